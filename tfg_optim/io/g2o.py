"""g2o pose-graph files: reader, writer, and the pose-graph cost.

A g2o file is a list of lines, one element each:

    VERTEX_SE2 id x y theta
    EDGE_SE2 i j dx dy dtheta  I11 I12 I13 I22 I23 I33
    VERTEX_SE3:QUAT id x y z qx qy qz qw
    EDGE_SE3:QUAT i j dx dy dz dqx dqy dqz dqw  I11 I12 .. I16 I22 .. I66
    FIX id [id ...]

An edge from vertex i to vertex j measures Z_ij, the pose of j seen from i,
with the information matrix Omega_ij (the upper triangle, row by row, in the
order of the tangent coordinates: translation first, then rotation). The
poses and measurements use the point representation of `manifolds.SE2` /
`manifolds.SE3`: (x, y, theta) and (x, y, z, qx, qy, qz, qw), which is the
order of the file, so reading and writing copy numbers, never convert them.

The cost of poses X is

    F(X) = 1/2 sum_edges e_ij^T Omega_ij e_ij,   e_ij = Log(Z_ij^-1 X_i^-1 X_j)

with Log the full Lie logarithm of SE(2) / SE(3) in twist coordinates
(v, w), translation first (`manifolds.se2_log`, `manifolds.se3_log`). This is
what GTSAM reports as `graph.error(values)` for the graph that
`gtsam.readG2o` builds (BetweenFactor<Pose2/Pose3> with the information
matrix permuted to GTSAM's rotation-first Pose3 tangent): they agree to 1.2e-14
relative on six benchmark graphs (benchmarks/pose_graph_cost_check.py,
docs/io.md).
"""

import os
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from tfg_optim.manifolds import lie_groups

# tag -> (dimension, kind, field names after the tag)
_SE2_INFORMATION = tuple(f"I{a}{b}" for a in range(1, 4) for b in range(a, 4))
_SE3_INFORMATION = tuple(f"I{a}{b}" for a in range(1, 7) for b in range(a, 7))
_TAGS = {
    "VERTEX_SE2": (2, "vertex", ("id", "x", "y", "theta")),
    "EDGE_SE2": (2, "edge", ("id1", "id2", "dx", "dy", "dtheta") +
                 _SE2_INFORMATION),
    "VERTEX_SE3:QUAT": (3, "vertex", ("id", "x", "y", "z", "qx", "qy", "qz",
                                      "qw")),
    "EDGE_SE3:QUAT": (3, "edge", ("id1", "id2", "dx", "dy", "dz", "dqx",
                                  "dqy", "dqz", "dqw") + _SE3_INFORMATION),
}
_VERTEX_TAG = {2: "VERTEX_SE2", 3: "VERTEX_SE3:QUAT"}
_EDGE_TAG = {2: "EDGE_SE2", 3: "EDGE_SE3:QUAT"}
_POSE_SIZE = {2: 3, 3: 7}
_TANGENT_SIZE = {2: 3, 3: 6}
# Quaternions whose squared norm is within this of 1 are kept bit for bit.
_UNIT_TOLERANCE = 1e-14


class PoseGraph(NamedTuple):
  """A pose graph as NumPy arrays (N vertices, K edges, d = 3 or 6).

  Attributes:
    dimension: 2 (SE(2) poses) or 3 (SE(3) poses).
    vertex_ids: [N] int64, the ids of the file, in the order of the file.
    poses: [N, 3] (x, y, theta) or [N, 7] (x, y, z, qx, qy, qz, qw) float64:
      points of `manifolds.SE2()` / `manifolds.SE3()` (unit quaternions).
    edges: [K, 2] int64, (i, j) as positions into `vertex_ids` (not ids).
    measurements: [K, 3] or [K, 7] float64, Z_ij in the pose representation.
    information: [K, d, d] float64 symmetric information matrices, rows and
      columns in tangent order (translation first).
    fixed: [F] int64, the vertex ids named by FIX lines, in file order.
  """
  dimension: int
  vertex_ids: np.ndarray
  poses: np.ndarray
  edges: np.ndarray
  measurements: np.ndarray
  information: np.ndarray
  fixed: np.ndarray

  @property
  def manifold(self):
    """`manifolds.SE2()` or `manifolds.SE3()`: the manifold of one pose."""
    return lie_groups.SE2() if self.dimension == 2 else lie_groups.SE3()

  @property
  def tangent_size(self):
    """d: 3 for SE(2), 6 for SE(3)."""
    return _TANGENT_SIZE[self.dimension]


# -- reading -------------------------------------------------------------------


def _error(path, line, message):
  return ValueError(f"{path}, line {line}: {message}")


def _floats(path, rows, lines, names, first_column):
  """rows (lists of strings) -> float64 array; errors name line and field."""
  try:
    values = np.array(rows, dtype=np.float64).reshape(
        len(rows), len(names) - first_column)
    if np.all(np.isfinite(values)):
      return values
  except ValueError:
    pass
  for row, line in zip(rows, lines):
    for column, text in enumerate(row):
      try:
        value = float(text)
      except ValueError:
        value = None
      if value is None or not np.isfinite(value):
        raise _error(path, line, f"expected a finite number for "
                     f"{names[first_column + column]}, got {text!r}")
  raise AssertionError("unreachable")


def _integers(path, column, lines, name):
  """A column of strings -> int64 array; errors name the line."""
  try:
    return np.array(column).astype(np.int64)
  except (ValueError, OverflowError):
    pass
  for text, line in zip(column, lines):
    try:
      int(text)
    except ValueError:
      raise _error(path, line, f"expected an integer for {name}, "
                   f"got {text!r}") from None
  raise AssertionError("unreachable")


def _normalize_quaternions(path, quaternions, lines):
  squared = np.sum(quaternions * quaternions, axis=-1)
  zero = np.flatnonzero(squared == 0)
  if zero.size:
    raise _error(path, lines[zero[0]], "the quaternion is zero")
  scale = np.where(np.abs(squared - 1.0) > _UNIT_TOLERANCE,
                   1.0 / np.sqrt(squared), 1.0)
  return quaternions * scale[:, np.newaxis]


def _symmetric(upper, size):
  rows, columns = np.triu_indices(size)
  full = np.zeros((upper.shape[0], size, size))
  full[:, rows, columns] = upper
  full[:, columns, rows] = upper
  return full


def _compose_one(a, b):
  """a b for single NumPy poses (x, y, theta) or (t, q) (chaining only)."""
  if a.size == 3:
    cosine, sine = np.cos(a[2]), np.sin(a[2])
    angle = a[2] + b[2]
    angle -= 2.0 * np.pi * np.round(angle / (2.0 * np.pi))
    return np.array([a[0] + cosine * b[0] - sine * b[1],
                     a[1] + sine * b[0] + cosine * b[1], angle])
  qv, qw = a[3:6], a[6]
  twice_cross = 2.0 * np.cross(qv, b[:3])
  translation = a[:3] + b[:3] + qw * twice_cross + np.cross(qv, twice_cross)
  bv, bw = b[3:6], b[6]
  vector = qw * bv + bw * qv + np.cross(qv, bv)
  quaternion = np.append(vector, qw * bw - qv @ bv)
  return np.concatenate([translation, quaternion / np.linalg.norm(quaternion)])


def read_g2o(path, missing_vertices="error"):
  """Reads a 2-D or 3-D g2o pose graph.

  Blank lines and lines starting with `#` are skipped. Quaternions are
  normalized (divided by their norm unless their squared norm is already
  within 1e-14 of 1, so a normalized quaternion is kept bit for bit and
  `write_g2o` -> `read_g2o` reproduces every array exactly). Vertices may
  come after the edges that use them.

  Args:
    path: the file (str or path-like).
    missing_vertices: what to do with an edge whose vertex has no VERTEX
      line: "error" (default) raises; "chain" adds it as GTSAM's
      `readG2o` does for pure-odometry files (CSAIL.g2o has no VERTEX lines):
      going through the edges in file order, an unknown first vertex is
      placed at the identity and an unknown second vertex j at X_i Z_ij;
      such vertices are appended to the vertex table in that order.

  Returns:
    A `PoseGraph`.

  Raises:
    ValueError: naming the file, the line and what was expected, for a
      wrong number of fields, a field that is not a finite number (or not an
      integer id), an unknown tag, a vertex defined twice, an edge (with
      missing_vertices="error") or FIX naming an unknown vertex, a zero
      quaternion, or 2-D and 3-D elements in one file; also for a file with
      no vertices and no edges.
  """
  if missing_vertices not in ("error", "chain"):
    raise ValueError("read_g2o: missing_vertices must be 'error' or 'chain', "
                     f"got {missing_vertices!r}.")
  path = os.fspath(path)
  with open(path, encoding="utf-8") as stream:
    text = stream.read()
  rows = {"vertex": [], "edge": []}
  lines = {"vertex": [], "edge": []}
  fixed, fixed_lines = [], []
  dimension, first_tag, first_line = None, None, None
  for number, line in enumerate(text.splitlines(), 1):
    fields = line.split()
    if not fields or fields[0].startswith("#"):
      continue
    tag = fields[0]
    if tag == "FIX":
      if len(fields) < 2:
        raise _error(path, number, "FIX expects at least one vertex id")
      for text_id in fields[1:]:
        fixed.append(text_id)
        fixed_lines.append(number)
      continue
    spec = _TAGS.get(tag)
    if spec is None:
      raise _error(path, number, f"unknown tag {tag!r}; expected one of "
                   f"{', '.join(sorted(_TAGS))} or FIX")
    element_dimension, kind, names = spec
    if dimension is None:
      dimension, first_tag, first_line = element_dimension, tag, number
    elif element_dimension != dimension:
      raise _error(path, number, f"a {element_dimension}-D element ({tag}) in "
                   f"a {dimension}-D graph (line {first_line} is {first_tag}); "
                   "2-D and 3-D elements cannot be mixed")
    if len(fields) - 1 != len(names):
      raise _error(path, number, f"{tag} expects {len(names)} fields after "
                   f"the tag ({' '.join(names)}), got {len(fields) - 1}")
    rows[kind].append(fields[1:])
    lines[kind].append(number)
  if dimension is None:
    raise ValueError(f"{path}: no VERTEX_SE2, EDGE_SE2, VERTEX_SE3:QUAT or "
                     "EDGE_SE3:QUAT line.")
  pose_size = _POSE_SIZE[dimension]
  vertex_names = _TAGS[_VERTEX_TAG[dimension]][2]
  edge_names = _TAGS[_EDGE_TAG[dimension]][2]

  vertex_rows, vertex_lines = rows["vertex"], lines["vertex"]
  ids = _integers(path, [row[0] for row in vertex_rows], vertex_lines, "id")
  poses = _floats(path, [row[1:] for row in vertex_rows], vertex_lines,
                  vertex_names, 1)
  edge_rows, edge_lines = rows["edge"], lines["edge"]
  edge_ids = np.stack([
      _integers(path, [row[0] for row in edge_rows], edge_lines, "id1"),
      _integers(path, [row[1] for row in edge_rows], edge_lines, "id2")],
                      axis=-1).reshape(-1, 2)
  values = _floats(path, [row[2:] for row in edge_rows], edge_lines,
                   edge_names, 2)
  measurements = values[:, :pose_size]
  information = _symmetric(values[:, pose_size:], _TANGENT_SIZE[dimension])
  if dimension == 3:
    poses[:, 3:] = _normalize_quaternions(path, poses[:, 3:], vertex_lines)
    measurements[:, 3:] = _normalize_quaternions(path, measurements[:, 3:],
                                                 edge_lines)

  if np.unique(ids).size != ids.size:
    seen = {}
    for vertex_id, line in zip(ids.tolist(), vertex_lines):
      if vertex_id in seen:
        raise _error(path, line, f"vertex {vertex_id} is defined again "
                     f"(first on line {seen[vertex_id]})")
      seen[vertex_id] = line
  if missing_vertices == "chain":
    ids, poses = _chain_missing(dimension, ids, poses, edge_ids, measurements)
  positions, known = _positions(ids, edge_ids)
  if not np.all(known):
    edge, column = np.argwhere(~known)[0]
    raise _error(path, edge_lines[edge], f"the edge refers to vertex "
                 f"{edge_ids[edge, column]}, which no {_VERTEX_TAG[dimension]} "
                 "line defines")
  fixed_ids = _integers(path, fixed, fixed_lines, "a FIX vertex id")
  fixed_known = _positions(ids, fixed_ids)[1]
  if not np.all(fixed_known):
    index = np.flatnonzero(~fixed_known)[0]
    raise _error(path, fixed_lines[index], f"FIX names vertex "
                 f"{fixed_ids[index]}, which no {_VERTEX_TAG[dimension]} "
                 "line defines")
  return PoseGraph(dimension, ids, poses, positions, measurements,
                   information, fixed_ids)


def _positions(ids, queries):
  """Positions of `queries` in `ids` and whether each was found."""
  queries = np.asarray(queries, np.int64)
  if ids.size == 0:
    return np.zeros(queries.shape, np.int64), np.zeros(queries.shape, bool)
  order = np.argsort(ids, kind="stable")
  slots = np.clip(np.searchsorted(ids[order], queries), 0, ids.size - 1)
  positions = order[slots]
  return positions.astype(np.int64), ids[positions] == queries


def _chain_missing(dimension, ids, poses, edge_ids, measurements):
  """GTSAM's pure-odometry initialization of vertices no VERTEX line gives."""
  table = dict(zip(ids.tolist(), poses))
  new_ids, new_poses = [], []
  identity = np.zeros(_POSE_SIZE[dimension])
  if dimension == 3:
    identity[6] = 1.0
  for (first, second), measurement in zip(edge_ids.tolist(), measurements):
    if first not in table:
      table[first] = identity
      new_ids.append(first)
      new_poses.append(identity)
    if second not in table:
      pose = _compose_one(table[first], measurement)
      table[second] = pose
      new_ids.append(second)
      new_poses.append(pose)
  if not new_ids:
    return ids, poses
  return (np.concatenate([ids, np.array(new_ids, np.int64)]),
          np.concatenate([poses, np.array(new_poses)]))


# -- writing -------------------------------------------------------------------


def _check_graph(graph):
  """Raises ValueError unless `graph`'s arrays fit together."""
  dimension = graph.dimension
  if dimension not in (2, 3):
    raise ValueError(f"write_g2o: dimension must be 2 or 3, got {dimension}.")
  pose_size, tangent_size = _POSE_SIZE[dimension], _TANGENT_SIZE[dimension]
  arrays = {name: np.asarray(getattr(graph, name)) for name in (
      "vertex_ids", "poses", "edges", "measurements", "information", "fixed")}
  vertices = arrays["vertex_ids"].shape[0] if arrays["vertex_ids"].ndim else 0
  edges = arrays["edges"].shape[0] if arrays["edges"].ndim else 0
  expected = {"vertex_ids": (vertices,), "poses": (vertices, pose_size),
              "edges": (edges, 2), "measurements": (edges, pose_size),
              "information": (edges, tangent_size, tangent_size),
              "fixed": arrays["fixed"].shape[:1] or (0,)}
  for name, shape in expected.items():
    if arrays[name].shape != shape:
      raise ValueError(f"write_g2o: `{name}` must have shape {list(shape)} "
                       f"for a {dimension}-D graph with {vertices} vertices "
                       f"and {edges} edges, got {list(arrays[name].shape)}.")
    if name in ("poses", "measurements", "information") and not np.all(
        np.isfinite(arrays[name])):
      raise ValueError(f"write_g2o: `{name}` has a NaN or Inf.")
  positions = arrays["edges"]
  if positions.size and (positions.min() < 0 or
                         positions.max() >= vertices):
    raise ValueError("write_g2o: `edges` must hold positions in "
                     f"[0, {vertices}), got values in "
                     f"[{positions.min()}, {positions.max()}].")


def _format_rows(prefixes, values):
  """'prefix v1 v2 ...' lines with shortest round-trip (repr) floats."""
  return [prefix + " " + " ".join(map(repr, row))
          for prefix, row in zip(prefixes, values.tolist())]


def write_g2o(path, graph):
  """Writes `graph` (a `PoseGraph`) as a g2o file.

  Floats are written with Python's `repr`, the shortest string that reads
  back as the same float64, so `read_g2o` gives back identical arrays. The
  vertices come first (in table order, with their ids), then the edges (with
  the ids of their vertices and the upper triangle of the information
  matrix, row by row), then one FIX line per fixed vertex.

  Args:
    path: the file to write (str or path-like); overwritten.
    graph: a `PoseGraph` (any object with its fields works).

  Raises:
    ValueError: for inconsistent shapes, NaN or Inf values, or edge
      positions outside the vertex table.
  """
  _check_graph(graph)
  dimension = graph.dimension
  ids = np.asarray(graph.vertex_ids, np.int64)
  edges = np.asarray(graph.edges, np.int64)
  tangent_size = _TANGENT_SIZE[dimension]
  rows, columns = np.triu_indices(tangent_size)
  upper = np.asarray(graph.information, np.float64)[:, rows, columns]
  vertex_tag, edge_tag = _VERTEX_TAG[dimension], _EDGE_TAG[dimension]
  output = _format_rows([f"{vertex_tag} {i}" for i in ids.tolist()],
                        np.asarray(graph.poses, np.float64))
  edge_prefixes = [f"{edge_tag} {a} {b}" for a, b in ids[edges].tolist()]
  output += _format_rows(edge_prefixes, np.concatenate(
      [np.asarray(graph.measurements, np.float64), upper], axis=1))
  output += [f"FIX {int(i)}" for i in np.asarray(graph.fixed).tolist()]
  with open(os.fspath(path), "w", encoding="utf-8") as stream:
    stream.write("\n".join(output) + "\n")


# -- the cost ------------------------------------------------------------------


def _gathered(graph, poses):
  """(X_i, X_j, Z_ij) tensors for every edge; poses [B..., N, 3 or 7]."""
  poses = graph.poses if poses is None else poses
  poses = tf.convert_to_tensor(poses)
  size = _POSE_SIZE[graph.dimension]
  shape = poses.shape
  if shape.rank is None or shape.rank < 2 or shape[-1] != size:
    raise ValueError(f"pose graph cost: `poses` must have shape [..., N, "
                     f"{size}] for a {graph.dimension}-D graph, got {shape}.")
  count = len(graph.vertex_ids)
  if shape[-2] is not None and shape[-2] != count:
    raise ValueError(f"pose graph cost: `poses` must hold the graph's {count} "
                     f"vertices on axis -2, got shape {shape}.")
  edges = tf.constant(np.asarray(graph.edges, np.int64).reshape(-1, 2))
  first = tf.gather(poses, edges[:, 0], axis=-2)
  second = tf.gather(poses, edges[:, 1], axis=-2)
  measurements = tf.constant(np.asarray(graph.measurements), poses.dtype)
  return first, second, measurements


def pose_graph_errors(graph, poses=None):
  """e_ij = Log(Z_ij^-1 X_i^-1 X_j) for every edge, [B..., K, d].

  Args:
    graph: a `PoseGraph`.
    poses: [B..., N, 3] or [B..., N, 7] tensor of poses in vertex-table
      order; defaults to `graph.poses`.

  Returns:
    The twists (v, w) (translation first), in the dtype of `poses`.
  """
  first, second, measurements = _gathered(graph, poses)
  return lie_groups.log(lie_groups.between(
      measurements, lie_groups.between(first, second)))


def pose_graph_cost(graph, poses=None):
  """F(X) = 1/2 sum_ij e_ij^T Omega_ij e_ij, shape [B...].

  Args:
    graph: a `PoseGraph`.
    poses: [B..., N, 3] or [B..., N, 7] poses in vertex-table order; defaults
      to `graph.poses`.

  Returns:
    The cost in the dtype of `poses`; equal to GTSAM's `graph.error(values)`
    for the graph `gtsam.readG2o` reads from the same file.
  """
  errors = pose_graph_errors(graph, poses)
  information = tf.constant(np.asarray(graph.information), errors.dtype)
  weighted = tf.einsum("kab,...kb->...ka", information, errors)
  return 0.5 * tf.reduce_sum(errors * weighted, axis=[-2, -1])


def square_root_information(graph):
  """[K, d, d] upper-triangular U with U^T U = Omega for every edge.

  Raises:
    ValueError: naming the first edge whose information matrix is not
      positive definite.
  """
  information = np.asarray(graph.information, np.float64)
  try:
    lower = np.linalg.cholesky(information)
  except np.linalg.LinAlgError:
    for index, matrix in enumerate(information):
      try:
        np.linalg.cholesky(matrix)
      except np.linalg.LinAlgError:
        raise ValueError(f"square_root_information: edge {index} (vertices "
                         f"{graph.edges[index].tolist()}) has an information "
                         "matrix that is not positive definite.") from None
    raise
  return np.swapaxes(lower, -1, -2)


def pose_graph_residuals(graph, poses=None):
  """Whitened residuals r_ij = U_ij e_ij (U^T U = Omega), [B..., K, d].

  1/2 sum |r_ij|^2 = `pose_graph_cost`; the least-squares form for a
  Gauss-Newton solver.

  Raises:
    ValueError: if an information matrix is not positive definite.
  """
  errors = pose_graph_errors(graph, poses)
  root = tf.constant(square_root_information(graph), errors.dtype)
  return tf.einsum("kab,...kb->...ka", root, errors)
