"""Can TensorFlow's CSR sparse-matrix ops be the direct sparse solver?

Checks `tf.raw_ops.SparseMatrixSparseCholesky` (with the fill-reducing
`SparseMatrixOrderingAMD`) on the normal matrix of a 2-D grid pose graph
(3 x 3 blocks, the sparsity of a pose graph's J^T J) in every execution
mode and dtype, with a batch, and looks for a triangular solve among the
CSR ops. There is none; `bordered_solve` gets both substitutions from
factorizations alone (below). Times: the sparse factorization, the
bordered solve and the dense `tf.linalg.cholesky` of the same matrix, at a
few sizes.

The bordered solve (correct to rounding; not in the package because of its
cost):

TensorFlow has a sparse Cholesky factorization with a fill-reducing ordering
(`SparseMatrixOrderingAMD`, `SparseMatrixSparseCholesky`: CPU kernels only,
no XLA kernels, no gradient) but no sparse triangular solve. Both
substitutions are read off factorizations of bordered matrices instead:

1. Forward. With P the AMD ordering and P A P^T = L L^T, the factor of the
   bordered matrix [[P A P^T, P b], [b^T P^T, beta]] (the border ordered
   last) is [[L, 0], [y^T, gamma]] with L y = P b: its last row is
   y = L^-1 P b. (beta only has to exceed ||y||^2; it is huge.)
2. Backward. L^T L reversed (R L^T L R, R the reversal) has the Cholesky
   factor R L^T R (lower triangular), so the last row of the factor of
   [[R L^T L R, R y], [y^T R, beta]] is (R L^T R)^-1 R y = R L^-T y = R z:
   z = L^-T y.
3. x = P^T z.

Cost: two sparse factorizations (the second of L^T L, whose factor is
R L^T R: no fill beyond L's) and one sparse product per solve. Runs eagerly,
in `tf.function` and in TF1 graphs, float32 and float64; not under XLA
(no kernels) nor on GPUs. See docs/sparse.md for the measurements.

    PYTHONPATH=. python benchmarks/csr_cholesky_check.py [--sizes 20 40 70]
"""

import argparse
import time

import numpy as np
import tensorflow as tf

raw = tf.raw_ops


def grid_matrix(side, block=3, seed=0):
  """SPD block matrix of a side x side grid graph (blocks of `block`)."""
  rng = np.random.default_rng(seed)
  count = side * side
  n = count * block
  edges = []
  for i in range(side):
    for j in range(side):
      k = i * side + j
      if j + 1 < side:
        edges.append((k, k + 1))
      if i + 1 < side:
        edges.append((k, k + side))
  matrix = {}
  def add(a, b, value):
    matrix[(a, b)] = matrix.get((a, b), 0) + value
  for a, b in edges:
    jacobian_a = rng.normal(size=(block, block))
    jacobian_b = rng.normal(size=(block, block))
    add(a, a, jacobian_a.T @ jacobian_a)
    add(b, b, jacobian_b.T @ jacobian_b)
    add(a, b, jacobian_a.T @ jacobian_b)
    add(b, a, jacobian_b.T @ jacobian_a)
  for k in range(count):
    add(k, k, np.eye(block))
  rows, cols, vals = [], [], []
  for (a, b), value in matrix.items():
    r, c = np.meshgrid(np.arange(block), np.arange(block), indexing="ij")
    rows.append((a * block + r).ravel())
    cols.append((b * block + c).ravel())
    vals.append(value.ravel())
  rows, cols, vals = map(np.concatenate, (rows, cols, vals))
  order = np.lexsort((cols, rows))
  indices = np.stack([rows[order], cols[order]], -1).astype(np.int64)
  return indices, vals[order], n


def factor_and_solve(indices, values, n, rhs):
  """Sparse Cholesky with AMD; the solve through the dense factor (the CSR
  ops have no triangular solve)."""
  csr = raw.SparseTensorToCSRSparseMatrix(
      indices=indices, values=values, dense_shape=tf.constant([n, n],
                                                              tf.int64))
  ordering = raw.SparseMatrixOrderingAMD(input=csr)
  factor = raw.SparseMatrixSparseCholesky(input=csr, permutation=ordering,
                                          type=values.dtype)
  lower = raw.CSRSparseMatrixToDense(sparse_input=factor, type=values.dtype)
  permuted = tf.gather(rhs, ordering)
  y = tf.linalg.triangular_solve(lower, permuted[:, tf.newaxis], lower=True)
  x = tf.linalg.triangular_solve(lower, y, lower=True, adjoint=True)[:, 0]
  return tf.tensor_scatter_nd_update(tf.zeros_like(rhs), ordering[:, None], x)


def _csr(indices, values, size):
  return raw.SparseTensorToCSRSparseMatrix(
      indices=indices, values=values,
      dense_shape=tf.stack([size, size]))


def _last_row(factor, size, dtype):
  """The last row of a CSR factor [size, size], dense [size]."""
  rows, columns, values = raw.CSRSparseMatrixComponents(
      csr_sparse_matrix=factor, index=0, type=dtype)
  start, end = rows[size - 1], rows[size]
  return tf.scatter_nd(tf.cast(columns[start:end, tf.newaxis], tf.int64),
                       values[start:end], tf.reshape(size, [1]))


def _bordered(indices, values, border, size):
  """COO of [[A, c], [c^T, beta]] ([size + 1]^2) from A's COO (size x size)
  and the dense border c [size], sorted row-major."""
  dtype = values.dtype
  big = tf.constant(1e30, dtype)
  positions = tf.range(size, dtype=tf.int64)
  last = tf.fill([size], size)
  all_indices = tf.concat([
      indices, tf.stack([positions, last], 1), tf.stack([last, positions], 1),
      tf.reshape(tf.stack([size, size]), [1, 2])], 0)
  all_values = tf.concat([values, border, border, big[tf.newaxis]], 0)
  sparse = tf.sparse.reorder(tf.SparseTensor(
      all_indices, all_values, tf.stack([size + 1, size + 1])))
  return sparse.indices, sparse.values


def bordered_solve(indices, values, size, rhs, ordering=None):
  """x = A^-1 rhs.

  Args:
    indices: int64 [nnz, 2], A's nonzero positions, unique (any order).
    values: [nnz] float32/float64.
    size: n, a Python int or int64 scalar.
    rhs: [n].
    ordering: optional int32 [n] fill-reducing ordering (AMD of A), to
      reuse; computed when None.

  Returns:
    x [n]; NaN where A is not positive definite.
  """
  dtype = values.dtype
  size = tf.cast(size, tf.int64)
  if ordering is None:
    ordering = amd_ordering(indices, values, size)
  extended = tf.concat([ordering, tf.cast(size, tf.int32)[tf.newaxis]], 0)
  # 1. y = L^-1 P b: the last row of the bordered factor.
  border_indices, border_values = _bordered(indices, values, rhs, size)
  factor = raw.SparseMatrixSparseCholesky(
      input=_csr(border_indices, border_values, size + 1),
      permutation=extended, type=dtype)
  y = _last_row(factor, size + 1, dtype)[:-1]
  # 2. z = L^-T y from the reversed factorization of L^T L (L: the factor
  # without its border row, whose y y^T would make L^T L dense).
  rows, columns, entries = raw.CSRSparseMatrixComponents(
      csr_sparse_matrix=factor, index=0, type=dtype)
  kept = rows[size]  # entries of the first n rows
  row_of_entry = tf.repeat(tf.range(size, dtype=tf.int64),
                           rows[1:size + 1] - rows[:size])
  lower = _csr(tf.stack([row_of_entry, tf.cast(columns[:kept], tf.int64)],
                        1), entries[:kept], size)
  gram = raw.SparseMatrixSparseMatMul(a=lower, b=lower, type=dtype,
                                       transpose_a=True)
  gram = raw.CSRSparseMatrixToSparseTensor(sparse_matrix=gram, type=dtype)
  second_indices, second_values = _bordered(gram.indices, gram.values, y,
                                            size)
  reverse = tf.concat([tf.range(tf.cast(size, tf.int32) - 1, -1, -1),
                       tf.cast(size, tf.int32)[tf.newaxis]], 0)
  second = raw.SparseMatrixSparseCholesky(
      input=_csr(second_indices, second_values, size + 1),
      permutation=reverse, type=dtype)
  z = tf.reverse(_last_row(second, size + 1, dtype)[:-1], [0])
  # 3. x = P^T z.
  x = tf.scatter_nd(ordering[:, tf.newaxis], z, tf.reshape(
      tf.cast(size, tf.int32), [1]))
  finite = tf.reduce_all(tf.math.is_finite(x))
  return tf.where(finite, x, tf.fill(tf.shape(x), tf.constant(np.nan, dtype)))


def amd_ordering(indices, values, size):
  """AMD fill-reducing ordering of A's pattern, int32 [n]."""
  return raw.SparseMatrixOrderingAMD(
      input=_csr(indices, values, tf.cast(size, tf.int64)))


def factor_only(indices, values, n):
  csr = raw.SparseTensorToCSRSparseMatrix(
      indices=indices, values=values, dense_shape=tf.constant([n, n],
                                                              tf.int64))
  ordering = raw.SparseMatrixOrderingAMD(input=csr)
  factor = raw.SparseMatrixSparseCholesky(input=csr, permutation=ordering,
                                          type=values.dtype)
  return raw.SparseMatrixNNZ(sparse_matrix=factor)


def modes_check():
  indices, values, n = grid_matrix(5)
  dense = np.zeros((n, n))
  dense[indices[:, 0], indices[:, 1]] = values
  rhs = np.random.default_rng(1).normal(size=n)
  truth = np.linalg.solve(dense, rhs)
  for dtype in (np.float64, np.float32):
    args = (tf.constant(indices), tf.constant(values.astype(dtype)), n,
            tf.constant(rhs.astype(dtype)))
    for mode in ("eager", "function", "session", "xla"):
      try:
        if mode == "eager":
          x = factor_and_solve(*args).numpy()
        elif mode in ("function", "xla"):
          function = tf.function(lambda i, v, r: factor_and_solve(i, v, n, r),
                                 jit_compile=mode == "xla")
          x = function(args[0], args[1], args[3]).numpy()
        else:
          graph = tf.Graph()
          with graph.as_default():
            out = factor_and_solve(tf.constant(indices),
                                   tf.constant(values.astype(dtype)), n,
                                   tf.constant(rhs.astype(dtype)))
            with tf.compat.v1.Session(graph=graph) as session:
              x = session.run(out)
        error = np.max(np.abs(x - truth)) / np.max(np.abs(truth))
        print(f"{mode:9s} {np.dtype(dtype).name}: ok, relative error "
              f"{error:.1e}")
      except Exception as e:  # pylint: disable=broad-except
        print(f"{mode:9s} {np.dtype(dtype).name}: FAILS: "
              f"{type(e).__name__}: {str(e).splitlines()[0][:150]}")
  # A batch: the CSR ops take [B, n, n] dense shapes.
  try:
    batch_indices = np.concatenate([
        np.concatenate([np.full((len(indices), 1), b), indices], 1)
        for b in range(2)]).astype(np.int64)
    csr = raw.SparseTensorToCSRSparseMatrix(
        indices=batch_indices, values=np.concatenate([values, values]),
        dense_shape=tf.constant([2, n, n], tf.int64))
    ordering = raw.SparseMatrixOrderingAMD(input=csr)
    factor = raw.SparseMatrixSparseCholesky(input=csr, permutation=ordering,
                                            type=tf.float64)
    print("batch [2, n, n]: ok, nnz", raw.SparseMatrixNNZ(
        sparse_matrix=factor).numpy())
  except Exception as e:  # pylint: disable=broad-except
    print(f"batch: FAILS: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
  try:
    g = tf.Graph()
    with g.as_default():
      v = tf.constant(values)
      with tf.GradientTape() as tape:
        tape.watch(v)
        out = tf.reduce_sum(factor_and_solve(tf.constant(indices), v, n,
                                             tf.constant(rhs)))
      tape.gradient(out, v)
    print("gradient: ok")
  except Exception as e:  # pylint: disable=broad-except
    print(f"gradient: FAILS: {type(e).__name__}: "
          f"{str(e).splitlines()[0][:150]}")
  triangular = [name for name in dir(raw) if "SparseMatrix" in name and (
      "Solve" in name or "Triangular" in name)]
  print("CSR triangular-solve ops:", triangular or "none")
  from tensorflow.python.framework import kernels  # pylint: disable=g-import-not-at-top
  for op in ("SparseMatrixOrderingAMD", "SparseMatrixSparseCholesky",
             "SparseTensorToCSRSparseMatrix"):
    devices = sorted({k.device_type for k in
                      kernels.get_registered_kernels_for_op(op).kernel})
    print(f"registered kernels of {op}: {devices}")


def timing(sides):
  print(f"{'n':>7} {'nnz(A)':>9} {'nnz(L)':>10} {'sparse factor s':>16} "
        f"{'bordered solve s':>17} {'dense cholesky s':>17}")
  for side in sides:
    indices, values, n = grid_matrix(side)
    factor = tf.function(lambda i, v: factor_only(i, v, n))
    i_t, v_t = tf.constant(indices), tf.constant(values)
    nnz = factor(i_t, v_t).numpy()
    begin = time.perf_counter()
    for _ in range(3):
      factor(i_t, v_t).numpy()
    sparse_time = (time.perf_counter() - begin) / 3
    solve_time = float("nan")
    if n <= 5000:
      rhs = tf.constant(np.random.default_rng(0).normal(size=n))
      solve = tf.function(lambda i, v, r: bordered_solve(i, v, n, r))
      x = solve(i_t, v_t, rhs).numpy()
      product = np.zeros(n)
      np.add.at(product, indices[:, 0], values * x[indices[:, 1]])
      assert np.allclose(product, rhs.numpy(), atol=1e-9), "wrong solve"
      begin = time.perf_counter()
      solve(i_t, v_t, rhs).numpy()
      solve_time = time.perf_counter() - begin
    dense_time = float("nan")
    if n <= 8000:
      dense = np.zeros((n, n))
      dense[indices[:, 0], indices[:, 1]] = values
      d_t = tf.constant(dense)
      chol = tf.function(tf.linalg.cholesky)
      chol(d_t).numpy()
      begin = time.perf_counter()
      chol(d_t).numpy()
      dense_time = time.perf_counter() - begin
    print(f"{n:>7} {len(values):>9} {nnz:>10} {sparse_time:>16.4f} "
          f"{solve_time:>17.4f} {dense_time:>17.4f}")


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--sizes", type=int, nargs="+", default=[20, 40, 70])
  args = parser.parse_args()
  modes_check()
  timing(args.sizes)
