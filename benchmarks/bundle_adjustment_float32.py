"""The Schur solvers of bundle adjustment in float32 against float64.

On `io.synthetic_bal(10, 200, observations_per_point=4, seed=4)`, noise-free
and with 1 pixel of noise, from the same start (start perturbation 0.05):
'schur' and 'iterative_schur' in float64 and float32 (each one
`tf.function`, the factor graph's defaults, at most 50 iterations). Prints
the initial and final cost as the solve evaluated them, the final cost of
the solution evaluated in float64 (`io.bal_cost`), iterations and stop
reason.

    PYTHONPATH=. python benchmarks/bundle_adjustment_float32.py
"""

import numpy as np
import tensorflow as tf

from tfg_optim import factor_graph
from tfg_optim import io
from tfg_optim._engine import StopReason
from tfg_optim.examples import bundle_adjustment


def solve(start, dtype, linear_solver):
  @tf.function(autograph=False)
  def run(cameras, points):
    variables, terms = bundle_adjustment.factor_graph_problem(
        start, cameras, points)
    return factor_graph.least_squares(variables, terms,
                                      linear_solver=linear_solver,
                                      max_iterations=50)
  return run(tf.constant(start.cameras.astype(dtype)),
             tf.constant(start.points.astype(dtype)))


def main():
  print(f"{'noise':>5} {'dtype':>7} {'solver':<16} {'initial cost':>14} "
        f"{'final cost':>22} {'final (float64)':>22} {'iters':>5} stop")
  for noise in (0.0, 1.0):
    start, _ = io.synthetic_bal(10, 200, observations_per_point=4,
                                pixel_noise=noise, start_perturbation=0.05,
                                seed=4)
    for dtype in (np.float64, np.float32):
      for linear_solver in ("schur", "iterative_schur"):
        results = solve(start, dtype, linear_solver)
        cameras, points = (p.numpy().astype(np.float64)
                           for p in results.position)
        cost64 = float(io.bal_cost(cameras, points, start.camera_index,
                                   start.point_index, start.observations))
        print(f"{noise:>5} {np.dtype(dtype).name:>7} {linear_solver:<16} "
              f"{float(results.initial_cost):>14.6e} "
              f"{float(results.cost):>22.15e} {cost64:>22.15e} "
              f"{int(results.num_iterations):>5} "
              f"{StopReason(int(results.stop_reason)).name.lower()}",
              flush=True)


if __name__ == "__main__":
  main()
