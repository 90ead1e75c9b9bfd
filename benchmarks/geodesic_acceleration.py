"""What geodesic acceleration costs: least_squares with and without it.

Two problems, each solved by `tfg_optim.least_squares` with default options
(geodesic_acceleration=2.0) and with geodesic_acceleration=None, side by
side in one run, in tf.function and with jit_compile=True:

  curve fit   y = p0 exp(-p1 t) + p2 sin(3 p3 t), m = 10,000, n = 4 (the
              problem of benchmarks/tfg_curve_fit.py), from [1, 1, 0.3, 0.6].
  NIST        all 27 NIST StRD datasets, both starts as a batch of 2, timed
              together (one tf.function per dataset).

Reports the median time over repeats (after a warm-up call), iterations, and
the time ratio with / without. Run from the repository root:

    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/geodesic_acceleration.py
"""

import argparse
import numpy as np
import tensorflow as tf

import tfg_optim
from benchmarks import tfg_curve_fit
from tests import nist


def _curve_fit(acceleration, jit):
  t, y = tfg_curve_fit.make_data()
  t, y = tf.constant(t), tf.constant(y)
  residual = lambda p: p[0] * tf.exp(-p[1] * t) + p[2] * tf.sin(
      3.0 * p[3] * t) - y

  @tf.function(jit_compile=jit)
  def run(p0):
    result = tfg_optim.least_squares(residual, p0,
                                     geodesic_acceleration=acceleration)
    return result.num_iterations, result.cost

  start = tf.constant(tfg_curve_fit.START)
  return lambda: [v.numpy() for v in run(start)]


def _nist_suite(acceleration, jit):
  runs = []
  for name in nist.NAMES:
    dataset = nist.load(name)
    residual = nist.residual_fn(dataset)

    @tf.function(jit_compile=jit)
    def run(b0, residual=residual):
      result = tfg_optim.least_squares(residual, b0, batch_dims=1,
                                       geodesic_acceleration=acceleration)
      return result.num_iterations, result.cost

    runs.append((run, tf.constant(dataset.starts)))

  def solve():
    iterations = [run(b0)[0].numpy() for run, b0 in runs]
    return int(np.sum(iterations)), None
  return solve


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  print("| problem | mode | with: time | iterations | without: time | "
        "iterations | time ratio with / without |")
  print("|---|---|---|---|---|---|---|")
  for problem, make in (("curve fit m=10k n=4", _curve_fit),
                        ("NIST, 54 starts", _nist_suite)):
    for jit in (False, True):
      row = {}
      for acceleration in (2.0, None):
        repeats = args.repeats if problem.startswith("curve") else 1
        median, _, _, out = tfg_curve_fit.time_solve(make(acceleration, jit),
                                                     repeats)
        row[acceleration] = median, out
      (with_time, with_out), (without_time, without_out) = row[2.0], row[None]
      print(f"| {problem} | {'jit_compile' if jit else 'tf.function'} | "
            f"{with_time * 1e3:.1f} ms | {int(with_out[0])} | "
            f"{without_time * 1e3:.1f} ms | {int(without_out[0])} | "
            f"{with_time / without_time:.2f} |", flush=True)


if __name__ == "__main__":
  main()
