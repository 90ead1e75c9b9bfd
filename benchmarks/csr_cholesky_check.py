"""Can TensorFlow's CSR sparse-matrix ops be the direct sparse solver?

Checks `tf.raw_ops.SparseMatrixSparseCholesky` (with the fill-reducing
`SparseMatrixOrderingAMD`) on the normal matrix of a 2-D grid pose graph
(3 x 3 blocks, the sparsity of a pose graph's J^T J) in every execution
mode and dtype, with a batch, and looks for a triangular solve among the
CSR ops. Times: the sparse factorization vs the dense `tf.linalg.cholesky`
of the same matrix, at a few sizes.

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
  print("GPU kernels of SparseMatrixSparseCholesky: only CPU kernels are "
        "registered in TensorFlow's source (sparse_cholesky_op.cc)")


def timing(sides):
  print(f"{'n':>7} {'nnz(A)':>9} {'nnz(L)':>10} {'sparse factor s':>16} "
        f"{'dense cholesky s':>17}")
  for side in sides:
    indices, values, n = grid_matrix(side)
    factor = tf.function(lambda i, v: factor_only(i, v, n))
    i_t, v_t = tf.constant(indices), tf.constant(values)
    nnz = factor(i_t, v_t).numpy()
    begin = time.perf_counter()
    for _ in range(3):
      factor(i_t, v_t).numpy()
    sparse_time = (time.perf_counter() - begin) / 3
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
          f"{dense_time:>17.4f}")


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--sizes", type=int, nargs="+", default=[20, 40, 70])
  args = parser.parse_args()
  modes_check()
  timing(args.sizes)
