"""The block sparse Cholesky's ordering on the shared g2o graphs.

For each graph (the factor-graph problem of tfg_optim/examples/pose_graph.py:
one SE(2)/SE(3) table, the first pose held) prints, per ordering: the
off-diagonal blocks of L (nnz(L), fill), the elimination tree's height (the
number of sequential steps a column-by-column factorization would take),
the fundamental supernodes and the levels of their tree (without the
dense root), the update pairs (the d x d blocks the supernodes' update
products reach, without the dense root), the sequential steps of a
factorization (the supernode levels below the dense root of
`DENSE_ROOT_SIZE` coordinates, and one for it) and the time of the symbolic
analysis (NumPy). Orderings:
nested dissection with parts of at most `leaf` rows ordered by minimum
degree (`_sparse_cholesky.Structure`, leaf = 4, 8, 16, 64), and the file's
own vertex order (no reordering) for comparison. With --ops it also traces
the solver (assembly, factorization, substitutions) once in a graph and
counts its ops.

    PYTHONPATH=. python benchmarks/sparse_cholesky_ordering.py \
        [--data ../shared/data/posegraph] [--graphs MIT intel ...] \
        [--leaves 4 8 16 64] [--ops]
"""

import sys
import time

import numpy as np

import _harness
GRAPHS = ("tinyGrid3D", "smallGrid3D", "MIT", "CSAIL", "intel",
          "parking-garage")


def natural_order(layout):
  """(nnz(L), height) of the file's own vertex order (no reordering) of a
  one-table, one-term layout."""
  # pylint: disable=g-import-not-at-top,protected-access
  import tensorflow as tf
  from tfg_optim import _sparse_cholesky
  # pylint: enable=g-import-not-at-top
  term = layout.terms[0]
  first, second = (np.asarray(tf.get_static_value(i), np.int64)
                   for i in term.indices)
  free = layout.tables[0].free > 0
  keep = free[first] & free[second]
  count = layout.tables[0].size
  indptr, neighbours = _sparse_cholesky._adjacency(count, first[keep],
                                                   second[keep])
  structures, levels = _sparse_cholesky._symbolic(indptr, neighbours,
                                                  np.arange(count))
  return sum(len(s) for s in structures), int(levels.max()) + 1


def main():
  parser = _harness.parser(__doc__)
  parser.add_argument("--data", default=None,
                      help="folder of the g2o files (default: "
                      "../shared/data/posegraph)")
  parser.add_argument("--graphs", nargs="+", default=list(GRAPHS))
  parser.add_argument("--leaves", nargs="+", type=int, default=[4, 8, 16, 64])
  parser.add_argument("--ops", action="store_true")
  args = parser.parse_args()
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  from tests import problems
  from tfg_optim import _sparse_cholesky
  from tfg_optim import factor_graph
  # pylint: enable=g-import-not-at-top

  print("| graph | rows | edges | ordering | nnz(L) blocks | etree height | "
        "supernodes | supernode levels | steps | update pairs | symbolic s | "
        "solver ops |")
  print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  for name in args.graphs:
    graph, variables, terms = problems.pose_graph_problem(name, args.data)
    layout, _ = factor_graph._layout(variables, terms)  # pylint: disable=protected-access
    rows, edges = len(graph.vertex_ids), len(graph.edges)
    for leaf in args.leaves:
      begin = time.perf_counter()
      structure = _sparse_cholesky.Structure(layout, leaf)
      seconds = time.perf_counter() - begin
      plain = _sparse_cholesky.Structure(layout, leaf, dense_root_size=0)
      ops = "-"
      if args.ops and leaf == _sparse_cholesky.DISSECTION_LEAF_SIZE:
        kind = _sparse_cholesky.SparseCholeskyKind(layout, leaf)
        linearization = kind.at((tf.constant(graph.poses),), None)
        solve = tf.function(
            lambda blocks, lam, scaling, gradient: kind.linearization_class(  # pylint: disable=cell-var-from-loop
                *blocks).damped_solver(lam, scaling)(None, gradient).solution,
            autograph=False)
        concrete = solve.get_concrete_function(
            linearization.blocks, tf.constant(1.0, tf.float64),
            linearization.column_norms(), linearization.column_norms())
        ops = str(len(concrete.graph.get_operations()))
      print(f"| {name} | {rows} | {edges} | nested dissection, leaf {leaf} | "
            f"{structure.nnz_blocks} | {structure.height} | "
            f"{plain.supernodes} | {plain.steps} | {structure.steps} | "
            f"{plain.update_pairs} | "
            f"{seconds:.2f} | {ops} |", flush=True)
    begin = time.perf_counter()
    nnz, height = natural_order(layout)
    print(f"| {name} | {rows} | {edges} | file order | {nnz} | {height} | "
          f"- | - | - | - | {time.perf_counter() - begin:.2f} | - |",
          flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
