"""Fits y = p0 exp(-p1 t) + p2 sin(3 p3 t) to 10,000 noisy samples.

Run: python -m tfg_optim.examples.curve_fit
It solves the fit with `tfg_optim.levenberg_marquardt.minimize` inside a
`tf.function(jit_compile=True)` and prints the parameters found next to the
ones that generated the data.
"""

import time

import numpy as np
import tensorflow as tf

from tfg_optim import levenberg_marquardt


def make_data(num_points=10_000, noise=0.01, seed=0):
  rng = np.random.default_rng(seed)
  t = np.linspace(0.0, 4.0, num_points)
  true_parameters = np.array([2.0, 1.3, 0.5, 0.7])
  p = true_parameters
  y = p[0] * np.exp(-p[1] * t) + p[2] * np.sin(3.0 * p[3] * t)
  return t, y + noise * rng.standard_normal(num_points), true_parameters


def main():
  t, y, true_parameters = make_data()

  def residual(p):
    return p[0] * tf.exp(-p[1] * t) + p[2] * tf.sin(3.0 * p[3] * t) - y

  @tf.function(jit_compile=True)
  def fit(start):
    return levenberg_marquardt.minimize(residual, start, max_iterations=30)

  start = tf.constant([1.0, 1.0, 0.3, 0.6], tf.float64)
  fit(start)  # Compiles once.
  begin = time.perf_counter()
  objective, (parameters,) = fit(start)
  elapsed = time.perf_counter() - begin
  print("Curve fit y = p0 exp(-p1 t) + p2 sin(3 p3 t), m = 10,000 points")
  print(f"  start:        {start.numpy()}")
  print(f"  fitted:       {np.round(parameters.numpy(), 4)}")
  print(f"  true:         {true_parameters}")
  print(f"  objective:    {objective.numpy():.6g} (1/2 sum of squared "
        "residuals; noise sigma 0.01)")
  print(f"  time:         {elapsed * 1e3:.1f} ms for 30 iterations "
        "(XLA, after compilation)")


if __name__ == "__main__":
  main()
