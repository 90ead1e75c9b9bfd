"""Tests of tfg_optim.io: g2o and BAL readers/writers and their costs."""

import pathlib

import numpy as np
import pytest
import scipy.linalg
from scipy.spatial.transform import Rotation
import tensorflow as tf

from tests import modes
from tfg_optim import io
from tfg_optim import manifolds

DATA = pathlib.Path(__file__).resolve().parent / "data"
TINY_GRID = DATA / "posegraph" / "tinyGrid3D.g2o"
DUBROVNIK = DATA / "bal" / "dubrovnik-3-7-pre.txt"

# GTSAM 4.3.0 (pip), graph, initial = gtsam.readG2o(path, is3D);
# graph.error(initial), for tests/data/posegraph/tinyGrid3D.g2o and for
# SMALL_2D below written to a file (benchmarks/pose_graph_cost_check.py
# compares all six benchmark graphs).
GTSAM_TINY_GRID_ERROR = 143.31787355350406
GTSAM_SMALL_2D_ERROR = 1.527691392492678
SMALL_2D = """\
VERTEX_SE2 10 0 0 0
VERTEX_SE2 11 1.02 0.01 1.58
VERTEX_SE2 12 0.97 1.05 3.1
VERTEX_SE2 13 -0.03 0.98 -1.6
EDGE_SE2 10 11 1 0 1.5707963267948966 100 0 0 100 0 400
EDGE_SE2 11 12 1 0 1.5707963267948966 100 5 1 80 -2 400
EDGE_SE2 12 13 1 0 1.5707963267948966 100 0 0 100 0 400
EDGE_SE2 13 10 1 0 1.5707963267948966 50 0 0 50 0 100
EDGE_SE2 10 12 1 1 3.141592653589793 10 0 0 10 0 30
FIX 10
"""


def write(tmp_path, text, name="graph.g2o"):
  path = tmp_path / name
  path.write_text(text)
  return path


def assert_identical(a, b):
  assert type(a) is type(b)
  for name, x, y in zip(a._fields, a, b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, name
    np.testing.assert_array_equal(x, y, err_msg=name)


def reference_cost(graph):
  """1/2 sum e^T Omega e with e from scipy's matrix logarithm (independent
  of tfg_optim's closed forms)."""
  to_matrix = (manifolds.se2_to_matrix if graph.dimension == 2 else
               manifolds.se3_to_matrix)
  poses = np.asarray(to_matrix(graph.poses))
  measured = np.asarray(to_matrix(graph.measurements))
  total = 0.0
  for (i, j), z, omega in zip(graph.edges, measured, graph.information):
    log = np.real(scipy.linalg.logm(
        np.linalg.inv(z) @ np.linalg.inv(poses[i]) @ poses[j]))
    if graph.dimension == 2:
      error = np.array([log[0, 2], log[1, 2], log[1, 0]])
    else:
      error = np.array([log[0, 3], log[1, 3], log[2, 3], log[2, 1],
                        log[0, 2], log[1, 0]])
    total += 0.5 * error @ omega @ error
  return total


# -- g2o -----------------------------------------------------------------------


def test_read_tiny_grid():
  graph = io.read_g2o(TINY_GRID)
  assert graph.dimension == 3 and graph.tangent_size == 6
  np.testing.assert_array_equal(graph.vertex_ids, np.arange(9))
  assert graph.poses.shape == (9, 7) and graph.measurements.shape == (11, 7)
  assert graph.edges.shape == (11, 2) and graph.edges.dtype == np.int64
  np.testing.assert_array_equal(graph.edges[:3], [[0, 1], [1, 2], [2, 3]])
  np.testing.assert_allclose(np.linalg.norm(graph.poses[:, 3:], axis=-1), 1.0,
                             rtol=0, atol=1e-15)
  raw = np.array([1.033099, 0.093536, -0.037961, 0.3171845, -0.2366641,
                  0.1427899, 0.9071908])  # VERTEX_SE3:QUAT 1, normalized
  np.testing.assert_array_equal(graph.poses[1, :3], raw[:3])
  np.testing.assert_allclose(graph.poses[1, 3:],
                             raw[3:] / np.linalg.norm(raw[3:]), rtol=1e-15)
  # Upper triangle 100 0 0 0 0 0 100 ... 25: translation first.
  np.testing.assert_array_equal(graph.information[0],
                                np.diag([100.0] * 3 + [25.0] * 3))
  assert graph.fixed.shape == (0,)
  assert isinstance(graph.manifold, manifolds.SE3)


def test_tiny_grid_cost_is_gtsams():
  graph = io.read_g2o(TINY_GRID)
  cost = float(io.pose_graph_cost(graph))
  np.testing.assert_allclose(cost, GTSAM_TINY_GRID_ERROR, rtol=1e-12)
  np.testing.assert_allclose(cost, reference_cost(graph), rtol=1e-9)
  residuals = io.pose_graph_residuals(graph)
  np.testing.assert_allclose(0.5 * np.sum(np.square(residuals)), cost,
                             rtol=1e-13)


def test_small_2d_graph_cost_is_gtsams_and_survives_a_round_trip(tmp_path):
  graph = io.read_g2o(write(tmp_path, SMALL_2D))
  assert graph.dimension == 2 and isinstance(graph.manifold, manifolds.SE2)
  np.testing.assert_array_equal(graph.vertex_ids, [10, 11, 12, 13])
  np.testing.assert_array_equal(graph.edges, [[0, 1], [1, 2], [2, 3], [3, 0],
                                              [0, 2]])
  np.testing.assert_array_equal(graph.information[1], [[100, 5, 1],
                                                       [5, 80, -2],
                                                       [1, -2, 400]])
  np.testing.assert_array_equal(graph.fixed, [10])
  cost = float(io.pose_graph_cost(graph))
  np.testing.assert_allclose(cost, GTSAM_SMALL_2D_ERROR, rtol=1e-12)
  np.testing.assert_allclose(cost, reference_cost(graph), rtol=1e-9)
  io.write_g2o(tmp_path / "again.g2o", graph)
  again = io.read_g2o(tmp_path / "again.g2o")
  assert_identical(again, graph)
  assert (tmp_path / "again.g2o").read_text().splitlines()[-1] == "FIX 10"


def test_g2o_round_trip_is_exact(tmp_path):
  graph = io.read_g2o(TINY_GRID)
  rng = np.random.default_rng(0)
  # Values with all 17 significant digits, and renormalized quaternions.
  poses = manifolds.SE3().random_point(9, seed=1).numpy()
  poses[:, :3] += rng.standard_normal((9, 3)) * 1e-7
  graph = graph._replace(poses=poses, fixed=np.array([0, 4]))
  io.write_g2o(tmp_path / "a.g2o", graph)
  first = io.read_g2o(tmp_path / "a.g2o")
  assert_identical(first, graph)
  io.write_g2o(tmp_path / "b.g2o", first)
  assert (tmp_path / "a.g2o").read_text() == (tmp_path / "b.g2o").read_text()
  # The text is g2o's layout: tag, ids, values, upper triangle.
  line = (tmp_path / "a.g2o").read_text().splitlines()[9]
  assert line.startswith("EDGE_SE3:QUAT 0 1 1.033099 ")
  assert len(line.split()) == 31


def test_pose_graph_cost_batched_under_xla_and_in_float32():
  graph = io.read_g2o(TINY_GRID)
  se3 = manifolds.SE3()
  moved = se3.retract(graph.poses, 0.1 * np.random.default_rng(2)
                      .standard_normal((9, 6))).numpy()
  batch = np.stack([graph.poses, moved])
  expected = [GTSAM_TINY_GRID_ERROR,
              reference_cost(graph._replace(poses=moved))]
  cost = modes.run(lambda poses: io.pose_graph_cost(graph, poses), [batch],
                   "xla", signature=[[2, None, 7]])
  np.testing.assert_allclose(cost, expected, rtol=1e-9)
  cost32 = modes.run(lambda poses: io.pose_graph_cost(graph, poses),
                     [batch.astype(np.float32)], "eager")
  assert cost32.dtype == np.float32
  np.testing.assert_allclose(cost32, expected, rtol=1e-4)
  with pytest.raises(ValueError,
                     match=r"`poses` must have shape \[\.\.\., N, 7"):
    io.pose_graph_cost(graph, graph.poses[:, :3])
  with pytest.raises(ValueError, match="9 vertices"):
    io.pose_graph_cost(graph, graph.poses[:5])


def test_missing_vertices(tmp_path):
  text = ("EDGE_SE2 0 1 1 0 0.5 1 0 0 1 0 1\n"
          "EDGE_SE2 1 2 1 0 0.5 1 0 0 1 0 1\n"
          "EDGE_SE2 2 0 1 0 0.5 1 0 0 1 0 1\n")
  path = write(tmp_path, text)
  with pytest.raises(ValueError, match=r"line 1: the edge refers to vertex 0, "
                     "which no VERTEX_SE2 line defines"):
    io.read_g2o(path)
  graph = io.read_g2o(path, missing_vertices="chain")
  np.testing.assert_array_equal(graph.vertex_ids, [0, 1, 2])
  # X_0 = identity, X_1 = X_0 Z_01, X_2 = X_1 Z_12.
  expected = [[0, 0, 0], [1, 0, 0.5],
              [1 + np.cos(0.5), np.sin(0.5), 1.0]]
  np.testing.assert_allclose(graph.poses, expected, atol=1e-15)
  with pytest.raises(ValueError, match="missing_vertices"):
    io.read_g2o(path, missing_vertices="zero")


VERTEX3 = "VERTEX_SE3:QUAT 0 0 0 0 0 0 0 1\n"
EDGE3 = ("EDGE_SE3:QUAT 0 1 1 0 0 0 0 0 1 " + " ".join(["1"] * 21) + "\n")


@pytest.mark.parametrize("text,message", [
    ("VERTEX_SE2 0 0 0\n", r"line 1: VERTEX_SE2 expects 4 fields after the "
     r"tag \(id x y theta\), got 3"),
    ("VERTEX_SE2 0 0 0 0\nVERTEX_SE2 1 0 zero 0\n",
     r"line 2: expected a finite number for y, got 'zero'"),
    ("VERTEX_SE2 0 0 0 0\nVERTEX_SE2 1 0 nan 0\n",
     r"line 2: expected a finite number for y, got 'nan'"),
    ("VERTEX_SE2 0 0 0 0\n\nVERTEX_SE2 1.5 0 0 0\n",
     r"line 3: expected an integer for id, got '1.5'"),
    ("VERTEX_SE2 0 0 0 0\nVERTEX_XY 1 0 0\n",
     r"line 2: unknown tag 'VERTEX_XY'; expected one of EDGE_SE2"),
    ("VERTEX_SE2 0 0 0 0\nEDGE_SE2 0 7 1 0 0 1 0 0 1 0 1\n",
     r"line 2: the edge refers to vertex 7, which no VERTEX_SE2 line"),
    ("VERTEX_SE2 0 0 0 0\n" + VERTEX3,
     r"line 2: a 3-D element \(VERTEX_SE3:QUAT\) in a 2-D graph \(line 1 is "
     r"VERTEX_SE2\)"),
    ("VERTEX_SE2 0 0 0 0\nVERTEX_SE2 0 1 0 0\n",
     r"line 2: vertex 0 is defined again \(first on line 1\)"),
    (VERTEX3 + "VERTEX_SE3:QUAT 1 0 0 0 0 0 0 0\n",
     r"line 2: the quaternion is zero"),
    (VERTEX3 + "VERTEX_SE3:QUAT 1 0 0 0 0 0 0 1\n" + EDGE3[:-3] + "\n",
     r"line 3: EDGE_SE3:QUAT expects 30 fields after the tag \(id1 id2 dx"),
    (VERTEX3 + "FIX 3\n", r"line 2: FIX names vertex 3, which no "
     r"VERTEX_SE3:QUAT line defines"),
    ("# only a comment\n", r"no VERTEX_SE2, EDGE_SE2"),
], ids=lambda value: value[:24] if isinstance(value, str) else None)
def test_malformed_g2o_files_name_file_line_and_expectation(tmp_path, text,
                                                            message):
  path = write(tmp_path, text, "bad.g2o")
  with pytest.raises(ValueError, match=message) as error:
    io.read_g2o(path)
  assert str(path) in str(error.value)


def test_comments_blank_lines_and_normalization(tmp_path):
  text = ("# a comment\n\n" + VERTEX3 +
          "VERTEX_SE3:QUAT 1 1 2 3 0 0 0 2\n" + EDGE3 + "FIX 0 1\n")
  graph = io.read_g2o(write(tmp_path, text))
  np.testing.assert_array_equal(graph.poses[1], [1, 2, 3, 0, 0, 0, 1])
  np.testing.assert_array_equal(graph.fixed, [0, 1])
  np.testing.assert_array_equal(graph.information[0], np.ones((6, 6)))


def test_write_g2o_rejects_inconsistent_graphs(tmp_path):
  graph = io.read_g2o(TINY_GRID)
  for bad, message in [
      (graph._replace(poses=graph.poses[:, :3]), r"`poses` must have shape "
       r"\[9, 7\]"),
      (graph._replace(edges=graph.edges + 5), r"positions in \[0, 9\)"),
      (graph._replace(information=graph.information * np.nan), "NaN"),
      (graph._replace(dimension=4), "dimension")]:
    with pytest.raises(ValueError, match=message):
      io.write_g2o(tmp_path / "out.g2o", bad)


# -- BAL -----------------------------------------------------------------------


def reference_residuals(problem):
  """The data README's formula with scipy's rotation-vector exp map."""
  cameras = problem.cameras[problem.camera_index]
  points = problem.points[problem.point_index]
  moved = Rotation.from_rotvec(cameras[:, :3]).apply(points) + cameras[:, 3:6]
  p = -moved[:, :2] / moved[:, 2:]
  r2 = np.sum(p * p, axis=1, keepdims=True)
  radial = 1 + cameras[:, 7:8] * r2 + cameras[:, 8:9] * r2 * r2
  return cameras[:, 6:7] * radial * p - problem.observations


def test_read_dubrovnik_and_round_trip(tmp_path):
  problem = io.read_bal(DUBROVNIK)
  assert [np.shape(a) for a in problem] == [(3, 9), (7, 3), (19,), (19,),
                                            (19, 2)]
  np.testing.assert_array_equal(problem.camera_index[:3], [0, 1, 2])
  np.testing.assert_array_equal(problem.point_index[:3], [0, 0, 0])
  np.testing.assert_array_equal(problem.observations[0], [-385.99, 387.12])
  assert problem.cameras[0, 6] == 1.4300319432711681e+03
  assert problem.points[6, 2] == -5.2070299568846060e+01
  io.write_bal(tmp_path / "copy.txt", problem)
  assert_identical(io.read_bal(tmp_path / "copy.txt"), problem)
  # The line-by-line reader (used for error messages) agrees.
  from tfg_optim.io import bal  # pylint: disable=g-import-not-at-top
  assert_identical(bal._read_checked("x", DUBROVNIK.read_text()), problem)


def test_bal_cost_matches_the_formula():
  problem = io.read_bal(DUBROVNIK)
  expected = reference_residuals(problem)
  np.testing.assert_allclose(io.bal_residuals(*problem), expected,
                             rtol=1e-12, atol=1e-9)
  np.testing.assert_allclose(io.bal_cost(*problem),
                             0.5 * np.sum(expected ** 2), rtol=1e-12)
  # Batched parameters, in a graph, and a zero rotation (finite gradient).
  cameras = np.stack([problem.cameras, problem.cameras])
  cameras[1, :, :3] = 0.0
  second = problem._replace(cameras=cameras[1])

  def build(cameras, points):
    with tf.GradientTape() as tape:
      tape.watch(cameras)
      cost = io.bal_cost(cameras, points, problem.camera_index,
                         problem.point_index, problem.observations)
    return cost, tape.gradient(cost, cameras)
  cost, gradient = modes.run(build, [cameras, problem.points], "function")
  np.testing.assert_allclose(
      cost, [0.5 * np.sum(expected ** 2),
             0.5 * np.sum(reference_residuals(second) ** 2)], rtol=1e-12)
  assert np.all(np.isfinite(gradient))
  with pytest.raises(ValueError, match=r"`points` must have shape"):
    io.bal_residuals(problem.cameras, problem.cameras, problem.camera_index,
                     problem.point_index, problem.observations)


@pytest.mark.parametrize("edit,message", [
    (lambda lines: ["3 7"] + lines[1:], r"line 1: expected the header"),
    (lambda lines: lines[:2] + ["1 0 3.0"] + lines[3:],
     r"line 3: expected an observation 'camera point x y' \(4 fields\), got 3"),
    (lambda lines: lines[:4] + ["5 0 1.0 2.0"] + lines[5:],
     r"line 5: camera index 5 is out of range \[0, 3\)"),
    (lambda lines: lines[:4] + ["1 x 1.0 2.0"] + lines[5:],
     r"line 5: expected an integer point index, got 'x'"),
    (lambda lines: lines[:6] + ["1 1 1.0 inf"] + lines[7:],
     r"line 7: expected a finite number \(an image coordinate\), got 'inf'"),
    (lambda lines: lines[:30] + ["1.0.0"] + lines[31:],
     r"line 31: expected a finite number \(a camera or point parameter\)"),
    (lambda lines: lines + ["1.0"],
     r"line 81: expected the end of the file after 48 parameters"),
    (lambda lines: lines[:-3],
     r"the file ends after 46 of the 48 parameters"),
], ids=range(8))
def test_malformed_bal_files_name_file_and_line(tmp_path, edit, message):
  lines = DUBROVNIK.read_text().splitlines()
  path = write(tmp_path, "\n".join(edit(lines)) + "\n", "bad.txt")
  with pytest.raises(ValueError, match=message) as error:
    io.read_bal(path)
  assert str(path) in str(error.value)


def test_synthetic_bal():
  start, truth = io.synthetic_bal(12, 300, observations_per_point=3,
                                  pixel_noise=0.0, seed=5)
  assert len(truth.observations) == 900
  np.testing.assert_array_equal(np.bincount(truth.point_index), [3] * 300)
  pairs = truth.point_index * 12 + truth.camera_index
  assert np.unique(pairs).size == 900  # distinct cameras per point
  assert np.all(np.diff(pairs) > 0)  # ordered by point, then camera
  # Noise-free: zero cost at the truth, by the TensorFlow formula.
  assert float(io.bal_cost(*truth)) < 1e-16 * len(truth.observations)
  np.testing.assert_allclose(reference_residuals(truth), 0.0, atol=1e-9)
  # Points in front of the cameras: P_z < 0 under p = -P / P_z.
  cameras = truth.cameras[truth.camera_index]
  depth = (Rotation.from_rotvec(cameras[:, :3]).apply(
      truth.points[truth.point_index]) + cameras[:, 3:6])[:, 2]
  assert np.all(depth < -1.0)
  assert float(io.bal_cost(*start)) > 1.0
  assert_identical(start, io.synthetic_bal(12, 300, observations_per_point=3,
                                           pixel_noise=0.0, seed=5)[0])
  noisy, noisy_truth = io.synthetic_bal(12, 300, num_observations=1000,
                                        pixel_noise=2.0, seed=6)
  np.testing.assert_array_equal(np.bincount(noisy.point_index),
                                [4] * 100 + [3] * 200)
  at_truth = noisy._replace(cameras=noisy_truth.cameras,
                            points=noisy_truth.points)
  np.testing.assert_allclose(np.std(reference_residuals(at_truth)), 2.0,
                             rtol=0.1)
  with pytest.raises(ValueError, match="not both"):
    io.synthetic_bal(3, 3, observations_per_point=2, num_observations=6)
  with pytest.raises(ValueError, match=r"observations_per_point must be in "
                     r"\[1, num_cameras\]"):
    io.synthetic_bal(3, 3, observations_per_point=4)
