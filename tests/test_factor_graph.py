"""Factor graphs (`tfg_optim.factor_graph`) and their block-sparse
linearization (`tfg_optim._block_sparse`).

The block products are checked against the dense Jacobian of the same
residual map by central differences over the whole tangent vector (no
blocks); the solves against the truth of noise-free problems (every mode)
and against scipy's MINPACK on a noisy pose graph.
"""

import functools

import numpy as np
import pytest
import tensorflow as tf

from tests import modes
from tfg_optim import _engine
from tfg_optim import factor_graph
from tfg_optim.manifolds import lie_groups


# -- a random two-table, two-term problem with a held row ----------------------


def _random_problem(dtype=tf.float64, seed=0):
  """Points [5, 2] (row 0 held) and SE(2) poses [4, 3]; term 'seen': a point
  in a pose's frame minus a measurement (cauchy loss), term 'distance':
  squared distances of point pairs minus data (two slots on one table)."""
  rng = np.random.default_rng(seed)
  points = factor_graph.Variables(tf.constant(rng.normal(size=(5, 2)), dtype),
                                  fixed=[0], name="points")
  poses = factor_graph.Variables(
      tf.constant(lie_groups.SE2().random_point([4], seed=seed), dtype),
      manifold=lie_groups.SE2(), name="poses")

  def seen(point, pose, measurement):
    return lie_groups.transform(lie_groups.inverse(pose), point) - measurement

  def distance(a, b, target):
    return tf.reduce_sum(tf.square(a - b), -1, keepdims=True) - target

  seen_term = factor_graph.Term(
      seen, [(points, [0, 1, 2, 3, 4, 1]), (poses, [0, 1, 2, 3, 0, 3])],
      data=[rng.normal(size=(6, 2))], loss="cauchy", loss_scale=0.5,
      name="seen")
  distance_term = factor_graph.Term(
      distance, [(points, [0, 1, 2, 3]), (points, [1, 2, 3, 4])],
      data=[rng.uniform(size=(4, 1))], name="distance")
  return [points, poses], [seen_term, distance_term]


def _dense_reference(variables, terms):
  """(layout, linearization, J): J by central differences of the residual
  map s -> F(R_X(s)) over the whole tangent vector (no blocks), with the
  held rows' columns zeroed."""
  layout, _ = factor_graph._layout(variables, terms)  # pylint: disable=protected-access
  point = tuple(v.values for v in variables)
  n, h = layout.tangent_dim, 1e-6
  columns = []
  for j in range(n):
    step = h * np.eye(n)[j]
    columns.append((layout.residual(layout.retract(point, step)) -
                    layout.residual(layout.retract(point, -step))) / (2 * h))
  jacobian = np.stack(columns, axis=-1)
  free = np.concatenate([
      np.repeat(np.ones(v.size) if v.free is None else v.free,
                v.manifold.dim) for v in variables])
  kind = factor_graph._block_sparse.BlockSparseKind(layout, dense=False)  # pylint: disable=protected-access
  return layout, kind.at(point, None), jacobian * free


def test_block_products_equal_the_dense_jacobians():
  variables, terms = _random_problem()
  layout, linearization, jacobian = _dense_reference(variables, terms)
  m, n = jacobian.shape
  assert (m, n) == (6 * 2 + 4, 5 * 2 + 4 * 3)
  assert np.all(jacobian[:, :2] == 0)  # the held row
  rng = np.random.default_rng(1)
  v, u = rng.normal(size=n), rng.normal(size=m)
  # Central differences: errors of about h^2 = 1e-12 relative, plus
  # rounding of eps / h = 1e-10.
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-7,
                                                  atol=1e-7)
  close(linearization.matvec(tf.constant(v)), jacobian @ v)
  close(linearization.rmatvec(tf.constant(u)), jacobian.T @ u)
  close(linearization.curvature(tf.constant(v)), np.sum((jacobian @ v) ** 2))
  gram = jacobian.T @ jacobian
  close(linearization.column_norms(), np.diag(gram))
  close(linearization.gram(), gram)
  blocks = linearization.block_diagonal()
  for table, block in zip(layout.tables, blocks):
    for row in range(table.size):
      at = table.offset + row * table.dim
      close(block[row], gram[at:at + table.dim, at:at + table.dim])
  # Block-Jacobi: solves with the damped diagonal blocks (a held row's zero
  # block is the identity there).
  damping = rng.uniform(0.5, 1.0, size=n)
  reference = np.zeros((n, n))
  for table in layout.tables:
    for row in range(table.size):
      at = slice(table.offset + row * table.dim,
                 table.offset + (row + 1) * table.dim)
      reference[at, at] = gram[at, at]
  diagonal = np.diag(reference).copy()
  reference[np.diag_indices(n)] = np.where(diagonal > 0, diagonal, 1.0)
  reference += np.diag(damping)
  preconditioner = linearization.preconditioner(tf.constant(damping))
  np.testing.assert_allclose(preconditioner.solve(tf.constant(v)),
                             np.linalg.solve(reference, v), rtol=1e-6)
  np.testing.assert_allclose(preconditioner.multiply(tf.constant(v)),
                             reference @ v, rtol=1e-6)
  free = np.ones(n)
  free[[3, 11]] = 0.0
  close(linearization.hold_fixed(tf.constant(free)).matvec(tf.constant(v)),
        (jacobian * free) @ v)
  assert not linearization.is_zero()


# -- pose graphs -----------------------------------------------------------------


def _loop(count=8, noise=0.0, seed=0):
  """A 2-D loop of `count` poses with two chords: (truth, start, edges,
  measurements); measurements exact when noise is 0."""
  rng = np.random.default_rng(seed)
  angle = np.linspace(0.0, 2.0 * np.pi, count, endpoint=False)
  truth = np.stack([5.0 * np.cos(angle), 5.0 * np.sin(angle),
                    np.asarray(lie_groups.wrap_angle(angle + np.pi / 2))], -1)
  edges = np.array([(i, (i + 1) % count) for i in range(count)] +
                   [(0, count // 2), (2, 2 + count // 2)])
  measurements = np.asarray(lie_groups.SE2().retract(
      lie_groups.between(truth[edges[:, 0]], truth[edges[:, 1]]),
      noise * rng.normal(size=(len(edges), 3))))
  start = np.array(lie_groups.SE2().retract(
      truth, 0.2 * rng.normal(size=truth.shape)))
  start[0] = truth[0]
  return truth, start, edges, measurements


def _between_error(first, second, measurement):
  return lie_groups.log(lie_groups.between(
      measurement, lie_groups.between(first, second)))


def _solve_loop(start, edges, measurements, linear_solver, **options):
  poses = factor_graph.Variables(start, manifold=lie_groups.SE2(), fixed=[0],
                                 name="poses")
  term = factor_graph.Term(_between_error,
                           [(poses, edges[:, 0]), (poses, edges[:, 1])],
                           data=[tf.cast(measurements, start.dtype)],
                           name="between")
  return factor_graph.least_squares([poses], [term],
                                    linear_solver=linear_solver, **options)


def _se2_error(first, second, measurement):
  """Log(Z^-1 X_i^-1 X_j) in NumPy (translation first)."""
  def between(a, b):
    c, s = np.cos(a[:, 2]), np.sin(a[:, 2])
    dx, dy = b[:, 0] - a[:, 0], b[:, 1] - a[:, 1]
    angle = np.arctan2(np.sin(b[:, 2] - a[:, 2]), np.cos(b[:, 2] - a[:, 2]))
    return np.stack([c * dx + s * dy, -s * dx + c * dy, angle], -1)
  e = between(measurement, between(first, second))
  theta = e[:, 2]
  small = np.abs(theta) < 1e-8
  safe = np.where(small, 1.0, theta)
  a = np.where(small, 1.0, np.sin(safe) / safe)  # V = [[a, -b], [b, a]]
  b = np.where(small, theta / 2, (1.0 - np.cos(safe)) / safe)
  det = a * a + b * b
  return np.stack([(a * e[:, 0] + b * e[:, 1]) / det,
                   (-b * e[:, 0] + a * e[:, 1]) / det, theta], -1)


def _pose_difference(a, b):
  return float(np.max(np.abs(np.asarray(lie_groups.log(
      lie_groups.between(a, b))))))


def _ranges(dtype):
  """Range-only localization, noise-free: anchors [3, 2] (all held) and
  points [4, 2], one range per anchor-point pair. Returns (truth, start,
  build(start) -> results)."""
  rng = np.random.default_rng(5)
  anchors = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
  truth = rng.uniform(0.5, 3.5, size=(4, 2))
  start = truth + 0.3 * rng.normal(size=truth.shape)
  a, p = np.meshgrid(np.arange(3), np.arange(4), indexing="ij")
  a, p = a.ravel(), p.ravel()
  ranges = np.linalg.norm(anchors[a] - truth[p], axis=-1, keepdims=True)

  def distance(x, y, target):
    return tf.norm(x - y, axis=-1, keepdims=True) - target

  def build(start, linear_solver="cg"):
    anchor_table = factor_graph.Variables(tf.constant(anchors, dtype),
                                          fixed=[0, 1, 2], name="anchors")
    points = factor_graph.Variables(start, name="points")
    term = factor_graph.Term(distance, [(anchor_table, a), (points, p)],
                             data=[ranges])
    return factor_graph.least_squares([anchor_table, points], [term],
                                      linear_solver=linear_solver)
  return truth, start.astype(dtype), build


@pytest.mark.parametrize("mode, dtype", [
    ("eager", np.float64), ("function", np.float64),
    ("session", np.float32), ("xla", np.float64)])
def test_every_mode_recovers_noise_free_ranges(mode, dtype):
  """Block-Jacobi conjugate gradients (the XLA path) in every mode."""
  truth, start, build = _ranges(dtype)

  def solve(start):
    results = build(start)
    return (results.position, results.cost, results.stop_reason,
            results.converged)

  (anchors, points), cost, reason, converged = modes.run(solve, [start],
                                                         mode)
  assert converged, _engine.StopReason(int(reason))
  assert anchors.dtype == dtype
  np.testing.assert_array_equal(anchors[1], [4.0, 0.0])  # held
  tolerance = 1e-9 if dtype == np.float64 else 1e-4
  np.testing.assert_allclose(points, truth, atol=tolerance)
  assert cost < (1e-20 if dtype == np.float64 else 1e-9)


@functools.lru_cache(maxsize=None)
def _noisy_loop_minimum(count, noise, seed):
  """(start, edges, measurements, minimum cost, minimizer [count - 1, 3]) of
  a noisy `_loop` by scipy's MINPACK LM on the same cost in (x, y, theta)
  coordinates (NumPy residuals, finite-difference Jacobian)."""
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  _, start, edges, measurements = _loop(count=count, noise=noise, seed=seed)

  def residuals(free):
    poses = np.concatenate([start[:1], free.reshape(-1, 3)])
    return _se2_error(poses[edges[:, 0]], poses[edges[:, 1]],
                      measurements).ravel()

  reference = optimize.least_squares(residuals, start[1:].ravel(),
                                     method="lm", xtol=1e-15, ftol=1e-15,
                                     gtol=1e-15)
  return (start, edges, measurements, 0.5 * np.sum(reference.fun ** 2),
          reference.x.reshape(-1, 3))


def test_noisy_pose_loop_reaches_the_reference_minimum():
  """SE(2) poses, the first held, noisy measurements: the Cholesky of the
  block-assembled J^T J (eagerly) ends where scipy's MINPACK LM does on the
  same cost in (x, y, theta) coordinates (NumPy residuals, finite-difference
  Jacobian), at a cost well above zero."""
  start, edges, measurements, reference_cost, reference = (
      _noisy_loop_minimum(count=6, noise=0.05, seed=3))
  assert reference_cost > 1e-4
  sparse = _solve_loop(tf.constant(start), edges, measurements, "cholesky")
  assert sparse.converged
  np.testing.assert_array_equal(sparse.position[0][0], start[0])  # held
  np.testing.assert_allclose(sparse.cost, reference_cost, rtol=1e-10)
  assert _pose_difference(sparse.position[0][1:], reference) < 1e-6


class _Columns:
  """A linearization seen only through its squared column norms."""

  def __init__(self, norms):
    self.norms = tf.constant(norms, tf.float64)

  def column_norms(self):
    return self.norms


def test_default_damping_scales_by_the_current_clamped_diagonal():
  """D is diag(J^T J) of the latest linearization clamped to [1e-6, 1e32]
  (it falls when the curvature does, unlike Marquardt's running maximum,
  which 'nielsen' keeps), and lambda starts at 1e-10."""
  policy = factor_graph.default_damping()
  state = policy.initial(tf.float64, [], _Columns([0.0, 4.0, 1e40]))
  np.testing.assert_array_equal(state.scale, [1e-6, 4.0, 1e32])
  assert float(state.lam) == 1e-10
  state = policy.observe_linearization(state, _Columns([2.0, 1e-9, 3.0]))
  np.testing.assert_array_equal(state.scale, [2.0, 1e-6, 3.0])
  running = factor_graph.nonlinear_least_squares.damping_policy("nielsen")
  state = running.initial(tf.float64, [], _Columns([0.0, 4.0, 5.0]))
  state = running.observe_linearization(state, _Columns([2.0, 1e-9, 3.0]))
  np.testing.assert_array_equal(state.scale, [2.0, 4.0, 5.0])
  with pytest.raises(ValueError, match="'scaling' must be one of"):
    factor_graph.damping_lib.NielsenDamping(scaling="maximum")


_CONVERGENCE_LOOP = (12, 0.05, 3)  # count, noise, seed


def test_default_stops_at_the_minimum_without_rounding_level_rejections():
  """The defaults (lambda from 1e-10, the function tolerance 1e-12 on the
  decrease taken or promised by the model) end a noisy pose loop converged
  by a cost test, with no step rejected, at MINPACK's minimum. The former
  defaults (lambda from 1e-6, `tfg_optim.least_squares`' criterion) reached
  the same cost and then rejected rounding-level steps, lambda growing,
  until the relative step test fired (here: 8 rejected of 15 iterations,
  against 0 of 6; checked once, not run each time: 2 s)."""
  start, edges, measurements, minimum, _ = _noisy_loop_minimum(
      *_CONVERGENCE_LOOP)
  results = _solve_loop(tf.constant(start), edges, measurements, "cholesky")
  reason = _engine.StopReason(int(results.stop_reason))
  assert reason in (_engine.StopReason.RELATIVE_COST_CHANGE,
                    _engine.StopReason.MODEL_DECREASE), reason
  assert int(results.num_rejected) == 0
  np.testing.assert_allclose(results.cost, minimum, rtol=1e-11)


def test_too_few_iterations_still_say_max_iterations():
  """The honest ending: a loop stopped before it converged reports the
  iteration limit, not a cost test."""
  start, edges, measurements, minimum, _ = _noisy_loop_minimum(
      *_CONVERGENCE_LOOP)
  results = _solve_loop(tf.constant(start), edges, measurements, "cholesky",
                        max_iterations=2)
  assert (_engine.StopReason(int(results.stop_reason)) ==
          _engine.StopReason.MAX_ITERATIONS)
  assert not results.converged
  assert float(results.cost) > (1 + 1e-5) * minimum


# -- errors ----------------------------------------------------------------------


def test_invalid_arguments_name_what_is_wrong():
  poses = factor_graph.Variables(np.zeros((3, 3)), manifold=lie_groups.SE2(),
                                 name="poses")
  data = [np.zeros((2, 3))]
  with pytest.raises(ValueError, match=r"argument 1: index 3 out of range "
                     r"for 'poses' with 3 rows"):
    factor_graph.Term(_between_error, [(poses, [0, 1]), (poses, [1, 3])],
                      data=data)
  with pytest.raises(ValueError, match="all slots share K"):
    factor_graph.Term(_between_error, [(poses, [0, 1]), (poses, [1, 2, 0])],
                      data=data)
  with pytest.raises(ValueError, match=r"data\[0\] has 3 rows for 2 edges"):
    factor_graph.Term(_between_error, [(poses, [0, 1]), (poses, [1, 2])],
                      data=[np.zeros((3, 3))])
  with pytest.raises(TypeError, match="index must be integers"):
    factor_graph.Term(_between_error, [(poses, [0.0, 1.0]), (poses, [1, 2])],
                      data=data)
  with pytest.raises(ValueError, match="rows of shape \\[2\\]"):
    factor_graph.Variables(np.zeros((3, 2)), manifold=lie_groups.SE2())
  with pytest.raises(ValueError, match="'fixed' row index out of range"):
    factor_graph.Variables(np.zeros((3, 3)), fixed=[3])
  other = factor_graph.Variables(np.zeros((3, 3)), name="other")
  term = factor_graph.Term(_between_error, [(poses, [0, 1]), (other, [1, 2])],
                           data=data, name="between")
  with pytest.raises(ValueError, match="'between' reads table 'other'"):
    factor_graph.least_squares([poses], [term])
  with pytest.raises(ValueError, match="'linear_solver' must be one of"):
    factor_graph.least_squares([poses, other], [term], linear_solver="lu")
  bad = factor_graph.Term(lambda a, b, z: tf.reshape(a - b, [-1]),
                          [(poses, [0, 1]), (other, [1, 2])], data=data,
                          name="flat")
  with pytest.raises(ValueError, match=r"'flat' must return \[K, r\]"):
    factor_graph.least_squares([poses, other], [bad])
