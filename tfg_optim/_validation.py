"""Argument checks shared by the front-ends: each error names the argument."""

import numbers

import numpy as np
import tensorflow as tf

FLOAT_DTYPES = (tf.float32, tf.float64)


def as_callable_list(value, name):
  """A callable or a non-empty list/tuple of callables, as a list."""
  values = list(value) if isinstance(value, (list, tuple)) else [value]
  if not values:
    raise ValueError(f"'{name}' must not be empty.")
  for index, item in enumerate(values):
    if not callable(item):
      where = name if len(values) == 1 else f"{name}[{index}]"
      raise TypeError(f"'{where}' must be callable, got {type(item).__name__}.")
  return values


INT32_MAX = 2**31 - 1


def positive_int(value, name, minimum=1, maximum=INT32_MAX):
  """A Python or NumPy integer in [minimum, maximum] (bools are rejected).

  The default maximum is the largest int32: counters and loop bounds are
  int32 tensors, and a larger value would wrap silently.
  """
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"'{name}' must be an integer, got {value!r}.")
  if value < minimum:
    raise ValueError(f"'{name}' needs to be at least {minimum}.")
  if value > maximum:
    raise ValueError(f"'{name}' must be at most {maximum}, got {value}.")
  return int(value)


def connected_outputs(function, primals, names):
  """Evaluates `function()` -> list of tensors, checking that each depends on
  `primals` (a structure of tensors) through differentiable ops.

  The evaluation runs under a gradient tape; an output whose gradient is
  None for every primal (not a computed zero) is not connected: computed in
  NumPy, from constants, or through ops without gradients. Such a residual
  would make every solver report convergence at the start, so it is an
  error, raised while tracing. In a graph the gradient ops are pruned, since
  nothing reads them.

  Returns the outputs. Raises ValueError naming the first unconnected one.
  """
  flat = tf.nest.flatten(primals)
  with tf.GradientTape(watch_accessed_variables=False,
                       persistent=True) as tape:
    tape.watch(flat)
    outputs = function()
  require_connected([any(g is not None for g in tape.gradient(output, flat))
                     for output in outputs], names)
  return outputs


def require_connected(connected, names):
  """Raises ValueError naming the first output that is not `connected` (a
  bool per output: whether it depends on the variables through
  differentiable ops; see `connected_outputs`)."""
  for is_connected, name in zip(connected, names):
    if not is_connected:
      raise ValueError(
          f"'{name}' does not depend on the variables through "
          "differentiable TensorFlow ops (was it computed in NumPy, from "
          "constants, or only through ops without gradients such as round, "
          "floor or an int cast, or through a tf.custom_gradient whose "
          "derivative TensorFlow's forward mode cannot take?); the solver "
          "cannot move it.")


def real_number(value, name, lower=None, lower_inclusive=True, upper=None,
                upper_inclusive=True):
  """A finite real Python/NumPy number within the given bounds."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"'{name}' must be a real number, got {value!r}.")
  value = float(value)
  if not np.isfinite(value):
    raise ValueError(f"'{name}' must be finite, got {value}.")
  if lower is not None and (value < lower or
                            (not lower_inclusive and value == lower)):
    bound = ">=" if lower_inclusive else ">"
    raise ValueError(f"'{name}' must be {bound} {lower}, got {value}.")
  if upper is not None and (value > upper or
                            (not upper_inclusive and value == upper)):
    bound = "<=" if upper_inclusive else "<"
    raise ValueError(f"'{name}' must be {bound} {upper}, got {value}.")
  return value


def float_tensors(values, name, batch_dims=None):
  """Converts values to tensors of one float dtype.

  With `batch_dims=None` every shape must be fully known; with an int, only
  the dimensions after the first `batch_dims` (each problem's own shape, which
  fixes the number of parameters while tracing): batch dimensions may be
  unknown (`tf.TensorSpec([None, 3])`).
  """
  tensors = []
  for index, value in enumerate(values):
    where = name if len(values) == 1 else f"{name}[{index}]"
    try:
      tensor = tf.convert_to_tensor(value)
    except (TypeError, ValueError) as error:
      raise TypeError(f"'{where}' cannot be converted to a tensor: "
                      f"{error}") from error
    if tensor.dtype not in FLOAT_DTYPES:
      raise TypeError(f"'{where}' must be float32 or float64, got "
                      f"{tensor.dtype.name}.")
    if batch_dims is None:
      if not tensor.shape.is_fully_defined():
        raise ValueError(f"'{where}' must have a fully defined shape, got "
                         f"{tensor.shape}.")
    elif (tensor.shape.rank is None or tensor.shape.rank < batch_dims or
          not tensor.shape[batch_dims:].is_fully_defined()):
      raise ValueError(
          f"'{where}' has shape {tensor.shape}: its dimensions after the "
          f"{batch_dims} batch dimension(s) must be known while tracing (they "
          "fix the number of parameters); only batch dimensions may be "
          "unknown.")
    tensors.append(tensor)
  dtypes = {t.dtype for t in tensors}
  if len(dtypes) > 1:
    raise TypeError(f"All '{name}' must share one dtype, got "
                    f"{sorted(d.name for d in dtypes)}.")
  return tensors


def check_output_dtype(tensor, dtype, name):
  """A residual's output must be a float tensor of the variables' dtype."""
  tensor = tf.convert_to_tensor(tensor)
  if tensor.dtype != dtype:
    raise TypeError(f"'{name}' returned a {tensor.dtype.name} tensor; it must "
                    f"return {dtype.name}, the dtype of the variables.")
  return tensor


def check_finite(tensors, name):
  """Rejects NaN or Inf in a starting point.

  Eagerly this raises `ValueError` at once. In a graph it adds a
  `tf.debugging.check_numerics` op that raises `InvalidArgumentError` when the
  graph runs. XLA drops such checks; there the solver returns the start
  unchanged with a NaN objective.
  """
  if tf.executing_eagerly():
    for index, tensor in enumerate(tensors):
      if not np.all(np.isfinite(tensor.numpy())):
        where = name if len(tensors) == 1 else f"{name}[{index}]"
        raise ValueError(f"'{where}' contains NaN or Inf; the starting point "
                         "must be finite.")
    return list(tensors)
  return [tf.debugging.check_numerics(
      tensor, f"'{name}' contains NaN or Inf; the starting point must be "
      "finite") for tensor in tensors]


def check_batch_shapes(tensors, batch_dims, name):
  """All tensors share their first `batch_dims` dimensions."""
  if not batch_dims:
    return
  batch_shape = None
  for index, tensor in enumerate(tensors):
    if tensor.shape.rank < batch_dims:
      raise ValueError(f"'{name}[{index}]' has rank {tensor.shape.rank} "
                       f"< batch_dims={batch_dims}.")
    shape = tensor.shape[:batch_dims]
    if batch_shape is None:
      batch_shape = shape
    elif not shape.is_compatible_with(batch_shape):
      raise ValueError(f"'{name}[{index}]' has batch shape {shape}, expected "
                       f"{batch_shape} like '{name}[0]'.")
