"""Per-problem selection for batches: every problem of a batch has its own
decisions, applied to tensors of shape [B..., ...] by a [B...] condition."""

import tensorflow as tf


def leading_shape(tensor, rank):
  """The first `rank` dimensions of `tensor`: a list of ints where all are
  known while tracing (no op is built), else a 1-D int32 tensor."""
  static = tensor.shape[:rank]
  if static.is_fully_defined():
    return static.as_list()
  return tf.shape(tensor)[:rank]


def concat_shapes(*parts):
  """Shape parts (lists of ints, or 1-D int32 tensors) joined: a list when
  every part is a list (no op is built), else one tensor."""
  if all(isinstance(part, list) for part in parts):
    return [size for part in parts for size in part]
  return tf.concat(list(parts), axis=0)


def full_like(tensor, value, dtype=None):
  """A tensor of `tensor`'s shape filled with `value` (dtype: `tensor`'s by
  default): one constant where the shape is known while tracing, else a
  fill of its dynamic shape."""
  dtype = dtype or tensor.dtype
  if tensor.shape.is_fully_defined():
    return tf.constant(value, dtype, shape=tensor.shape)
  return tf.fill(tf.shape(tensor), tf.constant(value, dtype))


def any_entry(tensor):
  """`tf.reduce_any` over every axis, with the axes one constant where the
  rank is known (for a scalar, TensorFlow builds its Rank, Range and three
  constants)."""
  rank = tensor.shape.rank
  return tf.reduce_any(tensor, axis=None if rank is None else
                       list(range(rank)))


def isin(tensor, values):
  """Whether each entry of an integer `tensor` is one of the Python ints
  `values` (one comparison, not one per value)."""
  return tf.reduce_any(tf.equal(tf.expand_dims(tensor, -1),
                                tf.constant(list(values), tensor.dtype)),
                       axis=-1)


def select(condition, if_true, if_false):
  """`tf.where` for a [B...] condition and tensors of shape [B..., ...]."""
  condition = tf.convert_to_tensor(condition)
  if_true = tf.convert_to_tensor(if_true)
  extra = if_true.shape.rank - condition.shape.rank
  if extra and condition.shape.rank:  # A scalar condition broadcasts.
    condition = tf.reshape(condition, concat_shapes(
        leading_shape(condition, condition.shape.rank), [1] * extra))
  return tf.where(condition, if_true, if_false)


def select_structure(condition, if_true, if_false):
  """`select` over matching structures of tensors."""
  return tf.nest.map_structure(lambda a, b: select(condition, a, b),
                               if_true, if_false)


def all_finite(tensor, batch_rank):
  """[B...]: whether every entry of each problem's part is finite."""
  finite = tf.math.is_finite(tensor)
  return tf.reduce_all(finite, axis=list(range(batch_rank, tensor.shape.rank)))


def norm(vector):
  """||v|| over the last axis, [B...], without overflow: where the plain
  norm overflows for finite entries (float32 past ~1.8e19), it is computed
  as max|v_i| ||v / max|v_i|||; elsewhere (non-finite entries included) it
  is the plain norm, bit for bit (the values of `tf.norm`)."""
  plain = tf.sqrt(tf.reduce_sum(tf.square(vector), axis=-1))
  largest = tf.reduce_max(tf.abs(vector), axis=-1)
  # Where largest is 0 or not finite the plain norm is kept, so the scaled
  # one (NaN there) is never read.
  scaled = largest * tf.sqrt(tf.reduce_sum(
      tf.square(vector / tf.expand_dims(largest, -1)), axis=-1))
  return tf.where(tf.math.is_finite(plain) | ~tf.math.is_finite(largest),
                  plain, scaled)


def not_positive(tensor):
  """tensor <= 0 or NaN, in every mode. (Not tf.logical_not(tensor > 0):
  Grappler rewrites that into tensor <= 0, False for NaN, in graphs only.)"""
  return (tensor <= 0) | tf.math.is_nan(tensor)
