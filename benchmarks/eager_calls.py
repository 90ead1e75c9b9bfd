"""Eager calls of least_squares: op by op against the cached compiled solve.

Two problems called eagerly, as people do while debugging: a 50-point
exponential fit (a few iterations) and Moré-Garbow-Hillstrom's Powell
singular function (n = 4, capped at 200 iterations: its Jacobian is
singular at the solution, so it converges slowly and ends at the cap). For each,
the time of `eager_compile=False` (every call op by op) and of the default
'auto' (first call op by op, second traces, later calls compiled; a first
call still running after `_eager.TRIAL_ITERATIONS` iterations is compiled
at once, so its second call is already compiled), side by side in one run.

    python benchmarks/eager_calls.py
"""

import numpy as np
import tensorflow as tf

import _harness
from tests import problems
import tfg_optim

PROBLEMS = {
    "curve fit (m=50, n=2)": (problems.exponential_residual, lambda: [
        tf.constant(1.0, tf.float64), tf.constant(0.0, tf.float64)]),
    "Powell singular (n=4, 200 it.)": (problems.powell_singular, lambda: (
        tf.constant(problems.POWELL_START, tf.float64))),
}


def timed(residual, start, calls, **options):
  """The times of `calls` eager calls (the first one included)."""
  def call():
    result = tfg_optim.least_squares(residual, start(), **options)
    float(result.cost)
    return int(result.num_iterations)
  timing = _harness.time_call(call, calls - 1)
  return [timing.first_call] + timing.times, timing.output


def main():
  _harness.parser(__doc__).parse_args()
  rows = []
  for name, (residual, start) in PROBLEMS.items():
    calls, options = 3, {}
    if "Powell" in name:
      calls, options = 1, dict(max_iterations=200)
    eager, iterations = timed(residual, start, calls, eager_compile=False,
                              **options)
    auto, _ = timed(residual, start, 4, **options)
    rows.append((name, iterations, f"{np.median(eager):.3f}",
                 f"{auto[0]:.3f}", f"{auto[1]:.3f}", f"{auto[2]:.4f}",
                 f"{auto[3]:.4f}",
                 f"{np.median(eager) / np.median(auto[2:]):.0f}"))
    print(f"  done: {name}", flush=True)
  _harness.print_table(
      ("problem", "iterations", "op by op, each call s", "auto: 1st",
       "2nd (trace*)", "3rd", "4th", "op by op / compiled"), rows)


if __name__ == "__main__":
  main()
