"""The manifold interface shared by every manifold of this package.

A manifold M is described by its points, stored as tensors of shape
[B..., *point_shape] (B... = any leading batch dimensions), and by an
orthonormal basis b_1(p), ..., b_dim(p) of each tangent space T_p M. A tangent
vector is handled in two forms:

* ambient: a tensor of the point's shape, v in T_p M inside the embedding
  space (R^n, R^{n x k}, ...);
* coordinates: a [B..., dim] tensor c with v = sum_i c_i b_i(p).

The basis is orthonormal for `inner`, which is the Euclidean (Frobenius) inner
product of the embedding unless a manifold says otherwise, so Euclidean
lengths of coordinates are Riemannian lengths of tangent vectors.

A retraction R_p(v) maps a tangent vector to a point with R_p(0) = p and
d/dt R_p(t v)|_{t=0} = v. `retract(p, c)` is R_p(sum_i c_i b_i(p)); it is what
an optimizer needs: it can differentiate c -> F(retract(p, c)) at c = 0 in
forward or reverse mode and get the Riemannian Jacobian of F in the basis.
Every retraction of this package has finite, exact derivatives at c = 0 (no
0/0 from sin(t)/t or 1/||v||), compiles under XLA, vectorizes under
`tf.vectorized_map`, and returns points on the manifold to machine precision.
"""

import numbers

import numpy as np
import tensorflow as tf


def default_tolerance(dtype):
  """Default `check_point` tolerance: 1e-4 (float32) or 1e-9 (float64)."""
  return 1e-4 if tf.as_dtype(dtype) in (tf.float16, tf.bfloat16,
                                        tf.float32) else 1e-9


def batch_shape_of(batch_shape):
  if isinstance(batch_shape, numbers.Integral):
    return (int(batch_shape),)
  return tuple(int(size) for size in batch_shape)


def standard_normal(shape, dtype, seed):
  """N(0, 1) samples; reproducible (stateless) when `seed` is an int."""
  dtype = tf.as_dtype(dtype)
  if seed is None:
    return tf.random.normal(shape, dtype=dtype)
  return tf.random.stateless_normal(shape, seed=[int(seed), 0], dtype=dtype)


def sub_seed(seed, index):
  return None if seed is None else int(seed) * 7919 + 104729 * (index + 1)


def safe_function(x_squared, taylor, exact, threshold=1e-4):
  """f(x) from its square, with a Taylor branch near x = 0.

  Computes `exact(sqrt(x_squared))` where x_squared >= threshold and
  `taylor(x_squared)` elsewhere. The "double where" keeps both the value and
  every derivative (forward and reverse mode) finite at x = 0: the exact
  branch never sees a square root of (or division by) zero, even in the
  unselected lane.
  """
  small = x_squared < threshold
  safe = tf.where(small, tf.ones_like(x_squared), x_squared)
  return tf.where(small, taylor(x_squared), exact(tf.sqrt(safe)))


def sinc(x_squared):
  """sin(x)/x as a function of x^2 (Taylor error < 1e-17 below the switch)."""
  return safe_function(
      x_squared, lambda t: 1.0 - t / 6.0 * (1.0 - t / 20.0 * (1.0 - t / 42.0)),
      lambda x: tf.sin(x) / x)


def one_minus_cos_over_square(x_squared):
  """(1 - cos x)/x^2 as a function of x^2, without cancellation."""
  def exact(x):
    half = tf.sin(0.5 * x) / x
    return 2.0 * half * half
  return safe_function(
      x_squared,
      lambda t: 0.5 - t / 24.0 * (1.0 - t / 30.0 * (1.0 - t / 56.0)), exact)


def last_axes(rank):
  return list(range(-rank, 0)) if rank else []


class Manifold:
  """Base class: shared logic and Euclidean-embedding defaults.

  Subclasses set `dim`, `point_shape` and `name`, and implement
  `tangent_vector`, `coordinates`, `project`, `retract`,
  `distance_to_manifold` and `random_point`. The defaults here assume points
  are single tensors whose last len(point_shape) axes are the point.
  """

  def __init__(self, name, dim, point_shape):
    self._name = name
    self._dim = int(dim)
    self._point_shape = tuple(point_shape)

  @property
  def name(self):
    return self._name

  @property
  def dim(self):
    """Intrinsic dimension: the number of tangent coordinates."""
    return self._dim

  @property
  def point_shape(self):
    """The shape of one point (without batch dimensions)."""
    return self._point_shape

  @property
  def point_rank(self):
    return len(self._point_shape)

  def __repr__(self):
    return self._name

  # -- tangent spaces ----------------------------------------------------------

  def inner(self, point, u, v):
    """<u, v>_p; the Euclidean (Frobenius) inner product by default. [B...]."""
    del point
    return tf.reduce_sum(u * v, axis=last_axes(self.point_rank))

  def norm(self, point, v):
    """||v||_p = sqrt(<v, v>_p), shape [B...]."""
    return tf.sqrt(self.inner(point, v, v))

  def project(self, point, v):
    """Orthogonal projection of an ambient vector onto T_p M."""
    raise NotImplementedError

  def tangent_vector(self, point, coordinates):
    """sum_i c_i b_i(p): coordinates [B..., dim] -> ambient tangent vector."""
    raise NotImplementedError

  def coordinates(self, point, v):
    """The coordinates of project(p, v) in the basis b_i(p), [B..., dim]."""
    raise NotImplementedError

  def retract(self, point, coordinates):
    """R_p(sum_i c_i b_i(p)): a point of the manifold."""
    raise NotImplementedError

  # -- points ------------------------------------------------------------------

  def distance_to_manifold(self, point):
    """A per-batch-element measure of how far `point` is off M, [B...]."""
    raise NotImplementedError

  def random_point(self, batch_shape=(), dtype=tf.float64, seed=None):
    """Random points of shape [*batch_shape, *point_shape]."""
    raise NotImplementedError

  def as_point(self, point):
    """`point` (a tensor, NumPy value, nested list, `tf.Variable`) as this
    manifold's structure: one tensor here; a `Product` keeps the tuple or
    list it is given."""
    return tf.convert_to_tensor(point)

  def check_shape(self, point, batch_dims=None):
    """Raises ValueError unless `point` has shape [B..., *point_shape].

    With `batch_dims` given, exactly that many leading axes B... are
    allowed (an extra axis with batch_dims=0 is an error, not a batch).
    Unknown sizes pass.
    """
    shape = tf.convert_to_tensor(point).shape
    rank = self.point_rank
    if shape.rank is None:
      return
    ok = (shape.rank == rank + batch_dims if batch_dims is not None else
          shape.rank >= rank)
    ok = ok and tf.TensorShape(shape[shape.rank - rank:]).is_compatible_with(
        self.point_shape)
    if not ok:
      batch = ("..." if batch_dims is None else
               ", ".join(f"B{i + 1}" for i in range(batch_dims)))
      expected = ", ".join(([batch] if batch else []) +
                           [str(size) for size in self.point_shape])
      raise ValueError(f"{self.name}: a point must have shape [{expected}], "
                       f"got {shape}.")

  def _check_distance(self, point, atol):
    dtype = tf.nest.flatten(point)[0].dtype
    atol = default_tolerance(dtype) if atol is None else float(atol)
    distance = self.distance_to_manifold(point)
    if not tf.executing_eagerly():
      return
    distance = np.asarray(distance)
    if not np.all(np.isfinite(distance)):
      raise ValueError(f"{self.name}: the point is not finite.")
    worst = float(np.max(distance)) if distance.size else 0.0
    if worst > atol:
      raise ValueError(
          f"{self.name}: the point is off the manifold (distance {worst:.3g} "
          f"> atol {atol:.3g}{self._off_manifold_hint(point)}).")

  def _off_manifold_hint(self, point):
    del point
    return ""

  def check_point(self, point, atol=None):
    """Raises ValueError if `point` has the wrong shape or is off M.

    The distance test runs only eagerly (in a graph only the static shape is
    checked; see `contains` for the in-graph test). atol defaults to 1e-4 for
    float32 and 1e-9 for float64. Returns `point`.
    """
    point = tf.convert_to_tensor(point)
    self.check_shape(point)
    self._check_distance(point, atol)
    return point

  def contains(self, point, atol=None):
    """[B...] bool: whether each point is on M, distance_to_manifold(p) <=
    atol, the test of `check_point` as a tensor (False for NaN or Inf).

    Runs in every mode, XLA included; atol defaults as in `check_point`.
    """
    dtype = tf.nest.flatten(point)[0].dtype
    atol = default_tolerance(dtype) if atol is None else float(atol)
    distance = self.distance_to_manifold(point)
    # is_finite is not redundant: Grappler rewrites not(d <= atol) into
    # d > atol, which is False for NaN.
    return tf.math.is_finite(distance) & (
        distance <= tf.constant(atol, distance.dtype))
