"""The rigid-motion groups SE(2) and SE(3) as manifolds, with their group maps.

Points (group elements) are the vectors that g2o files store:

* SE(2): [B..., 3] = (x, y, theta), the motion p -> R(theta) p + (x, y);
  every finite vector is a pose (theta and theta + 2 pi are the same one).
* SE(3): [B..., 7] = (x, y, z, qx, qy, qz, qw), the motion p -> R(q) p + t
  with t = (x, y, z) and q a unit quaternion, Hamilton convention, scalar
  last (the order of g2o's `VERTEX_SE3:QUAT` and of Eigen's coefficients);
  q and -q are the same pose.

Tangent coordinates are twists, translation first (the order of g2o's
information matrices):

* SE(2): c = (vx, vy, w), hat(c) = [[0, -w, vx], [w, 0, vy], [0, 0, 0]];
* SE(3): c = (v, w) in R^3 x R^3, hat(c) = [[hat(w), v], [0, 0]], where
  hat(w) x = w x x (cross product).

The exponential Exp(c) = expm(hat(c)) and its inverse Log, in closed form:

* SE(3): Exp(v, w) = (V(w) v, q(w)) with, for t = |w|,
    q(w) = (sin(t/2)/t w, cos(t/2))                 (so R(q(w)) = expm(hat w)),
    V(w) = I + (1 - cos t)/t^2 hat(w) + (t - sin t)/t^3 hat(w)^2,
    V(w)^-1 = I - hat(w)/2 + (1 - (t/2) cot(t/2))/t^2 hat(w)^2;
  Log(t, q) flips q to qw >= 0, takes w = 2 atan2(|q_v|, qw) q_v/|q_v| (the
  rotation angle lies in [0, pi]) and v = V(w)^-1 t.
* SE(2): Exp(vx, vy, w) = (V(w) (vx, vy), w) with
    V(w) = [[a, -b], [b, a]], a = sin(w)/w, b = (1 - cos w)/w,
    V(w)^-1 = [[alpha, beta], [-beta, alpha]], alpha = (w/2) cot(w/2),
    beta = w/2;
  Log wraps theta into [-pi, pi] first.

Log(Exp(c)) = c for rotation angles below pi, Exp(Log(X)) = X (for SE(3) up
to the sign of q). Every coefficient is evaluated from the squared angle with
a Taylor branch near 0 behind a "double where" (`base.safe_function`), so
values and derivatives (forward and reverse mode) are exact and finite at the
identity; no lane divides by zero, and everything compiles under XLA.
Coefficients with cancellation ((t - sin t)/t^3, (1 - (t/2)cot(t/2))/t^2)
use a 7-term series below t^2 = 1/4 in float64 (truncation < 1e-19
relative), below t^2 = 1 in float32.

Group operations (batched, broadcasting over leading dimensions, dispatched
on the static size of the last axis: 3 for SE(2), 7 for SE(3)):
compose(a, b) = a b, inverse(a) = a^-1, between(a, b) = a^-1 b,
transform(X, p) = R p + t. SE(2) results have theta wrapped into [-pi, pi]
(the wrap is theta - 2 pi round(theta / 2 pi), which leaves angles inside
that interval bit for bit unchanged).

The manifolds `SE2()` and `SE3()` use the right perturbation that g2o and
GTSAM use: retract(X, c) = X Exp(c) (for SE(3) the quaternion is then
renormalized, removing rounding drift; for SE(2) theta is wrapped). The
tangent basis is b_i(X) = d/ds X Exp(s e_i) at s = 0, so coordinates are
body-frame twists. It is orthonormal for the left-invariant metric in which
twists have their Euclidean length:

* SE(2): b_i(X) = (R(theta) e_i, 0) for i = 1, 2 and (0, 0, 1); orthonormal
  for the Euclidean inner product of the embedding R^3 (the default);
* SE(3): b_i(X) = (R(q) e_i, 0) for the translation and (0, q (x) (e_i, 0)/2)
  for the rotation, so `inner` weights the quaternion block by 4:
  <u, v> = <u_t, v_t> + 4 <u_q, v_q>.
"""

import math

import numpy as np
import tensorflow as tf

from tfg_optim.manifolds import base

SE2_POINT_SIZE = 3
SE3_POINT_SIZE = 7


def _series_threshold(dtype):
  """t^2 below which the 7-term series replaces the cancelling formula.

  1/4 in float64 (series truncation < 1e-19, cancellation in the exact
  formula above it < 1e-15 relative); 1 in lower precisions, where the
  cancellation near 1/4 would cost 1e-4 in the derivatives.
  """
  return 0.25 if tf.as_dtype(dtype) == tf.float64 else 1.0


# -- scalar coefficients of t^2 ------------------------------------------------


def _series(x, coefficients):
  """sum_k coefficients[k] x^k by Horner's rule."""
  total = tf.zeros_like(x) + coefficients[-1]
  for coefficient in reversed(coefficients[:-1]):
    total = total * x + coefficient
  return total


# (t - sin t)/t^3 = sum_k (-1)^k t^{2k}/(2k+3)!
_T_MINUS_SIN_OVER_CUBE = [(-1) ** k / math.factorial(2 * k + 3)
                          for k in range(7)]
# (1 - (t/2) cot(t/2))/t^2 = sum_{n>=1} (-1)^{n+1} B_{2n} t^{2n-2}/(2n)!
_BERNOULLI = [1 / 6, -1 / 30, 1 / 42, -1 / 30, 5 / 66, -691 / 2730, 7 / 6]
_INVERSE_V_COEFFICIENT = [(-1) ** (n + 1) * _BERNOULLI[n - 1] /
                          math.factorial(2 * n) for n in range(1, 8)]


def _t_minus_sin_over_cube(t_squared):
  """(t - sin t)/t^3 as a function of t^2."""
  return base.safe_function(
      t_squared, lambda x: _series(x, _T_MINUS_SIN_OVER_CUBE),
      lambda t: (t - tf.sin(t)) / (t * t * t),
      _series_threshold(t_squared.dtype))


def _inverse_v_coefficient(t_squared):
  """(1 - (t/2) cot(t/2))/t^2 as a function of t^2 (finite for t < 2 pi)."""
  def exact(t):
    half = 0.5 * t
    return (1.0 - half / tf.tan(half)) / (t * t)
  return base.safe_function(
      t_squared, lambda x: _series(x, _INVERSE_V_COEFFICIENT), exact,
      _series_threshold(t_squared.dtype))


def _cos_of_root(x_squared):
  """cos(x) as a function of x^2, differentiable at 0."""
  return base.safe_function(
      x_squared,
      lambda t: 1.0 - t / 2.0 * (1.0 - t / 12.0 * (1.0 - t / 30.0 * (
          1.0 - t / 56.0))), tf.cos)


def wrap_angle(angle):
  """angle - 2 pi round(angle / (2 pi)): into [-pi, pi], derivative 1.

  Angles already in [-pi, pi] come back unchanged, bit for bit.
  """
  angle = tf.convert_to_tensor(angle)
  turns = tf.stop_gradient(tf.round(angle / (2.0 * math.pi)))
  return angle - (2.0 * math.pi) * turns


# -- small vector helpers ------------------------------------------------------


def _cross(a, b):
  """a x b over the last axis, broadcasting the leading axes."""
  ax, ay, az = tf.unstack(a, axis=-1)
  bx, by, bz = tf.unstack(b, axis=-1)
  return tf.stack([ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx],
                  axis=-1)


def _dot(a, b, keepdims=True):
  return tf.reduce_sum(a * b, axis=-1, keepdims=keepdims)


def _quaternion_multiply(a, b):
  """Hamilton product of [..., 4] (x, y, z, w) quaternions."""
  av, aw = a[..., :3], a[..., 3:]
  bv, bw = b[..., :3], b[..., 3:]
  vector = aw * bv + bw * av + _cross(av, bv)
  scalar = aw * bw - _dot(av, bv)
  return tf.concat([vector, scalar], axis=-1)


def _conjugate(q):
  return tf.concat([-q[..., :3], q[..., 3:]], axis=-1)


def _rotate(q, p):
  """R(q) p for unit quaternions q [..., 4] and vectors p [..., 3]."""
  qv, qw = q[..., :3], q[..., 3:]
  twice_cross = 2.0 * _cross(qv, p)
  return p + qw * twice_cross + _cross(qv, twice_cross)


def _planar_rotate(angle, p):
  """R(angle) p for angles [...] and 2-vectors p [..., 2]."""
  cosine, sine = tf.cos(angle)[..., tf.newaxis], tf.sin(angle)[..., tf.newaxis]
  x, y = p[..., :1], p[..., 1:]
  return tf.concat([cosine * x - sine * y, sine * x + cosine * y], axis=-1)


# -- argument checks -----------------------------------------------------------


def _last_size(x, function, argument, allowed):
  """The static size of x's last axis; ValueError unless it is allowed."""
  shape = x.shape
  size = None if shape.rank in (None, 0) else shape[-1]
  if size not in allowed:
    expected = " or ".join(f"[..., {n}]" for n in allowed)
    raise ValueError(f"{function}: `{argument}` must have shape {expected} "
                     f"(with a statically known last axis), got {shape}.")
  return size


def _same_dtype(a, b):
  """a as a tensor, and b as one of a's dtype unless b is already a tensor."""
  a = tf.convert_to_tensor(a)
  if not isinstance(b, (tf.Tensor, tf.Variable)):
    b = tf.convert_to_tensor(b, a.dtype)
  return a, tf.convert_to_tensor(b)


# -- SE(2) ---------------------------------------------------------------------


def se2_exp(c):
  """Exp: twists c = (vx, vy, w) [..., 3] -> poses (x, y, theta) [..., 3].

  (x, y) = V(w) (vx, vy) and theta = w (not wrapped), see the module
  docstring; exact, finite derivatives at c = 0.
  """
  c = tf.convert_to_tensor(c)
  _last_size(c, "se2_exp", "c", (3,))
  w = c[..., 2]
  w_squared = w * w
  a = base.sinc(w_squared)[..., tf.newaxis]
  b = (w * base.one_minus_cos_over_square(w_squared))[..., tf.newaxis]
  vx, vy = c[..., :1], c[..., 1:2]
  return tf.concat([a * vx - b * vy, b * vx + a * vy, c[..., 2:]], axis=-1)


def se2_log(pose):
  """Log: poses (x, y, theta) [..., 3] -> twists (vx, vy, w) [..., 3].

  w = theta wrapped into [-pi, pi]; (vx, vy) = V(w)^-1 (x, y) with
  alpha = (w/2) cot(w/2) = cos(w/2) / sinc(w/2) (no cancellation, finite at
  w = 0 and 0 at w = pi) and beta = w/2.
  """
  pose = tf.convert_to_tensor(pose)
  _last_size(pose, "se2_log", "pose", (3,))
  w = wrap_angle(pose[..., 2])
  alpha = (tf.cos(0.5 * w) / base.sinc(0.25 * w * w))[..., tf.newaxis]
  beta = (0.5 * w)[..., tf.newaxis]
  x, y = pose[..., :1], pose[..., 1:2]
  return tf.concat([alpha * x + beta * y, alpha * y - beta * x,
                    w[..., tf.newaxis]], axis=-1)


def _se2_compose(a, b):
  translation = a[..., :2] + _planar_rotate(a[..., 2], b[..., :2])
  angle = wrap_angle(a[..., 2] + b[..., 2])
  return tf.concat([translation, angle[..., tf.newaxis]], axis=-1)


def _se2_inverse(a):
  translation = -_planar_rotate(-a[..., 2], a[..., :2])
  return tf.concat([translation, wrap_angle(-a[..., 2:])], axis=-1)


def _se2_between(a, b):
  translation = _planar_rotate(-a[..., 2], b[..., :2] - a[..., :2])
  angle = wrap_angle(b[..., 2] - a[..., 2])
  return tf.concat([translation, angle[..., tf.newaxis]], axis=-1)


def se2_to_matrix(pose):
  """(x, y, theta) [..., 3] -> homogeneous matrices [..., 3, 3]."""
  pose = tf.convert_to_tensor(pose)
  _last_size(pose, "se2_to_matrix", "pose", (3,))
  x, y, theta = tf.unstack(pose, axis=-1)
  cosine, sine = tf.cos(theta), tf.sin(theta)
  zero, one = tf.zeros_like(x), tf.ones_like(x)
  return tf.stack([tf.stack([cosine, -sine, x], -1),
                   tf.stack([sine, cosine, y], -1),
                   tf.stack([zero, zero, one], -1)], -2)


def se2_from_matrix(matrix):
  """[R | t] matrices [..., 2, 3] or [..., 3, 3] -> (x, y, theta) [..., 3].

  theta = atan2(R10, R00) in [-pi, pi].
  """
  matrix = tf.convert_to_tensor(matrix)
  shape = matrix.shape
  if (shape.rank is None or shape.rank < 2 or shape[-1] != 3 or
      shape[-2] not in (2, 3)):
    raise ValueError("se2_from_matrix: `matrix` must have shape [..., 2, 3] "
                     f"or [..., 3, 3], got {shape}.")
  theta = tf.atan2(matrix[..., 1, 0], matrix[..., 0, 0])
  return tf.stack([matrix[..., 0, 2], matrix[..., 1, 2], theta], axis=-1)


# -- SE(3) ---------------------------------------------------------------------


def se3_exp(c):
  """Exp: twists c = (v, w) [..., 6] -> poses (t, q) [..., 7].

  t = V(w) v, q = (sin(|w|/2)/|w| w, cos(|w|/2)); see the module docstring.
  Exact, finite derivatives at c = 0: d Exp(c)/dc_i there is the i-th
  generator (translation e_i, rotation quaternion (e_i/2, 0)).
  """
  c = tf.convert_to_tensor(c)
  _last_size(c, "se3_exp", "c", (6,))
  v, w = c[..., :3], c[..., 3:]
  angle_squared = _dot(w, w)
  quarter = 0.25 * angle_squared
  quaternion = tf.concat([0.5 * base.sinc(quarter) * w,
                          _cos_of_root(quarter)], axis=-1)
  w_cross_v = _cross(w, v)
  translation = (v + base.one_minus_cos_over_square(angle_squared) * w_cross_v
                 + _t_minus_sin_over_cube(angle_squared) *
                 _cross(w, w_cross_v))
  return tf.concat([translation, quaternion], axis=-1)


def se3_log(pose):
  """Log: poses (t, q) [..., 7] -> twists (v, w) [..., 6].

  q is flipped to qw >= 0, so the rotation angle |w| lies in [0, pi];
  w = 2 atan2(|q_v|, qw) q_v / |q_v| and v = V(w)^-1 t. Assumes unit q (a
  pose of `SE3`); exact, finite derivatives at the identity.
  """
  pose = tf.convert_to_tensor(pose)
  _last_size(pose, "se3_log", "pose", (7,))
  t, q = pose[..., :3], pose[..., 3:]
  q = tf.where(q[..., 3:] < 0, -q, q)
  qv, qw = q[..., :3], q[..., 3:]
  s_squared = _dot(qv, qv)
  # w = scale q_v with scale = 2 atan2(s, qw)/s = (2/qw) atan(z)/z, z = s/qw.
  small = s_squared < 1e-4
  ones = tf.ones_like(s_squared)
  s_safe = tf.sqrt(tf.where(small, ones, s_squared))
  qw_safe = tf.where(small, qw, ones)
  z_squared = tf.where(small, s_squared, tf.zeros_like(s_squared)) / (
      qw_safe * qw_safe)
  taylor = 2.0 / qw_safe * (1.0 - z_squared * (1.0 / 3.0 - z_squared * (
      1.0 / 5.0 - z_squared / 7.0)))
  scale = tf.where(small, taylor, 2.0 * tf.atan2(s_safe, qw) / s_safe)
  w = scale * qv
  w_cross_t = _cross(w, t)
  v = (t - 0.5 * w_cross_t +
       _inverse_v_coefficient(_dot(w, w)) * _cross(w, w_cross_t))
  return tf.concat([v, w], axis=-1)


def _se3_compose(a, b):
  translation = a[..., :3] + _rotate(a[..., 3:], b[..., :3])
  return tf.concat([translation, _quaternion_multiply(a[..., 3:], b[..., 3:])],
                   axis=-1)


def _se3_inverse(a):
  conjugate = _conjugate(a[..., 3:])
  return tf.concat([-_rotate(conjugate, a[..., :3]), conjugate], axis=-1)


def _se3_between(a, b):
  conjugate = _conjugate(a[..., 3:])
  translation = _rotate(conjugate, b[..., :3] - a[..., :3])
  return tf.concat([translation, _quaternion_multiply(conjugate, b[..., 3:])],
                   axis=-1)


def quaternion_to_rotation_matrix(quaternion):
  """Unit quaternions (x, y, z, w) [..., 4] -> rotation matrices [..., 3, 3]."""
  q = tf.convert_to_tensor(quaternion)
  _last_size(q, "quaternion_to_rotation_matrix", "quaternion", (4,))
  x, y, z, w = tf.unstack(q, axis=-1)
  xx, yy, zz = x * x, y * y, z * z
  xy, xz, yz = x * y, x * z, y * z
  wx, wy, wz = w * x, w * y, w * z
  return tf.stack([
      tf.stack([1 - 2 * (yy + zz), 2 * (xy - wz), 2 * (xz + wy)], -1),
      tf.stack([2 * (xy + wz), 1 - 2 * (xx + zz), 2 * (yz - wx)], -1),
      tf.stack([2 * (xz - wy), 2 * (yz + wx), 1 - 2 * (xx + yy)], -1)], -2)


def rotation_matrix_to_quaternion(rotation):
  """Rotation matrices [..., 3, 3] -> unit quaternions (x, y, z, w), w >= 0.

  With K the symmetric 4 x 4 matrix that equals 4 q q^T for a rotation
  (diagonal 1 + 2 R_ii - trace R for x, y, z and 1 + trace R for w), q is
  the column of K with the largest diagonal entry (>= 1) divided by
  2 sqrt(that entry); no square root of a small number is taken. The result
  is normalized (so a slightly non-orthogonal R gives a nearby unit q) and
  its sign chosen with w >= 0.
  """
  r = tf.convert_to_tensor(rotation)
  shape = r.shape
  if shape.rank is None or shape.rank < 2 or shape[-2:] != (3, 3):
    raise ValueError("rotation_matrix_to_quaternion: `rotation` must have "
                     f"shape [..., 3, 3], got {shape}.")
  r00, r01, r02 = r[..., 0, 0], r[..., 0, 1], r[..., 0, 2]
  r10, r11, r12 = r[..., 1, 0], r[..., 1, 1], r[..., 1, 2]
  r20, r21, r22 = r[..., 2, 0], r[..., 2, 1], r[..., 2, 2]
  trace = r00 + r11 + r22
  k = tf.stack([
      tf.stack([1 + 2 * r00 - trace, r01 + r10, r02 + r20, r21 - r12], -1),
      tf.stack([r01 + r10, 1 + 2 * r11 - trace, r12 + r21, r02 - r20], -1),
      tf.stack([r02 + r20, r12 + r21, 1 + 2 * r22 - trace, r10 - r01], -1),
      tf.stack([r21 - r12, r02 - r20, r10 - r01, 1 + trace], -1)], -2)
  diagonal = tf.linalg.diag_part(k)
  pick = tf.stop_gradient(tf.one_hot(tf.argmax(diagonal, axis=-1), 4,
                                     dtype=r.dtype))
  column = tf.reduce_sum(k * pick[..., tf.newaxis, :], axis=-1)
  pivot = tf.reduce_sum(diagonal * pick, axis=-1, keepdims=True)
  q = column / (2.0 * tf.sqrt(pivot))
  q = q / tf.norm(q, axis=-1, keepdims=True)
  return tf.where(q[..., 3:] < 0, -q, q)


def se3_to_matrix(pose):
  """(t, q) [..., 7] -> homogeneous [[R(q), t], [0, 1]], [..., 4, 4]."""
  pose = tf.convert_to_tensor(pose)
  _last_size(pose, "se3_to_matrix", "pose", (7,))
  rotation = quaternion_to_rotation_matrix(pose[..., 3:])
  top = tf.concat([rotation, pose[..., :3, tf.newaxis]], axis=-1)
  bottom = tf.concat([tf.zeros_like(pose[..., :3]),
                      tf.ones_like(pose[..., :1])], axis=-1)
  return tf.concat([top, bottom[..., tf.newaxis, :]], axis=-2)


def se3_from_matrix(matrix):
  """[R | t] matrices [..., 3, 4] or [..., 4, 4] -> (t, q) [..., 7], qw >= 0."""
  matrix = tf.convert_to_tensor(matrix)
  shape = matrix.shape
  if (shape.rank is None or shape.rank < 2 or shape[-1] != 4 or
      shape[-2] not in (3, 4)):
    raise ValueError("se3_from_matrix: `matrix` must have shape [..., 3, 4] "
                     f"or [..., 4, 4], got {shape}.")
  quaternion = rotation_matrix_to_quaternion(matrix[..., :3, :3])
  return tf.concat([matrix[..., :3, 3], quaternion], axis=-1)


# -- group operations for both -------------------------------------------------


def compose(a, b):
  """The product a b of poses [..., 3] (SE(2)) or [..., 7] (SE(3)).

  Leading axes broadcast. SE(2): theta wrapped into [-pi, pi]. SE(3): the
  quaternion product, not renormalized.
  """
  a, b = _same_dtype(a, b)
  size = _last_size(a, "compose", "a", (3, 7))
  _last_size(b, "compose", "b", (size,))
  return _se2_compose(a, b) if size == 3 else _se3_compose(a, b)


def inverse(a):
  """The inverse a^-1 of poses [..., 3] (SE(2)) or [..., 7] (SE(3))."""
  a = tf.convert_to_tensor(a)
  size = _last_size(a, "inverse", "a", (3, 7))
  return _se2_inverse(a) if size == 3 else _se3_inverse(a)


def between(a, b):
  """a^-1 b: pose b seen from pose a; [..., 3] (SE(2)) or [..., 7] (SE(3)).

  The relative pose that a g2o edge from a to b measures.
  """
  a, b = _same_dtype(a, b)
  size = _last_size(a, "between", "a", (3, 7))
  _last_size(b, "between", "b", (size,))
  return _se2_between(a, b) if size == 3 else _se3_between(a, b)


def transform(pose, points):
  """R p + t: points [..., 2] by SE(2) poses or [..., 3] by SE(3) poses.

  Leading axes broadcast (e.g. pose[..., tf.newaxis, :] with points
  [..., N, 3] moves N points by each pose).
  """
  pose, points = _same_dtype(pose, points)
  size = _last_size(pose, "transform", "pose", (3, 7))
  if size == 3:
    _last_size(points, "transform", "points", (2,))
    return _planar_rotate(pose[..., 2], points) + pose[..., :2]
  _last_size(points, "transform", "points", (3,))
  return _rotate(pose[..., 3:], points) + pose[..., :3]


def exp(c):
  """se2_exp for [..., 3] twists, se3_exp for [..., 6] twists."""
  c = tf.convert_to_tensor(c)
  size = _last_size(c, "exp", "c", (3, 6))
  return se2_exp(c) if size == 3 else se3_exp(c)


def log(pose):
  """se2_log for [..., 3] poses, se3_log for [..., 7] poses."""
  pose = tf.convert_to_tensor(pose)
  size = _last_size(pose, "log", "pose", (3, 7))
  return se2_log(pose) if size == 3 else se3_log(pose)


# -- Jacobians of the relative-pose error ---------------------------------------


def _with_derivative(function, x):
  """(function(x), d function / dx) of an elementwise function of [K] x, by
  one forward-mode product on the K values (its Taylor branches included)."""
  with tf.autodiff.ForwardAccumulator(x, tf.ones_like(x)) as accumulator:
    value = function(x)
  return value, accumulator.jvp(value)


def _hat(w):
  """[..., 3] -> the cross-product matrices [..., 3, 3], hat(w) x = w x x."""
  zero = tf.zeros_like(w[..., 0])
  wx, wy, wz = tf.unstack(w, axis=-1)
  return tf.stack([tf.stack([zero, -wz, wy], -1),
                   tf.stack([wz, zero, -wx], -1),
                   tf.stack([-wy, wx, zero], -1)], -2)


def _blocks(top_left, top_right, bottom_left, bottom_right):
  return tf.concat([tf.concat([top_left, top_right], -1),
                    tf.concat([bottom_left, bottom_right], -1)], -2)


def _se3_log_jacobian(error):
  """(Log E, D) for poses E [..., 7]: D [..., 6, 6] = d Log(E Exp(c))/dc at
  c = 0 (see `between_error_jacobians`)."""
  e = se3_log(error)
  w = e[..., 3:]
  t, q = error[..., :3], error[..., 3:]
  coefficient, slope = _with_derivative(_inverse_v_coefficient,
                                        _dot(w, w, keepdims=False))
  c = coefficient[..., tf.newaxis, tf.newaxis]
  hat_w = _hat(w)
  hat_w2 = tf.matmul(hat_w, hat_w)
  identity = tf.eye(3, dtype=error.dtype)
  right_inverse = identity + 0.5 * hat_w + c * hat_w2
  v_inverse = identity - 0.5 * hat_w + c * hat_w2
  w_cross_w_cross_t = _cross(w, _cross(w, t))
  outer = lambda a, b: a[..., :, tf.newaxis] * b[..., tf.newaxis, :]
  along_w = (0.5 * _hat(t) +
             c * (_dot(w, t)[..., tf.newaxis] * identity + outer(w, t) -
                  2.0 * outer(t, w)) +
             2.0 * slope[..., tf.newaxis, tf.newaxis] *
             outer(w_cross_w_cross_t, w))
  zeros = tf.zeros_like(hat_w)
  jacobian = _blocks(
      tf.matmul(v_inverse, quaternion_to_rotation_matrix(q)),
      tf.matmul(along_w, right_inverse), zeros, right_inverse)
  return e, jacobian


def _se3_adjoint(pose):
  """Ad_T [..., 6, 6] of poses T = (t, q) [..., 7] on twists (v, w):
  [[R, hat(t) R], [0, R]]."""
  rotation = quaternion_to_rotation_matrix(pose[..., 3:])
  return _blocks(rotation, tf.matmul(_hat(pose[..., :3]), rotation),
                 tf.zeros_like(rotation), rotation)


def _se2_log_jacobian(error):
  """(Log E, D) for poses E [..., 3]: D [..., 3, 3] = d Log(E Exp(c))/dc at
  c = 0 (see `between_error_jacobians`)."""
  e = se2_log(error)
  w = e[..., 2]
  alpha, slope = _with_derivative(
      lambda w: tf.cos(0.5 * w) / base.sinc(0.25 * w * w), w)
  beta = 0.5 * w
  x, y = error[..., 0], error[..., 1]
  cosine, sine = tf.cos(error[..., 2]), tf.sin(error[..., 2])
  zero, one = tf.zeros_like(w), tf.ones_like(w)
  # V^-1 R(theta_E), then the column of w, then (0, 0, 1).
  jacobian = tf.stack([
      tf.stack([alpha * cosine + beta * sine, beta * cosine - alpha * sine,
                slope * x + 0.5 * y], -1),
      tf.stack([-beta * cosine + alpha * sine, beta * sine + alpha * cosine,
                slope * y - 0.5 * x], -1),
      tf.stack([zero, zero, one], -1)], -2)
  return e, jacobian


def _se2_adjoint(pose):
  """Ad_T [..., 3, 3] of poses T = (x, y, theta) [..., 3] on twists
  (vx, vy, w): [[R(theta), (y, -x)^T], [0, 0, 1]]."""
  x, y, theta = tf.unstack(pose, axis=-1)
  cosine, sine = tf.cos(theta), tf.sin(theta)
  zero, one = tf.zeros_like(x), tf.ones_like(x)
  return tf.stack([tf.stack([cosine, -sine, y], -1),
                   tf.stack([sine, cosine, -x], -1),
                   tf.stack([zero, zero, one], -1)], -2)


def between_error_jacobians(measurement, a, b):
  """The relative-pose error and its Jacobians, in closed form.

  For poses a, b and measurements Z ([..., 3] SE(2) or [..., 7] SE(3)),
  e = Log(Z^-1 a^-1 b) (`log(between(measurement, between(a, b)))`, the
  error of a g2o edge) and its derivatives with respect to the body twists
  of the right perturbations a Exp(c_a), b Exp(c_b) (the retraction of `SE2`
  / `SE3`) at c = 0. With E = Z^-1 a^-1 b and D(E) = d Log(E Exp(c))/dc:

      de/dc_b = D(E),
      de/dc_a = -D(E) Ad(b^-1 a)

  (Z^-1 Exp(-c_a) a^-1 b = E Exp(-Ad((a^-1 b)^-1) c_a)), with the adjoint
  Ad(T) = [[R, hat(t) R], [0, R]] on SE(3) twists (v, w) and
  [[R(theta), (y, -x)^T], [0, 0, 1]] on SE(2) twists (vx, vy, w). D is the
  inverse right Jacobian of Log at E = (t, R), e = (v, w), written through
  Log's own formulas (so no series beyond Log's): E Exp(c) = (t + R c_v,
  R Exp(c_w)) to first order, so

      SE(3): D = [[V^-1(w) R,  G J_r^-1(w)], [0, J_r^-1(w)]],
        J_r^-1(w) = I + hat(w)/2 + g(|w|^2) hat(w)^2,
        V^-1(w)   = I - hat(w)/2 + g(|w|^2) hat(w)^2,
        G = d(V^-1(w) t)/dw = hat(t)/2 + g ((w.t) I + w t^T - 2 t w^T)
            + 2 g'(|w|^2) (w x (w x t)) w^T,
        g(s) = (1 - (r/2) cot(r/2))/r^2, r = sqrt(s);
      SE(2): D = [[V^-1(w) R(theta_E), (alpha' x + y/2, alpha' y - x/2)^T],
                  [0, 0, 1]],
        V^-1(w) = [[alpha, beta], [-beta, alpha]], alpha = (w/2) cot(w/2),
        beta = w/2, (x, y) = t

  (Barfoot, "State Estimation for Robotics", 2017, sections 7.1.5 and
  7.3.3; Sola, Deray and Atchuthan, "A micro Lie theory for state estimation
  in robotics", 2018, eq. 81 and appendices). g' and alpha' are the
  forward-mode derivatives of the same scalar helpers as Log's, on one
  value per pose. Every product is on [..., d, d] matrices: no tiling of the
  poses by the tangent directions.

  Args:
    measurement: Z, [..., 3] or [..., 7].
    a: the first poses, same shape.
    b: the second poses, same shape.

  Returns:
    (e [..., d], de/dc_a [..., d, d], de/dc_b [..., d, d]), d = 3 or 6.
  """
  a, b = _same_dtype(a, b)
  measurement = tf.convert_to_tensor(measurement, a.dtype)
  size = _last_size(a, "between_error_jacobians", "a", (3, 7))
  _last_size(b, "between_error_jacobians", "b", (size,))
  _last_size(measurement, "between_error_jacobians", "measurement", (size,))
  error = between(measurement, between(a, b))
  if size == 3:
    e, jacobian = _se2_log_jacobian(error)
    adjoint = _se2_adjoint(between(b, a))
  else:
    e, jacobian = _se3_log_jacobian(error)
    adjoint = _se3_adjoint(between(b, a))
  return e, -tf.matmul(jacobian, adjoint), jacobian


# -- the manifolds -------------------------------------------------------------


class SE2(base.Manifold):
  """Planar rigid motions; points (x, y, theta) [B..., 3], dim 3.

  Coordinates: body-frame twists (vx, vy, w). Retraction: the exponential
  map with right perturbation, R_X(c) = X Exp(c) (`compose(X, se2_exp(c))`,
  theta wrapped into [-pi, pi]). Basis: b(X) = (R(theta) e_1, 0),
  (R(theta) e_2, 0), (0, 0, 1), orthonormal in the Euclidean metric of R^3;
  every tangent space is all of R^3 (projection: identity). Every finite
  vector is a pose: distance_to_manifold is 0, or inf where a coordinate is
  NaN or Inf. random_point: x, y ~ N(0, 1), theta ~ U(-pi, pi).
  """

  def __init__(self):
    super().__init__("SE2", 3, (SE2_POINT_SIZE,))

  def project(self, point, v):
    del point
    return tf.convert_to_tensor(v)

  def tangent_vector(self, point, coordinates):
    point = tf.convert_to_tensor(point)
    c = tf.convert_to_tensor(coordinates, point.dtype)
    return tf.concat([_planar_rotate(point[..., 2], c[..., :2]), c[..., 2:]],
                     axis=-1)

  def coordinates(self, point, v):
    point = tf.convert_to_tensor(point)
    v = tf.convert_to_tensor(v, point.dtype)
    return tf.concat([_planar_rotate(-point[..., 2], v[..., :2]), v[..., 2:]],
                     axis=-1)

  def retract(self, point, coordinates):
    point = tf.convert_to_tensor(point)
    return _se2_compose(point, se2_exp(tf.convert_to_tensor(coordinates,
                                                            point.dtype)))

  def distance_to_manifold(self, point):
    point = tf.convert_to_tensor(point)
    finite = tf.reduce_all(tf.math.is_finite(point), axis=-1)
    return tf.where(finite, tf.zeros([], point.dtype),
                    tf.constant(np.inf, point.dtype))

  def random_point(self, batch_shape=(), dtype=tf.float64, seed=None):
    shape = base.batch_shape_of(batch_shape)
    translation = base.standard_normal(shape + (2,), dtype, seed)
    if seed is None:
      angle = tf.random.uniform(shape + (1,), -math.pi, math.pi, dtype)
    else:
      angle = tf.random.stateless_uniform(
          shape + (1,), [base.sub_seed(seed, 0), 1], -math.pi, math.pi,
          tf.as_dtype(dtype))
    return tf.concat([translation, angle], axis=-1)


class SE3(base.Manifold):
  """Spatial rigid motions; points (x, y, z, qx, qy, qz, qw) [B..., 7], dim 6.

  Coordinates: body-frame twists (v, w), translation first. Retraction: the
  exponential map with right perturbation followed by renormalizing the
  quaternion, R_X(c) = X Exp(c) (exact derivative at c = 0; the
  renormalization is the identity, with identity derivative on tangent
  directions, for unit q and removes rounding drift).

  Tangent space at X = (t, q): {(u, r) : <r, q> = 0} in R^3 x R^4;
  projection (u, r - <r, q> q). Basis: (R(q) e_i, 0) for the translation and
  (0, q (x) (e_i, 0) / 2) for the rotation, so tangent_vector(X, (v, w)) =
  (R(q) v, q (x) (w, 0) / 2) and coordinates(X, (u, r)) =
  (R(q)^T u, 2 vec(q* (x) r)). `inner` is <u_t, v_t> + 4 <u_q, v_q>, in which
  the basis is orthonormal: twists have their Euclidean length.

  distance_to_manifold: | |q| - 1 | (inf where a coordinate is NaN or Inf).
  random_point: t ~ N(0, I), q uniform on the unit sphere (Haar rotations).
  """

  def __init__(self):
    super().__init__("SE3", 6, (SE3_POINT_SIZE,))

  def inner(self, point, u, v):
    del point
    u = tf.convert_to_tensor(u)
    v = tf.convert_to_tensor(v, u.dtype)
    product = u * v
    return (tf.reduce_sum(product[..., :3], axis=-1) +
            4.0 * tf.reduce_sum(product[..., 3:], axis=-1))

  @staticmethod
  def _unit_quaternion(point):
    q = point[..., 3:]
    return q / tf.norm(q, axis=-1, keepdims=True)

  def project(self, point, v):
    point = tf.convert_to_tensor(point)
    v = tf.convert_to_tensor(v, point.dtype)
    q = self._unit_quaternion(point)
    r = v[..., 3:]
    return tf.concat([v[..., :3], r - _dot(r, q) * q], axis=-1)

  def tangent_vector(self, point, coordinates):
    point = tf.convert_to_tensor(point)
    c = tf.convert_to_tensor(coordinates, point.dtype)
    q = point[..., 3:]
    pure = tf.concat([c[..., 3:], tf.zeros_like(c[..., :1])], axis=-1)
    return tf.concat([_rotate(q, c[..., :3]),
                      0.5 * _quaternion_multiply(q, pure)], axis=-1)

  def coordinates(self, point, v):
    point = tf.convert_to_tensor(point)
    v = tf.convert_to_tensor(v, point.dtype)
    conjugate = _conjugate(point[..., 3:])
    rotation = 2.0 * _quaternion_multiply(conjugate, v[..., 3:])[..., :3]
    return tf.concat([_rotate(conjugate, v[..., :3]), rotation], axis=-1)

  def retract(self, point, coordinates):
    point = tf.convert_to_tensor(point)
    moved = _se3_compose(point, se3_exp(tf.convert_to_tensor(coordinates,
                                                             point.dtype)))
    q = moved[..., 3:]
    return tf.concat([moved[..., :3], q / tf.norm(q, axis=-1, keepdims=True)],
                     axis=-1)

  def distance_to_manifold(self, point):
    point = tf.convert_to_tensor(point)
    finite = tf.reduce_all(tf.math.is_finite(point), axis=-1)
    distance = tf.abs(tf.norm(point[..., 3:], axis=-1) - 1.0)
    return tf.where(finite, distance, tf.constant(np.inf, point.dtype))

  def _off_manifold_hint(self, point):
    norms = np.linalg.norm(np.asarray(point)[..., 3:], axis=-1)
    worst = norms.flat[np.argmax(np.abs(norms - 1.0))]
    return f"; the quaternion's norm is {float(worst):.6g}, not 1"

  def random_point(self, batch_shape=(), dtype=tf.float64, seed=None):
    shape = base.batch_shape_of(batch_shape)
    translation = base.standard_normal(shape + (3,), dtype,
                                       base.sub_seed(seed, 0))
    q = base.standard_normal(shape + (4,), dtype, base.sub_seed(seed, 1))
    return tf.concat([translation, q / tf.norm(q, axis=-1, keepdims=True)],
                     axis=-1)
