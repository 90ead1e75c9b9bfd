"""Chunked data: least squares over N residuals in O(K n + n^2) memory.

The residual map is given per row of data tensors with a shared leading
dimension N, F(p) = concat_c f(p, data[c K : (c + 1) K]), and is never held
whole. One pass over the chunks (a `tf.while_loop` over the N // K full
chunks of static size K, then one remainder chunk of N mod K rows: static
shapes wherever N is static, which XLA needs) sums, per chunk c,

    cost_c = 1/2 ||F_c||^2,   J_c^T J_c,   J_c^T F_c,

with J_c the dense [K, n] Jacobian of the chunk (`_linearization.jacobian`:
one forward-mode product per coordinate). `chunk_terms` is that unit, one
chunk's (J^T J, J^T F, cost): a multi-device solve sums it across devices
as the pass sums it across chunks.

The loop sees a problem whose residual is the [1] vector ||F|| =
sqrt(2 cost) (a cost pass: one evaluation of f per chunk, no derivative),
so the cost, the gradient-cosine test and the finiteness checks are
unchanged, and a `Gram` linearization holding J^T J and J^T F (a Jacobian
pass, only after an accepted step). The loop asks a linearization for
J^T F (`gradient`), ||J v||^2 = v^T J^T J v (`curvature`), diag(J^T J)
and J^T J; nothing needs J itself, except geodesic acceleration
(F''[v, v] over all residuals) and the matrix-free solvers, which are not
offered with chunks.
"""

import tensorflow as tf

from tfg_optim import _linearization


class Gram:
  """J through J^T [J | F], [n, n + 1]: J^T J and the gradient J^T F at a
  point, in one tensor (the one a multi-device solve sums; the loop state
  also carries it as one tensor: with two, TensorFlow's graph optimizer
  (constant folding with dependency optimization) left the loop's outputs
  without values)."""

  dense = True

  def __init__(self, augmented):
    self.augmented = augmented
    self._gram = augmented[..., :-1]
    self._gradient = augmented[..., -1]

  @property
  def tensors(self):
    return (self.augmented,)

  def matvec(self, vector):
    raise ValueError("a chunked-data linearization keeps J^T J, not J.")

  rmatvec = matvec

  def gradient(self, residual):
    del residual  # The residual it was built with, summed chunk by chunk.
    return self._gradient

  def curvature(self, vector):
    # v^T J^T J v >= 0; rounding may not know it.
    value = tf.reduce_sum(vector * tf.linalg.matvec(self._gram, vector), -1)
    return tf.maximum(value, tf.zeros_like(value))

  def column_norms(self):
    return tf.linalg.diag_part(self._gram)

  def gram(self):
    return self._gram

  def is_zero(self):
    return tf.reduce_all(tf.equal(self._gram, 0), axis=[-2, -1])

  def hold_fixed(self, free):
    both = tf.concat([free, tf.ones_like(free[..., :1])], -1)
    return Gram(self.augmented * free[..., :, tf.newaxis] *
                both[..., tf.newaxis, :])


def chunk_terms(chunk_residual, retract, tangent_dim, point, chunk):
  """One chunk's (J^T [J | F] [n, n + 1], cost []): the unit that the
  passes (and, later, devices) sum."""
  from tfg_optim import _engine  # pylint: disable=g-import-not-at-top
  residual_fn = lambda p: chunk_residual(p, chunk)
  residual = residual_fn(point)
  problem = _engine.Problem(residual_fn=residual_fn, retract=retract,
                            tangent_dim=tangent_dim, cost_fn=None,
                            jacobian_fn=None)
  jacobian = _linearization.jacobian(problem, point, tf.zeros([0], tf.int32),
                                     None)
  residual = tf.reshape(residual, [-1, 1])
  return (tf.matmul(jacobian, tf.concat([jacobian, residual], -1),
                    adjoint_a=True),
          0.5 * tf.reduce_sum(tf.square(residual)))


class ChunkedData:
  """Data tensors [N, ...] read in chunks of `chunk_size` rows."""

  def __init__(self, data, chunk_size):
    self.data = list(data)
    self.chunk_size = chunk_size

  def fold(self, function, zeros):
    """The sum over chunks of `function(chunk)` (a tuple of tensors shaped
    like `zeros`); chunk: the list of data slices."""
    k = self.chunk_size
    static_n = self.data[0].shape[0]
    for tensor in self.data[1:]:
      if static_n is None:
        static_n = tensor.shape[0]
    length = static_n if static_n is not None else tf.shape(self.data[0])[0]
    add = lambda a, b: tuple(x + y for x, y in zip(a, b))

    def rows(start, size):
      chunk = []
      for tensor in self.data:
        rank = tensor.shape.rank
        piece = tf.slice(tensor, tf.stack([start] + [0] * (rank - 1)),
                         [size] + [-1] * (rank - 1))
        if isinstance(size, int) and size >= 0:
          piece.set_shape([size] + tensor.shape[1:].as_list())
        chunk.append(piece)
      return chunk

    full = length // k
    total = zeros
    if not isinstance(full, int) or full > 0:
      def body(i, total):
        return i + 1, add(total, function(rows(i * k, k)))
      _, total = tf.while_loop(
          lambda i, total: i < full, body, (tf.constant(0), zeros),
          maximum_iterations=full, parallel_iterations=1)
    if isinstance(length, int):
      if length % k:
        total = add(total, function(rows(full * k, length % k)))
    else:  # A dynamic remainder, possibly empty.
      total = add(total, function(rows(full * k, -1)))
    return total


class ChunkedKind:
  """Builds `Gram` linearizations by a Jacobian pass over the chunks, and
  evaluates ||F|| by a cost pass (`residual_norm`, the engine's residual).

  chunk_residual: (point, chunk) -> the [K_c] residuals of the chunk's rows.
  In graphs each pass is one `tf.function` (the residual is traced once per
  pass and chunk shape, however often the loop calls it).
  """

  dense = True

  def __init__(self, chunk_residual, retract, tangent_dim, data, chunk_size,
               dtype):
    self.data = ChunkedData(data, chunk_size)
    n = tangent_dim
    zero = lambda *shape: tf.zeros(shape, dtype)

    def cost_pass(point):
      def terms(chunk):
        residual = chunk_residual(point, chunk)
        return (0.5 * tf.reduce_sum(tf.square(residual)),)
      return self.data.fold(terms, (zero(),))[0]

    def jacobian_pass(point):
      augmented, _ = self.data.fold(
          lambda chunk: chunk_terms(chunk_residual, retract, n, point, chunk),
          (zero(n, n + 1), zero()))
      return augmented

    def count(point):
      def terms(chunk):
        return (tf.size(chunk_residual(point, chunk)),)
      return self.data.fold(terms, (tf.constant(0),))[0]

    if tf.executing_eagerly():
      self.cost_pass, self.jacobian_pass = cost_pass, jacobian_pass
      self.count = count
    else:
      self.cost_pass = _linearization.trace_once(cost_pass)
      self.jacobian_pass = _linearization.trace_once(jacobian_pass)
      self.count = _linearization.trace_once(count)

  def residual_norm(self, point):
    """[1]: ||F(point)|| = sqrt(2 cost), from one cost pass."""
    cost = self.cost_pass(point)
    return tf.sqrt(2.0 * cost)[tf.newaxis]

  def at(self, point, residual):
    """The `Gram` linearization at `point` (one Jacobian pass)."""
    del residual
    return Gram(self.jacobian_pass(point))

  def restore(self, tensors, point):
    del point
    return Gram(*tensors)
