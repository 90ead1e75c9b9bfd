"""Steady-state time of one `least_squares` solve (after tracing/compiling).

The curve fit of tests/problems.py (y = p0 exp(-p1 t) + p2 sin(3 p3 t),
m = 10,000, n = 4, float64, from `CURVE_FIT_START`, at most 30
iterations), in `tf.function` and with `jit_compile=True`, with the
default options and with Nielsen's damping without geodesic acceleration;
the median of 15 calls after two warm-up calls. To compare two trees, run
each tree's own copy one after the other, and repeat:

    cd OLD && PYTHONPATH=. python benchmarks/steady_state.py OLD
    cd NEW && PYTHONPATH=. python benchmarks/steady_state.py NEW
"""

import sys
import time

import numpy as np
import tensorflow as tf

sys.path.insert(0, ".")
from tests import problems  # pylint: disable=g-import-not-at-top
import tfg_optim  # pylint: disable=g-import-not-at-top

OPTIONS = {
    "default": {},
    "nielsen": dict(damping="nielsen", geodesic_acceleration=None),
}


def main():
  label = sys.argv[1] if len(sys.argv) > 1 else ""
  t, y = problems.curve_fit_data()
  residual = problems.curve_fit_residual(tf.constant(t), tf.constant(y))
  start = tf.constant(problems.CURVE_FIT_START)
  cells = []
  for name, options in OPTIONS.items():
    for jit_compile in (False, True):
      solve = tf.function(
          lambda x, options=options: tfg_optim.least_squares(
              residual, x, max_iterations=30, **options).cost,
          jit_compile=jit_compile, autograph=False)
      solve(start)
      solve(start)
      times = []
      for _ in range(15):
        begin = time.perf_counter()
        solve(start).numpy()
        times.append(time.perf_counter() - begin)
      mode = "xla" if jit_compile else "function"
      cells.append(f"{name}/{mode} {np.median(times) * 1e3:.2f} ms")
  print(label, " ".join(cells))


if __name__ == "__main__":
  main()
