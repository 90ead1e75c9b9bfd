"""Implicit gradients through the Schur solvers of bundle adjustment.

On `io.synthetic_bal(4, 20, observations_per_point=3, seed=5)` (1 pixel of
noise, start perturbation 0.02), eagerly: the solve with 'schur' and with
'iterative_schur' (the factor graph's default gradients='implicit'), then
the gradient of sum(residual * z) (z fixed Gaussian weights: the final
residuals are invariant under the gauge, unlike the tables) with respect
to the observations. Prints each solver's final cost, iterations and
gradient norm, and the two gradients' relative difference.

    PYTHONPATH=. python benchmarks/bundle_adjustment_gradients.py
"""

import numpy as np
import tensorflow as tf

from tfg_optim import factor_graph
from tfg_optim import io
from tfg_optim.examples import bundle_adjustment


def main():
  start, _ = io.synthetic_bal(4, 20, observations_per_point=3,
                              pixel_noise=1.0, start_perturbation=0.02,
                              seed=5)
  observations = tf.Variable(start.observations)
  gradients = {}
  for linear_solver in ("schur", "iterative_schur"):
    with tf.GradientTape() as tape:
      cameras = factor_graph.Variables(tf.constant(start.cameras),
                                       name="cameras")
      points = factor_graph.Variables(tf.constant(start.points),
                                      name="points")
      term = factor_graph.Term(
          bundle_adjustment.reprojection_error,
          [(cameras, start.camera_index), (points, start.point_index)],
          data=[observations])
      results = factor_graph.least_squares([cameras, points], [term],
                                           linear_solver=linear_solver,
                                           max_iterations=100)
      weights = np.random.default_rng(0).normal(size=results.residual.shape)
      target = tf.reduce_sum(results.residual * weights)
    gradients[linear_solver] = tape.gradient(target, observations).numpy()
    print(f"{linear_solver:<16} final cost {float(results.cost):.15e} "
          f"iterations {int(results.num_iterations)} gradient norm "
          f"{np.linalg.norm(gradients[linear_solver]):.6e}")
  difference = np.linalg.norm(gradients["schur"] -
                              gradients["iterative_schur"])
  print(f"relative difference {difference / np.linalg.norm(gradients['schur']):.3e}")


if __name__ == "__main__":
  main()
