"""The unit sphere S^{n-1} in R^n (unit quaternions: Sphere(4))."""

import tensorflow as tf

from tfg_optim.manifolds import base


class Sphere(base.Manifold):
  """Unit vectors of R^n; points are [B..., n], dim = n - 1.

  Tangent space: T_p = {v : <p, v> = 0}; projection v - <p, v> p.

  Basis: the columns 2..n of the Householder reflection H(p) = I - 2 w w^T /
  ||w||^2 with w = p + s e_1 and s = sign(p_1) (+1 at 0). H is symmetric and
  orthogonal and H e_1 = -s p, so its other columns are an orthonormal basis
  of p's orthogonal complement. ||w||^2 = 2 (1 + |p_1|) >= 2: the basis is
  well defined (and smooth away from p_1 = 0) for every unit p. So
  tangent_vector(p, c) = H [0, c] and coordinates(p, v) = (H v)[2:n].

  Retraction: the exponential map followed by a renormalization,

      R_p(v) = q / ||q||,   q = cos(|v|) p + sin(|v|)/|v| v,

  with sin(t)/t and cos(t) evaluated from |v|^2 through Taylor branches near 0
  (exact finite derivatives at v = 0; the renormalization keeps | ||p|| - 1 |
  at rounding level over any number of steps).
  """

  def __init__(self, n):
    n = int(n)
    if n < 2:
      raise ValueError(f"Sphere: n must be at least 2, got {n}.")
    super().__init__(f"Sphere({n})", n - 1, (n,))
    self.n = n

  @staticmethod
  def _normalize(p):
    return p / tf.norm(p, axis=-1, keepdims=True)

  def _householder(self, point):
    """(w, 2/||w||^2) of the reflection of the module docstring."""
    p = self._normalize(tf.convert_to_tensor(point))
    first = p[..., :1]
    sign = tf.where(first < 0, -tf.ones_like(first), tf.ones_like(first))
    w = tf.concat([first + sign, p[..., 1:]], axis=-1)
    scale = 1.0 / (1.0 + tf.abs(first))  # 2 / ||w||^2
    return w, scale

  def _reflect(self, point, x):
    w, scale = self._householder(point)
    return x - w * (scale * tf.reduce_sum(w * x, axis=-1, keepdims=True))

  def project(self, point, v):
    p = self._normalize(tf.convert_to_tensor(point))
    v = tf.convert_to_tensor(v)
    return v - p * tf.reduce_sum(p * v, axis=-1, keepdims=True)

  def tangent_vector(self, point, coordinates):
    c = tf.convert_to_tensor(coordinates)
    padded = tf.concat([tf.zeros_like(c[..., :1]), c], axis=-1)
    return self._reflect(point, padded)

  def coordinates(self, point, v):
    return self._reflect(point, tf.convert_to_tensor(v))[..., 1:]

  def retract(self, point, coordinates):
    point = tf.convert_to_tensor(point)
    v = self.tangent_vector(point, coordinates)
    angle_squared = tf.reduce_sum(v * v, axis=-1, keepdims=True)
    cosine = base.safe_function(
        angle_squared,
        lambda t: 1.0 - t / 2.0 * (1.0 - t / 12.0 * (1.0 - t / 30.0)),
        tf.cos)
    q = cosine * point + base.sinc(angle_squared) * v
    return self._normalize(q)

  def distance_to_manifold(self, point):
    return tf.abs(tf.norm(tf.convert_to_tensor(point), axis=-1) - 1.0)

  def random_point(self, batch_shape=(), dtype=tf.float64, seed=None):
    shape = base.batch_shape_of(batch_shape) + (self.n,)
    return self._normalize(base.standard_normal(shape, dtype, seed))
