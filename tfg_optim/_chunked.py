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

The chunks may also be the elements of a `tf.data.Dataset` of batches
(`DatasetChunks`): each element (a tensor, or a tuple of tensors sharing a
leading dimension) is one chunk, and each pass iterates the dataset once
(an iterator's `get_next_as_optional` in a `tf.while_loop` in graphs, the
data read on the host and the chunk's terms computed on the pass's device;
a Python loop eagerly). The sums are those of the same rows given as
tensors with `data_chunk_size` equal to the batch size, added chunk after
chunk in both (the same additions in the same order when the batches are
those chunks: the tests find the same iterates).
"""

import tensorflow as tf

from tfg_optim import _linearization


class Gram:
  """J through J^T [J | F], [n, n + 1]: J^T J and the gradient J^T F at a
  point, in one tensor (the one a multi-device solve sums; the loop state
  also carries it as one tensor: with two, TensorFlow's graph optimizer
  (constant folding with dependency optimization) left the loop's outputs
  without values). Its column norms, diag(J^T J), are exact."""

  dense = True
  exact_column_norms = True

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


DATASETS = (tf.data.Dataset, tf.distribute.DistributedDataset)


def dataset_chunk(element):
  """A dataset element as a chunk: the list of its data tensors."""
  return list(element) if isinstance(element, (tuple, list)) else [element]


def row_specs(element_spec):
  """The `tf.TensorSpec`s of a chunk from a dataset's element spec (a
  distributed dataset's: the first replica's)."""
  specs = dataset_chunk(element_spec)
  return [getattr(spec, "_value_specs", (spec,))[0] for spec in specs]


def check_dataset(dataset, argument="data"):
  """Raises naming `argument` for a dataset that cannot be a solve's data:
  elements that are not a tensor or a flat tuple of tensors of rank >= 1,
  and, where its cardinality is known now (eagerly), an infinite or empty
  dataset (else `DatasetChunks` checks it when a pass runs)."""
  for index, spec in enumerate(row_specs(dataset.element_spec)):
    if not isinstance(spec, tf.TensorSpec):
      raise TypeError(f"'{argument}': a dataset's elements must be a tensor "
                      "or a tuple of tensors (the rows of a batch), got "
                      f"{dataset.element_spec}.")
    if spec.shape.rank == 0 or spec.shape.rank is None:
      raise ValueError(f"'{argument}': element {index} of the dataset must "
                       "have a known rank >= 1 (a leading batch dimension), "
                       f"got shape {spec.shape}.")
  cardinality = known_cardinality(dataset)
  if cardinality == tf.data.INFINITE_CARDINALITY:
    raise ValueError(f"'{argument}' is an infinite dataset (cardinality "
                     "INFINITE, e.g. .repeat() without a count): each pass "
                     "iterates it once; pass a finite dataset.")
  if cardinality == 0:
    raise ValueError(f"'{argument}' is an empty dataset: no rows to fit.")


def known_cardinality(dataset):
  """The number of elements if known now (eagerly), INFINITE, or None."""
  if isinstance(dataset, tf.distribute.DistributedDataset):
    value = getattr(dataset, "_cardinality", None)  # Computed eagerly by TF.
  elif tf.executing_eagerly():
    value = int(dataset.cardinality())
  else:
    value = tf.get_static_value(dataset.cardinality())
  if value is None or value == tf.data.UNKNOWN_CARDINALITY:
    return None
  return int(value)


def require_rows(rows, totals, argument="data"):
  """totals, after a check that a pass saw rows > 0 (eagerly a ValueError,
  in graphs an assertion: an empty dataset ends the solve with an error
  naming `argument`)."""
  message = (f"'{argument}': the dataset gave no rows (an empty dataset, or "
             "elements of 0 rows only)")
  if tf.executing_eagerly():
    if int(rows) <= 0:
      raise ValueError(message + ".")
    return totals
  with tf.control_dependencies([tf.debugging.assert_positive(
      rows, message=message)]):
    return tf.nest.map_structure(tf.identity, totals)


def finite_cardinality_check(dataset, argument="data"):
  """[an op asserting, when it runs, that `dataset` is not infinite] in
  graphs (its cardinality is known only then); [] eagerly (checked by
  `check_dataset`)."""
  if tf.executing_eagerly():
    return []
  return [tf.debugging.assert_none_equal(
      dataset.cardinality(), tf.constant(tf.data.INFINITE_CARDINALITY,
                                         tf.int64),
      message=(f"'{argument}' is an infinite dataset (cardinality INFINITE,"
               " e.g. .repeat() without a count): each pass iterates it "
               "once; pass a finite dataset"))]


class DatasetChunks:
  """The elements of a finite `tf.data.Dataset` of batches as chunks.

  Each element, a tensor or a tuple of tensors with a shared leading
  dimension (the batch's rows), is one chunk, in the dataset's order; a
  pass (`fold`) iterates the dataset once. The batching is the chunking:
  batches may differ in size (a last partial batch), and the rows' number
  N need not be known.
  """

  def __init__(self, dataset):
    self.dataset = dataset

  def fold(self, function, zeros):
    """The sum over the elements of `function(chunk)` (a tuple of tensors
    shaped like `zeros`); raises (eagerly) or fails (in graphs) naming
    'data' if the dataset is infinite or gives no rows."""
    add = lambda a, b: tuple(x + y for x, y in zip(a, b))
    rows = lambda chunk: tf.shape(chunk[0], out_type=tf.int64)[0]
    if tf.executing_eagerly():
      total, count = zeros, 0
      for element in self.dataset:
        chunk = dataset_chunk(element)
        total = add(total, function(chunk))
        count += int(rows(chunk))
      return require_rows(count, total)
    with tf.control_dependencies(finite_cardinality_check(self.dataset)):
      iterator = iter(self.dataset)
      first = iterator.get_next_as_optional()

    def body(optional, count, total):
      chunk = dataset_chunk(optional.get_value())
      return (iterator.get_next_as_optional(), count + rows(chunk),
              add(total, function(chunk)))

    _, count, total = tf.while_loop(
        lambda optional, count, total: optional.has_value(), body,
        (first, tf.constant(0, tf.int64), zeros), parallel_iterations=1)
    return require_rows(count, total)


class ChunkedKind:
  """Builds `Gram` linearizations by a Jacobian pass over the chunks, and
  evaluates ||F|| by a cost pass (`residual_norm`, the engine's residual).

  chunk_residual: (point, chunk) -> the [K_c] residuals of the chunk's rows.
  data: the list of data tensors [N, ...], read in chunks of `chunk_size`
  rows, or a `DatasetChunks` (then `chunk_size` is None). In graphs each
  pass is one `tf.function` (the residual is traced once per pass and chunk
  shape, however often the loop calls it).
  """

  dense = True

  def __init__(self, chunk_residual, retract, tangent_dim, data, chunk_size,
               dtype):
    self.data = (data if isinstance(data, DatasetChunks) else
                 ChunkedData(data, chunk_size))
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
