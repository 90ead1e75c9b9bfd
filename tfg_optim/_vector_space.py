"""A list of tensors seen as one flat vector: R^n with retraction x + s.

With `batch_rank` leading batch dimensions, each tensor is [B..., *shape_i]
and a step is [B..., n] with n = sum_i prod(shape_i).
"""

import numpy as np
import tensorflow as tf


def event_shapes(tensors, batch_rank):
  """The per-problem shape of each tensor (its shape after the batch dims)."""
  return [t.shape[batch_rank:] for t in tensors]


def sizes(shapes):
  return [int(np.prod(shape.as_list(), dtype=np.int64)) for shape in shapes]


def split_step(step, shapes):
  """Splits a [B..., n] step into tensors of shapes [B..., *shape_i]."""
  batch_shape = tf.shape(step)[:-1]
  pieces = tf.split(step, sizes(shapes), axis=-1)
  return [tf.reshape(piece, tf.concat([batch_shape, shape.as_list()], 0))
          for piece, shape in zip(pieces, shapes)]


def retract(tensors, step, batch_rank):
  """x + s for a list of tensors x and a flat step s."""
  shapes = event_shapes(tensors, batch_rank)
  return [t + piece for t, piece in zip(tensors, split_step(step, shapes))]


def flatten_batched(tensor, batch_rank):
  """Reshapes [B..., *shape] to [B..., prod(shape)]."""
  batch_shape = tf.shape(tensor)[:batch_rank]
  return tf.reshape(tensor, tf.concat([batch_shape, [-1]], 0))
