"""How far the default (Gauss-Newton) implicit derivative can be off at a
large-residual solution, and the checks that agree with each other.

The 2-D landmark graph of tests/test_sparse_cholesky.py with Euclidean rows:
relative-position terms between poses and range terms ||x_i[:2] - y_k|| -
s r_k with noisy ranges (cost 48 at the solution). L = sum of the squared
free pose coordinates at the solution; dL/ds at s = 1 by:

- factor_graph.least_squares, gradients='implicit' with
  implicit_hessian='gauss_newton' and 'exact' (with linear_solver=
  'cholesky', and 'exact' with 'cg' and 'sparse_cholesky' too), and
  gradients='unrolled';
- tfg_optim.least_squares on the same residuals, implicit_hessian=
  'gauss_newton' and 'exact';
- central differences of re-solves (h = 1e-5).

Run: PYTHONPATH=. python benchmarks/gauss_newton_gradient_error.py
"""

import numpy as np
import tensorflow as tf

import tfg_optim
from tests import test_factor_graph_implicit
from tests import test_sparse_cholesky
from tfg_optim import factor_graph

VALUES, POINTS, EDGES, MEASUREMENTS, SIGHTINGS, OBSERVATIONS = (
    test_sparse_cholesky._GRAPH)  # pylint: disable=protected-access
RANGES = np.linalg.norm(OBSERVATIONS, axis=-1, keepdims=True)
TIGHT = dict(function_tolerance=1e-15, gradient_tolerance=1e-15,
             parameter_tolerance=1e-15)


def _graph_solve(scale, gradients, hessian="gauss_newton",
                 linear_solver="cholesky"):
  variables, terms = test_factor_graph_implicit.landmark_problem(
      test_sparse_cholesky._GRAPH, scale)  # pylint: disable=protected-access
  result = factor_graph.least_squares(
      variables, terms, linear_solver=linear_solver, gradients=gradients,
      implicit_hessian=hessian, max_iterations=100, **TIGHT)
  return tf.reduce_sum(tf.square(result.position[0])), result.cost


def _flat_solve(scale, hessian):
  def residual(free, points):
    values = tf.concat([tf.constant(VALUES[:1]), free], 0)
    between = (tf.gather(values, EDGES[:, 1]) - tf.gather(values, EDGES[:, 0])
               - MEASUREMENTS)
    ranges = tf.norm(tf.gather(values, SIGHTINGS[:, 0])[:, :2] -
                     tf.gather(points, SIGHTINGS[:, 1]), axis=-1,
                     keepdims=True) - RANGES * scale
    return tf.concat([tf.reshape(between, [-1]), tf.reshape(ranges, [-1])], 0)
  result = tfg_optim.least_squares(
      residual, [tf.constant(VALUES[1:]), tf.constant(POINTS)],
      implicit_hessian=hessian, max_iterations=200, **TIGHT)
  return (tf.reduce_sum(tf.square(result.position[0])) +
          float(np.sum(VALUES[:1] ** 2)), result.cost)


def _derivative(solve, option):
  @tf.function(autograph=False)
  def run(scale):
    with tf.GradientTape() as tape:
      tape.watch(scale)
      loss, cost = solve(scale, option)
    return tape.gradient(loss, scale), cost
  return run(tf.constant(1.0, tf.float64))


def main():
  def graph(linear_solver):
    return lambda scale, hessian: _graph_solve(scale, "implicit", hessian,
                                               linear_solver)
  rows = [("factor_graph, implicit gauss_newton", graph("cholesky"),
           "gauss_newton"),
          ("factor_graph, implicit exact (cholesky)", graph("cholesky"),
           "exact"),
          ("factor_graph, implicit exact (cg)", graph("cg"), "exact"),
          ("factor_graph, implicit exact (sparse_cholesky)",
           graph("sparse_cholesky"), "exact"),
          ("factor_graph, unrolled", _graph_solve, "unrolled"),
          ("least_squares, implicit gauss_newton", _flat_solve,
           "gauss_newton"),
          ("least_squares, implicit exact", _flat_solve, "exact")]
  print("| derivative | dL/ds | cost at the solution |")
  print("|---|---|---|")
  for label, solve, option in rows:
    value, cost = _derivative(solve, option)
    print(f"| {label} | {float(value):.6g} | {float(cost):.6g} |")
  h = 1e-5
  solve = tf.function(lambda s: _graph_solve(s, "none"), autograph=False)
  plus, _ = solve(tf.constant(1.0 + h, tf.float64))
  minus, _ = solve(tf.constant(1.0 - h, tf.float64))
  print(f"| central differences of re-solves, h = {h:g} | "
        f"{float((plus - minus) / (2 * h)):.6g} | |")


if __name__ == "__main__":
  main()
