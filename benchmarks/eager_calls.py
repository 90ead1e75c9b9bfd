"""Eager calls of least_squares: op by op against the cached compiled solve.

Two problems called eagerly, as people do while debugging: a 50-point
exponential fit (a few iterations) and Moré-Garbow-Hillstrom's Powell
singular function (n = 4, capped at 200 iterations: its Jacobian is
singular at the solution, so it converges slowly and ends at the cap). For each,
the time of `eager_compile=False` (every call op by op) and of the default
'auto' (first call op by op, second traces, later calls compiled), side by
side in one run.

    python benchmarks/eager_calls.py
"""

import time

import numpy as np
import tensorflow as tf

import tfg_optim

_T = np.linspace(0.0, 1.0, 50)
_Y = 2.0 * np.exp(-1.3 * _T) + 0.01 * np.sin(40.0 * _T)


def curve_fit(a, b):
  return a * tf.exp(b * _T) - _Y


def powell(x):
  return tf.stack([x[0] + 10.0 * x[1], np.sqrt(5.0) * (x[2] - x[3]),
                   (x[1] - 2.0 * x[2]) ** 2,
                   np.sqrt(10.0) * (x[0] - x[3]) ** 2])


PROBLEMS = {
    "curve fit (m=50, n=2)": (curve_fit, lambda: [
        tf.constant(1.0, tf.float64), tf.constant(0.0, tf.float64)]),
    "Powell singular (n=4, 200 it.)": (powell, lambda: tf.constant(
        [3.0, -1.0, 0.0, 1.0], tf.float64)),
}


def timed(residual, start, calls, **options):
  times = []
  for _ in range(calls):
    begin = time.perf_counter()
    result = tfg_optim.least_squares(residual, start(), **options)
    float(result.cost)
    times.append(time.perf_counter() - begin)
  return times, int(result.num_iterations)


def main():
  print("| problem | iterations | op by op, each call s | auto: 1st | 2nd "
        "(trace) | 3rd | 4th | op by op / compiled |")
  print("|---|---|---|---|---|---|---|---|")
  for name, (residual, start) in PROBLEMS.items():
    calls, options = 3, {}
    if "Powell" in name:
      calls, options = 1, dict(max_iterations=200)
    eager, iterations = timed(residual, start, calls, eager_compile=False,
                              **options)
    auto, _ = timed(residual, start, 4, **options)
    print(f"| {name} | {iterations} | {np.median(eager):.3f} | "
          f"{auto[0]:.3f} | {auto[1]:.3f} | {auto[2]:.4f} | {auto[3]:.4f} | "
          f"{np.median(eager) / np.median(auto[2:]):.0f} |", flush=True)


if __name__ == "__main__":
  main()
