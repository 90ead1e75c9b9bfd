"""Block-sparse linearization of a factor graph (`tfg_optim.factor_graph`).

Variables live in tables: table t holds N_t rows, each a point of a
manifold of dimension d_t; the tangent vector of the whole problem is the
concatenation of the tables' [N_t, d_t] coordinates, flattened row-major
(n = sum_t N_t d_t). A residual term is a function over K edges,
f(x_{i_1(k)}, x_{i_2(k)}, ..., data_k) -> [K, r]; slot s reads table t_s at
rows i_s(k). The residual vector is the concatenation of the terms'
flattened [K, r] outputs. J is zero except in the blocks

    J_{term, s}[k] = d f_k / d c_s  at c = 0,  [K, r, d_{t_s}],

(c_s: the local coordinates of the retraction R_x(c) of slot s's row), and
the loop state carries only these blocks. The products:

    (J v)_term[k]  = sum_s J_{term,s}[k] v_{t_s}[i_s(k)]           (gather)
    (J^T u)_t[i]   = sum_{term, s: t_s = t} sum_{k: i_s(k) = i}
                        J_{term,s}[k]^T u_term[k]                (segment sum)
    diag(J^T J)_t[i] = sum_{term,s; i_s(k) = i} sum_r J_{term,s}[k]_{r,:}^2
    B_t[i] = sum_{term,s; i_s(k) = i} J_{term,s}[k]^T J_{term,s}[k]
                                    ([N_t, d_t, d_t]: block-Jacobi blocks)

and J^T J itself (n x n, for the dense Cholesky path only) is the scatter-add
of J_{term,a}[k]^T J_{term,b}[k] into the (i_a(k), i_b(k)) block for every
pair of slots (a, b) of every term: no m x n matrix is ever formed.

A term may bring its blocks in closed form (`Term.jacobian`, e.g. the
relative-pose error of a pose graph: `lie_groups.between_error_jacobians`);
otherwise they are computed as directional derivatives: the D = sum_s d_s basis
directions of all slots of a term are one tangent of the edges tiled D
times (row j K + k moves edge k along the j-th direction: e_j of its slot,
zero in the others), so one Jacobian-vector product of f over D K edges
gives every [K, r, d_s] block of the term, and f is traced once per term.
The direction e_j enters as its ambient tangent vector at the row
(`manifold.tangent_vector`; the chain rule, since DR_x(0) = id), so the
retraction takes no part in it. Rows held fixed
(the gauge) have their blocks' columns zeroed (`hold_fixed`), so the step
and the gradient leave them alone.

The exact Hessian of the cost in these coordinates (the implicit
gradients' implicit_hessian='exact') has the sparsity of J^T J: edge k of
a term contributes the [D, D] Hessian of 1/2 ||f_k(R(c))||^2 in the
coordinates c of the rows it reads (the retractions inside, so their
curvature counts), placed like the blocks J_a^T J_b. `Layout.hessian_blocks`
computes them for all edges of a term by reverse over reverse over the
same tiled edges; `EdgeHessian` holds them: H v, the scattered H (dense
Cholesky only) and the slot-pair blocks for the sparse Cholesky.
"""

import collections

import numpy as np
import tensorflow as tf

from tfg_optim import _linear_solvers
from tfg_optim import _linearization


Table = collections.namedtuple(
    "Table", ["size", "dim", "manifold", "offset", "free"])
Table.__doc__ = """One variable table as the linearization sees it.

size: N (rows), a Python int. dim: d, the manifold's dimension.
manifold: a `tfg_optim.manifolds` manifold of one row.
offset: where its N d coordinates start in the tangent vector.
free: None (every row free) or a float NumPy [N] mask, 0 for a held row.
"""

Term = collections.namedtuple(
    "Term", ["function", "tables", "indices", "data", "size", "width",
             "jacobian"], defaults=(None,))
Term.__doc__ = """One residual term as the linearization sees it.

function: (*rows, *data) -> [K, r], the (robust) residuals of K edges.
tables: per slot, the index of the table it reads.
indices: per slot, the int32 [K] rows it reads.
data: per-edge data tensors [K, ...].
size: K (a Python int or a scalar tensor). width: r, a Python int.
jacobian: None (the blocks by forward mode) or (*rows, *data) -> per slot
  the [K, r, d_s] blocks in closed form (`term_blocks`).
"""


class Layout:
  """The static structure: tables, terms, and the tangent/residual layout."""

  def __init__(self, tables, terms):
    self.tables = list(tables)
    self.terms = list(terms)
    self.tangent_dim = sum(t.size * t.dim for t in self.tables)

  def split_tangent(self, vector):
    """[n] -> per table [N_t, d_t]."""
    return [tf.reshape(vector[t.offset:t.offset + t.size * t.dim],
                       [t.size, t.dim]) for t in self.tables]

  def join_tangent(self, parts):
    """Per table [N_t, d_t] -> [n]."""
    return tf.concat([tf.reshape(p, [-1]) for p in parts], axis=0)

  def join_sums(self, sums, dtype):
    """Per table a list of [N_t, d_t] terms -> their sums joined, [n] (a
    table without terms: zeros)."""
    return self.join_tangent([
        tf.add_n(parts) if parts else tf.zeros([t.size, t.dim], dtype)
        for t, parts in zip(self.tables, sums)])

  def coordinates(self, point, ambient):
    """P^T v: per table, the manifold's coordinates of the ambient
    cotangents `ambient` (one [N_t, ...] per table) at `point`, joined
    into [n] (the tangent coordinates of `retract`)."""
    return self.join_tangent([
        table.manifold.coordinates(values, vector)
        for table, values, vector in zip(self.tables, point, ambient)])

  def split_residual(self, vector):
    """[m] -> per term [K, r]."""
    sizes = [term.size * term.width for term in self.terms]
    if len(sizes) == 1:
      pieces = [vector]
    elif all(isinstance(size, int) for size in sizes):
      pieces = tf.split(vector, sizes)
    else:
      pieces = tf.split(vector, tf.stack(sizes), num=len(sizes))
    return [tf.reshape(piece, [-1, term.width])
            for piece, term in zip(pieces, self.terms)]

  def retract(self, point, step):
    """R_X(step): every table's rows by their manifold's retraction."""
    return tuple(
        table.manifold.retract(values, coordinates)
        for table, values, coordinates in zip(self.tables, point,
                                              self.split_tangent(step)))

  def term_residuals(self, point, term):
    """[K, r]: one term's residuals at `point` (a tuple of tables)."""
    rows = [tf.gather(point[t], index)
            for t, index in zip(term.tables, term.indices)]
    return term.function(*rows, *term.data)

  def residual(self, point):
    """F(point), [m]: the terms' residuals, flattened and concatenated."""
    return tf.concat([tf.reshape(self.term_residuals(point, term), [-1])
                      for term in self.terms], axis=0)

  def _tiled(self, point, term):
    """A term's edges tiled D = sum_s d_s times, row j K + k moving edge k
    along the j-th of all its slots' basis directions (see the module
    docstring): (dims [d_s], rows [D K, ...] per slot, data [D K, ...],
    K, directions [D K, d_s] per slot: e_j on the rows of slot s's own
    directions, else 0)."""
    dims = [self.tables[t].dim for t in term.tables]
    total = sum(dims)
    tile = lambda x: tf.tile(x, [total] + [1] * (x.shape.rank - 1))
    rows = [tf.gather(point[t], tf.tile(index, [total]))
            for t, index in zip(term.tables, term.indices)]
    size = tf.shape(term.indices[0])[0]
    directions, start = [], 0
    for d in dims:
      basis = tf.constant(np.eye(total, d, -start),  # [D, d]
                          dtype=point[0].dtype)
      directions.append(tf.repeat(basis, size, axis=0))  # [D K, d]
      start += d
    return dims, rows, [tile(x) for x in term.data], size, directions

  def term_blocks(self, point, term):
    """J_{term, s} for every slot s: [K, r, d_s]: the term's own closed
    form where it has one (`Term.jacobian`, on the K edges), else by one
    forward-mode product of f over the edges tiled D = sum_s d_s times
    (`_tiled`; f is traced once per term)."""
    if term.jacobian is not None:
      rows = [tf.gather(point[t], index)
              for t, index in zip(term.tables, term.indices)]
      blocks = [tf.convert_to_tensor(block) for block in
                term.jacobian(*rows, *term.data)]
      for slot, (t, block) in enumerate(zip(term.tables, blocks)):
        expected = [term.width, self.tables[t].dim]
        if block.shape.rank != 3 or not block.shape[1:].is_compatible_with(
            expected):
          raise ValueError(f"the jacobian's block of slot {slot} must have "
                           f"shape [K, {expected[0]}, {expected[1]}], got "
                           f"{block.shape}.")
      return blocks
    dims, rows, data, size, directions = self._tiled(point, term)
    total = sum(dims)
    # d/dt f(R_x(t e_j)) = Df(x)[tangent_vector(x, e_j)] (every retraction
    # has DR_x(0) = id): the retraction is neither differentiated nor run
    # on the D K tiled rows. (`directional_derivatives`: reverse mode
    # twice, not TensorFlow's op-by-op forward mode.)
    tangents = [self.tables[t].manifold.tangent_vector(row, direction)
                for t, row, direction in zip(term.tables, rows, directions)]
    residual, (derivative,) = _linearization.directional_derivatives(
        lambda moved: term.function(*moved, *data), rows, [tangents])
    if derivative is None:
      derivative = tf.zeros_like(residual)
    derivative = tf.reshape(derivative, [total, size, term.width])
    blocks, start = [], 0
    for d in dims:
      blocks.append(tf.transpose(derivative[start:start + d], [1, 2, 0]))
      start += d
    return blocks

  def term_hessian(self, point, term):
    """H_term [K, D, D]: per edge k, the Hessian of 1/2 ||f_k(R(c))||^2
    in the D = sum_s d_s local coordinates c of its slots' rows, at c = 0
    (R: each row's retraction, whose second derivative is included).

    Reverse over reverse over the edges tiled D times (`_tiled`): each
    tiled row has its own c, so the gradient of g . e (g the gradient of
    the cost with respect to every row's c, e the directions: e_j on the
    rows j K + k) is, on row j K + k, column j of edge k's Hessian. f is
    traced once, on D K edges. (Forward over reverse, TensorFlow's
    `ForwardAccumulator` around the tape, was slower, eagerly by several
    times, on SE(2) terms.)"""
    dims, rows, data, size, directions = self._tiled(point, term)
    total = sum(dims)
    origins = [tf.zeros_like(direction) for direction in directions]
    zero = tf.UnconnectedGradients.ZERO
    with tf.GradientTape(watch_accessed_variables=False) as outer:
      outer.watch(origins)
      with tf.GradientTape(watch_accessed_variables=False) as inner:
        inner.watch(origins)
        moved = [self.tables[t].manifold.retract(row, origin)
                 for t, row, origin in zip(term.tables, rows, origins)]
        residual = term.function(*moved, *data)
        cost = 0.5 * tf.reduce_sum(tf.square(residual))
      gradients = inner.gradient(cost, origins, unconnected_gradients=zero)
      along = tf.add_n([tf.reduce_sum(g * e)
                        for g, e in zip(gradients, directions)])
    columns = outer.gradient(along, origins, unconnected_gradients=zero)
    columns = tf.reshape(tf.concat(columns, -1), [total, size, total])
    return tf.transpose(columns, [1, 2, 0])

  def hessian_blocks(self, point):
    """Every term's `term_hessian`, in order, with the rows and columns of
    held rows' coordinates zeroed."""
    blocks = []
    for term in self.terms:
      block = self.term_hessian(point, term)
      if all(self.tables[t].free is None for t in term.tables):
        blocks.append(block)
        continue
      mask = tf.concat([
          tf.repeat(tf.gather(self._free(t, block.dtype), index)[:, None],
                    self.tables[t].dim, axis=1)
          for t, index in zip(term.tables, term.indices)], -1)  # [K, D]
      blocks.append(block * mask[:, :, tf.newaxis] * mask[:, tf.newaxis, :])
    return tuple(blocks)

  def _free(self, t, dtype):
    """float [N_t]: 0 on table t's held rows, 1 elsewhere."""
    free = self.tables[t].free
    return tf.ones([self.tables[t].size], dtype) if free is None else (
        tf.constant(free, dtype))

  def coordinate_indices(self, t, index):
    """[K, d]: the tangent coordinates of rows `index` of table t."""
    table = self.tables[t]
    return (table.offset + index[:, tf.newaxis] * table.dim +
            tf.range(table.dim, dtype=index.dtype)[tf.newaxis, :])

  def scatter_pairs(self, pairs):
    """The n x n matrix sum_k P_a(k)^T M_ab[k] P_b(k) over `pairs`, an
    iterable of (table a, index a, table b, index b, M_ab [K, d_a, d_b])
    (P_s(k): the selection of row i_s(k)'s coordinates); repeated
    positions are summed."""
    indices, values = [], []
    for t_a, index_a, t_b, index_b, product in pairs:
      rows = self.coordinate_indices(t_a, index_a)  # [K, d_a]
      columns = self.coordinate_indices(t_b, index_b)
      row_grid = tf.broadcast_to(rows[:, :, tf.newaxis], tf.shape(product))
      column_grid = tf.broadcast_to(columns[:, tf.newaxis, :],
                                    tf.shape(product))
      indices.append(tf.reshape(tf.stack([row_grid, column_grid], -1),
                                [-1, 2]))
      values.append(tf.reshape(product, [-1]))
    n = self.tangent_dim
    return tf.scatter_nd(tf.concat(indices, 0), tf.concat(values, 0), [n, n])

  def blocks(self, point):
    """Every (term, slot) block, in order, with held rows zeroed."""
    blocks = []
    for term in self.terms:
      for slot, block in enumerate(self.term_blocks(point, term)):
        free = self.tables[term.tables[slot]].free
        if free is not None:
          mask = tf.gather(tf.constant(free, block.dtype), term.indices[slot])
          block *= mask[:, tf.newaxis, tf.newaxis]
        blocks.append(block)
    return tuple(blocks)

  def slots(self):
    """(term index, slot, table index, index tensor) per block, in order."""
    for number, term in enumerate(self.terms):
      for slot, (t, index) in enumerate(zip(term.tables, term.indices)):
        yield number, slot, t, index


Preconditioner = collections.namedtuple("Preconditioner",
                                        ["solve", "multiply"])
Preconditioner.__doc__ = """The block-Jacobi preconditioner M = B + diag(e).

solve: r -> M^-1 r (blockwise Cholesky solves); multiply: v -> M v (the
metric of a preconditioned trust region), both [n] -> [n].
"""


class BlockSparse:
  """J as its [K, r, d] blocks; see the module docstring.

  A subclass per problem binds `layout` and `dense` (`BlockSparseKind`), so
  that a linearization is rebuilt from its tensors alone (`select`).
  `dense` True sends the damped solvers to `gram()` (Cholesky of the
  assembled J^T J), False to preconditioned conjugate gradients. Its column
  norms (sums of squares of the exact blocks) are exact.
  """

  layout = None
  dense = False
  exact_column_norms = True

  def __init__(self, *blocks):
    self.blocks = tuple(blocks)

  @property
  def tensors(self):
    return self.blocks

  def _by_term(self):
    """Per term, the list of (slot's table index, index, block)."""
    grouped = [[] for _ in self.layout.terms]
    for block, (number, _, t, index) in zip(self.blocks, self.layout.slots()):
      grouped[number].append((t, index, block))
    return grouped

  def matvec(self, vector):
    parts = self.layout.split_tangent(vector)
    outputs = []
    for slots in self._by_term():
      value = tf.add_n([
          tf.einsum("krd,kd->kr", block, tf.gather(parts[t], index))
          for t, index, block in slots])
      outputs.append(tf.reshape(value, [-1]))
    return tf.concat(outputs, axis=0)

  def rmatvec(self, vector):
    tables = self.layout.tables
    sums = [[] for _ in tables]
    for slots, u in zip(self._by_term(), self.layout.split_residual(vector)):
      for t, index, block in slots:
        sums[t].append(tf.math.unsorted_segment_sum(
            tf.einsum("krd,kr->kd", block, u), index, tables[t].size))
    return self.layout.join_sums(sums, vector.dtype)

  def gradient(self, residual):
    return self.rmatvec(residual)

  def curvature(self, vector):
    return tf.reduce_sum(tf.square(self.matvec(vector)), axis=-1)

  def column_norms(self):
    tables = self.layout.tables
    sums = [[] for _ in tables]
    for block, (_, _, t, index) in zip(self.blocks, self.layout.slots()):
      sums[t].append(tf.math.unsorted_segment_sum(
          tf.reduce_sum(tf.square(block), axis=1), index, tables[t].size))
    return self.layout.join_sums(sums, self.blocks[0].dtype)

  def block_diagonal(self):
    """B_t = the [N_t, d_t, d_t] diagonal blocks of J^T J, per table."""
    tables = self.layout.tables
    sums = [[] for _ in tables]
    for block, (_, _, t, index) in zip(self.blocks, self.layout.slots()):
      sums[t].append(tf.math.unsorted_segment_sum(
          tf.einsum("kra,krb->kab", block, block), index, tables[t].size))
    dtype = self.blocks[0].dtype
    return [tf.add_n(parts) if parts else
            tf.zeros([table.size, table.dim, table.dim], dtype)
            for table, parts in zip(tables, sums)]

  def gram(self):
    """J^T J, [n, n], scattered from the blocks (dense solvers only)."""
    return self.layout.scatter_pairs(
        (t_a, index_a, t_b, index_b,
         tf.einsum("kra,krb->kab", block_a, block_b))
        for slots in self._by_term()
        for t_a, index_a, block_a in slots
        for t_b, index_b, block_b in slots)

  def preconditioner(self, damping_diagonal):
    """The block-Jacobi `Preconditioner` of J^T J + diag(damping_diagonal)
    (a [n] or broadcastable [1] tensor). A block whose diagonal entry is
    zero (a held row) gets 1 there, and sqrt(eps) of each diagonal is added
    (the blocks of rows seen by too few residuals are singular); it only
    preconditions, so the solution is unchanged."""
    dtype = self.blocks[0].dtype
    eps = np.finfo(dtype.as_numpy_dtype).eps
    damping = self.layout.split_tangent(tf.broadcast_to(
        damping_diagonal, [self.layout.tangent_dim]))
    factors, matrices = [], []
    for block, extra in zip(self.block_diagonal(), damping):
      diagonal = tf.linalg.diag_part(block)
      diagonal = (tf.where(diagonal > 0, diagonal * (1.0 + np.sqrt(eps)),
                           tf.ones_like(diagonal)) + extra)
      matrix = tf.linalg.set_diag(block, diagonal)
      matrices.append(matrix)
      factors.append(_linear_solvers._cholesky(matrix))  # pylint: disable=protected-access

    def solve(vector):
      parts = self.layout.split_tangent(vector)
      return self.layout.join_tangent([
          tf.linalg.cholesky_solve(factor, part[..., tf.newaxis])[..., 0]
          for factor, part in zip(factors, parts)])

    def multiply(vector):
      parts = self.layout.split_tangent(vector)
      return self.layout.join_tangent([
          tf.linalg.matvec(matrix, part)
          for matrix, part in zip(matrices, parts)])

    return Preconditioner(solve, multiply)

  def is_zero(self):
    return tf.reduce_all([tf.reduce_all(tf.equal(block, 0))
                          for block in self.blocks])

  def hold_fixed(self, free):
    """J diag(free): the columns of coordinates where free is 0 zeroed."""
    parts = self.layout.split_tangent(free)
    return type(self)(*[
        block * tf.gather(parts[t], index)[:, tf.newaxis, :]
        for block, (_, _, t, index) in zip(self.blocks, self.layout.slots())])


class EdgeHessian:
  """A symmetric n x n matrix H = sum_terms sum_k P(k)^T H_term[k] P(k) as
  its per-edge blocks H_term [K, D, D] in the coordinates of the edge's
  slots' rows (D = sum_s d_s; P(k) selects them): the exact Hessian of a
  factor graph's cost (`Layout.hessian_blocks`) has the sparsity of J^T J.

  H v is a gather, an einsum and a segment sum per term (no n x n matrix);
  `dense()` scatters H (the dense Cholesky path only); `pair(number, a,
  b)` is term `number`'s [K, d_a, d_b] block of slots (a, b) (the sparse
  Cholesky's assembly).
  """

  def __init__(self, layout, blocks):
    self.layout = layout
    self.blocks = tuple(blocks)

  def _slot_ranges(self, term):
    """Per slot (table, index, start, end) of its coordinates in D."""
    start = 0
    for t, index in zip(term.tables, term.indices):
      end = start + self.layout.tables[t].dim
      yield t, index, start, end
      start = end

  def restricted(self, free):
    """diag(free) H diag(free) for `free` [n] (0 or 1): the blocks' rows and
    columns of the coordinates where `free` is 0 zeroed (as `hold_fixed`
    zeroes J's columns), so that H v, `dense()` and `pair` all see H on
    the free coordinates only."""
    parts = self.layout.split_tangent(free)
    blocks = []
    for term, block in zip(self.layout.terms, self.blocks):
      mask = tf.concat([tf.gather(parts[t], index)
                        for t, index, _, _ in self._slot_ranges(term)],
                       -1)  # [K, D]
      blocks.append(block * mask[:, :, tf.newaxis] * mask[:, tf.newaxis, :])
    return EdgeHessian(self.layout, blocks)

  def pair(self, number, a, b):
    ranges = list(self._slot_ranges(self.layout.terms[number]))
    block = self.blocks[number]
    return block[:, ranges[a][2]:ranges[a][3], ranges[b][2]:ranges[b][3]]

  def matvec(self, vector):
    tables = self.layout.tables
    parts = self.layout.split_tangent(vector)
    sums = [[] for _ in tables]
    for term, block in zip(self.layout.terms, self.blocks):
      ranges = list(self._slot_ranges(term))
      gathered = tf.concat([tf.gather(parts[t], index)
                            for t, index, _, _ in ranges], -1)  # [K, D]
      product = tf.einsum("kab,kb->ka", block, gathered)
      for t, index, start, end in ranges:
        sums[t].append(tf.math.unsorted_segment_sum(
            product[:, start:end], index, tables[t].size))
    return self.layout.join_sums(sums, vector.dtype)

  def dense(self):
    """H, [n, n] (scattered from the blocks)."""
    return self.layout.scatter_pairs(
        (t_a, index_a, t_b, index_b, block[:, start_a:end_a, start_b:end_b])
        for term, block in zip(self.layout.terms, self.blocks)
        for t_a, index_a, start_a, end_a in self._slot_ranges(term)
        for t_b, index_b, start_b, end_b in self._slot_ranges(term))


class BlockSparseKind:
  """Builds `BlockSparse` linearizations of a `Layout`.

  dense: True for the dense Cholesky (or eigendecomposition) of the
  assembled J^T J, False for preconditioned conjugate gradients. In graphs
  the blocks are one `tf.function`, traced once however often the loop
  relinearizes.
  """

  def __init__(self, layout, dense):
    self.layout = layout
    self.dense = dense
    self.linearization_class = type(
        "BlockSparse", (BlockSparse,), {"layout": layout, "dense": dense})
    if tf.executing_eagerly():
      self._blocks = layout.blocks
    else:
      self._blocks = _linearization.trace_once(layout.blocks)

  def at(self, point, residual):
    """The linearization at `point` (the residual there is not needed)."""
    del residual
    return self.linearization_class(*self._blocks(tuple(point)))

  def restore(self, tensors, point):
    del point
    return self.linearization_class(*tensors)
