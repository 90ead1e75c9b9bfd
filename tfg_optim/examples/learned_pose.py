"""Trains a Keras model through a least-squares pose fit.

Run: python -m tfg_optim.examples.learned_pose [--jit_compile]

A Dense layer maps features to four 2-D points; a `PoseFit` layer fits the
rigid pose (angle a, translation t) that moves a fixed template onto them,

    pose = argmin_{a, t} 1/2 sum_k ||rot(a) template_k + t - points_k||^2,

with `tfg_optim.least_squares` (one problem per example, `batch_dims=1`),
and the loss compares that pose with the true one. The loss reaches the
Dense layer's weights through the solve by implicit differentiation
(`gradients='implicit'`, the default): the backward pass is one 3 x 3
linear solve per example, and the solver's loop is never differentiated.
The script prints the training loss of every epoch.
"""

import argparse
import time

import numpy as np
import tensorflow as tf

import tfg_optim

TEMPLATE = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -0.5]],
                    np.float32)


def rotate(angle, points):
  """rot(angle) points for angles [B] and points [B or 1, K, 2]."""
  c = tf.cos(angle)[:, tf.newaxis]
  s = tf.sin(angle)[:, tf.newaxis]
  x, y = points[..., 0], points[..., 1]
  return tf.stack([c * x - s * y, s * x + c * y], axis=-1)


def fit_pose(points, **options):
  """The least-squares pose [B, 3] = (angle, tx, ty) of points [B, K, 2]."""
  template = tf.constant(TEMPLATE, points.dtype)

  def residual(pose):
    moved = rotate(pose[:, 0], template[tf.newaxis]) + pose[:, tf.newaxis, 1:]
    return moved - points  # captures the predicted points

  start = tf.zeros(tf.stack([tf.shape(points)[0], 3]), points.dtype)
  return tfg_optim.least_squares(residual, start, batch_dims=1,
                                 **options).position


def make_data(num_examples=256, seed=0):
  """(features [N, 8], poses [N, 3]): features mix the posed template."""
  rng = np.random.default_rng(seed)
  poses = rng.uniform(-1.0, 1.0, (num_examples, 3)).astype(np.float32)
  points = (rotate(tf.constant(poses[:, 0]), TEMPLATE[np.newaxis]).numpy() +
            poses[:, np.newaxis, 1:])
  mix = (np.eye(8) + rng.standard_normal((8, 8)) / 3.0).astype(np.float32)
  return points.reshape(num_examples, 8) @ mix, poses


def build_model(jit_compile=False, learning_rate=0.02, **solver_options):
  """Dense -> four points -> PoseFit, compiled with an MSE loss on poses."""
  import keras  # pylint: disable=g-import-not-at-top

  class PoseFit(keras.layers.Layer):
    """Fits the rigid pose of the template to its input points."""

    def call(self, points):
      return fit_pose(points, **solver_options)

    def compute_output_shape(self, input_shape):
      return (input_shape[0], 3)

  inputs = keras.Input((8,))
  points = keras.layers.Reshape((4, 2))(keras.layers.Dense(8)(inputs))
  model = keras.Model(inputs, PoseFit()(points))
  model.compile(keras.optimizers.Adam(learning_rate), "mse",
                jit_compile=jit_compile)
  return model


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--jit_compile", action="store_true",
                      help="compile the training step with XLA")
  parser.add_argument("--epochs", type=int, default=10)
  args = parser.parse_args(argv)
  import keras  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(0)
  features, poses = make_data()
  model = build_model(args.jit_compile, max_iterations=20)
  print("Learning points whose least-squares pose matches the target "
        f"(256 examples, jit_compile={args.jit_compile})")
  begin = time.perf_counter()
  history = model.fit(features, poses, batch_size=64, epochs=args.epochs,
                      verbose=0)
  elapsed = time.perf_counter() - begin
  for epoch, loss in enumerate(history.history["loss"], 1):
    print(f"  epoch {epoch:2d}: loss {loss:.5f}")
  print(f"  {elapsed:.1f} s (tracing included)")


if __name__ == "__main__":
  main()
