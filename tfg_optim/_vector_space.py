"""A list of tensors seen as one flat vector: R^n with retraction x + s.

With `batch_rank` leading batch dimensions, each tensor is [B..., *shape_i]
and a step is [B..., n] with n = sum_i prod(shape_i).
"""

import numpy as np
import tensorflow as tf

from tfg_optim import _batch
from tfg_optim import _validation


def event_shapes(tensors, batch_rank):
  """The per-problem shape of each tensor (its shape after the batch dims)."""
  return [t.shape[batch_rank:] for t in tensors]


def sizes(shapes):
  return [int(np.prod(shape.as_list(), dtype=np.int64)) for shape in shapes]


def split_step(step, shapes):
  """Splits a [B..., n] step into tensors of shapes [B..., *shape_i]."""
  batch_shape = (tf.shape(step)[:-1] if step.shape.rank is None else
                 _batch.leading_shape(step, step.shape.rank - 1))
  pieces = tf.split(step, sizes(shapes), axis=-1)
  return [tf.reshape(piece, _batch.concat_shapes(batch_shape, shape.as_list()))
          for piece, shape in zip(pieces, shapes)]


def retract(tensors, step, batch_rank):
  """x + s for a list of tensors x and a flat step s."""
  shapes = event_shapes(tensors, batch_rank)
  return [t + piece for t, piece in zip(tensors, split_step(step, shapes))]


def flatten_batched(tensor, batch_rank):
  """Reshapes [B..., *shape] to [B..., prod(shape)]."""
  event = tensor.shape[batch_rank:]
  size = event.num_elements() if event.is_fully_defined() else -1
  return tf.reshape(tensor, _batch.concat_shapes(
      _batch.leading_shape(tensor, batch_rank), [size]))


class ResidualStack:
  """F(x) = concat_k flatten(residual_k(*x)), checked, as [B..., m].

  Called with the list of variables. After the first call `sizes` holds each
  residual's length m_k (static ints where known).
  """

  def __init__(self, residuals, dtype, batch_dims):
    self.residuals = residuals
    self.dtype = dtype
    self.batch_dims = batch_dims
    self.sizes = []
    self.last_pieces = []  # The pieces of the latest call (while tracing).

  def names(self):
    """The name of each residual in error messages."""
    if len(self.residuals) == 1:
      return ["residuals"]
    return [f"residuals[{index}]" for index in range(len(self.residuals))]

  def pieces(self, variables):
    """[flatten(residual_k(*variables)) for each k], each [B..., m_k]."""
    pieces = []
    for where, residual in zip(self.names(), self.residuals):
      value = _validation.check_output_dtype(residual(*variables), self.dtype,
                                             where)
      if value.shape.rank is not None and value.shape.rank < self.batch_dims:
        raise ValueError(f"'{where}' returned a tensor of rank "
                         f"{value.shape.rank} < batch_dims={self.batch_dims}.")
      pieces.append(flatten_batched(value, self.batch_dims))
    if not self.sizes:
      self.sizes.extend(p.shape[-1] if p.shape[-1] is not None else
                        tf.shape(p)[-1] for p in pieces)
    self.last_pieces = pieces
    return pieces

  def __call__(self, variables):
    return tf.concat(self.pieces(variables), axis=-1)
