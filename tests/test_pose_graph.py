"""Pose-graph optimization (tfg_optim/examples/pose_graph.py) end to end.

Slow for its size: each of the three solves traces the engine's dense path
(a `vectorized_map` Jacobian through SE(2)/SE(3) ops) for 10 to 25 s on the
shared 2-core machine, 66 s for the module at load 3.5. Block-sparse
linearization (docs/pose_graphs.md) is what would bring it under budget.
"""

import io as python_io
import pathlib

import numpy as np
import pytest

from tfg_optim import io
from tfg_optim.examples import pose_graph
from tfg_optim.manifolds import lie_groups

DATA = pathlib.Path(__file__).resolve().parent / "data" / "posegraph"

# GTSAM 4.3.0 (/work/venv-gtsam) LevenbergMarquardtOptimizer on
# tests/data/posegraph/tinyGrid3D.g2o with a PriorFactorPose3 on vertex 0 and
# tolerances 1e-14 (benchmarks/pose_graph.py, "GTSAM LM tight"):
# graph.error at its result. GTSAM's default parameters stop at
# 9.313909533600556.
GTSAM_TINY_GRID_3D_COST = 9.313909433543383


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


def _truth_3d(count=6):
  rng = np.random.default_rng(3)
  translation = np.cumsum(rng.normal(size=(count, 3)), axis=0)
  quaternion = rng.normal(size=(count, 4))
  quaternion /= np.linalg.norm(quaternion, axis=-1, keepdims=True)
  quaternion[0] = [0.0, 0.0, 0.0, 1.0]
  translation[0] = 0.0
  return np.concatenate([translation, quaternion], axis=-1)


def _pose_difference(dimension, a, b):
  """Largest |Log(a^-1 b)| coordinate over the poses."""
  return float(np.max(np.abs(np.asarray(
      lie_groups.log(lie_groups.between(a, b))))))


@pytest.mark.parametrize("dimension", [2, 3])
def test_noise_free_graph_recovers_the_truth(dimension):
  count = 10 if dimension == 2 else 6
  truth = _truth_2d(count) if dimension == 2 else _truth_3d(count)
  # Odometry, one loop closure, (3-D) one chord.
  edges = [(i, i + 1) for i in range(count - 1)] + [(count - 1, 0)]
  if dimension == 3:
    edges.append((1, 4))
  graph = _graph(dimension, truth, edges, seed=dimension)
  assert _pose_difference(dimension, graph.poses, truth) > 0.1
  solution = pose_graph.optimize(graph, max_iterations=50)
  results = solution.results
  assert results.stop_reason != 1, "hit the iteration limit"
  np.testing.assert_array_equal(solution.graph.poses[0], truth[0])
  assert _pose_difference(dimension, solution.graph.poses, truth) < 1e-8
  assert float(results.cost) < 1e-16
  np.testing.assert_array_equal(solution.graph.vertex_ids, graph.vertex_ids)


def test_example_program_reaches_gtsam_and_writes_the_same_cost(tmp_path):
  # One solve (tracing costs tens of seconds) covers the program and the
  # GTSAM target on tinyGrid3D.
  source = io.read_g2o(DATA / "tinyGrid3D.g2o")
  output = tmp_path / "out.g2o"
  stdout = python_io.StringIO()
  status = pose_graph.main([str(DATA / "tinyGrid3D.g2o"), "--output",
                            str(output), "--max-iterations", "40"],
                           stdout=stdout)
  text = stdout.getvalue()
  assert status == 0, text
  iterations = int(text.split("\niterations ")[1].split()[0])
  iteration_lines = [line for line in text.splitlines()
                     if line.split()[:1] and line.split()[0].isdigit()]
  assert ([int(line.split()[0]) for line in iteration_lines] ==
          list(range(iterations + 1)))
  for needle in ("initial cost", "tracing", "linear solver dense",
                 "stop reason relative_step: converged", "wrote"):
    assert needle in text, text
  final = float(text.split("final cost")[1].split()[0])
  assert final <= GTSAM_TINY_GRID_3D_COST * (1 + 1e-6)
  written = io.read_g2o(output)
  np.testing.assert_array_equal(written.vertex_ids, source.vertex_ids)
  np.testing.assert_array_equal(written.edges, source.edges)
  np.testing.assert_array_equal(written.poses[0], source.poses[0])  # gauge
  assert float(io.pose_graph_cost(written)) == pytest.approx(final, rel=1e-14)
  assert float(io.pose_graph_cost(written)) <= GTSAM_TINY_GRID_3D_COST * (
      1 + 1e-6)


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
