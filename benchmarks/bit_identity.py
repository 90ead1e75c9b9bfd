"""Hashes of solver outputs, to check that a refactor left the numbers bit
for bit unchanged.

    PYTHONPATH=<old tree> python benchmarks/bit_identity.py > old.txt
    PYTHONPATH=<new tree> python benchmarks/bit_identity.py > new.txt
    diff old.txt new.txt && echo IDENTICAL

70 solves: curve fit and Rosenbrock under every damping with and without
geodesic acceleration, bounds, a Cauchy loss, a batch, an underdetermined
problem (m < n), NIST BoxBOD from start 1 without acceleration (a step is
refused for a vanishing Jacobian column), per-iteration records with a
callback, the matrix-free solver (linear_solver='cg') and chunked data,
eagerly (op by op: `eager_compile=False`) and in `tf.function`; the curve fit and Rosenbrock under XLA; a
small factor graph with every linear solver of
`factor_graph.least_squares` (Nielsen's damping; 'cg' also with the trust
region: Steihaug), eagerly and in `tf.function`; plus a Riemannian
rotation fit (also in `tf.function` and XLA), L-BFGS and BFGS
(`lbfgs_cases`) eagerly, in `tf.function` and XLA, and a curve fit, the
rotation and the L-BFGS cases in a TF1 `Session`; and TensorFlow Graphics'
`minimize` (with a callback). Each line is a case, the first 10 hex digits of the SHA-1 of its
outputs' bytes (position, cost, iterations, stop reason; records where
kept) and those of its counters (accepted, rejected, residual and Jacobian
evaluations). (The engine's linearization refactor, the chunked-data change
and the loop's split into stage modules were checked with it.)
"""

import hashlib

import numpy as np
import tensorflow as tf

import tfg_optim
from tfg_optim import factor_graph
from tfg_optim import levenberg_marquardt
from tfg_optim import manifolds

_T = np.linspace(0.0, 1.0, 50)
_Y = 2.0 * np.exp(-1.3 * _T) + 0.01 * np.sin(40.0 * _T)


def curve(a, b):
  return a * tf.exp(b * _T) - _Y


def rosenbrock(x):
  return tf.stack([10.0 * (x[..., 1] - x[..., 0] ** 2), 1.0 - x[..., 0]], -1)


def wide(x):  # m = 2 < n = 3
  return tf.stack([tf.reduce_sum(x ** 2) - 1.0, x[0] - x[2]])


# NIST BoxBOD (tests/data), model b1 (1 - exp(-b2 x)), start 1: (1, 1).
_BOXBOD_X = np.array([1.0, 2.0, 3.0, 5.0, 7.0, 10.0])
_BOXBOD_Y = np.array([109.0, 149.0, 149.0, 191.0, 213.0, 224.0])


def boxbod(b):
  return b[0] * (1.0 - tf.exp(-b[1] * _BOXBOD_X)) - _BOXBOD_Y


def chunked_curve(a, b, t, y):
  return a * tf.exp(b * t) - y


def finite_cost(iteration, cost, position):  # a callback that returns an op
  del iteration, position
  return tf.debugging.assert_all_finite(cost, "cost")


def _f64(*values):
  return [tf.constant(v, tf.float64) for v in values]


def cases():
  for damping in ("trust_region", "nielsen", "tfg", "manopt"):
    for acceleration in (2.0, None):
      yield "curve", damping, acceleration, {}
      yield "rosen", damping, acceleration, {}
  yield "rosen", "trust_region", 2.0, {"bounds": (-1.5, 1.8)}
  yield "rosen", "nielsen", 2.0, {"loss": "cauchy"}
  yield "batch", "trust_region", 2.0, {"batch_dims": 1}
  yield "wide", "nielsen", None, {}
  # Records (every iteration's cost, gradient norm, step and damping) tell
  # apart solves that end on the same floating-point fixed point.
  yield "boxbod", "trust_region", None, {"record": True}
  yield "curve", "nielsen", 2.0, {"record": True, "callback": finite_cost}
  yield "curve", "trust_region", 2.0, {"linear_solver": "cg", "record": True}
  yield "curve", "nielsen", 2.0, {"linear_solver": "cg", "record": True}
  yield "rosen", "trust_region", 2.0, {"record": 5, "bounds": (-1.5, 1.8)}
  yield "chunked", "trust_region", None, {"data_chunk_size": 17,
                                          "record": True}
  yield "chunked", "nielsen", None, {"data_chunk_size": 17}


def xla_cases():
  yield "curve", "trust_region", 2.0, {"record": True}
  yield "rosen", "nielsen", 2.0, {"record": True}


def solve(name, damping, acceleration, options):
  # eager_compile=False: the eager rows run op by op (under 'auto', a first
  # call past 10 iterations runs the compiled solve).
  options = dict(options, damping=damping,
                 geodesic_acceleration=acceleration, eager_compile=False)
  if name == "curve":
    result = tfg_optim.least_squares(curve, _f64(1.0, 0.0), **options)
  elif name == "rosen":
    result = tfg_optim.least_squares(
        rosenbrock, tf.constant([-1.2, 1.0], tf.float64), **options)
  elif name == "boxbod":
    result = tfg_optim.least_squares(
        boxbod, tf.constant([1.0, 1.0], tf.float64), **options)
  elif name == "chunked":
    result = tfg_optim.least_squares(
        chunked_curve, _f64(1.0, 0.0), data=_f64(_T, _Y), **options)
  elif name == "batch":
    result = tfg_optim.least_squares(
        rosenbrock, tf.constant([[-1.2, 1.0], [2.0, 2.0], [0.5, -1.0]],
                                tf.float64), **options)
  else:
    result = tfg_optim.least_squares(
        wide, tf.constant([1.0, 2.0, 3.0], tf.float64), **options)
  values = tf.nest.flatten(result.position) + [
      result.cost, result.num_iterations, result.stop_reason] + [
          result.records[key] for key in _RECORDS if key in result.records]
  counters = [result.num_accepted, result.num_rejected,
              result.num_residual_evaluations,
              result.num_jacobian_evaluations]
  return values, counters


# The records hashed: those every tree has (newer trees record more).
_RECORDS = ("cost", "damping", "gradient_norm", "step_size")


# A small factor graph (two tables, each term reading one row of each, row
# 0 of `a` held): f_k = exp(0.3 (a_i - b_j)) - y_k, for every linear solver
# of `factor_graph.least_squares`.
_PAIRS = np.array([(0, 0), (0, 1), (1, 1), (1, 2), (2, 2), (2, 3), (0, 3),
                   (1, 0), (2, 1)])
_GRAPH_Y = np.random.default_rng(3).normal(size=(len(_PAIRS), 2)) * 0.2 + 1.0


def graph_cases():
  for solver in ("cholesky", "cg", "sparse_cholesky", "schur",
                 "iterative_schur"):
    yield solver, "nielsen"
  yield "cg", "trust_region"


def graph_solve(solver, damping):
  a = factor_graph.Variables(tf.zeros([3, 2], tf.float64),
                                       fixed=[0], name="a")
  b = factor_graph.Variables(
      tf.constant(np.linspace(-0.5, 0.5, 8).reshape(4, 2)), name="b")
  term = factor_graph.Term(
      lambda x, z, y: tf.exp(0.3 * (x - z)) - y,
      [(a, _PAIRS[:, 0]), (b, _PAIRS[:, 1])], data=[tf.constant(_GRAPH_Y)])
  result = factor_graph.least_squares(
      [a, b], [term], linear_solver=solver, damping=damping, record=True,
      gradients="none")
  values = tf.nest.flatten(result.position) + [
      result.cost, result.num_iterations, result.stop_reason] + [
          result.records[key] for key in _RECORDS]
  counters = [result.num_accepted, result.num_rejected,
              result.num_residual_evaluations,
              result.num_jacobian_evaluations]
  return values, counters


def riemannian_solve(points, target):
  """The rotation fit of `main` (NumPy `points`, `target`), with its cost
  and iterations."""
  points, target = tf.constant(points), tf.constant(target)
  result = tfg_optim.riemannian.levenberg_marquardt(
      manifolds.SpecialOrthogonal(3),
      lambda r: tf.reshape(tf.matmul(r, points) - target, [-1]),
      tf.eye(3, dtype=tf.float64), return_state=True, eager_compile=False)
  return [result.position, result.cost, result.num_iterations]


def lbfgs_cases():
  yield "lbfgs", "float64", 0
  yield "bfgs", "float64", 0
  yield "lbfgs", "float32", 1


def lbfgs_solve(method, dtype, batch_dims):
  """L-BFGS or BFGS on the curve fit's 1/2 ||r||^2 (a batch of two starts
  with batch_dims=1)."""
  start = [[1.0, 0.0], [2.0, -2.0]] if batch_dims else [1.0, 0.0]
  t, y = tf.constant(_T, dtype), tf.constant(_Y, dtype)

  def objective(x):
    r = x[..., :1] * tf.exp(x[..., 1:] * t) - y
    return 0.5 * tf.reduce_sum(tf.square(r), axis=-1)
  minimize = (tfg_optim.lbfgs.minimize_lbfgs if method == "lbfgs" else
              tfg_optim.lbfgs.minimize_bfgs)
  result = minimize(objective, tf.constant(start, dtype), dtype=dtype,
                    batch_dims=batch_dims, return_results=True,
                    eager_compile=False)
  return [result.position, result.objective_value, result.num_iterations,
          result.num_func_calls, result.stop_reason]


def digest(values):
  return hashlib.sha1(b"".join(
      np.asarray(v).tobytes() for v in values)).hexdigest()[:10]


def main():
  lines = []
  for mode in ("eager", "function", "xla"):
    for name, damping, acceleration, options in (
        xla_cases() if mode == "xla" else cases()):
      run = lambda: solve(name, damping, acceleration, options)
      if mode != "eager":
        run = tf.function(run, jit_compile=mode == "xla")
      values, counters = run()
      described = {key: getattr(value, "__name__", value)
                   for key, value in options.items()}
      lines.append(f"{mode} {name} {damping} {acceleration} {described} "
                   f"{digest(values)} {digest(counters)}")
  for mode in ("eager", "function"):
    for solver, damping in graph_cases():
      run = lambda: graph_solve(solver, damping)
      if mode != "eager":
        run = tf.function(run)
      values, counters = run()
      lines.append(f"{mode} graph {solver} {damping} {digest(values)} "
                   f"{digest(counters)}")
  points = tf.constant(np.eye(3) * [1.0, 2.0, 3.0])
  target = tf.constant(np.diag([1.0, 2.0, 3.0])[::-1].copy())
  rotation = tfg_optim.riemannian.levenberg_marquardt(
      manifolds.SpecialOrthogonal(3),
      lambda r: tf.reshape(tf.matmul(r, points) - target, [-1]),
      tf.eye(3, dtype=tf.float64), eager_compile=False)
  lines.append(f"riemannian {digest([rotation])}")
  points, target = points.numpy(), target.numpy()
  for mode in ("function", "xla"):
    run = tf.function(lambda: riemannian_solve(points, target),
                      jit_compile=mode == "xla")
    lines.append(f"{mode} riemannian {digest(run())}")
  for mode in ("eager", "function", "xla"):
    for case in lbfgs_cases():
      run = lambda: lbfgs_solve(*case)
      if mode != "eager":
        run = tf.function(run, jit_compile=mode == "xla")
      lines.append(f"{mode} lbfgs {case} {digest(run())}")
  # A TF1 Session graph.
  with tf.Graph().as_default():
    fetches = [solve("curve", "trust_region", 2.0, {"record": True}),
               riemannian_solve(points, target)] + [
                   lbfgs_solve(*case) for case in lbfgs_cases()]
    with tf.compat.v1.Session() as session:
      fetched = session.run(fetches)
  lines.append(f"session curve {digest(fetched[0][0])} "
               f"{digest(fetched[0][1])}")
  lines.append(f"session riemannian {digest(fetched[1])}")
  for case, values in zip(lbfgs_cases(), fetched[2:]):
    lines.append(f"session lbfgs {case} {digest(values)}")
  reference = levenberg_marquardt.minimize(curve, _f64(1.0, 0.0), 20,
                                          callback=finite_cost)
  lines.append(f"tfg {digest(tf.nest.flatten(reference))}")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
