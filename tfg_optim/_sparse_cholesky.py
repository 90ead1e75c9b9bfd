"""Block sparse Cholesky of the damped normal equations (factor graphs).

For a factor graph (`_block_sparse`) the damped normal matrix

    A = J^T J + lambda D

is sparse in blocks: its block (i, j) (rows i and j of the variable
tables, d x d) is nonzero only if some edge reads both rows. A is factored
as P A P^T = L L^T by a supernodal block sparse Cholesky (a column = one
variable row, d coordinates; a supernode = a chain of columns factored as
one dense block), and the step solves L y = -P g, L^T x = y,
delta = P^T x.

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
   min S_j (the elimination tree; Liu 1990, Davis 2006 ch. 4).
4. Fundamental supernodes (Liu, Ng and Peyton 1993): column j + 1 joins
   column j's supernode when it is j's parent, j is its only child and
   S_j = {j + 1} | S_{j+1}. A supernode C's diagonal block of L is dense
   and all its columns share the rows R below it (those of its last
   column), so it is eliminated as one dense block. A nested-dissection
   separator is (mostly) one supernode: parking-garage's etree of 83
   column levels is 18 supernode levels. Each supernode's level in the
   supernode tree is 0 for a leaf, else one more than its highest child;
   supernodes of one level do not depend on each other, so the numeric
   phase runs level by level, leaves first: the number of levels is the
   number of sequential steps. The top levels, as many as fit in
   `DENSE_ROOT_SIZE` coordinates, are merged into one supernode (the dense
   root: the trailing Schur complement factored as one dense matrix,
   zero blocks included).
5. A level's supernodes are split into batches, each padded to its largest
   supernode (K columns, M rows below; padded columns get an identity
   diagonal block, padded rows zero blocks): sorted by (K + M, K), cut
   where the summed cost of the batches is least (`_batches`: a fixed
   `BATCH_OVERHEAD` per batch, the padded blocks it moves and its block
   products weighted by `FLOP_WEIGHT`; dynamic programming).
6. The columns are renumbered by (level, batch, supernode, position), a
   topological order of the tree (the same factor), and L's blocks stored
   by column, each level's contiguous and followed by a zero and an
   identity block (the padding). Per batch, static index lists: the rows
   of its blocks in the storage (`_block_rows`: a gather lays them out as
   dense [S, K d, K d] and [S, M d, K d] matrices, no transpose), and per
   level which products of the levels below update which of its blocks.

Numeric phase (TensorFlow ops, per iteration): the blocks
J_{term,a}[k]^T J_{term,b}[k] are scattered (`unsorted_segment_sum`, one
call) into the lower-triangular storage; then for each level (a Python
loop over the static schedule: each batch has its own static shapes)

    A_l  = A_l - sum of the products of the levels below that
           reach level l's blocks               one gather per level
                                                below, one segment sum
    L_CC = chol(A_CC)                           batched Cholesky, kept as
                                                L_CC^-1 [S, K d, K d]
    L_RC = A_RC L_CC^-T                         one batched matmul
    U    = L_RC L_RC^T                          one batched matmul; its
                                                blocks (i, k), i >= k,
                                                are the level's products
                                                (A_ik -= U_ik later)

with the damping lambda D (and E: 1 where J^T J + lambda D has a zero
diagonal entry: padded and unseen coordinates, and on held rows, as
`_schur` does) added to the diagonal blocks first. A level's storage is
its own slice, so no op copies the whole storage per level (a
`tensor_scatter_nd_sub` into it would: TensorFlow's graph executor does
not forward its input). L_CC^-1 comes from one batched triangular solve
per batch; every other solve is a product by it (XLA compiles a
triangular solve about six times slower than a Cholesky or a product).
The substitutions run by the same schedule: forward (y_C = L_CC^-1 b_C,
then b_R -= L_RC y_C), backward from the root level
(x_C = L_CC^-T (y_C - L_RC^T x_R)).

Tables of different dimensions share one block size d = max d_t: smaller
rows are padded with identity coordinates (zero right-hand side, zero
step). A factorization that fails (a block not positive definite) gives NaN
there, and so does an assembled matrix that is not finite (checked once),
so the step is all NaN: a rejected step, in every mode. Every op
(Cholesky, triangular solve, gather, matmul, segment sums, scatters)
compiles under XLA.

`SparseCholeskyKind` is the `_block_sparse.BlockSparseKind` whose
linearizations carry `damped_solver(regularization, scaling)`, the hook that
`_linear_solvers.damped_solver` calls. See docs/sparse.md.
"""

import collections
import functools

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

# The supernodes of one level are factored in batches, each padded to its
# largest supernode (`_batches`): one more batch costs as much as this many
# padded d x d blocks moved, and one block product (d^3 multiply-adds) as
# this many (picked on parking-garage: `benchmarks/sparse_cholesky_profile.py
# --schedules`, docs/sparse.md).
BATCH_OVERHEAD = 1000
FLOP_WEIGHT = 0.2


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


def _supernodes(structures):
  """The fundamental supernodes of the factor whose column j (an
  elimination position) has the sorted rows `structures[j]` below its
  diagonal (`_symbolic`): first [S + 1], supernode s the consecutive
  columns first[s] .. first[s + 1] - 1. Column j + 1 joins j's supernode
  when it is j's parent, j is its only child, and S_j = {j + 1} u S_{j+1}
  (Liu, Ng and Peyton 1993): a supernode's diagonal block of L is dense
  (lower triangle) and its columns share the rows below it, those of its
  last column."""
  count = len(structures)
  if not count:
    return np.zeros([1], np.int64)
  lengths = np.array([len(s) for s in structures], np.int64)
  parent = np.array([s[0] if len(s) else -1 for s in structures], np.int64)
  children = np.bincount(parent[parent >= 0], minlength=count)
  chained = ((parent[:-1] == np.arange(1, count)) & (children[1:] == 1) &
             (lengths[:-1] == lengths[1:] + 1))
  return np.concatenate([np.flatnonzero(np.concatenate([[True], ~chained])),
                         [count]])


def _batches(widths, heights, overhead):
  """Splits the supernodes of one level (widths k [S] columns, heights m
  [S] rows below) into batches, each padded to its largest k and m: index
  arrays into the level's supernodes. Sorted by (k + m, k), the
  supernodes (those of equal k and m together) are cut into the runs that
  minimize the summed cost of the batches, each `overhead` + count
  (K (K + M) + M^2 + `FLOP_WEIGHT`
  (M^2 K + M K^2 + K^3 / 3)) (the blocks gathered and produced: K x K,
  M x K and the M x M update; the block products of the update, of L_RC
  and of the Cholesky), by dynamic programming over the cut points."""
  # Supernodes of equal (k, m) share a batch: the cuts run over the
  # distinct sizes (few), not over the supernodes (thousands of leaves).
  sizes, group = np.unique(np.stack([widths, heights], -1), axis=0,
                           return_inverse=True)
  group = group.reshape(-1)
  order = np.lexsort((sizes[:, 0], sizes.sum(-1)))
  widths, heights = sizes[order, 0], sizes[order, 1]
  # Supernodes in the sorted sizes' first .. end - 1: totals[end] -
  # totals[first].
  totals = np.concatenate([[0], np.cumsum(
      np.bincount(group, minlength=len(sizes))[order])])
  count = len(order)
  best = np.zeros(count + 1)
  cut = np.zeros(count + 1, np.int64)
  for end in range(1, count + 1):
    # The largest k and m of each run start .. end - 1.
    k = np.maximum.accumulate(widths[:end][::-1])[::-1]
    m = np.maximum.accumulate(heights[:end][::-1])[::-1]
    costs = (best[:end] + overhead + (totals[end] - totals[:end]) * (
        k * (k + m) + m * m +
        FLOP_WEIGHT * (m * m * k + m * k * k + k * k * k / 3.0)))
    cut[end] = np.argmin(costs)
    best[end] = costs[cut[end]]
  rank = np.empty(count, np.int64)
  rank[order] = np.arange(count)
  rank = rank[group]  # each supernode's sorted size
  runs, end = [], count
  while end:
    runs.append(np.flatnonzero((rank >= cut[end]) & (rank < end)))
    end = cut[end]
  return runs[::-1]


Batch = collections.namedtuple(
    "Batch", ["columns", "below", "diagonal", "off", "pairs"])
Batch.__doc__ = """The static schedule of a batch of supernodes of one
level, each padded to K columns and M rows below (the batch's largest).

columns: int32 [S, K], each supernode's columns (renumbered order);
  below: int32 [S, M], the rows below it (its structure); padding `rows`
  (a zero row of the right-hand side).
diagonal: int32 [S, K, d, K], the rows (of d numbers: `_block_rows`) of
  the blocks of each supernode's diagonal block, lower triangle, in its
  level's storage (its upper blocks, blocks not in L's structure and
  padding: the level's zero block; padded diagonal blocks: its identity
  block); off: int32 [S, M, d, K], those of the blocks below it.
pairs: int32 [P, d], the rows of the blocks (i, k), i >= k both below a
  supernode, in the update products [S, M, d, M, d] (supernode, row, row)
  as rows of d numbers.
"""


Level = collections.namedtuple(
    "Level", ["batches", "base", "size", "incoming", "targets"])
Level.__doc__ = """The static schedule of one level of the supernode tree.

batches: its `Batch`es. base, size: its blocks are storage[base:base +
  size], followed by a zero block and an identity block.
incoming: per level below whose update products reach this level's blocks,
  (that level's number, int32 indices into its products, the `pairs` of
  its batches concatenated); targets: int32, the block (counted from base)
  each of them updates, all levels' concatenated (None: no updates).
"""


class Structure:
  """The static structure of the sparse Cholesky of a layout's J^T J.

  Attributes:
    block: d, the common block size (max d_t; smaller rows padded).
    rows: the number of block rows (all tables' rows, held included).
    position: int64 [rows], each row's column in the renumbered
      elimination order; order: its inverse.
    levels: the `Level`s of the supernode tree, leaves first, the dense
      root last.
    steps: the sequential steps of a factorization: len(levels).
    supernodes: how many supernodes (the dense root one of them).
    root_columns: the columns of the dense root (0: none).
    stored: the number of stored blocks (diagonal and below, and two
      padding blocks per level); level_base: int64 [levels + 1], where
      each level's blocks start; identity: int64 [levels], each level's
      identity block (its zero block is the one before).
    nnz_blocks: off-diagonal blocks of L (below the diagonal).
    update_pairs: the blocks updated by the supernodes' products, summed.
    height: the number of etree levels (of single columns).
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
               dense_root_size=None, batch_overhead=None):
    if dense_root_size is None:
      dense_root_size = DENSE_ROOT_SIZE
    if batch_overhead is None:
      batch_overhead = BATCH_OVERHEAD
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
    self.height = int(levels.max()) + 1 if self.rows else 0
    self._schedule(order, structures, dense_root_size, batch_overhead)
    self._assembly(layout, slot_rows, free)

  def _schedule(self, order, structures, dense_root_size, batch_overhead):
    """The supernodes, their levels and batches, the renumbering, the
    storage layout and the per-batch index lists."""
    count, d = self.rows, self.block
    first = _supernodes(structures)
    members = [np.arange(a, b) for a, b in zip(first[:-1], first[1:])]
    below = [structures[b - 1] for b in first[1:]]
    of_column = np.repeat(np.arange(len(members)), np.diff(first))
    level = np.zeros(len(members), np.int64)
    for s, rows in enumerate(below):  # parents come later
      if rows.size:
        parent = of_column[rows[0]]
        level[parent] = max(level[parent], level[s] + 1)
    # The dense root: the top levels, as many as fit in dense_root_size
    # coordinates, merged into one supernode (their columns are the last
    # ones and none has rows below the others).
    height = int(level.max()) + 1 if len(members) else 0
    root_level, total = height, 0
    while root_level > 0:
      more = sum(len(members[s]) for s in np.flatnonzero(
          level == root_level - 1))
      if (total + more) * d > dense_root_size:
        break
      total += more
      root_level -= 1
    self.root_columns = 0
    if root_level < height:
      top = np.flatnonzero(level >= root_level)
      top = top[np.lexsort((top, level[top]))]
      keep = np.flatnonzero(level < root_level)
      members = [members[s] for s in keep] + [
          np.concatenate([members[s] for s in top])]
      below = [below[s] for s in keep] + [np.zeros([0], np.int64)]
      level = np.concatenate([level[keep], [root_level]])
      height = root_level + 1
      self.root_columns = len(members[-1])
    self.supernodes = len(members)
    widths = np.array([len(m) for m in members], np.int64)
    heights = np.array([len(b) for b in below], np.int64)
    # Renumbered by (level, batch, supernode, position): a topological
    # order of the tree (the same factor), each supernode contiguous.
    schedule = []
    for l in range(height):
      at = np.flatnonzero(level == l)
      schedule.append([at[run] for run in _batches(
          widths[at], heights[at], batch_overhead)])
    renumber = np.concatenate(
        [members[s] for runs in schedule for run in runs for s in run] or
        [np.zeros([0], np.int64)])
    new_of_old = np.empty(count, np.int64)
    new_of_old[renumber] = np.arange(count)
    structures = [np.sort(new_of_old[structures[j]]) for j in renumber]
    self.order = order[renumber]
    self.position = np.empty(count, np.int64)
    self.position[self.order] = np.arange(count)
    # Storage: L's blocks by column, the diagonal block first, then those
    # below it by row; after each level's blocks a zero and an identity
    # block (padding).
    lengths = np.array([len(s) for s in structures], np.int64)
    self.nnz_blocks = int(lengths.sum())
    column_level = np.repeat(np.arange(height), [
        sum(len(members[s]) for run in runs for s in run)
        for runs in schedule])
    keys = np.concatenate(
        [np.concatenate([[j], s]) + j * count
         for j, s in enumerate(structures)] or [np.zeros([0], np.int64)])
    level_blocks = np.bincount(column_level, lengths + 1, minlength=height)
    self.level_base = np.concatenate(
        [[0], np.cumsum(level_blocks.astype(np.int64) + 2)])
    self.stored = int(self.level_base[-1])
    self.diagonal = (np.cumsum(lengths + 1) - lengths - 1 +
                     2 * column_level)
    self.identity = self.level_base[1:] - 1

    def stored_block(rows, columns, missing=None):
      """Stored index of blocks (row, column), row >= column; `missing`
      for blocks not in L's structure (None: there are none)."""
      columns = np.asarray(columns, np.int64)
      wanted = columns * count + rows
      where = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
      found = keys[where] == wanted
      where = where + 2 * column_level[columns]
      if missing is None:
        assert found.all()
        return where
      return np.where(found, where, missing)

    self.stored_block = stored_block
    self.levels, self.update_pairs = [], 0
    products = []  # per level below, the stored block of each product
    for l, runs in enumerate(schedule):
      base = self.level_base[l]
      zero = self.level_base[l + 1] - 2 - base
      # The products of the levels below that update this level's blocks.
      incoming, incoming_targets = [], []
      for lower, targets in enumerate(products):
        mine = np.flatnonzero((targets >= base) & (targets < base + zero))
        if mine.size:
          incoming.append((lower, mine.astype(np.int32)))
          incoming_targets.append(targets[mine] - base)
      batches, level_targets = [], []
      for run in runs:
        width, depth = int(widths[run].max()), int(heights[run].max())
        size = len(run)
        columns = np.full([size, width], count, np.int64)
        rows_below = np.full([size, depth], count, np.int64)
        diagonal = np.full([size, width, width], zero, np.int64)
        off = np.full([size, depth, width], zero, np.int64)
        pairs = []
        for b, s in enumerate(run):
          own = new_of_old[members[s]]
          rows = np.sort(new_of_old[below[s]])
          k, m = len(own), len(rows)
          columns[b, :k], rows_below[b, :m] = own, rows
          diagonal[b, np.arange(k, width), np.arange(k, width)] = zero + 1
          i, j = _lower_triangle(k)
          diagonal[b, i, j] = stored_block(own[i], own[j], zero + base) - base
          off[b, :m, :k] = (stored_block(np.repeat(rows, k), np.tile(own, m))
                            .reshape(m, k) - base)
          i, j = _lower_triangle(m)
          # Rows of d numbers of the update [S, M, d, M, d].
          pairs.append((((b * depth + i)[:, np.newaxis] * d + np.arange(d)) *
                        depth + j[:, np.newaxis]))
          level_targets.append(stored_block(rows[i], rows[j]))
        pairs = np.concatenate(pairs)
        self.update_pairs += len(pairs)
        to32 = lambda x: x.astype(np.int32)
        batches.append(Batch(
            to32(columns), to32(rows_below), to32(_block_rows(diagonal, d)),
            to32(_block_rows(off, d)), to32(pairs)))
      products.append(np.concatenate(level_targets))
      self.levels.append(Level(
          batches, int(base), int(zero), incoming,
          np.concatenate(incoming_targets).astype(np.int32)
          if incoming else None))
    self.steps = len(self.levels)

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
          target = np.full(len(keep), dropped, np.int64)
          target[keep] = self.stored_block(high[keep], low[keep])
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




@functools.lru_cache(maxsize=None)
def _lower_triangle(size):
  """np.tril_indices(size), computed once per size (the schedule asks for
  it once per supernode)."""
  return np.tril_indices(size)


def _block_rows(blocks, d):
  """Indices [..., p, q] of d x d blocks of a matrix of blocks [..., p,
  q, d, d] -> the indices [..., p, d, q] of their rows in the matrix's
  rows of d numbers [..., p, d, q, d] (block b's row r: b d + r). A gather
  of rows by them lays the blocks out as the dense [..., p d, q d] matrix
  (a reshape), with no transpose."""
  rows = blocks[..., np.newaxis, :] * d + np.arange(d)[:, np.newaxis]
  return rows


def factor(structure, storage):
  """L from the assembled, damped storage [stored, d, d] (diagonal blocks
  already damped): per level, per `Batch`, (L_CC^-1 [S, K d, K d], the
  blocks below it L_RC [S, M d, K d], or None where M = 0). The diagonal
  blocks are kept inverted (one batched triangular solve per batch; every
  other solve is then a batched product, which XLA compiles far faster
  than triangular solves)."""
  d = structure.block
  dtype = storage.dtype
  factors, products = [], []
  for level in structure.levels:
    current = storage[level.base:level.base + level.size + 2]
    if level.incoming:
      # A_ik -= sum of the products L_iC L_kC^T of the levels below.
      pieces = [tf.gather(products[lower], index)
                for lower, index in level.incoming]
      current -= tf.math.unsorted_segment_sum(
          pieces[0] if len(pieces) == 1 else tf.concat(pieces, 0),
          level.targets, level.size + 2)
    rows = tf.reshape(current, [-1, d])  # rows of d numbers
    updates = []
    for batch in level.batches:
      count, width = batch.columns.shape
      depth = batch.below.shape[1]
      diagonal = tf.reshape(tf.gather(rows, batch.diagonal),
                            [count, width * d, width * d])
      inverse = tf.linalg.triangular_solve(
          _block_cholesky(diagonal), tf.constant(np.eye(width * d), dtype),
          lower=True)
      if not depth:
        factors.append((inverse, None))
        continue
      # L_RC = A_RC L_CC^-T; the update A_RR -= L_RC L_RC^T.
      off = tf.matmul(tf.reshape(tf.gather(rows, batch.off),
                                 [count, depth * d, width * d]),
                      inverse, transpose_b=True)
      factors.append((inverse, off))
      updates.append(tf.gather(tf.reshape(
          tf.matmul(off, off, transpose_b=True), [-1, d]), batch.pairs))
    products.append(None if not updates else updates[0] if
                    len(updates) == 1 else tf.concat(updates, 0))
  return factors


def substitute(structure, factors, rhs):
  """x = L^-T L^-1 rhs for rhs [rows, d] in the renumbered order (the
  caller permutes): forward then backward by the batch schedule."""
  d = structure.block
  zero = tf.zeros([1, d], rhs.dtype)
  rest, solved, at = tf.concat([rhs, zero], 0), [], 0
  for level in structure.levels:  # L y = rhs
    products, rows = [], []
    for batch in level.batches:
      inverse, off = factors[at]
      at += 1
      count, width = batch.columns.shape
      y = tf.matmul(inverse, tf.reshape(
          tf.gather(rest, batch.columns), [count, width * d, 1]))
      solved.append(y)
      if off is not None:
        products.append(tf.reshape(tf.matmul(off, y), [-1, d]))
        rows.append(batch.below.reshape(-1))
    if products:
      rest = tf.tensor_scatter_nd_sub(
          rest, np.concatenate(rows)[:, np.newaxis], tf.concat(products, 0))
  solution = tf.concat([tf.zeros_like(rhs), zero], 0)
  for level in reversed(structure.levels):  # L^T x = y
    values, columns = [], []
    for batch in reversed(level.batches):
      at -= 1
      (inverse, off), y = factors[at], solved[at]
      count, depth = batch.below.shape
      if off is not None:
        y -= tf.matmul(off, tf.reshape(
            tf.gather(solution, batch.below), [count, depth * d, 1]),
                       adjoint_a=True)
      values.append(tf.reshape(tf.matmul(inverse, y, adjoint_a=True),
                               [-1, d]))
      columns.append(batch.columns.reshape(-1))
    solution = tf.tensor_scatter_nd_update(
        solution, np.concatenate(columns)[:, np.newaxis],
        tf.concat(values, 0))
  return solution[:-1]


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
    extra = tf.where(
        (held > 0) | ((norms <= 0) & _batch.not_positive(diagonal)),
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
      # The assembled matrix too: a Cholesky kernel factors Inf (a float32
      # J^T J that overflowed) into a finite factor.
      finite = _batch.all_finite(step, 0) & _batch.all_finite(damped, 0)
      return _linear_solvers.direct_outcome(tf.where(
          finite, step, tf.fill(tf.shape(step), tf.constant(np.nan, dtype))))

    return solve


def _add_to_diagonals(structure, storage, extra):
  """storage with extra [rows, d] (renumbered order) added to the diagonals
  of the diagonal blocks, and the levels' identity blocks set."""
  index = np.concatenate([structure.diagonal, structure.identity])
  ones = tf.ones([len(structure.identity), structure.block], extra.dtype)
  return tf.tensor_scatter_nd_add(
      storage, tf.constant(index.astype(np.int32)[:, np.newaxis]),
      tf.linalg.diag(tf.concat([extra, ones], 0)))


def _block_cholesky(matrix):
  """The Cholesky factor of a batch of diagonal blocks, NaN where it fails
  (eagerly: `_linear_solvers._cholesky`, as older kernels raise; in a
  graph the kernel's NaN; a storage that is not finite is caught once, in
  `SparseCholesky.damped_solver`)."""
  if tf.executing_eagerly():
    return _linear_solvers._cholesky(matrix)  # pylint: disable=protected-access
  return tf.linalg.cholesky(matrix)


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
