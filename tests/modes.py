"""Runs one piece of TensorFlow code in every execution mode.

`run(build, inputs, mode)` calls `build(*tensors)` on `inputs` (NumPy arrays)
eagerly, inside `tf.function`, inside `tf.function(jit_compile=True)`, or in a
TF1 graph evaluated by a `tf.compat.v1.Session`, and returns NumPy values of
the same structure. Test classes use `parameterized.parameters(*MODES)`.
"""

import numpy as np
import tensorflow as tf

MODES = ("eager", "function", "xla", "session")


def run(build, inputs, mode, signature=None):
  """Returns build(*inputs) evaluated in `mode`, as NumPy values.

  `signature`: optional list of shapes (None for an unknown dimension), one
  per input, for the graph modes: the `tf.function` input signature, or the
  placeholders' shapes; by default the inputs' own shapes.
  """
  inputs = [np.asarray(value) for value in inputs]
  shapes = signature or [value.shape for value in inputs]
  if mode == "eager":
    outputs = build(*[tf.constant(value) for value in inputs])
    return tf.nest.map_structure(_numpy, outputs)
  if mode in ("function", "xla"):
    function = tf.function(
        build, jit_compile=(mode == "xla"), autograph=False,
        input_signature=None if signature is None else [
            tf.TensorSpec(shape, tf.as_dtype(value.dtype))
            for shape, value in zip(shapes, inputs)])
    outputs = function(*[tf.constant(value) for value in inputs])
    return tf.nest.map_structure(_numpy, outputs)
  if mode == "session":
    graph = tf.Graph()
    with graph.as_default():
      placeholders = [tf.compat.v1.placeholder(tf.as_dtype(value.dtype),
                                               shape)
                      for value, shape in zip(inputs, shapes)]
      outputs = build(*placeholders)
      with tf.compat.v1.Session(graph=graph) as session:
        session.run(tf.compat.v1.global_variables_initializer())
        return session.run(outputs, dict(zip(placeholders, inputs)))
  raise ValueError(f"unknown mode {mode!r}")


def _numpy(value):
  return value.numpy() if hasattr(value, "numpy") else value
