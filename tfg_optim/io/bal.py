"""Bundle Adjustment in the Large (BAL) files, the BAL cost, synthetic problems.

File format (whitespace-separated text):

    num_cameras num_points num_observations
    camera point x y                  (num_observations lines)
    9 parameters per camera           (any layout, usually one per line)
    3 parameters per point

A camera is (w, t, f, k1, k2): a rotation vector w (Rodrigues: R = expm(hat
w)), a translation t, a focal length f and two radial distortion
coefficients. A point X is seen at

    P = R X + t,   p = -P_xy / P_z,   r = 1 + k1 |p|^2 + k2 |p|^4,
    predicted = f r p,

so the camera looks down its -z axis (a point in front of it has P_z < 0).
The residual of an observation is predicted - observed, and the cost is
1/2 sum |residual|^2 over the observations.
"""

import os
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from tfg_optim.manifolds import base

CAMERA_SIZE = 9


class BalProblem(NamedTuple):
  """A BAL problem as NumPy arrays (C cameras, P points, K observations).

  The fields are in the argument order of `bal_residuals` and `bal_cost`, so
  `bal_cost(*problem)` evaluates the cost at the problem's parameters.

  Attributes:
    cameras: [C, 9] float64, (w, t, f, k1, k2) per camera.
    points: [P, 3] float64.
    camera_index: [K] int64, the camera of each observation.
    point_index: [K] int64, the point of each observation.
    observations: [K, 2] float64, the measured image positions.
  """
  cameras: np.ndarray
  points: np.ndarray
  camera_index: np.ndarray
  point_index: np.ndarray
  observations: np.ndarray


# -- reading and writing -------------------------------------------------------


def _error(path, line, message):
  return ValueError(f"{path}, line {line}: {message}")


def _locate(path, tokens, lines, parse, what):
  """Raises the error for the first token `parse` rejects."""
  for token, line in zip(tokens, lines):
    try:
      value = parse(token)
    except ValueError:
      value = None
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
      raise _error(path, line, f"expected {what}, got {str(token)!r}")
  raise AssertionError("unreachable")


def read_bal(path):
  """Reads a BAL file.

  Args:
    path: the file (str or path-like).

  Returns:
    A `BalProblem`.

  Raises:
    ValueError: naming the file, the line and what was expected: a header
      that is not three non-negative integers, an observation line without
      exactly four fields, an index that is not an integer or is out of
      range, a value that is not a finite number, or too few or too many
      parameters.
  """
  path = os.fspath(path)
  with open(path, encoding="utf-8") as stream:
    text = stream.read()
  problem = _read_fast(text)
  return _read_checked(path, text) if problem is None else problem


_OBSERVATION = np.dtype([("camera", np.int64), ("point", np.int64),
                         ("x", np.float64), ("y", np.float64)])


def _read_fast(text):
  """The problem of a well-formed file by NumPy's parsers, or None.

  None whenever anything is unusual (blank lines inside the observations,
  a bad field, a wrong count): `_read_checked` then reads the file line by
  line and names the problem.
  """
  lines = text.split("\n")
  header = lines[0].split()
  try:
    num_cameras, num_points, num_observations = (int(field)
                                                 for field in header)
  except ValueError:
    return None
  if min(num_cameras, num_points, num_observations) < 1:
    return None
  block = lines[1:1 + num_observations]
  try:
    table = np.loadtxt(block, dtype=_OBSERVATION, comments=None, ndmin=1)
    parameters = np.array("\n".join(lines[1 + num_observations:]).split(),
                          dtype=np.float64)
  except ValueError:
    return None
  expected = CAMERA_SIZE * num_cameras + 3 * num_points
  if table.shape != (num_observations,) or parameters.shape != (expected,):
    return None
  observations = np.stack([table["x"], table["y"]], axis=-1)
  camera_index, point_index = table["camera"], table["point"]
  if not (np.all(np.isfinite(observations)) and
          np.all(np.isfinite(parameters)) and
          0 <= camera_index.min() and camera_index.max() < num_cameras and
          0 <= point_index.min() and point_index.max() < num_points):
    return None
  split = CAMERA_SIZE * num_cameras
  return BalProblem(parameters[:split].reshape(num_cameras, CAMERA_SIZE),
                    parameters[split:].reshape(num_points, 3), camera_index,
                    point_index, observations)


def _read_checked(path, text):
  """read_bal line by line, raising ValueError at the first problem."""
  content = [(number, fields) for number, fields in
             enumerate((line.split() for line in text.splitlines()), 1)
             if fields]
  if not content:
    raise ValueError(f"{path}: empty file; expected the header "
                     "'num_cameras num_points num_observations'.")
  header_line, header = content[0]
  if len(header) != 3:
    raise _error(path, header_line, "expected the header 'num_cameras "
                 f"num_points num_observations', got {len(header)} fields")
  try:
    sizes = [int(field) for field in header]
  except ValueError:
    sizes = [-1]
  if min(sizes) < 0:
    raise _error(path, header_line, "expected three non-negative integers "
                 f"(num_cameras num_points num_observations), got "
                 f"{' '.join(header)!r}")
  num_cameras, num_points, num_observations = sizes

  block = content[1:1 + num_observations]
  if len(block) < num_observations:
    last = content[-1][0]
    raise _error(path, last, f"the file ends after {len(block)} of the "
                 f"{num_observations} observation lines")
  lengths = np.fromiter((len(fields) for _, fields in block), np.int64,
                        count=len(block))
  wrong = np.flatnonzero(lengths != 4)
  if wrong.size:
    line, fields = block[wrong[0]]
    raise _error(path, line, "expected an observation 'camera point x y' "
                 f"(4 fields), got {len(fields)} fields")
  table = np.array([fields for _, fields in block], dtype=str).reshape(-1, 4)
  observation_lines = [line for line, _ in block]
  indices = []
  for column, name, limit in ((0, "camera", num_cameras),
                              (1, "point", num_points)):
    try:
      index = table[:, column].astype(np.int64)
    except (ValueError, OverflowError):
      _locate(path, table[:, column], observation_lines, int,
              f"an integer {name} index")
    bad = np.flatnonzero((index < 0) | (index >= limit))
    if bad.size:
      raise _error(path, observation_lines[bad[0]], f"{name} index "
                   f"{index[bad[0]]} is out of range [0, {limit})")
    indices.append(index)
  try:
    observations = table[:, 2:].astype(np.float64)
    finite = np.all(np.isfinite(observations))
  except ValueError:
    finite = False
  if not finite:
    _locate(path, table[:, 2:].ravel(), np.repeat(observation_lines, 2),
            float, "a finite number (an image coordinate)")

  rest = content[1 + num_observations:]
  tokens = [token for _, fields in rest for token in fields]
  expected = CAMERA_SIZE * num_cameras + 3 * num_points
  if len(tokens) != expected:
    token_lines = [line for line, fields in rest for _ in fields]
    if len(tokens) < expected:
      last = content[-1][0]
      raise _error(path, last, f"the file ends after {len(tokens)} of the "
                   f"{expected} parameters (9 per camera, 3 per point)")
    raise _error(path, token_lines[expected], "expected the end of the file "
                 f"after {expected} parameters (9 per camera, 3 per point), "
                 f"got {len(tokens) - expected} more values")
  try:
    parameters = np.array(tokens, dtype=np.float64)
    finite = np.all(np.isfinite(parameters))
  except ValueError:
    finite = False
  if not finite:
    token_lines = [line for line, fields in rest for _ in fields]
    _locate(path, tokens, token_lines, float,
            "a finite number (a camera or point parameter)")
  split = CAMERA_SIZE * num_cameras
  return BalProblem(parameters[:split].reshape(num_cameras, CAMERA_SIZE),
                    parameters[split:].reshape(num_points, 3), indices[0],
                    indices[1], observations.reshape(num_observations, 2))


def _check_problem(problem, function):
  cameras = np.asarray(problem.cameras)
  points = np.asarray(problem.points)
  camera_index = np.asarray(problem.camera_index)
  point_index = np.asarray(problem.point_index)
  observations = np.asarray(problem.observations)
  count = observations.shape[0] if observations.ndim else 0
  for name, array, shape in (
      ("cameras", cameras, (None, CAMERA_SIZE)), ("points", points, (None, 3)),
      ("camera_index", camera_index, (count,)),
      ("point_index", point_index, (count,)),
      ("observations", observations, (count, 2))):
    if array.ndim != len(shape) or any(
        want is not None and got != want
        for got, want in zip(array.shape, shape)):
      expected = ", ".join("N" if size is None else str(size)
                           for size in shape)
      raise ValueError(f"{function}: `{name}` must have shape [{expected}], "
                       f"got {list(array.shape)}.")
  for name, index, limit in (("camera_index", camera_index, len(cameras)),
                             ("point_index", point_index, len(points))):
    if index.size and (index.min() < 0 or index.max() >= limit):
      raise ValueError(f"{function}: `{name}` must lie in [0, {limit}), got "
                       f"values in [{index.min()}, {index.max()}].")
  for name, array in (("cameras", cameras), ("points", points),
                      ("observations", observations)):
    if not np.all(np.isfinite(array)):
      raise ValueError(f"{function}: `{name}` has a NaN or Inf.")
  return cameras, points, camera_index, point_index, observations


def write_bal(path, problem):
  """Writes `problem` (a `BalProblem`) as a BAL file.

  Floats are written with Python's `repr`, the shortest string that reads
  back as the same float64, so `read_bal` gives back identical arrays; the
  parameters one per line, as in the BAL files.

  Raises:
    ValueError: for inconsistent shapes, out-of-range indices or NaN/Inf.
  """
  cameras, points, camera_index, point_index, observations = _check_problem(
      problem, "write_bal")
  lines = [f"{len(cameras)} {len(points)} {len(observations)}"]
  lines += [f"{c} {p} {x!r} {y!r}" for c, p, (x, y) in zip(
      camera_index.tolist(), point_index.tolist(), observations.tolist())]
  lines += map(repr, cameras.ravel().tolist())
  lines += map(repr, points.ravel().tolist())
  with open(os.fspath(path), "w", encoding="utf-8") as stream:
    stream.write("\n".join(lines) + "\n")


# -- the cost ------------------------------------------------------------------


def _cross(a, b):
  ax, ay, az = tf.unstack(a, axis=-1)
  bx, by, bz = tf.unstack(b, axis=-1)
  return tf.stack([ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx],
                  axis=-1)


def rotate(rotation_vectors, points):
  """expm(hat(w)) X by Rodrigues' formula, [..., 3]; exact derivatives at w = 0.

  X + (sin t / t) w x X + ((1 - cos t) / t^2) w x (w x X), t = |w|.
  """
  w = tf.convert_to_tensor(rotation_vectors)
  x = tf.convert_to_tensor(points, w.dtype)
  angle_squared = tf.reduce_sum(w * w, axis=-1, keepdims=True)
  w_cross_x = _cross(w, x)
  return (x + base.sinc(angle_squared) * w_cross_x +
          base.one_minus_cos_over_square(angle_squared) * _cross(w, w_cross_x))


def bal_residuals(cameras, points, camera_index, point_index, observations):
  """predicted - observed for every observation, [B..., K, 2].

  Args:
    cameras: [B..., C, 9] (w, t, f, k1, k2) per camera.
    points: [B..., P, 3].
    camera_index: [K] integer camera of each observation.
    point_index: [K] integer point of each observation.
    observations: [K, 2] (or [B..., K, 2]) measured image positions.

  Returns:
    f r p - observed with P = R(w) X + t, p = -P_xy / P_z,
    r = 1 + k1 |p|^2 + k2 |p|^4, in the dtype of `cameras`.

  Raises:
    ValueError: if a shape is wrong (naming the argument).
  """
  cameras = tf.convert_to_tensor(cameras)
  points = tf.convert_to_tensor(points, cameras.dtype)
  observations = tf.convert_to_tensor(observations, cameras.dtype)
  for name, value, size in (("cameras", cameras, CAMERA_SIZE),
                            ("points", points, 3),
                            ("observations", observations, 2)):
    shape = value.shape
    if shape.rank is not None and (shape.rank < 2 or shape[-1] not in (
        None, size)):
      raise ValueError(f"bal_residuals: `{name}` must have shape [..., N, "
                       f"{size}], got {shape}.")
  camera_index = tf.convert_to_tensor(camera_index)
  point_index = tf.convert_to_tensor(point_index)
  for name, value in (("camera_index", camera_index),
                      ("point_index", point_index)):
    if value.shape.rank not in (None, 1) or not value.dtype.is_integer:
      raise ValueError(f"bal_residuals: `{name}` must be a [K] integer "
                       f"tensor, got {value.shape} {value.dtype.name}.")
  camera = tf.gather(cameras, camera_index, axis=-2)
  point = tf.gather(points, point_index, axis=-2)
  moved = rotate(camera[..., 0:3], point) + camera[..., 3:6]
  projected = -moved[..., :2] / moved[..., 2:3]
  radius_squared = tf.reduce_sum(projected * projected, axis=-1, keepdims=True)
  distortion = 1.0 + radius_squared * (camera[..., 7:8] +
                                       camera[..., 8:9] * radius_squared)
  return camera[..., 6:7] * distortion * projected - observations


def bal_cost(cameras, points, camera_index, point_index, observations):
  """1/2 sum |bal_residuals|^2 over the observations, shape [B...]."""
  residuals = bal_residuals(cameras, points, camera_index, point_index,
                            observations)
  return 0.5 * tf.reduce_sum(residuals * residuals, axis=[-2, -1])


# -- synthetic problems --------------------------------------------------------


def _rotation_vectors(rotations):
  """NumPy rotation matrices [N, 3, 3] -> rotation vectors [N, 3]."""
  r = rotations
  trace = np.trace(r, axis1=-2, axis2=-1)
  k = np.stack([
      np.stack([1 + 2 * r[:, 0, 0] - trace, r[:, 0, 1] + r[:, 1, 0],
                r[:, 0, 2] + r[:, 2, 0], r[:, 2, 1] - r[:, 1, 2]], -1),
      np.stack([r[:, 0, 1] + r[:, 1, 0], 1 + 2 * r[:, 1, 1] - trace,
                r[:, 1, 2] + r[:, 2, 1], r[:, 0, 2] - r[:, 2, 0]], -1),
      np.stack([r[:, 0, 2] + r[:, 2, 0], r[:, 1, 2] + r[:, 2, 1],
                1 + 2 * r[:, 2, 2] - trace, r[:, 1, 0] - r[:, 0, 1]], -1),
      np.stack([r[:, 2, 1] - r[:, 1, 2], r[:, 0, 2] - r[:, 2, 0],
                r[:, 1, 0] - r[:, 0, 1], 1 + trace], -1)], -2)
  pivot = np.argmax(np.diagonal(k, axis1=-2, axis2=-1), axis=-1)
  rows = np.arange(len(r))
  q = k[rows, :, pivot] / (2.0 * np.sqrt(k[rows, pivot, pivot]))[:, None]
  q *= np.where(q[:, 3:] < 0, -1.0, 1.0)
  sine = np.linalg.norm(q[:, :3], axis=-1)
  angle = 2.0 * np.arctan2(sine, q[:, 3])
  scale = np.where(sine > 0, angle / np.where(sine > 0, sine, 1.0), 2.0)
  return scale[:, None] * q[:, :3]


def _look_at(centers, targets, ups):
  """BAL rotations (rows x, y, z) of cameras at `centers` viewing `targets`
  down their -z axis."""
  z = centers - targets
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  x = np.cross(ups, z)
  x /= np.linalg.norm(x, axis=-1, keepdims=True)
  y = np.cross(z, x)
  return np.stack([x, y, z], axis=-2)


def _camera_choice(rng, num_cameras, counts):
  """Distinct cameras for each point: [P, max(counts)] with C where unused."""
  most = int(counts.max())
  first = rng.integers(num_cameras, size=(len(counts), 1))
  if most > 1:
    widest = (num_cameras - 1) // (most - 1)
    steps = rng.integers(1, widest + 1, size=(len(counts), most - 1))
    offsets = np.concatenate([np.zeros_like(first), np.cumsum(steps, 1)], 1)
  else:
    offsets = np.zeros_like(first)
  chosen = (first + offsets) % num_cameras  # offsets < C: all distinct
  used = np.arange(most)[None, :] < counts[:, None]
  return np.sort(np.where(used, chosen, num_cameras), axis=1)


def synthetic_bal(num_cameras, num_points, observations_per_point=None,
                  num_observations=None, pixel_noise=1.0,
                  start_perturbation=0.1, seed=0):
  """A random BAL problem with its ground truth.

  The scene: points uniform in the cube [-1, 1]^3; cameras at distance 4 to 6
  from the origin in uniformly random directions, each looking at a point
  near the origin (N(0, 0.1^2) per coordinate) with a random roll, so every
  point is in front of every camera (P_z < -1.9 under BAL's p = -P/P_z);
  focal lengths uniform in [500, 1000] pixels, k1 in [-0.05, 0.05], k2 in
  [-0.005, 0.005]. Each point is seen by distinct cameras; observations are
  ordered by point, then camera, and are the true projections plus
  N(0, pixel_noise^2) noise per image coordinate.

  The start perturbs the truth with Gaussian noise of standard deviation
  `start_perturbation` on every point coordinate and camera translation,
  `start_perturbation / 10` on the rotation vectors (radians) and a
  relative `start_perturbation / 10` on the focal lengths; k1 and k2 start
  at their true values. Vectorized NumPy: a million observations take about
  a second.

  Args:
    num_cameras: C >= 1.
    num_points: P >= 1.
    observations_per_point: cameras per point, in [1, C]; default
      min(4, C) unless `num_observations` is given.
    num_observations: K, instead of `observations_per_point`: point i gets
      K // P observations, one more for i < K % P (needs P <= K <= C P).
    pixel_noise: standard deviation of the observation noise (pixels).
    start_perturbation: size of the start's perturbation (see above).
    seed: seed of `np.random.default_rng`; equal seeds give equal problems.

  Returns:
    (start, truth): two `BalProblem`s with the same observations; `start`
    holds the perturbed cameras and points, `truth` the true ones.

  Raises:
    ValueError: for sizes out of range or both observation counts given.
  """
  num_cameras, num_points = int(num_cameras), int(num_points)
  if num_cameras < 1 or num_points < 1:
    raise ValueError("synthetic_bal: num_cameras and num_points must be "
                     f"positive, got {num_cameras} and {num_points}.")
  if observations_per_point is not None and num_observations is not None:
    raise ValueError("synthetic_bal: give observations_per_point or "
                     "num_observations, not both.")
  if num_observations is not None:
    total = int(num_observations)
    if not num_points <= total <= num_cameras * num_points:
      raise ValueError("synthetic_bal: num_observations must be in "
                       f"[num_points, num_cameras * num_points] = "
                       f"[{num_points}, {num_cameras * num_points}], got "
                       f"{total}.")
    counts = np.full(num_points, total // num_points, np.int64)
    counts[:total % num_points] += 1
  else:
    per_point = (min(4, num_cameras) if observations_per_point is None else
                 int(observations_per_point))
    if not 1 <= per_point <= num_cameras:
      raise ValueError("synthetic_bal: observations_per_point must be in "
                       f"[1, num_cameras] = [1, {num_cameras}], got "
                       f"{per_point}.")
    counts = np.full(num_points, per_point, np.int64)
  if pixel_noise < 0 or start_perturbation < 0:
    raise ValueError("synthetic_bal: pixel_noise and start_perturbation must "
                     "be non-negative.")

  rng = np.random.default_rng(seed)
  points = rng.uniform(-1.0, 1.0, size=(num_points, 3))
  directions = rng.standard_normal((num_cameras, 3))
  directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
  centers = directions * rng.uniform(4.0, 6.0, size=(num_cameras, 1))
  targets = 0.1 * rng.standard_normal((num_cameras, 3))
  rotations = _look_at(centers, targets, rng.standard_normal((num_cameras, 3)))
  translations = -np.einsum("cij,cj->ci", rotations, centers)
  intrinsics = np.stack([rng.uniform(500.0, 1000.0, num_cameras),
                         rng.uniform(-0.05, 0.05, num_cameras),
                         rng.uniform(-0.005, 0.005, num_cameras)], axis=-1)
  cameras = np.concatenate([_rotation_vectors(rotations), translations,
                            intrinsics], axis=-1)

  chosen = _camera_choice(rng, num_cameras, counts)
  used = chosen < num_cameras
  camera_index = chosen[used]
  point_index = np.repeat(np.arange(num_points), counts)
  moved = (np.einsum("kij,kj->ki", rotations[camera_index],
                     points[point_index]) + translations[camera_index])
  projected = -moved[:, :2] / moved[:, 2:]
  radius_squared = np.sum(projected * projected, axis=-1, keepdims=True)
  k1, k2 = intrinsics[camera_index, 1:2], intrinsics[camera_index, 2:3]
  predicted = (intrinsics[camera_index, 0:1] *
               (1.0 + radius_squared * (k1 + k2 * radius_squared)) * projected)
  observations = predicted + pixel_noise * rng.standard_normal(predicted.shape)

  start_cameras = cameras.copy()
  start_cameras[:, 0:3] += (0.1 * start_perturbation *
                            rng.standard_normal((num_cameras, 3)))
  start_cameras[:, 3:6] += start_perturbation * rng.standard_normal(
      (num_cameras, 3))
  start_cameras[:, 6] *= 1.0 + 0.1 * start_perturbation * rng.standard_normal(
      num_cameras)
  start_points = points + start_perturbation * rng.standard_normal(
      points.shape)
  truth = BalProblem(cameras, points, camera_index, point_index, observations)
  start = BalProblem(start_cameras, start_points, camera_index, point_index,
                     observations)
  return start, truth
