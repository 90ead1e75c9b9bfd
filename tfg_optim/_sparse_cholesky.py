"""Block sparse Cholesky of the damped normal equations (factor graphs).

For a factor graph (`_block_sparse`) the damped normal matrix

    A = J^T J + lambda D

is sparse in blocks: its block (i, j) (rows i and j of the variable
tables, d x d) is nonzero only if some edge reads both rows. A is factored
as P A P^T = L L^T by a block (supernode = one variable row) sparse
Cholesky, and the step solves L y = -P g, L^T x = y, delta = P^T x.

Symbolic phase (NumPy, once per problem, from the static index tensors):

1. The block graph of the free rows: an edge (i, j) for every edge of a
   term whose slots read rows i != j (held rows stay isolated: their block
   is the identity, their step 0).
2. A fill-reducing ordering that also keeps the elimination tree shallow:
   nested dissection. A connected part larger than `DISSECTION_LEAF_SIZE`
   rows is split by a level of a breadth-first search from a
   pseudo-peripheral row (the level with the smallest ratio of its size to
   the smaller side; only its rows that touch the next level are kept in
   the separator); the separator is ordered after both sides. Small parts
   are ordered by minimum degree.
3. The symbolic factorization: column j's structure
   S_j = {i > j : A_ij != 0} | U_{c child of j} S_c \\ {j}, its parent
   min S_j (the elimination tree), its level (0 for a leaf, else one more
   than its highest child). Columns of the same level do not depend on each
   other, so the numeric phase runs level by level, leaves first: the tree
   height is the number of sequential steps. The columns are renumbered by
   (level, position), a topological order of the tree that gives the same
   factor, so each level's columns are contiguous.
4. The schedule: L's blocks (diagonal and below) stored level by level, a
   level's diagonal blocks then its off-diagonal blocks; per level the
   right-looking update pairs (i, k), i >= k in S_j, of each column j with
   the storage position of the block (i, k) they update. The top levels
   (the root separator: a chain of one column per level), as many as fit
   in `DENSE_ROOT_SIZE` coordinates, are one dense step instead.

Numeric phase (TensorFlow ops, per iteration): the blocks
J_{term,a}[k]^T J_{term,b}[k] are scattered (`unsorted_segment_sum`, one
call) into the lower-triangular storage; then for each level l (a Python
loop over the static schedule: each level has its own static shapes)

    L_jj = chol(A_jj + E_j)                       batched Cholesky,
                                                  kept as L_jj^-1
    L_ij = A_ij L_jj^-T,   i in S_j               batched products
    A_ik -= L_ij L_kj^T,   i >= k in S_j          batched products,
                                                  `tensor_scatter_nd_sub`

and then the dense root: its blocks, which are then the trailing Schur
complement, gathered into one dense matrix and factored by one Cholesky;
with E_j lambda D on the diagonal (1 where J^T J + lambda D has a zero
diagonal entry: padded and unseen coordinates, and on held rows, as
`_schur` does). L_jj^-1 comes from one batched triangular solve per
level; every other solve is a product by it (XLA compiles a triangular
solve about six times slower than a Cholesky or a product). The
substitutions run by the same schedule: forward (y_j = L_jj^-1 b_j, then
b_i -= L_ij y_j), backward from the root level
(x_j = L_jj^-T (y_j - sum_i L_ij^T x_i)).

Tables of different dimensions share one block size d = max d_t: smaller
rows are padded with identity coordinates (zero right-hand side, zero
step). A factorization that fails (a block not positive definite) gives NaN
there, so the step is all NaN: a rejected step, in every mode. Every op
(Cholesky, triangular solve, gather, einsum, segment sums, scatters)
compiles under XLA.

`SparseCholeskyKind` is the `_block_sparse.BlockSparseKind` whose
linearizations carry `damped_solver(regularization, scaling)`, the hook that
`_linear_solvers.damped_solver` calls. See docs/sparse.md.
"""

import collections

import numpy as np
import tensorflow as tf

from tfg_optim import _batch
from tfg_optim import _block_sparse
from tfg_optim import _linear_solvers

# Connected parts of the block graph of at most this many rows are ordered
# by minimum degree; larger ones are split by nested dissection.
DISSECTION_LEAF_SIZE = 8

# The top levels of the elimination tree (the root separator: a chain of
# one column per level) are factored as one dense matrix of at most this
# many coordinates: one step instead of one per level.
DENSE_ROOT_SIZE = 256


def _adjacency(count, first, second):
  """(indptr, neighbours): the CSR form of the undirected graph on `count`
  nodes with edges first[e] -- second[e] (loops and repeats dropped)."""
  keep = first != second
  a = np.concatenate([first[keep], second[keep]]).astype(np.int64)
  b = np.concatenate([second[keep], first[keep]]).astype(np.int64)
  key = np.unique(a * count + b)
  a, b = key // count, key % count
  indptr = np.zeros(count + 1, np.int64)
  np.cumsum(np.bincount(a, minlength=count), out=indptr[1:])
  return indptr, b


def _neighbours_of(indptr, neighbours, nodes):
  """The concatenated neighbour lists of `nodes` (with repeats)."""
  starts, ends = indptr[nodes], indptr[nodes + 1]
  lengths = ends - starts
  total = int(lengths.sum())
  if not total:
    return np.zeros([0], np.int64)
  offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
  return neighbours[offsets + np.arange(total)]


def _subgraph(indptr, neighbours, nodes):
  """The graph induced on `nodes` (a [p] array), relabelled 0..p-1."""
  local = np.full(len(indptr) - 1, -1, np.int64)
  local[nodes] = np.arange(len(nodes))
  lengths = indptr[nodes + 1] - indptr[nodes]
  owner = np.repeat(np.arange(len(nodes)), lengths)
  other = local[_neighbours_of(indptr, neighbours, nodes)]
  keep = other >= 0
  owner, other = owner[keep], other[keep]
  sub_indptr = np.zeros(len(nodes) + 1, np.int64)
  np.cumsum(np.bincount(owner, minlength=len(nodes)), out=sub_indptr[1:])
  return sub_indptr, other  # (owner is sorted: rows stay in order)


def _bfs_levels(indptr, neighbours, start):
  """level [p]: the breadth-first distance from `start` (-1 unreached)."""
  level = np.full(len(indptr) - 1, -1, np.int64)
  level[start] = 0
  frontier, depth = np.array([start], np.int64), 0
  while frontier.size:
    reached = _neighbours_of(indptr, neighbours, frontier)
    reached = np.unique(reached[level[reached] < 0])
    depth += 1
    level[reached] = depth
    frontier = reached
  return level


def _minimum_degree(indptr, neighbours):
  """An elimination order of a small graph by minimum degree (explicit
  elimination graph; ties by the lowest label)."""
  count = len(indptr) - 1
  graph = [set(neighbours[indptr[v]:indptr[v + 1]].tolist())
           for v in range(count)]
  remaining, order = set(range(count)), []
  while remaining:
    node = min(remaining, key=lambda v: (len(graph[v]), v))
    near = graph[node]
    for v in near:
      graph[v] |= near
      graph[v].discard(v)
      graph[v].discard(node)
    remaining.discard(node)
    order.append(node)
  return np.asarray(order, np.int64)


def _components(indptr, neighbours):
  """label [p]: the smallest node of each node's connected component (min
  propagation over the edges with pointer jumping, vectorized)."""
  count = len(indptr) - 1
  label = np.arange(count)
  owner = np.repeat(np.arange(count), np.diff(indptr))
  while True:
    lowest = label.copy()
    np.minimum.at(lowest, owner, label[neighbours])
    lowest = lowest[lowest]
    if np.array_equal(lowest, label):
      return label
    label = lowest


def _dissect(indptr, neighbours, leaf_size):
  """A nested-dissection elimination order of a graph (local labels)."""
  count = len(indptr) - 1
  if count <= leaf_size:
    return _minimum_degree(indptr, neighbours)
  label = _components(indptr, neighbours)
  if label.max() > 0:  # several components: each on its own
    nodes = np.argsort(label, kind="stable")
    sizes = np.bincount(label)[np.unique(label)]
    ends = np.cumsum(sizes)
    # Relabelled so that each component is a contiguous range.
    indptr, neighbours = _subgraph(indptr, neighbours, nodes)
    order = []
    for start, end in zip(ends - sizes, ends):
      if end - start == 1:
        order.append(nodes[start:end])
        continue
      part_indptr = indptr[start:end + 1] - indptr[start]
      part = neighbours[indptr[start]:indptr[end]] - start
      order.append(nodes[start + _dissect(part_indptr, part, leaf_size)])
    return np.concatenate(order)
  level = _bfs_levels(indptr, neighbours, 0)
  # A pseudo-peripheral start: the farthest row, until the depth stops
  # growing.
  start, depth = 0, level.max()
  for _ in range(8):
    candidate = int(np.argmax(level))
    candidate_level = _bfs_levels(indptr, neighbours, candidate)
    if candidate_level.max() <= depth:
      break
    start, level, depth = candidate, candidate_level, candidate_level.max()
  if depth < 2:  # (nearly) a clique: no separator helps
    return _minimum_degree(indptr, neighbours)
  sizes = np.bincount(level, minlength=depth + 1)
  below = np.cumsum(sizes) - sizes
  above = count - below - sizes
  # Level l's rows that touch level l + 1 separate levels < l from > l.
  owner = np.repeat(np.arange(count), np.diff(indptr))
  touches = np.zeros(count, bool)
  touches[owner[level[neighbours] == level[owner] + 1]] = True
  separator_sizes = np.bincount(level[touches], minlength=depth + 1)
  candidates = np.arange(1, depth)
  score = separator_sizes[candidates] / np.maximum(
      np.minimum(below[candidates], above[candidates]), 1)
  cut = candidates[np.argmin(score)]
  separator = np.flatnonzero((level == cut) & touches)
  first = np.flatnonzero((level < cut) | ((level == cut) & ~touches))
  second = np.flatnonzero(level > cut)
  order = [part[_dissect(*_subgraph(indptr, neighbours, part), leaf_size)]
           for part in (first, second) if part.size]
  return np.concatenate(order + [separator])


def _symbolic(indptr, neighbours, order):
  """(structures, levels) of the factor of the graph eliminated in `order`
  (order[p]: the node eliminated p-th): per position j, the sorted int64
  array of positions i > j with L_ij != 0, and the etree level of j."""
  count = len(order)
  position = np.empty(count, np.int64)
  position[order] = np.arange(count)
  children = [[] for _ in range(count)]
  structures, levels = [None] * count, np.zeros(count, np.int64)
  for j in range(count):
    node = order[j]
    own = position[neighbours[indptr[node]:indptr[node + 1]]]
    rows = set(own[own > j].tolist())
    for child in children[j]:
      rows |= structures[child]
      levels[j] = max(levels[j], levels[child] + 1)
    rows.discard(j)
    structures[j] = rows
    if rows:
      children[min(rows)].append(j)
  return [np.array(sorted(s), np.int64) for s in structures], levels


Level = collections.namedtuple(
    "Level", ["start", "columns", "blocks", "block_column", "first",
              "second", "target", "rows"])
Level.__doc__ = """The static schedule of one etree level.

start: its first column (columns start .. start + columns - 1, in the
  renumbered order). columns: how many. blocks: how many off-diagonal
  blocks its columns have (stored after its `columns` diagonal blocks).
block_column: int32 [blocks], the column (0 .. columns - 1) of each block.
first, second: int32 [P]: the blocks L_ij, L_kj (0 .. blocks - 1) of each
  update pair; target: int32 [P], the stored block A_ik they update,
  counted from the end of this level's storage.
rows: int32 [blocks], each block's row i counted from the level's end
  (start + columns).
"""


Root = collections.namedtuple(
    "Root", ["start", "columns", "diagonal", "diagonal_position", "off",
             "off_position"])
Root.__doc__ = """The dense root: the top levels' columns factored as one
dense matrix (the trailing Schur complement, whatever its sparsity).

start: its first column; columns: R, how many (the last ones).
diagonal, off: int32 [R], [B]: the stored blocks (counted from the root's
  first stored block) of its diagonal and off-diagonal blocks;
diagonal_position, off_position: int32 [R, 2], [B, 2]: their (row, column)
  among the R columns.
"""


class Structure:
  """The static structure of the sparse Cholesky of a layout's J^T J.

  Attributes:
    block: d, the common block size (max d_t; smaller rows padded).
    rows: the number of block rows (all tables' rows, held included).
    position: int64 [rows], each row's column in the renumbered
      elimination order; order: its inverse.
    levels: the `Level` schedule, leaves first, without the dense root.
    root: the `Root` (the top levels, dense), or None.
    stored: the number of stored blocks (diagonal and below).
    nnz_blocks: off-diagonal blocks of L (below the diagonal).
    height: the number of etree levels.
    steps: the sequential steps of a factorization: the levels below the
      root, and one for the root.
    diagonal: int64 [rows], the stored index of each column's diagonal
      block; stored_block(rows, columns): that of blocks (i, j), i >= j.
    targets: per (term, slot pair (a, b), a <= b) in `pairs`, int32 [K]:
      where its blocks land in the storage (`stored`: dropped).
    pairs: the (term, a, b) of `targets`; transposed: per pair, the
      float [K] coefficients (plain, transposed) of J_a^T J_b and of its
      transpose in the stored block (the transpose where the row of b is
      below the row of a; both for edges reading one row in both slots).
    held: float [rows * d], 1 on coordinates whose diagonal is set to 1
      (held rows and padding).
  """

  def __init__(self, layout, leaf_size=DISSECTION_LEAF_SIZE,
               dense_root_size=None):
    if dense_root_size is None:
      dense_root_size = DENSE_ROOT_SIZE
    tables = layout.tables
    self.block = max(table.dim for table in tables)
    row_offsets = np.cumsum([0] + [table.size for table in tables])
    self.rows = int(row_offsets[-1])
    self.row_offsets = row_offsets
    free = np.concatenate([
        np.ones(table.size) if table.free is None else
        np.asarray(table.free, np.float64) for table in tables]) > 0
    # The global rows each slot reads.
    slot_rows = []
    for number, term in enumerate(layout.terms):
      rows = []
      for slot, (t, index) in enumerate(zip(term.tables, term.indices)):
        value = tf.get_static_value(index)
        if value is None:
          raise ValueError(
              "linear_solver='sparse_cholesky' needs index tensors known "
              f"while tracing (NumPy arrays or constants); term {number} "
              f"slot {slot} is not.")
        rows.append(np.asarray(value, np.int64).reshape(-1) + row_offsets[t])
      slot_rows.append(rows)
    first, second = [], []
    for rows in slot_rows:
      for a in range(len(rows)):
        for b in range(a + 1, len(rows)):
          keep = free[rows[a]] & free[rows[b]]
          first.append(rows[a][keep])
          second.append(rows[b][keep])
    empty = np.zeros([0], np.int64)
    indptr, neighbours = _adjacency(
        self.rows, np.concatenate(first) if first else empty,
        np.concatenate(second) if second else empty)
    order = _dissect(indptr, neighbours, leaf_size)
    structures, levels = _symbolic(indptr, neighbours, order)
    # Renumber by (level, position): same factor, levels contiguous.
    renumber = np.lexsort((np.arange(self.rows), levels))
    new_of_old = np.empty(self.rows, np.int64)
    new_of_old[renumber] = np.arange(self.rows)
    structures = [np.sort(new_of_old[structures[j]]) for j in renumber]
    levels = levels[renumber]
    self.order = order[renumber]
    self.position = np.empty(self.rows, np.int64)
    self.position[self.order] = np.arange(self.rows)
    self.height = int(levels.max()) + 1 if self.rows else 0
    self._schedule(structures, levels, dense_root_size)
    self._assembly(layout, slot_rows, free)

  def _schedule(self, structures, levels, dense_root_size):
    """The storage layout, the per-level `Level`s and the `Root`."""
    count = self.rows
    lengths = np.array([len(s) for s in structures], np.int64)
    column_of_block = np.repeat(np.arange(count), lengths)
    row_of_block = (np.concatenate(structures) if count else
                    np.zeros([0], np.int64))
    self.nnz_blocks = int(lengths.sum())
    level_columns = np.bincount(levels, minlength=self.height)
    level_start = np.cumsum(level_columns) - level_columns
    level_blocks = np.bincount(levels[column_of_block] if
                               self.nnz_blocks else np.zeros([0], np.int64),
                               minlength=self.height)
    level_storage = level_columns + level_blocks
    storage_start = np.cumsum(level_storage) - level_storage
    self.stored = int(level_storage.sum())
    # Stored index of the diagonal block of column j, and of block (i, j).
    diagonal = (storage_start[levels] + np.arange(count) -
                level_start[levels])
    block_start = np.cumsum(lengths) - lengths  # blocks numbered by column
    first_block_of_level = np.cumsum(level_blocks) - level_blocks
    off = (storage_start[levels[column_of_block]] +
           level_columns[levels[column_of_block]] +
           np.arange(self.nnz_blocks) -
           first_block_of_level[levels[column_of_block]])
    keys = row_of_block * count + column_of_block  # sorted by column, row
    key_order = np.argsort(keys)
    sorted_keys = keys[key_order]

    def stored_block(rows, columns):
      """Stored index of block (row, column), row >= column."""
      result = diagonal[rows].copy()
      below = rows != columns
      where = np.searchsorted(sorted_keys, rows[below] * count +
                              columns[below])
      result[below] = off[key_order[where]]
      return result

    self.diagonal = diagonal
    self.stored_block = stored_block
    # The dense root: as many top levels as fit in dense_root_size
    # coordinates (at least two, else nothing is gained).
    root_levels, total = 0, 0
    for l in reversed(range(self.height)):
      if (total + level_columns[l]) * self.block > dense_root_size:
        break
      total += level_columns[l]
      root_levels += 1
    if root_levels < 2:
      root_levels = 0
    self.root = None
    if root_levels:
      first_level = self.height - root_levels
      start, base = int(level_start[first_level]), int(
          storage_start[first_level])
      columns = np.arange(start, count)
      blocks = column_of_block >= start
      self.root = Root(
          start, count - start,
          (diagonal[columns] - base).astype(np.int32),
          np.stack([columns - start] * 2, -1).astype(np.int32),
          (off[blocks] - base).astype(np.int32),
          np.stack([row_of_block[blocks] - start,
                    column_of_block[blocks] - start], -1).astype(np.int32))
    self.steps = self.height - root_levels + (1 if root_levels else 0)
    self.levels = []
    for l in range(self.height - root_levels):
      start, columns = int(level_start[l]), int(level_columns[l])
      blocks = slice(int(first_block_of_level[l]),
                     int(first_block_of_level[l] + level_blocks[l]))
      end = int(storage_start[l] + level_storage[l])
      firsts, seconds, targets = [], [], []
      for j in range(start, start + columns):
        s = structures[j]
        if not s.size:
          continue
        a, b = np.tril_indices(len(s))
        firsts.append(block_start[j] - blocks.start + a)
        seconds.append(block_start[j] - blocks.start + b)
        targets.append(stored_block(s[a], s[b]) - end)
      cat = lambda parts: (np.concatenate(parts) if parts else
                           np.zeros([0], np.int64)).astype(np.int32)
      self.levels.append(Level(
          start, columns, int(level_blocks[l]),
          (column_of_block[blocks] - start).astype(np.int32),
          cat(firsts), cat(seconds), cat(targets),
          (row_of_block[blocks] - start - columns).astype(np.int32)))

  def _assembly(self, layout, slot_rows, free):
    """Where each slot pair's J_a^T J_b blocks land in the storage."""
    self.pairs, self.targets, self.transposed = [], [], []
    dropped = self.stored
    for number, rows in enumerate(slot_rows):
      for a in range(len(rows)):
        for b in range(a, len(rows)):
          pa, pb = self.position[rows[a]], self.position[rows[b]]
          keep = free[rows[a]] & free[rows[b]]
          low, high = np.minimum(pa, pb), np.maximum(pa, pb)
          target = np.where(keep, self.stored_block(high, low), dropped)
          # J_a^T J_b is block (pa, pb): stored as is when pa > pb, as its
          # transpose when pa < pb, both when pa = pb (a != b).
          plain = (pa >= pb).astype(np.float64)
          transposed = (pa <= pb).astype(np.float64)
          if a == b:
            plain, transposed = np.ones_like(plain), np.zeros_like(plain)
          self.pairs.append((number, a, b))
          self.targets.append(target.astype(np.int32))
          self.transposed.append((plain, transposed))
    d = self.block
    held = np.ones([self.rows, d])
    for table, offset in zip(layout.tables, self.row_offsets):
      rows = slice(offset, offset + table.size)
      held[rows, :table.dim] = 0.0
      if table.free is not None:
        held[offset:offset + table.size][np.asarray(table.free) == 0] = 1.0
    self.held = held.reshape(-1)


def factor(structure, storage):
  """L from the assembled, damped storage [stored, d, d] (diagonal blocks
  already damped): (per level below the root (L_jj^-1 [columns, d, d],
  the off-diagonal L_ij [blocks, d, d]), the dense root's L^-1
  [R d, R d] or None). The diagonal blocks are kept inverted (one batched
  triangular solve per level; every other solve is then a batched
  product, which XLA compiles far faster than triangular solves)."""
  factors = []
  rest = storage
  d = structure.block
  for level in structure.levels:
    size = level.columns + level.blocks
    current, rest = rest[:size], rest[size:]
    diagonal = _linear_solvers._cholesky(current[:level.columns])  # pylint: disable=protected-access
    inverse = tf.linalg.triangular_solve(
        diagonal, tf.eye(d, batch_shape=[level.columns], dtype=storage.dtype),
        lower=True)
    if not level.blocks:
      factors.append((inverse, None))
      continue
    # L_ij = A_ij L_jj^-T.
    off = tf.einsum("pab,pcb->pac", current[level.columns:],
                    tf.gather(inverse, level.block_column))
    if level.first.size:
      products = tf.einsum("pab,pcb->pac", tf.gather(off, level.first),
                           tf.gather(off, level.second))
      rest = tf.tensor_scatter_nd_sub(rest, level.target[:, np.newaxis],
                                      products)
    factors.append((inverse, off))
  root = structure.root
  if root is None:
    return factors, None
  # What is left is the trailing Schur complement of the root's columns.
  shape = [root.columns, root.columns, d, d]
  lower = tf.scatter_nd(root.off_position, tf.gather(rest, root.off), shape)
  blocks = (tf.scatter_nd(root.diagonal_position,
                          tf.gather(rest, root.diagonal), shape) +
            lower + tf.transpose(lower, [1, 0, 3, 2]))
  size = root.columns * d
  matrix = tf.reshape(tf.transpose(blocks, [0, 2, 1, 3]), [size, size])
  dense = _linear_solvers._cholesky(matrix)  # pylint: disable=protected-access
  return factors, tf.linalg.triangular_solve(
      dense, tf.eye(size, dtype=storage.dtype), lower=True)


def substitute(structure, factors, rhs):
  """x = P^T L^-T L^-1 P rhs for rhs [rows, d] in the renumbered order
  (the caller permutes): forward then backward by the level schedule."""
  factors, root = factors
  solved, rest = [], rhs
  for level, (inverse, off) in zip(structure.levels, factors):
    current, rest = rest[:level.columns], rest[level.columns:]
    y = tf.einsum("pab,pb->pa", inverse, current)
    if off is not None:
      rest = tf.tensor_scatter_nd_sub(
          rest, level.rows[:, np.newaxis],
          tf.einsum("pab,pb->pa", off, tf.gather(y, level.block_column)))
    solved.append(y)
  above = None
  if root is not None:  # rest: the root's columns
    y = tf.linalg.matvec(root, tf.reshape(rest, [-1]))
    above = tf.reshape(tf.linalg.matvec(root, y, adjoint_a=True),
                       [-1, structure.block])
  for level, (inverse, off), y in reversed(list(zip(
      structure.levels, factors, solved))):
    if off is not None:
      y = y - tf.math.unsorted_segment_sum(
          tf.einsum("pab,pa->pb", off, tf.gather(above, level.rows)),
          level.block_column, level.columns)
    x = tf.einsum("pba,pb->pa", inverse, y)
    above = x if above is None else tf.concat([x, above], 0)
  return above


class SparseCholesky(_block_sparse.BlockSparse):
  """A block-sparse linearization solved by the block sparse Cholesky
  (bound to a `Structure` by `SparseCholeskyKind`)."""

  structure = None

  def _padded(self, parts):
    """Per table [N_t, d_t] -> [rows, d] (zero padding)."""
    d = self.structure.block
    return tf.concat([
        tf.pad(part, [[0, 0], [0, d - table.dim]]) if table.dim < d else part
        for part, table in zip(parts, self.layout.tables)], 0)

  def _unpadded(self, rows):
    """[rows, d] -> [n] (the tables' coordinates, joined)."""
    offsets = self.structure.row_offsets
    return self.layout.join_tangent([
        rows[offsets[t]:offsets[t + 1], :table.dim]
        for t, table in enumerate(self.layout.tables)])

  def assemble(self, regularization, scaling=None, products=None):
    """The stored blocks of P (J^T J + lambda D) P^T, [stored, d, d], in
    the storage order, with E (module docstring) not yet added; and E's
    diagonal [rows, d] in the renumbered order. `products`: (term number,
    slot a, slot b) -> [K, d_a, d_b], the blocks of another matrix of
    J^T J's sparsity to assemble instead of J_a^T J_b (the exact Hessian:
    `_block_sparse.EdgeHessian.pair`)."""
    structure, layout = self.structure, self.layout
    d = structure.block
    dtype = self.blocks[0].dtype
    grouped = self._by_term()
    values, targets = [], []
    for (number, a, b), target, (plain, transposed) in zip(
        structure.pairs, structure.targets, structure.transposed):
      if products is None:
        block_a, block_b = grouped[number][a][2], grouped[number][b][2]
        product = tf.einsum("kra,krb->kab", block_a, block_b)
      else:
        product = products(number, a, b)
      pad = d - product.shape[-1], d - product.shape[-2]
      if pad != (0, 0):
        product = tf.pad(product, [[0, 0], [0, pad[1]], [0, pad[0]]])
      if not (plain == 1).all():
        product = (
            tf.constant(plain, dtype)[:, tf.newaxis, tf.newaxis] * product +
            tf.constant(transposed, dtype)[:, tf.newaxis, tf.newaxis] *
            tf.linalg.matrix_transpose(product))
      values.append(product)
      targets.append(tf.constant(target))
    storage = tf.math.unsorted_segment_sum(
        tf.concat(values, 0), tf.concat(targets, 0),
        structure.stored + 1)[:structure.stored]
    lam = tf.convert_to_tensor(regularization, dtype)
    damping = lam * (tf.ones([layout.tangent_dim], dtype) if scaling is None
                     else tf.broadcast_to(scaling, [layout.tangent_dim]))
    diagonal = self._padded(layout.split_tangent(damping))
    norms = self._padded(layout.split_tangent(self.column_norms()))
    held = tf.reshape(tf.constant(structure.held, dtype), [-1, d])
    # 1 on held and padded coordinates and where J^T J's column is zero and
    # lambda D does not make the diagonal positive (as `_schur`). A negative
    # diagonal elsewhere is left to fail the factorization.
    extra = tf.where((held > 0) | ((norms <= 0) & ~(diagonal > 0)),
                     tf.ones_like(diagonal), diagonal)
    return storage, tf.gather(extra, structure.order)

  def damped_solver(self, regularization, scaling=None, products=None):
    """Factors P (J^T J + lambda D) P^T = L L^T for lambda =
    regularization ([]) and D = diag(scaling) ([n], or None for I); returns
    solve(residual, gradient) -> the `_linear_solvers.SolveOutcome` of
    -(J^T J + lambda D)^-1 gradient, [n] (NaN if the factorization failed
    or the gradient is not finite). With `products` (`assemble`), of that
    matrix + lambda D instead."""
    structure = self.structure
    storage, extra = self.assemble(regularization, scaling, products)
    damped = _add_to_diagonals(structure, storage, extra)
    factors = factor(structure, damped)
    dtype = storage.dtype

    def solve(residual, gradient):
      del residual
      rhs = self._padded(self.layout.split_tangent(gradient))
      x = substitute(structure, factors, tf.gather(rhs, structure.order))
      step = -self._unpadded(tf.gather(x, structure.position))
      finite = _batch.all_finite(step, 0)
      return _linear_solvers.direct_outcome(tf.where(
          finite, step, tf.fill(tf.shape(step), tf.constant(np.nan, dtype))))

    return solve


def _add_to_diagonals(structure, storage, extra):
  """storage with extra [rows, d] (renumbered order) added to the diagonals
  of the diagonal blocks."""
  index = tf.constant(structure.diagonal.astype(np.int32)[:, np.newaxis])
  return tf.tensor_scatter_nd_add(storage, index, tf.linalg.diag(extra))


class SparseCholeskyKind(_block_sparse.BlockSparseKind):
  """`BlockSparseKind` whose linearizations solve by the block sparse
  Cholesky (`Structure`: the symbolic analysis, once, here).

  Args:
    layout: a `_block_sparse.Layout` with index tensors known while tracing.
    leaf_size: parts of at most this many rows are ordered by minimum
      degree (`DISSECTION_LEAF_SIZE`).
    dense_root_size: the top levels are factored as one dense matrix of at
      most this many coordinates (None: `DENSE_ROOT_SIZE`; 0: none).
  """

  def __init__(self, layout, leaf_size=DISSECTION_LEAF_SIZE,
               dense_root_size=None):
    structure = Structure(layout, leaf_size, dense_root_size)
    super().__init__(layout, dense=False)
    self.structure = structure
    self.linearization_class = type(
        "SparseCholesky", (SparseCholesky,),
        {"layout": layout, "dense": False, "structure": structure})
