"""Dense linear solvers of the damped Gauss-Newton system.

Each takes the Jacobian J [B..., m, n] (and what its method needs) and
returns `solve(residual, gradient)`, a function that solves the system for a
right-hand side: F (used by the dual form) and g = J^T F (used by the normal
form). The factorization is made once, so the same `solve` serves the step
and geodesic acceleration's second solve (and will serve the backward pass
of implicit differentiation). A failed factorization gives NaN steps, which
the loop treats as a rejection, in every mode.

- `damped_solver`: Cholesky of the damped normal equations
      (J^T J + lambda D) s = -J^T F                    (m >= n, or D given)
  or of the dual form
      s = -J^T (J J^T + lambda I)^-1 F                 (m < n, D = I),
  the arithmetic of `tf.linalg.lstsq(J, F, l2_regularizer=lambda,
  fast=True)`.
- `trust_region_solver`: the step of a trust region in the scaled norm
  ||D^1/2 s|| <= Delta, lambda found from an eigendecomposition of
  D^-1/2 J^T J D^-1/2 by Newton's method on the secular equation.
"""

import numpy as np
import tensorflow as tf

from tfg_optim import _batch


def in_xla():
  """Whether the ops being built will be compiled by XLA."""
  from tensorflow.python.ops import control_flow_util  # pylint: disable=g-import-not-at-top
  return (not tf.executing_eagerly() and
          control_flow_util.GraphOrParentsInXlaContext(
              tf.compat.v1.get_default_graph()))


def damped_solver(jacobian_matrix, regularization, scaling=None):
  """Factors the damped normal equations once; returns `solve`.

  Args:
    jacobian_matrix: J, [B..., m, n].
    regularization: lambda, [B...].
    scaling: D's diagonal, [B..., n], or None for the identity.
  """
  m, n = jacobian_matrix.shape[-2], jacobian_matrix.shape[-1]
  lam = regularization[..., tf.newaxis, tf.newaxis]

  def overdetermined():
    gram = tf.matmul(jacobian_matrix, jacobian_matrix, adjoint_a=True)
    if scaling is None:
      gram += lam * tf.eye(n, dtype=gram.dtype)
    else:
      gram += lam * tf.linalg.diag(scaling)
    factor = _cholesky(gram)
    return lambda residual, gradient: -tf.linalg.cholesky_solve(
        factor, gradient[..., tf.newaxis])[..., 0]

  def underdetermined():
    gram = tf.matmul(jacobian_matrix, jacobian_matrix, adjoint_b=True)
    gram += lam * tf.eye(tf.shape(gram)[-1], dtype=gram.dtype)
    factor = _cholesky(gram)

    def solve(residual, gradient):
      del gradient
      multiplier = tf.linalg.cholesky_solve(factor, residual[..., tf.newaxis])
      return -tf.matmul(jacobian_matrix, multiplier, adjoint_a=True)[..., 0]
    return solve

  if scaling is not None or (m is not None and m >= n):
    return overdetermined()
  if m is not None:
    return underdetermined()
  wide = tf.shape(jacobian_matrix)[-2] < n  # m unknown while tracing.
  return lambda residual, gradient: tf.cond(
      wide, lambda: underdetermined()(residual, gradient),
      lambda: overdetermined()(residual, gradient))


def _cholesky(matrix):
  """Cholesky factor; NaN where it fails (older eager kernels raise)."""
  if not tf.executing_eagerly():
    return tf.linalg.cholesky(matrix)
  try:
    return tf.linalg.cholesky(matrix)
  except tf.errors.InvalidArgumentError:
    return tf.fill(tf.shape(matrix), tf.constant(float("nan"), matrix.dtype))


def trust_region_solver(jacobian_matrix, gradient, scale, radius,
                        newton_iterations):
  """The trust-region step: returns (`solve`, radius, lambda).

  s(lambda) = -(J^T J + lambda D)^-1 g with lambda >= 0 the smallest value
  for which ||D^1/2 s|| <= radius. With the eigendecomposition
  D^-1/2 J^T J D^-1/2 = V diag(sigma) V^T and c = V^T D^-1/2 g,
  ||D^1/2 s(lambda)|| = ||c / (sigma + lambda)||, and lambda is found by
  Newton's method on psi(lambda) = 1/radius - 1/||D^1/2 s(lambda)||
  (concave, so the iterates rise monotonically to the root; Moré 1978).
  Eigenvalues below eps times the largest are rounding: a singular J^T J
  gives a long, finite Gauss-Newton step, not an infinite one. A negative
  radius is relative: -radius times the Gauss-Newton step's scaled length
  (the first radius). `eigh` raises on NaN or Inf in every mode, so such
  problems decompose the identity instead and get a NaN step (a rejection)
  and their radius back unchanged.

  Args:
    jacobian_matrix: J, [B..., m, n].
    gradient: g = J^T F, [B..., n].
    scale: D's diagonal, [B..., n], positive.
    radius: [B...].
    newton_iterations: a Python int.
  """
  dtype = gradient.dtype
  inverse_root = tf.math.rsqrt(scale)
  gram = tf.matmul(jacobian_matrix, jacobian_matrix, adjoint_a=True)
  scaled_gram = (gram * inverse_root[..., :, tf.newaxis] *
                 inverse_root[..., tf.newaxis, :])
  finite = _batch.all_finite(scaled_gram, scaled_gram.shape.rank - 2)
  identity = tf.eye(tf.shape(scaled_gram)[-1], dtype=dtype)
  sigma, vectors = tf.linalg.eigh(
      _batch.select(finite, scaled_gram,
                    tf.broadcast_to(identity, tf.shape(scaled_gram))))
  sigma = tf.maximum(sigma, tf.zeros_like(sigma))
  coefficients = tf.linalg.matvec(vectors, inverse_root * gradient,
                                  adjoint_a=True)
  finfo = np.finfo(dtype.as_numpy_dtype)
  tiny = tf.constant(finfo.tiny, dtype)
  floor = finfo.eps * tf.reduce_max(sigma, axis=-1, keepdims=True) + tiny

  def shifted(lam):  # sigma + lambda, [B..., n]
    return tf.maximum(sigma + lam[..., tf.newaxis], floor)

  lam = tf.zeros_like(radius)
  gauss_newton_length = tf.norm(coefficients / shifted(lam), axis=-1)
  old_radius = radius
  radius = tf.where(radius < 0, -radius * gauss_newton_length, radius)
  def newton_step(lam):
    shift = shifted(lam)
    current = tf.norm(coefficients / shift, axis=-1)
    slope = tf.reduce_sum(tf.square(coefficients) / shift ** 3, -1)
    # psi(lambda) = 1/radius - 1/length, psi' = -slope / length^3.
    update = ((current / radius - 1.0) * tf.square(current) /
              tf.maximum(slope, tiny))
    # Overflow (float32: coefficients / tiny shifts) must not make lambda
    # NaN: keep the last finite value, and let the gain ratio judge.
    raised = lam + update
    return tf.where((current > radius) & tf.math.is_finite(raised), raised,
                    lam)

  if in_xla():
    # A loop: the same arithmetic and run time under XLA, and a program
    # `newton_iterations` times smaller to trace and compile. Elsewhere
    # each loop iteration costs TensorFlow's executor more than the
    # unrolled ops (+0.1 ms per solver iteration).
    _, lam = tf.while_loop(
        lambda i, lam: True, lambda i, lam: (i + 1, newton_step(lam)),
        (tf.constant(0), lam), maximum_iterations=newton_iterations)
  else:
    for _ in range(newton_iterations):
      lam = newton_step(lam)
  final_shift = shifted(lam)

  def solve(residual, rhs_gradient):
    del residual
    c = tf.linalg.matvec(vectors, inverse_root * rhs_gradient, adjoint_a=True)
    step = -inverse_root * tf.linalg.matvec(vectors, c / final_shift)
    return _batch.select(finite, step,
                         tf.fill(tf.shape(step), tf.constant(np.nan, dtype)))

  radius = tf.where(finite & tf.math.is_finite(radius), radius, old_radius)
  return solve, radius, lam
