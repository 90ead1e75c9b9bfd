"""What geodesic acceleration costs: least_squares with and without it.

Two problems, each solved by `tfg_optim.least_squares` with default options
(geodesic_acceleration=2.0) and with geodesic_acceleration=None, side by
side in one run, in tf.function and with jit_compile=True:

  curve fit   y = p0 exp(-p1 t) + p2 sin(3 p3 t), m = 10,000, n = 4 (the
              problem of benchmarks/tfg_curve_fit.py), from [1, 1, 0.3, 0.6].
  NIST        all 27 NIST StRD datasets, both starts as a batch of 2, timed
              together (one tf.function per dataset).

Reports the median time over repeats (after a warm-up call; with and without
interleaved in rounds, benchmarks/_harness.py), iterations, and the time
ratio with / without. Run from the repository root:

    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/geodesic_acceleration.py
"""

import numpy as np
import tensorflow as tf

import _harness
from tests import nist
from tests import problems
import tfg_optim


def _curve_fit(acceleration, jit):
  t, y = problems.curve_fit_data()
  residual = problems.curve_fit_residual(tf.constant(t), tf.constant(y))

  @tf.function(jit_compile=jit)
  def run(p0):
    result = tfg_optim.least_squares(residual, p0,
                                     geodesic_acceleration=acceleration)
    return result.num_iterations, result.cost

  start = tf.constant(problems.CURVE_FIT_START)
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
  parser = _harness.parser(__doc__, repeats=5)
  args = parser.parse_args()
  rows = []
  for problem, make in (("curve fit m=10k n=4", _curve_fit),
                        ("NIST, 54 starts", _nist_suite)):
    for jit in (False, True):
      # With and without, side by side in interleaved rounds.
      repeats = args.repeats if problem.startswith("curve") else 1
      timings = _harness.interleave(
          {acceleration: make(acceleration, jit) for acceleration in
           (2.0, None)}, repeats)
      with_, without = timings[2.0], timings[None]
      rows.append((problem, "jit_compile" if jit else "tf.function",
                   f"{with_.seconds * 1e3:.1f} ms", int(with_.output[0]),
                   f"{without.seconds * 1e3:.1f} ms",
                   int(without.output[0]),
                   f"{with_.seconds / without.seconds:.2f}"))
      print("  done: " + " | ".join(str(cell) for cell in rows[-1]),
            flush=True)
  _harness.print_table(
      ("problem", "mode", "with: time", "iterations", "without: time",
       "iterations", "time ratio with / without"), rows)


if __name__ == "__main__":
  main()
