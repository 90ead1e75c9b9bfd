"""Pose-graph optimization (tfg_optim/examples/pose_graph.py) end to end, on
a small noise-free 2-D loop (the factor-graph solve traces in seconds). The
GTSAM targets on the real 2-D and 3-D graphs are benchmark-sized:
benchmarks/pose_graph.py (docs/sparse.md); tests/test_factor_graph.py checks
the block-sparse linearization and the solvers.
"""

import io as python_io

import numpy as np
import pytest
import tensorflow as tf

from tfg_optim import io
from tfg_optim.examples import pose_graph
from tfg_optim.manifolds import lie_groups



def _graph(dimension, truth, edges, seed):
  """A noise-free graph: Z_ij = X_i^-1 X_j of `truth`, varied information,
  started from `truth` perturbed (all but the first pose)."""
  rng = np.random.default_rng(seed)
  edges = np.array(edges, np.int64)
  measurements = np.asarray(lie_groups.between(truth[edges[:, 0]],
                                               truth[edges[:, 1]]))
  d = 3 if dimension == 2 else 6
  factors = rng.normal(size=(len(edges), d, d))
  information = factors @ np.swapaxes(factors, 1, 2) + d * np.eye(d)
  manifold = lie_groups.SE2() if dimension == 2 else lie_groups.SE3()
  step = 0.2 * rng.normal(size=(len(truth), d))
  step[0] = 0.0
  start = np.asarray(manifold.retract(truth, step))
  ids = np.arange(len(truth), dtype=np.int64) + 100  # ids are not positions
  return io.PoseGraph(dimension, ids, start, edges, measurements,
                      information, np.zeros([0], np.int64))


def _truth_2d(count=10):
  angle = np.linspace(0.0, 2.0 * np.pi, count, endpoint=False)
  return np.stack([5.0 * np.cos(angle), 5.0 * np.sin(angle),
                   np.asarray(lie_groups.wrap_angle(angle + np.pi / 2))], -1)


def _pose_difference(dimension, a, b):
  """Largest |Log(a^-1 b)| coordinate over the poses."""
  return float(np.max(np.abs(np.asarray(
      lie_groups.log(lie_groups.between(a, b))))))


def test_program_recovers_a_noise_free_graph(tmp_path):
  """The program end to end on a noise-free 2-D loop of 10 poses (odometry
  and one loop closure, started 0.2 away): the written graph is the truth,
  with the same ids and the first pose held."""
  count = 10
  truth = _truth_2d(count)
  edges = [(i, i + 1) for i in range(count - 1)] + [(count - 1, 0)]
  graph = _graph(2, truth, edges, seed=2)
  assert _pose_difference(2, graph.poses, truth) > 0.1
  source, output = tmp_path / "in.g2o", tmp_path / "out.g2o"
  io.write_g2o(source, graph)
  stdout = python_io.StringIO()
  # Block-Jacobi conjugate gradients on the block-sparse linearization.
  status = pose_graph.main([str(source), "--output", str(output),
                            "--max-iterations", "50", "--linear-solver", "cg"],
                           stdout=stdout)
  text = stdout.getvalue()
  assert status == 0, text
  iterations = int(text.split("\niterations ")[1].split()[0])
  iteration_lines = [line for line in text.splitlines()
                     if line.split()[:1] and line.split()[0].isdigit()]
  assert ([int(line.split()[0]) for line in iteration_lines] ==
          list(range(iterations + 1)))
  for needle in ("initial cost", "tracing", "linear solver cg",
                 "converged", "wrote"):
    assert needle in text, text
  written = io.read_g2o(output)
  np.testing.assert_array_equal(written.vertex_ids, graph.vertex_ids)
  np.testing.assert_array_equal(written.edges, graph.edges)
  np.testing.assert_array_equal(written.poses[0], truth[0])  # the gauge
  assert _pose_difference(2, written.poses, truth) < 1e-8
  final = float(text.split("final cost")[1].split()[0])
  assert final < 1e-16
  assert float(io.pose_graph_cost(written)) == pytest.approx(final, abs=1e-20)


def test_malformed_file_exits_with_status_2_and_the_line(tmp_path):
  bad = tmp_path / "bad.g2o"
  bad.write_text("VERTEX_SE2 0 0 0 0\nVERTEX_SE2 1 1 0 0\n"
                 "EDGE_SE2 0 1 1 0 zero 1 0 0 1 0 1\n")
  stdout = python_io.StringIO()
  status = pose_graph.main([str(bad), "--output", str(tmp_path / "o.g2o")],
                           stdout=stdout)
  assert status == 2
  assert "line 3" in stdout.getvalue()
  assert "Traceback" not in stdout.getvalue()
  assert not (tmp_path / "o.g2o").exists()


def test_plot_without_matplotlib_says_so(tmp_path, monkeypatch):
  import builtins  # pylint: disable=g-import-not-at-top
  real_import = builtins.__import__

  def no_matplotlib(name, *args, **kwargs):
    if name.startswith("matplotlib"):
      raise ImportError(name)
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_matplotlib)
  message = pose_graph.plot(tmp_path / "p.png", np.zeros([2, 3]),
                            np.zeros([2, 3]))
  assert "matplotlib is not installed" in message
  assert not (tmp_path / "p.png").exists()


def _edge_poses(dimension, count, rng):
  """(poses [2 count, 3 or 7], measurements [count, ...]): edge k joins
  poses k and count + k; its error Log(Z^-1 X_i^-1 X_j) is random on a
  quarter of the edges, within 1e-6 of the identity, exactly the identity,
  and within 1e-7 of a half turn on the others."""
  manifold = lie_groups.SE2() if dimension == 2 else lie_groups.SE3()
  d = 3 if dimension == 2 else 6
  poses = np.asarray(manifold.random_point([2 * count], seed=dimension))
  relative = np.asarray(lie_groups.between(poses[:count], poses[count:]))
  errors = rng.normal(size=(count, d))
  quarter = count // 4
  errors[quarter:2 * quarter] *= 1e-6
  errors[2 * quarter:3 * quarter] = 0.0
  rotation = 2 if d == 3 else 3  # where the twists' rotation part starts
  axis = rng.normal(size=(count - 3 * quarter, d - rotation))
  axis /= np.linalg.norm(axis, axis=-1, keepdims=True)
  angle = np.pi - 1e-7 * rng.uniform(size=(len(axis), 1))
  errors[3 * quarter:, rotation:] = axis * angle
  # Z = X_i^-1 X_j Exp(e)^-1, so that Log(Z^-1 X_i^-1 X_j) = e.
  measurements = np.asarray(lie_groups.compose(
      relative, lie_groups.exp(-errors)))
  return poses, measurements


_BLOCK_CASES = {}


def _block_case(dimension):
  """(poses, closed form: poses -> blocks, the forward-mode blocks as NumPy)
  of the pose-graph edge term on the edges of `_edge_poses`, pose 0 held;
  built once per dimension."""
  if dimension not in _BLOCK_CASES:
    # pylint: disable=g-import-not-at-top
    from tfg_optim import _block_sparse
    from tfg_optim import factor_graph
    # pylint: enable=g-import-not-at-top
    count = 24
    rng = np.random.default_rng(dimension)
    poses, measurements = _edge_poses(dimension, count, rng)
    d = 3 if dimension == 2 else 6
    factors = rng.normal(size=(count, d, d))
    roots = np.linalg.cholesky(
        factors @ np.swapaxes(factors, 1, 2) + d * np.eye(d))
    manifold = lie_groups.SE2() if dimension == 2 else lie_groups.SE3()
    table = factor_graph.Variables(poses, manifold=manifold, fixed=[0])
    term = factor_graph.Term(
        pose_graph.between_error,
        [(table, np.arange(count)), (table, np.arange(count, 2 * count))],
        data=[measurements, roots], jacobian=pose_graph.between_error_blocks)
    layout, _ = factor_graph._layout([table], [term])  # pylint: disable=protected-access
    forward = _block_sparse.Layout(layout.tables, [
        t._replace(jacobian=None) for t in layout.terms])
    reference = [np.asarray(b) for b in forward.blocks((tf.constant(poses),))]
    _BLOCK_CASES[dimension] = (poses, lambda x: layout.blocks((x,)),
                               reference)
  return _BLOCK_CASES[dimension]


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "function"])
@pytest.mark.parametrize("dimension", [2, 3])
def test_closed_form_blocks_equal_forward_mode(dimension, traced):
  """`between_error_blocks` (`lie_groups.between_error_jacobians`), eagerly
  and in a `tf.function`, against the forward-mode blocks of
  `between_error` over the tiled edges, on random poses whose errors are
  random, near the identity, the identity and near a half turn; the held
  pose 0's block is zero."""
  poses, closed, reference = _block_case(dimension)
  if traced:
    closed = tf.function(closed, autograph=False)
  blocks = [np.asarray(b) for b in closed(tf.constant(poses))]
  for mine, expected in zip(blocks, reference):
    assert np.max(np.abs(expected)) > 1.0
    np.testing.assert_allclose(mine, expected, rtol=0, atol=1e-12)
  assert np.all(blocks[0][0] == 0.0)


@pytest.mark.parametrize("loss,mode", [("cauchy", "eager"),
                                       ("huber", "function")])
def test_closed_form_blocks_with_a_robust_loss(loss, mode):
  """Eagerly and in a tf.function, with a robust loss (its scale the median edge error, so that
  Huber's edges lie on both sides of its kink): the closed-form blocks
  (`between_error_blocks` through the loss's chain rule) equal forward
  mode's blocks of the reweighted residual to 1e-12."""
  # pylint: disable=g-import-not-at-top
  from tfg_optim import _block_sparse
  from tfg_optim import factor_graph
  # pylint: enable=g-import-not-at-top
  count = 24
  rng = np.random.default_rng(7)
  poses, measurements = _edge_poses(3, count, rng)
  roots = np.broadcast_to(np.eye(6), [count, 6, 6])
  first, second = np.arange(count), np.arange(count, 2 * count)
  errors = np.linalg.norm(pose_graph.between_error(
      poses[first], poses[second], measurements, roots), axis=-1)
  scale = float(np.median(errors))
  assert errors.min() < scale < errors.max()
  table = factor_graph.Variables(poses, manifold=lie_groups.SE3(), fixed=[0])
  term = factor_graph.Term(
      pose_graph.between_error, [(table, first), (table, second)],
      data=[measurements, roots], loss=loss, loss_scale=scale,
      jacobian=pose_graph.between_error_blocks)
  layout, _ = factor_graph._layout([table], [term])  # pylint: disable=protected-access
  forward = _block_sparse.Layout(layout.tables, [
      t._replace(jacobian=None) for t in layout.terms])
  point = (tf.constant(poses),)
  both = lambda p: (layout.blocks(p), forward.blocks(p))
  if mode == "function":
    both = tf.function(both, autograph=False)
  for mine, expected in zip(*both(point)):
    assert np.max(np.abs(expected)) > 1.0
    np.testing.assert_allclose(mine, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode,dtype", [("function", "float64"),
                                        ("xla", "float32"),
                                        ("session", "float64")])
def test_closed_form_jacobians_in_every_mode(mode, dtype):
  """`lie_groups.between_error_jacobians` in a graph (an unknown number of
  edges: TensorSpec([None, 3 or 7])), under XLA in float32 and in a TF1
  Session, equal to its eager float64 values (which
  test_closed_form_blocks_equal_forward_mode checks against forward
  mode)."""
  from tests import modes  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  for dimension in (2, 3):
    poses, measurements = _edge_poses(dimension, 8, rng)
    inputs = [measurements, poses[:8], poses[8:]]
    expected = [np.asarray(v) for v in lie_groups.between_error_jacobians(
        *[tf.constant(v) for v in inputs])]
    size = inputs[0].shape[-1]
    got = modes.run(lie_groups.between_error_jacobians,
                    [v.astype(dtype) for v in inputs], mode,
                    signature=[(None, size)] * 3)
    # In float32 the last quarter's angles, pi - 1e-7, round to pi, where
    # Log may answer -pi as rightly as pi: compared in float64 only.
    edges = 8 if dtype == "float64" else 6
    for mine, want in zip(got, expected):
      assert mine.dtype == np.dtype(dtype)
      scale = np.max(np.abs(want))
      tolerance = 1e-12 if dtype == "float64" else 2e-4
      np.testing.assert_allclose(mine[:edges], want[:edges], rtol=0,
                                 atol=tolerance * scale)
