"""Stiefel manifolds St(n, k) and rotation groups SO(n).

Both are embedded in matrix space with the Frobenius inner product
<U, V> = trace(U^T V).
"""

import itertools
import math

import numpy as np
import tensorflow as tf

from tfg_optim.manifolds import base

RETRACTIONS = ("qr", "polar")
_POLAR_ITERATIONS = 8
_POLAR_SCALED_ITERATIONS = 6


def skew_basis(k):
  """An orthonormal basis E_1..E_{k(k-1)/2} of the k x k skew matrices.

  <E_i, E_j>_F = delta_ij: E for the pair a < b has E[b, a] = 1/sqrt(2) and
  E[a, b] = -1/sqrt(2), pairs in lexicographic order, except for k = 3, where
  the order is that of the rotation vector: E_i = hat(e_i) / sqrt(2) with
  hat(w) x = w x x (cross product). Returns a [k(k-1)/2, k, k] array.
  """
  if k == 3:
    pairs = [(1, 2), (2, 0), (0, 1)]  # hat(e_x), hat(e_y), hat(e_z)
  else:
    pairs = list(itertools.combinations(range(k), 2))
  basis = np.zeros((len(pairs), k, k))
  for index, (a, b) in enumerate(pairs):
    basis[index, b, a] = 1.0 / math.sqrt(2.0)
    basis[index, a, b] = -1.0 / math.sqrt(2.0)
  return basis


def _transpose(matrix):
  return tf.linalg.matrix_transpose(matrix)


def _symmetric_part(matrix):
  return 0.5 * (matrix + _transpose(matrix))


def _eye_like(matrix, size):
  """The identity of a static `size`, one constant (tf.eye builds six
  ops)."""
  return tf.constant(np.eye(size), matrix.dtype)


def qr_orthonormalize(x):
  """Q of x = Q R with R upper triangular with a positive diagonal.

  Computed as Cholesky QR applied twice (x^T x = R^T R, Q = x R^{-1}): only
  matmuls, Cholesky factorizations and triangular solves, so it vectorizes
  under tf.vectorized_map (which has no QR converter), compiles under XLA and
  differentiates in both modes. Two passes give Q orthonormal to rounding
  level for cond(x) up to about 1/sqrt(eps) (x = p + v has
  cond(x) = sqrt(1 + ||v||_2^2)).
  """
  for _ in range(2):
    lower = tf.linalg.cholesky(tf.matmul(x, x, transpose_a=True))
    x = _transpose(tf.linalg.triangular_solve(lower, _transpose(x),
                                              lower=True))
  return x


def polar_orthonormalize(x):
  """The polar factor U = x (x^T x)^{-1/2} of a full-column-rank x.

  Newton's iteration x <- (g x + x (x^T x)^{-1} / g) / 2 (singular values
  s <- (g s + 1/(g s)) / 2), with the Frobenius-norm scaling
  g = sqrt(||x (x^T x)^{-1}||_F / ||x||_F) on the first iterations. A fixed
  iteration count keeps it a plain differentiable graph (no eigenvalue
  gradients, which are infinite at x^T x = I); at an orthonormal x it is the
  identity with derivative identity on tangent directions.
  """
  for iteration in range(_POLAR_ITERATIONS):
    lower = tf.linalg.cholesky(tf.matmul(x, x, transpose_a=True))
    inverse_transpose = _transpose(tf.linalg.cholesky_solve(lower,
                                                            _transpose(x)))
    if iteration < _POLAR_SCALED_ITERATIONS:
      scale = tf.sqrt(
          tf.norm(inverse_transpose, axis=[-2, -1], keepdims=True) /
          tf.norm(x, axis=[-2, -1], keepdims=True))
      x = 0.5 * (scale * x + inverse_transpose / scale)
    else:
      x = 0.5 * (x + inverse_transpose)
  return x


def determinant(matrix):
  """det of [B..., n, n] matrices, in plain slicing, gathers and products
  (tf.linalg.det, slogdet and lu have no XLA kernel on CPU), so the same
  numbers in every mode: by cofactor expansion along the first row for
  n <= 6, by Gaussian elimination with partial pivoting beyond (n unrolled
  steps: det = prod of the pivots times the sign of the row swaps).
  """
  a = tf.convert_to_tensor(matrix)
  n = a.shape[-1]
  if n > 6:
    return _elimination_determinant(a)
  if a.shape[-2] == n:  # The entries by two unstacks: n + 1 ops, not a
    # slice per entry read (4 ops each, 15 reads for n = 3).
    entries = [tf.unstack(row, axis=-1) for row in tf.unstack(a, axis=-2)]
  else:
    entries = [[a[..., i, j] for j in range(n)] for i in range(n)]
  return _cofactor_determinant(entries, list(range(n)), 0, {})


def _elimination_determinant(a):
  """det by Gaussian elimination with partial pivoting: at step k the
  trailing [n - k, n - k] block's row of largest |first entry| is swapped
  to the top (a sign flip unless it is already there), its first entry
  multiplies the determinant, and its Schur complement is the next block.
  A zero pivot column gives det 0."""
  batch_rank = a.shape.rank - 2
  result = tf.ones(tf.shape(a)[:-2], a.dtype)
  block = a
  for size in range(a.shape[-1], 0, -1):
    pivot_row = tf.argmax(tf.abs(block[..., :, 0]), axis=-1,
                          output_type=tf.int32)  # [B...]
    rows = tf.range(size)
    pivot = pivot_row[..., tf.newaxis]
    order = tf.where(tf.equal(rows, 0), pivot,
                     tf.where(tf.equal(rows, pivot), 0, rows))  # swap 0, p
    block = tf.gather(block, order, axis=-2, batch_dims=batch_rank)
    head = block[..., 0, 0]
    result *= tf.where(tf.equal(pivot_row, 0), head, -head)
    if size > 1:
      safe = tf.where(tf.equal(head, 0), tf.ones_like(head), head)
      multipliers = block[..., 1:, 0] / safe[..., tf.newaxis]
      block = block[..., 1:, 1:] - (multipliers[..., :, tf.newaxis] *
                                    block[..., 0:1, 1:])
  return result


def _cofactor_determinant(entries, columns, row, minors):
  """The minor of rows `row`.. and `columns` of the matrix whose entries
  are `entries[i][j]`, expanded along its first row; `minors` caches the
  minors already built (the same values, each built once)."""
  if len(columns) == 1:
    return entries[row][columns[0]]
  key = (row, tuple(columns))
  if key in minors:
    return minors[key]
  total = None
  for index, column in enumerate(columns):
    minor = _cofactor_determinant(
        entries, columns[:index] + columns[index + 1:], row + 1, minors)
    term = entries[row][column] * minor
    if total is None:
      total = term
    elif index % 2:
      total = total - term
    else:
      total = total + term
  minors[key] = total
  return total


def _positive_diagonal_qr(x):
  """numpy-convention QR followed by the sign fix making diag(R) > 0."""
  q, r = tf.linalg.qr(x)
  diagonal = tf.linalg.diag_part(r)
  sign = tf.where(diagonal < 0, -tf.ones_like(diagonal),
                  tf.ones_like(diagonal))
  return q * sign[..., tf.newaxis, :]


class Stiefel(base.Manifold):
  """n x k matrices with orthonormal columns (p^T p = I_k); dim =
  k(k-1)/2 + (n-k)k. Points are [B..., n, k].

  Tangent space: T_p = {v : p^T v + v^T p = 0}; projection
  v - p sym(p^T v) with sym(a) = (a + a^T)/2.

  Basis: with p_perp an n x (n-k) orthonormal completion of p (the last
  columns of the full QR factor of p), every tangent vector is
  v = p Omega + p_perp K with Omega skew and K arbitrary, and
  ||v||_F^2 = ||Omega||_F^2 + ||K||_F^2. The basis is p E_i for the skew basis
  E_i of `skew_basis(k)` (first k(k-1)/2 coordinates) followed by
  p_perp e_a e_b^T in row-major order of K ((n-k)k coordinates).

  Retractions (`retraction=`):
    "qr":    R_p(v) = qf(p + v), the Q factor with positive diagonal R
             (numpy's QR up to that sign convention);
    "polar": R_p(v) = (p + v)(I + v^T v)^{-1/2}, the polar factor of p + v,
             i.e. the closest matrix with orthonormal columns.
  Both are computed with Cholesky-based iterations (see `qr_orthonormalize`,
  `polar_orthonormalize`) and return orthonormal columns to rounding level.
  """

  def __init__(self, n, k, retraction="qr"):
    n, k = int(n), int(k)
    if not 1 <= k <= n:
      raise ValueError(f"Stiefel: need 1 <= k <= n, got n={n}, k={k}.")
    self._init_matrix_manifold(
        f"Stiefel({n}, {k}{_retraction_suffix(retraction, 'qr')})", n, k,
        retraction, RETRACTIONS)

  def _init_matrix_manifold(self, name, n, k, retraction, allowed):
    if retraction not in allowed:
      raise ValueError(f"{name.split('(')[0]}: retraction must be one of "
                       f"{allowed}, got {retraction!r}.")
    self.n, self.k = n, k
    self.retraction = retraction
    self._skew_dim = k * (k - 1) // 2
    self._skew_basis = skew_basis(k)
    super().__init__(name, self._skew_dim + (n - k) * k, (n, k))

  def _complement(self, p):
    q = tf.linalg.qr(p, full_matrices=True)[0]
    return q[..., :, self.k:]

  def _skew(self, coordinates):
    basis = tf.constant(self._skew_basis, coordinates.dtype)
    return tf.einsum("...i,ijk->...jk", coordinates, basis)

  def project(self, point, v):
    p = tf.convert_to_tensor(point)
    v = tf.convert_to_tensor(v)
    return v - tf.matmul(p, _symmetric_part(tf.matmul(p, v, transpose_a=True)))

  def tangent_vector(self, point, coordinates):
    p = tf.convert_to_tensor(point)
    c = tf.convert_to_tensor(coordinates)
    v = tf.matmul(p, self._skew(c[..., :self._skew_dim]))
    if self.k < self.n:
      batch = tf.shape(c)[:-1]
      block = tf.reshape(c[..., self._skew_dim:],
                         tf.concat([batch, [self.n - self.k, self.k]], 0))
      v = v + tf.matmul(self._complement(p), block)
    return v

  def coordinates(self, point, v):
    p = tf.convert_to_tensor(point)
    v = tf.convert_to_tensor(v)
    basis = tf.constant(self._skew_basis, v.dtype)
    parts = [tf.einsum("...jk,ijk->...i", tf.matmul(p, v, transpose_a=True),
                       basis)]
    if self.k < self.n:
      block = tf.matmul(self._complement(p), v, transpose_a=True)
      batch = tf.shape(block)[:-2]
      parts.append(tf.reshape(block, tf.concat([batch, [-1]], 0)))
    return tf.concat(parts, axis=-1) if len(parts) > 1 else parts[0]

  def retract(self, point, coordinates):
    p = tf.convert_to_tensor(point)
    x = p + self.tangent_vector(p, coordinates)
    if self.retraction == "polar":
      return polar_orthonormalize(x)
    return qr_orthonormalize(x)

  def distance_to_manifold(self, point):
    """||p^T p - I||_F per batch element."""
    p = tf.convert_to_tensor(point)
    gram = tf.matmul(p, p, transpose_a=True)
    return tf.norm(gram - _eye_like(p, self.k), axis=[-2, -1])

  def random_point(self, batch_shape=(), dtype=tf.float64, seed=None):
    """Uniform (Haar) points: Q of a Gaussian matrix with diag(R) > 0."""
    shape = base.batch_shape_of(batch_shape) + (self.n, self.k)
    return _positive_diagonal_qr(base.standard_normal(shape, dtype, seed))


def _retraction_suffix(retraction, default):
  return "" if retraction == default else f", retraction={retraction!r}"


class SpecialOrthogonal(Stiefel):
  """Rotation matrices: p^T p = I, det p = +1. Points [B..., n, n];
  dim = n(n-1)/2.

  Tangent space: T_p = {p Omega : Omega skew}; projection p skew(p^T v).

  Basis (left-invariant, body frame): b_i(p) = p E_i with the skew basis
  E_i of `skew_basis(n)`, orthonormal in the Frobenius metric:
  <p E_i, p E_j>_F = trace(E_i^T E_j) = delta_ij. Because of this scaling,
  for n = 3, E_i = hat(e_i) / sqrt(2): coordinates c are the body-frame
  rotation vector w = c / sqrt(2) (c = sqrt(2) w), and the Frobenius length
  of the tangent vector is sqrt(2) |w|.

  Retractions (`retraction=`; default "exp" for n = 2, 3, else "qr"):
    "exp":   R_p(p Omega) = p expm(Omega), for n = 3 by Rodrigues' formula
             expm(hat(w)) = I + sin(t)/t hat(w) + (1 - cos t)/t^2 hat(w)^2,
             t = |w| (Taylor branches near t = 0), for n = 2 the planar
             rotation by w = c / sqrt(2); followed by one Newton-Schulz step
             x <- x (3I - x^T x) / 2 that removes the rounding drift of the
             product (identity, with identity derivative, on SO(n));
    "qr":    qf(p (I + Omega)) with positive-diagonal R;
    "polar": polar factor of p (I + Omega) = p (I + Omega)(I - Omega^2)^{-1/2}.
  All keep det = +1 (det(I + Omega) > 0 for skew Omega).
  """

  def __init__(self, n, retraction=None):
    n = int(n)
    if n < 2:
      raise ValueError(f"SpecialOrthogonal: n must be at least 2, got {n}.")
    default = "exp" if n in (2, 3) else "qr"
    retraction = default if retraction is None else retraction
    allowed = ("exp",) + RETRACTIONS if n in (2, 3) else RETRACTIONS
    if retraction == "exp" and n not in (2, 3):
      raise ValueError("SpecialOrthogonal: the 'exp' retraction is "
                       f"implemented for n = 2 and 3 only, got n = {n}.")
    self._init_matrix_manifold(
        f"SpecialOrthogonal({n}{_retraction_suffix(retraction, default)})",
        n, n, retraction, allowed)

  def retract(self, point, coordinates):
    if self.retraction != "exp":
      return super().retract(point, coordinates)
    p = tf.convert_to_tensor(point)
    c = tf.convert_to_tensor(coordinates)
    rotation = (rodrigues(c / math.sqrt(2.0)) if self.n == 3 else
                planar_rotation(c[..., 0] / math.sqrt(2.0)))
    x = tf.matmul(p, rotation)
    eye = _eye_like(x, self.n)
    return 0.5 * tf.matmul(x, 3.0 * eye - tf.matmul(x, x, transpose_a=True))

  def distance_to_manifold(self, point):
    """||p^T p - I||_F + |det p - 1| per batch element."""
    p = tf.convert_to_tensor(point)
    return super().distance_to_manifold(p) + tf.abs(determinant(p) - 1.0)

  def _off_manifold_hint(self, point):
    if np.any(np.asarray(determinant(point)) < 0):
      return "; determinant < 0: a reflection, not a rotation"
    return ""

  def random_point(self, batch_shape=(), dtype=tf.float64, seed=None):
    """Uniform (Haar) rotations: Haar O(n) by sign-fixed QR, then the first
    column negated where det = -1."""
    q = super().random_point(batch_shape, dtype, seed)
    sign = tf.sign(determinant(q))
    return tf.concat([q[..., :1] * sign[..., tf.newaxis, tf.newaxis],
                      q[..., 1:]], axis=-1)


def hat(w):
  """[B..., 3] -> the [B..., 3, 3] skew matrix with hat(w) x = w x x."""
  w = tf.convert_to_tensor(w)
  x, y, z = tf.unstack(w, axis=-1)
  zero = tf.zeros_like(x)
  return tf.stack([tf.stack([zero, -z, y], -1),
                   tf.stack([z, zero, -x], -1),
                   tf.stack([-y, x, zero], -1)], -2)


def rodrigues(w):
  """expm(hat(w)) for rotation vectors w [B..., 3]; exact derivatives at 0."""
  w = tf.convert_to_tensor(w)
  angle_squared = tf.reduce_sum(w * w, axis=-1)[..., tf.newaxis, tf.newaxis]
  k = hat(w)
  return (_eye_like(w, 3) + base.sinc(angle_squared) * k +
          base.one_minus_cos_over_square(angle_squared) * tf.matmul(k, k))


def planar_rotation(angle):
  """[B...] angles -> [B..., 2, 2] rotations [[cos, -sin], [sin, cos]]."""
  cosine, sine = tf.cos(angle), tf.sin(angle)
  return tf.stack([tf.stack([cosine, -sine], -1),
                   tf.stack([sine, cosine], -1)], -2)
