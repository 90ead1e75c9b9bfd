"""Time per iteration of least_squares' damping policies as n grows.

The trust region (the default) solves each step through an n x n
eigendecomposition; Nielsen's damping through a Cholesky factorization.
Problem: r(x) = A tanh(x) - b with A a fixed random [2n, n] matrix (seed 0),
from x = 0, float64, exactly 20 iterations (all tolerances 0), geodesic
acceleration off so that only the damping differs; both policies are timed
side by side in one run, in tf.function and with jit_compile=True (median of
3 solves after a warm-up). Run from the repository root:

    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/damping_cost.py
"""

import numpy as np
import tensorflow as tf

import tfg_optim
from benchmarks import tfg_curve_fit

ITERATIONS = 20


def _solver(n, damping, jit):
  rng = np.random.default_rng(0)
  matrix = tf.constant(rng.standard_normal((2 * n, n)) / np.sqrt(n))
  target = tf.constant(rng.standard_normal(2 * n))
  residual = lambda x: tf.linalg.matvec(matrix, tf.tanh(x)) - target

  @tf.function(jit_compile=jit)
  def run(x0):
    result = tfg_optim.least_squares(
        residual, x0, damping=damping, max_iterations=ITERATIONS,
        function_tolerance=0.0, gradient_tolerance=0.0,
        parameter_tolerance=0.0, geodesic_acceleration=None)
    return result.num_iterations

  start = tf.zeros(n, tf.float64)
  return lambda: int(run(start))


def main():
  print("| n | mode | trust_region ms/iteration | nielsen ms/iteration | "
        "ratio |")
  print("|---|---|---|---|---|")
  for n in (10, 100, 400):
    for jit in (False, True):
      per_iteration = {}
      for damping in ("trust_region", "nielsen"):
        median, _, _, iterations = tfg_curve_fit.time_solve(
            _solver(n, damping, jit), 3)
        per_iteration[damping] = median / iterations * 1e3
      print(f"| {n} | {'jit_compile' if jit else 'tf.function'} | "
            f"{per_iteration['trust_region']:.2f} | "
            f"{per_iteration['nielsen']:.2f} | "
            f"{per_iteration['trust_region'] / per_iteration['nielsen']:.2f} |",
            flush=True)


if __name__ == "__main__":
  main()
