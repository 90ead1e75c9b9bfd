"""Euclidean space R^{shape}: the flat manifold, for unconstrained parts."""

import numpy as np
import tensorflow as tf

from tfg_optim.manifolds import base


class Euclidean(base.Manifold):
  """R^{d1 x d2 x ...}; points are [B..., d1, d2, ...] tensors.

  Basis: the standard basis in row-major (C) order, so coordinates are the
  flattened tangent vector. Retraction: R_p(v) = p + v. Projection: identity.
  `Euclidean()` is a scalar, `Euclidean(3)` a vector, `Euclidean(2, 3)` a
  matrix.
  """

  def __init__(self, *shape):
    shape = tuple(int(size) for size in shape)
    if any(size < 1 for size in shape):
      raise ValueError(f"Euclidean: sizes must be positive, got {shape}.")
    super().__init__(f"Euclidean({', '.join(map(str, shape))})",
                     int(np.prod(shape, dtype=np.int64)), shape)

  def project(self, point, v):
    del point
    return tf.convert_to_tensor(v)

  def tangent_vector(self, point, coordinates):
    del point
    coordinates = tf.convert_to_tensor(coordinates)
    batch = tf.shape(coordinates)[:-1]
    return tf.reshape(coordinates,
                      tf.concat([batch, list(self.point_shape)], 0))

  def coordinates(self, point, v):
    del point
    v = tf.convert_to_tensor(v)
    batch = tf.shape(v)[:tf.rank(v) - self.point_rank]
    return tf.reshape(v, tf.concat([batch, [self.dim]], 0))

  def retract(self, point, coordinates):
    point = tf.convert_to_tensor(point)
    return point + self.tangent_vector(point, coordinates)

  def distance_to_manifold(self, point):
    point = tf.convert_to_tensor(point)
    finite = tf.reduce_all(tf.math.is_finite(point),
                           axis=base.last_axes(self.point_rank))
    return tf.where(finite, tf.zeros([], point.dtype),
                    tf.constant(np.inf, point.dtype))

  def random_point(self, batch_shape=(), dtype=tf.float64, seed=None):
    shape = base.batch_shape_of(batch_shape) + self.point_shape
    return base.standard_normal(shape, dtype, seed)
