"""Products M1 x M2 x ... and powers M^count of manifolds."""

import tensorflow as tf

from tfg_optim.manifolds import base


class Product(base.Manifold):
  """M1 x M2 x ...; points (and ambient tangent vectors) are Python tuples
  with one entry per factor, each in its factor's format (tf.nest-compatible;
  a factor that is itself a Product contributes a nested tuple). Lists work
  too (`[R, t]`, as Manopt users write them): what a method returns for a
  point has the container type of that point.

  Inner product: the sum of the factors' inner products. Basis: the factors'
  bases side by side, so coordinates are the factors' coordinates
  concatenated in factor order: dim = sum of the factors' dims. Retraction,
  projection: factor by factor. distance_to_manifold: the largest factor
  distance. point_shape: the tuple of the factors' point shapes.

  Example, a rigid pose (rotation, translation):
  `Product(SpecialOrthogonal(3), Euclidean(3))`, dim 6.
  """

  def __init__(self, *factors):
    if not factors:
      raise ValueError("Product: needs at least one factor.")
    for index, factor in enumerate(factors):
      if not isinstance(factor, base.Manifold):
        raise TypeError(f"Product: factor {index} is not a manifold: "
                        f"{factor!r}.")
    self.factors = tuple(factors)
    self._dims = [factor.dim for factor in factors]
    super().__init__(f"Product({', '.join(map(repr, factors))})",
                     sum(self._dims), tuple(f.point_shape for f in factors))

  def _split(self, coordinates):
    return tf.split(tf.convert_to_tensor(coordinates), self._dims, axis=-1)

  def _zip(self, *structures):
    for structure in structures:
      if not isinstance(structure, (tuple, list)) or len(structure) != len(
          self.factors):
        raise ValueError(f"{self.name}: expected a tuple or list of "
                         f"{len(self.factors)} entries, got {structure!r}.")
    return zip(self.factors, *structures)

  @staticmethod
  def _like(point, values):
    """`values` in the container type of `point` (list or tuple)."""
    return list(values) if isinstance(point, list) else tuple(values)

  def as_point(self, point):
    return self._like(point, (f.as_point(p) for f, p in self._zip(point)))

  def inner(self, point, u, v):
    return tf.add_n([f.inner(p, a, b) for f, p, a, b in self._zip(point, u, v)])

  def project(self, point, v):
    return self._like(point, (f.project(p, a)
                              for f, p, a in self._zip(point, v)))

  def tangent_vector(self, point, coordinates):
    return self._like(point, (
        f.tangent_vector(p, c)
        for f, p, c in self._zip(point, self._split(coordinates))))

  def coordinates(self, point, v):
    return tf.concat([f.coordinates(p, a) for f, p, a in self._zip(point, v)],
                     axis=-1)

  def retract(self, point, coordinates):
    return self._like(point, (
        f.retract(p, c)
        for f, p, c in self._zip(point, self._split(coordinates))))

  def distance_to_manifold(self, point):
    distances = [f.distance_to_manifold(p) for f, p in self._zip(point)]
    return tf.reduce_max(tf.stack(distances), axis=0)

  def contains(self, point, atol=None):
    """Every factor contains its entry (each with its own test)."""
    inside = [f.contains(p, atol) for f, p in self._zip(point)]
    return tf.reduce_all(tf.stack(inside), axis=0)

  def random_point(self, batch_shape=(), dtype=tf.float64, seed=None):
    return tuple(f.random_point(batch_shape, dtype, base.sub_seed(seed, index))
                 for index, f in enumerate(self.factors))

  def _each_factor(self, method, point, *args):
    """factor.method(entry, *args) for each factor; errors name the factor."""
    results = []
    for index, (factor, p) in enumerate(self._zip(point)):
      try:
        results.append(getattr(factor, method)(p, *args))
      except ValueError as error:
        raise ValueError(f"{self.name}, factor {index}: {error}") from None
    return results

  def check_shape(self, point, batch_dims=None):
    self._each_factor("check_shape", point, batch_dims)

  def check_point(self, point, atol=None):
    """Checks each factor (its error names the factor); returns the point."""
    return self._like(point, self._each_factor("check_point", point, atol))


class Power(base.Manifold):
  """M^count: `count` points of M stacked on a new axis right before M's
  point axes: points [B..., count, *M.point_shape] (for a Product M, each
  tuple entry gets the count axis). Coordinates are copy-major:
  [B..., count * M.dim], copy j's coordinates at [j*M.dim, (j+1)*M.dim).
  Inner product: the sum over the copies; everything else copy by copy (the
  count axis is one more batch axis for M).
  """

  def __init__(self, manifold, count):
    if not isinstance(manifold, base.Manifold):
      raise TypeError(f"Power: not a manifold: {manifold!r}.")
    count = int(count)
    if count < 1:
      raise ValueError(f"Power: count must be positive, got {count}.")
    self.manifold = manifold
    self.count = count
    point_shape = _prepend(count, manifold.point_shape)
    super().__init__(f"Power({manifold!r}, {count})", count * manifold.dim,
                     point_shape)

  def _unflatten(self, coordinates):
    c = tf.convert_to_tensor(coordinates)
    batch = tf.shape(c)[:-1]
    return tf.reshape(c, tf.concat([batch, [self.count, self.manifold.dim]],
                                   0))

  def _flatten(self, coordinates):
    batch = tf.shape(coordinates)[:-2]
    return tf.reshape(coordinates, tf.concat([batch, [self.dim]], 0))

  def inner(self, point, u, v):
    return tf.reduce_sum(self.manifold.inner(point, u, v), axis=-1)

  def project(self, point, v):
    return self.manifold.project(point, v)

  def tangent_vector(self, point, coordinates):
    return self.manifold.tangent_vector(point, self._unflatten(coordinates))

  def coordinates(self, point, v):
    return self._flatten(self.manifold.coordinates(point, v))

  def retract(self, point, coordinates):
    return self.manifold.retract(point, self._unflatten(coordinates))

  def distance_to_manifold(self, point):
    return tf.reduce_max(self.manifold.distance_to_manifold(point), axis=-1)

  def contains(self, point, atol=None):
    return tf.reduce_all(self.manifold.contains(point, atol), axis=-1)

  def as_point(self, point):
    return self.manifold.as_point(point)

  def check_shape(self, point, batch_dims=None):
    """M's shape check with the count axis as one more batch axis, and
    (with `batch_dims`) that axis of size `count`."""
    inner_batch_dims = None if batch_dims is None else batch_dims + 1
    try:
      self.manifold.check_shape(point, inner_batch_dims)
    except ValueError as error:
      raise ValueError(f"{self.name}: {error}") from None
    for leaf in tf.nest.flatten(point):
      shape = tf.convert_to_tensor(leaf).shape
      if batch_dims is None or shape.rank is None:
        continue
      if shape[batch_dims] not in (None, self.count):
        raise ValueError(f"{self.name}: axis {batch_dims} holds the "
                         f"{self.count} copies, got shape {shape}.")

  def random_point(self, batch_shape=(), dtype=tf.float64, seed=None):
    return self.manifold.random_point(
        base.batch_shape_of(batch_shape) + (self.count,), dtype, seed)

  def check_point(self, point, atol=None):
    return self.manifold.check_point(point, atol)


def _prepend(count, shapes):
  """Prepends `count` to every shape of a (nested) tuple of shapes."""
  if shapes and all(isinstance(s, int) for s in shapes):
    return (count,) + tuple(shapes)
  if not shapes:
    return (count,)
  return tuple(_prepend(count, s) for s in shapes)
