"""The block sparse Cholesky solver (`tfg_optim._sparse_cholesky`,
`factor_graph.least_squares(linear_solver='sparse_cholesky')`).

The factor and the step are checked against NumPy's dense Cholesky and
`np.linalg.solve` of the same damped J^T J + lambda D, assembled densely
from the blocks (`gram()`, the 'cholesky' path's scatter), on an SE(2) pose
graph with loop closures, a held first pose and a second table of 2-D
landmarks (block size 3, the landmarks padded); the full solve against
linear_solver='cholesky'; the ordering's elimination tree against the
logarithmic height nested dissection gives a chain.
"""

import numpy as np
import pytest
import tensorflow as tf

from tests import modes
from tfg_optim import _block_sparse
from tfg_optim import _sparse_cholesky
from tfg_optim import factor_graph
from tfg_optim.manifolds import lie_groups


def _between_error(first, second, measurement):
  return lie_groups.log(lie_groups.between(
      measurement, lie_groups.between(first, second)))


def _seen(pose, landmark, measurement):
  """A landmark in a pose's frame minus its measurement, [K, 2]."""
  return lie_groups.transform(lie_groups.inverse(pose), landmark) - measurement


def _graph(count=24, landmarks=4, noise=0.05, seed=0):
  """A noisy 2-D loop of `count` SE(2) poses (odometry and four loop
  closures; the first pose held) and `landmarks` 2-D points seen from
  every fourth pose: (poses, landmarks, edges, measurements, sightings,
  observations) as NumPy arrays."""
  rng = np.random.default_rng(seed)
  angle = np.linspace(0.0, 2.0 * np.pi, count, endpoint=False)
  truth = np.stack([5.0 * np.cos(angle), 5.0 * np.sin(angle),
                    np.asarray(lie_groups.wrap_angle(angle + np.pi / 2))], -1)
  edges = np.array([(i, (i + 1) % count) for i in range(count)] +
                   [(0, count // 2), (3, 3 + count // 2), (5, count - 2),
                    (count // 4, 3 * count // 4)]) % count
  measurements = np.asarray(lie_groups.SE2().retract(
      lie_groups.between(truth[edges[:, 0]], truth[edges[:, 1]]),
      noise * rng.normal(size=(len(edges), 3))))
  poses = np.array(lie_groups.SE2().retract(
      truth, 0.1 * rng.normal(size=truth.shape)))
  poses[0] = truth[0]
  points = rng.uniform(-4.0, 4.0, size=(landmarks, 2))
  seen_by = np.arange(0, count, 4)
  sightings = np.array([(pose, (k + shift) % landmarks)
                        for k, pose in enumerate(range(0, count, 4))
                        for shift in (0, 1)])
  observations = np.asarray(lie_groups.transform(
      lie_groups.inverse(truth[sightings[:, 0]]),
      points[sightings[:, 1]])) + noise * rng.normal(size=(len(sightings), 2))
  start_points = points + 0.2 * rng.normal(size=points.shape)
  return poses, start_points, edges, measurements, sightings, observations


_GRAPH = _graph()

# The test graphs are small enough to be one dense root (the default 256
# coordinates): at most 4 rows of 3 here, so the level-by-level path runs.
_ROOT = 12


@pytest.fixture(autouse=True)
def _small_dense_root(monkeypatch):
  monkeypatch.setattr(_sparse_cholesky, "DENSE_ROOT_SIZE", _ROOT)


def _problem(poses, points, graph=_GRAPH):
  """([poses, landmarks], [between, seen]) of `graph` at (poses, points)."""
  _, _, edges, measurements, sightings, observations = graph
  pose_table = factor_graph.Variables(poses, manifold=lie_groups.SE2(),
                                      fixed=[0], name="poses")
  landmark_table = factor_graph.Variables(points, name="landmarks")
  between = factor_graph.Term(
      _between_error, [(pose_table, edges[:, 0]), (pose_table, edges[:, 1])],
      data=[measurements], name="between")
  seen = factor_graph.Term(
      _seen, [(pose_table, sightings[:, 0]),
              (landmark_table, sightings[:, 1])],
      data=[observations], name="seen")
  return [pose_table, landmark_table], [between, seen]


def _euclidean_problem(values, points, graph=_GRAPH):
  """The same graph's structure with Euclidean rows (3 and 2 coordinates)
  and residuals cheap to trace (the graph-mode cells): x_j - x_i - z_ij,
  and ranges ||x_i[:2] - y_k|| - r_k (nonlinear)."""
  _, _, edges, measurements, sightings, observations = graph
  table = factor_graph.Variables(values, fixed=[0], name="values")
  landmark_table = factor_graph.Variables(points, name="landmarks")
  difference = factor_graph.Term(
      lambda a, b, z: b - a - z, [(table, edges[:, 0]), (table, edges[:, 1])],
      data=[measurements], name="difference")
  ranges = np.linalg.norm(observations, axis=-1, keepdims=True)
  seen = factor_graph.Term(
      lambda a, b, r: tf.norm(a[:, :2] - b, axis=-1, keepdims=True) - r,
      [(table, sightings[:, 0]), (landmark_table, sightings[:, 1])],
      data=[ranges], name="seen")
  return [table, landmark_table], [difference, seen]


def _step(poses, points, lam, scaling, problem=_problem):
  """(sparse step, gradient, J^T J): the sparse Cholesky step of
  (J^T J + lambda diag(scaling)) s = -g, with the dense J^T J (scattered
  from the same blocks) for the reference."""
  variables, terms = problem(poses, points)
  layout, _ = factor_graph._layout(variables, terms)  # pylint: disable=protected-access
  kind = _sparse_cholesky.SparseCholeskyKind(layout)
  point = (poses, points)
  linearization = kind.at(point, None)
  gradient = linearization.gradient(layout.residual(point))
  solve = linearization.damped_solver(lam, scaling)
  return solve(None, gradient).solution, gradient, linearization.gram()


def _reference_step(gradient, gram, lam, scaling):
  """-(A)^-1 g over the free coordinates (the held row's 3 are 0)."""
  matrix = gram + lam * np.diag(scaling)
  step = np.zeros_like(gradient)
  step[3:] = -np.linalg.solve(matrix[3:, 3:], gradient[3:])
  return step


def _inputs(seed, graph=_GRAPH, dtype=np.float64):
  """[poses, points, lambda, scaling]: lambda in [1e-3, 1], D's diagonal
  in [0.5, 2]."""
  rng = np.random.default_rng(seed)
  poses, points = graph[:2]
  lam = rng.uniform(1e-3, 1.0)
  scaling = rng.uniform(0.5, 2.0, size=3 * len(poses) + 2 * len(points))
  return [poses.astype(dtype), points.astype(dtype), dtype(lam),
          scaling.astype(dtype)]


def _check_step(step, gradient, gram, lam, scaling, tolerance):
  reference = _reference_step(gradient.astype(np.float64),
                              gram.astype(np.float64), np.float64(lam),
                              scaling.astype(np.float64))
  np.testing.assert_array_equal(step[:3], 0.0)  # the held row
  assert np.linalg.norm(reference) > 1e-3
  assert (np.linalg.norm(step - reference) <
          tolerance * np.linalg.norm(reference))


@pytest.mark.parametrize("root", [_ROOT, 0, 256])
def test_pose_graph_step_equals_the_dense_solve(root, monkeypatch):
  """SE(2) poses (the first held, loop closures) and 2-D landmarks (padded
  to 3), random lambda and D: the step equals np.linalg.solve of the dense
  damped J^T J to 1e-10 (relative); the held pose's step is exactly 0.
  With a dense root of 12 coordinates, none, and 256 (the whole problem)."""
  monkeypatch.setattr(_sparse_cholesky, "DENSE_ROOT_SIZE", root)
  inputs = _inputs(seed=0)
  step, gradient, gram = modes.run(_step, inputs, "eager")
  _check_step(step, gradient, gram, *inputs[2:], tolerance=1e-10)


_SMALL = _graph(count=6, landmarks=1, seed=1)
_LINEARIZATIONS = {}


def _linearization(graph, dtype):
  """(kind, blocks, gradient, J^T J) of `_euclidean_problem` on `graph`,
  computed eagerly once (module cache): the graph-mode cells run only the
  solver on them."""
  key = (id(graph), dtype)
  if key not in _LINEARIZATIONS:
    variables, terms = _euclidean_problem(
        tf.constant(graph[0], dtype), tf.constant(graph[1], dtype), graph)
    layout, _ = factor_graph._layout(variables, terms)  # pylint: disable=protected-access
    kind = _sparse_cholesky.SparseCholeskyKind(layout)
    point = tuple(v.values for v in variables)
    linearization = kind.at(point, None)
    _LINEARIZATIONS[key] = (
        kind, [b.numpy() for b in linearization.blocks],
        linearization.gradient(layout.residual(point)).numpy(),
        linearization.gram().numpy())
  return _LINEARIZATIONS[key]


def _solver_step(kind):
  """build(lam, scaling, gradient, *blocks) -> the step."""
  def build(lam, scaling, gradient, *blocks):
    linearization = kind.linearization_class(*blocks)
    return linearization.damped_solver(lam, scaling)(
        None, gradient).solution
  return build


def test_xla_step_equals_the_dense_solve():
  """Under XLA (`jit_compile=True`; the solver alone, on the Euclidean
  tables of a smaller graph: compile time) to 1e-10. Its schedule: a level
  of supernodes padded in rows whose updates reach the dense root."""
  kind, blocks, gradient, gram = _linearization(_SMALL, np.float64)
  structure = kind.structure
  assert len(structure.levels) == 2 and structure.root_columns > 1
  below = structure.levels[0].batches[0].below
  assert (below < structure.rows).any() and (below == structure.rows).any()
  _, _, lam, scaling = _inputs(seed=2, graph=_SMALL)
  step = modes.run(_solver_step(kind), [lam, scaling, gradient, *blocks],
                   "xla")
  _check_step(step, gradient, gram, lam, scaling, tolerance=1e-10)


def test_float32_session_step():
  """In a TF1 Session, float32, the whole problem built in the graph: the
  step to 1e-4; and lambda = -10, which makes J^T J + lambda D indefinite:
  an all-NaN step (a rejected step), not an exception."""
  poses, points, lam, scaling = _inputs(seed=1, dtype=np.float32)

  def build(poses, points, lam, scaling):
    step, gradient, gram = _step(poses, points, lam, scaling,
                                 problem=_euclidean_problem)
    indefinite, _, _ = _step(poses, points, -10.0 + 0.0 * lam, scaling,
                             problem=_euclidean_problem)
    return step, gradient, gram, indefinite

  step, gradient, gram, indefinite = modes.run(
      build, [poses, points, lam, scaling], "session")
  assert step.dtype == np.float32
  _check_step(step, gradient, gram, lam, scaling, tolerance=1e-4)
  assert np.isnan(indefinite).all()


def _coordinates(rows, d):
  """The coordinates [len(rows) d] of block rows `rows`."""
  return (np.asarray(rows)[:, np.newaxis] * d + np.arange(d)).reshape(-1)


def test_factor_equals_the_dense_cholesky():
  """The supernodes' blocks of L (batches padded in columns and rows,
  supernodes of several columns, and the dense root: the top levels, at
  most 12 coordinates here), put in a dense matrix, equal NumPy's Cholesky
  factor of P (J^T J + lambda D + E) P^T (E: 1 on the held and padded
  coordinates), block by block; every nonzero block of L is in the
  schedule once."""
  poses, points, lam, scaling = _inputs(seed=7)
  variables, terms = _problem(tf.constant(poses), tf.constant(points))
  layout, _ = factor_graph._layout(variables, terms)  # pylint: disable=protected-access
  kind = _sparse_cholesky.SparseCholeskyKind(layout)
  structure = kind.structure
  assert structure.root_columns > 1 and len(structure.levels) > 3
  batches = [batch for level in structure.levels for batch in level.batches]
  # Supernodes of several columns, and padding in columns and in rows.
  assert any((batch.columns[:, 1:] < structure.rows).any()
             for batch in batches[:-1])
  assert any((batch.columns == structure.rows).any() for batch in batches)
  assert any((batch.below == structure.rows).any() for batch in batches)
  linearization = kind.at((variables[0].values, variables[1].values), None)
  storage, extra = linearization.assemble(lam, scaling)
  factors = _sparse_cholesky.factor(
      structure, _sparse_cholesky._add_to_diagonals(structure, storage,  # pylint: disable=protected-access
                                                    extra))
  d, rows = structure.block, structure.rows
  dense = np.zeros([rows * d, rows * d])
  positions = []
  at = 0
  for level in structure.levels:
    for batch in level.batches:
      inverse, off = factors[at]
      at += 1
      for b, columns in enumerate(batch.columns):
        k = int((columns < rows).sum())
        columns = columns[:k]
        dense[np.ix_(_coordinates(columns, d), _coordinates(columns, d))] = (
            np.linalg.inv(inverse[b].numpy())[:k * d, :k * d])
        # Stored blocks (not the level's zero block) below the diagonal.
        stored = np.tril(batch.diagonal[b, :k, 0, :k] // d < level.size, -1)
        positions += [(columns[i], columns[j])
                      for i, j in zip(*np.nonzero(stored))]
        if off is not None:
          below = batch.below[b][batch.below[b] < rows]
          m = len(below)
          dense[np.ix_(_coordinates(below, d), _coordinates(columns, d))] = (
              off[b].numpy()[:m * d, :k * d])
          positions += [(i, j) for i in below for j in columns]
  # The damped J^T J in padded rows (3 coordinates per row), renumbered.
  n = layout.tangent_dim
  matrix = linearization.gram().numpy() + lam * np.diag(scaling)
  coordinates = np.concatenate([np.arange(3 * len(poses)).reshape(-1, 3),
                                np.pad(3 * len(poses) + np.arange(
                                    2 * len(points)).reshape(-1, 2),
                                       [[0, 0], [0, 1]], constant_values=n)])
  padded = np.zeros([n + 1, n + 1])
  padded[:n, :n] = matrix
  order = coordinates[structure.order].reshape(-1)
  permuted = padded[order][:, order]
  held = np.asarray(structure.held).reshape(-1, d)[structure.order].reshape(-1)
  permuted[held > 0] = 0.0
  permuted[:, held > 0] = 0.0
  permuted += np.diag(held)
  expected = np.linalg.cholesky(permuted)
  np.testing.assert_allclose(dense, expected, atol=1e-12 * np.abs(
      expected).max())
  nonzero = {(i, j) for i in range(rows) for j in range(i)
             if np.abs(expected[i * d:(i + 1) * d,
                                j * d:(j + 1) * d]).max() > 0}
  assert nonzero <= set(positions)
  assert len(positions) == len(set(positions)) == structure.nnz_blocks


def _numpy_residuals(graph):
  """The residuals of `_euclidean_problem` in NumPy, of the free
  coordinates (row 0 of the values held at its start)."""
  values, points, edges, measurements, sightings, observations = graph
  ranges = np.linalg.norm(observations, axis=-1)
  count = len(values)

  def residuals(free):
    table = np.concatenate([values[:1], free[:3 * (count - 1)].reshape(-1, 3)])
    landmarks = free[3 * (count - 1):].reshape(-1, 2)
    difference = table[edges[:, 1]] - table[edges[:, 0]] - measurements
    seen = np.linalg.norm(table[sightings[:, 0], :2] -
                          landmarks[sightings[:, 1]], axis=-1) - ranges
    return np.concatenate([difference.ravel(), seen])
  return residuals


def test_solve_reaches_minpacks_minimum():
  """In a `tf.function`: linear_solver='sparse_cholesky' ends where scipy's
  MINPACK LM (NumPy residuals, finite differences) does on a nonlinear
  problem with a held row, two tables and loop closures: the cost to
  1e-10, the tables to 1e-7, at a cost well above zero."""
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  values, points = _GRAPH[:2]
  reference = optimize.least_squares(
      _numpy_residuals(_GRAPH), np.concatenate([values[1:].ravel(),
                                                points.ravel()]),
      method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15)
  reference_cost = 0.5 * np.sum(reference.fun ** 2)
  assert reference_cost > 1e-2

  @tf.function(autograph=False)
  def solve(values, points):
    variables, terms = _euclidean_problem(values, points)
    results = factor_graph.least_squares(
        variables, terms, linear_solver="sparse_cholesky",
        max_iterations=100, function_tolerance=1e-15,
        gradient_tolerance=1e-15, parameter_tolerance=1e-15)
    return results.position, results.cost, results.converged

  (table, landmarks), cost, converged = solve(tf.constant(values),
                                              tf.constant(points))
  assert converged
  np.testing.assert_array_equal(table[0], values[0])  # held
  np.testing.assert_allclose(cost, reference_cost, rtol=1e-10)
  np.testing.assert_allclose(
      np.concatenate([np.ravel(table[1:]), np.ravel(landmarks)]),
      reference.x, atol=1e-7)


def test_indefinite_system_gives_a_nan_step():
  """Eagerly (where older Cholesky kernels raise): lambda = -10, an
  all-NaN step."""
  kind, blocks, gradient, _ = _linearization(_GRAPH, np.float64)
  _, _, _, scaling = _inputs(seed=1)
  step = modes.run(_solver_step(kind),
                   [np.float64(-10.0), scaling, gradient, *blocks], "eager")
  assert np.isnan(step).all()


def test_dissection_of_a_chain_is_shallow():
  """A chain of 1000 rows: nested dissection's elimination tree has
  logarithmic height (about log2(1000 / leaf) + leaf levels; the chain's
  natural order would have 1000) and at most two blocks per column (each
  separator meets the nearest separator on either side)."""
  count = 1000
  chain = np.arange(count - 1)
  table = _block_sparse.Table(count, 1, None, 0, None)
  term = _block_sparse.Term(None, [0, 0], [tf.constant(chain),
                                           tf.constant(chain + 1)], [],
                            count - 1, 1)
  structure = _sparse_cholesky.Structure(
      _block_sparse.Layout([table], [term]))
  assert count - 1 <= structure.nnz_blocks <= 2 * (count - 1)
  assert structure.height <= 2 * int(np.log2(count)) + 2
  # The top levels (at most 12 columns of 1 coordinate here) are one step.
  assert 1 < structure.root_columns <= _ROOT
  assert structure.steps == len(structure.levels) < structure.height


def test_many_components_are_ordered_without_deep_recursion():
  """5000 rows of which only 10 are linked (a chain): the 4990 unseen rows
  are components of their own; the ordering does not recurse per
  component (Python's recursion limit is 1000), and the tree stays that of
  the chain."""
  count = 5000
  chain = np.arange(9)
  table = _block_sparse.Table(count, 2, None, 0, None)
  term = _block_sparse.Term(None, [0, 0], [tf.constant(chain),
                                           tf.constant(chain + 1)], [], 9, 1)
  structure = _sparse_cholesky.Structure(
      _block_sparse.Layout([table], [term]))
  assert structure.rows == count
  assert 9 <= structure.nnz_blocks <= 18
  assert structure.height <= 6


def test_indices_must_be_known_while_tracing():
  @tf.function(autograph=False)
  def build(index):
    table = _block_sparse.Table(4, 1, None, 0, None)
    term = _block_sparse.Term(None, [0, 0], [index, index], [], 3, 1)
    _sparse_cholesky.Structure(_block_sparse.Layout([table], [term]))
  with pytest.raises(ValueError, match="known while tracing"):
    build.get_concrete_function(tf.TensorSpec([3], tf.int32))
