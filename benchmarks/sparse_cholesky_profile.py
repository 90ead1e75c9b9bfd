"""Where one iteration of a factor-graph solve with the sparse Cholesky
spends its time, on the shared g2o graphs.

For each graph (the problem of tfg_optim/examples/pose_graph.py, at its
start) times, each as its own `tf.function` (autograph off): the Jacobian
blocks (`_block_sparse.Layout.blocks`) in closed form (the edges' own
`jacobian`, `lie_groups.between_error_jacobians`) and by forward mode over
the edges tiled by the tangent directions (the same terms without it; their
largest difference is printed after the times), the cost (residuals and
their sum of squares), and the solver (`SparseCholesky.damped_solver`:
assembly, factorization and one solve) with the blocks as inputs, then its
three stages apart (assembly and factorization are called once to make the
next stage's input, so their trace and first-call columns are near 0): its graph's op count, tracing time, first
call (TensorFlow's graph optimization) and the mean of 5 later calls; with
--xla also the solver under `jit_compile=True` (first call: compilation),
checked against the graph's step. `steps` is the number of sequential
levels of the supernode tree (`_sparse_cholesky`: the dense root one of
them). With --levels also, per level: its supernodes, their columns, the
batches (supernodes x padded K columns x padded M rows below) and the
update pairs (d x d blocks of the products kept for the levels above).
With --schedules OVERHEAD:WEIGHT ... the solver of each batch schedule
(`_sparse_cholesky.BATCH_OVERHEAD`, `FLOP_WEIGHT`) is timed side by side
instead: --rounds rounds of 10 calls each, all schedules in turn, the
median and the smallest wall-clock and process CPU seconds per call.

    PYTHONPATH=. python benchmarks/sparse_cholesky_profile.py \
        [--data ../shared/data/posegraph] [--graphs MIT parking-garage] \
        [--xla] [--levels] [--schedules 1000:0 1000:0.2 --rounds 15]
"""

import sys
import time

import numpy as np

import _harness


def _flat(output):
  """The tensors of a nested tuple/list (None skipped)."""
  if output is None:
    return []
  if isinstance(output, (list, tuple)):
    return [x for part in output for x in _flat(part)]
  return [output]


def _timed(function, *args):
  """(seconds of the first call, mean seconds of 5 more, output)."""
  begin = time.perf_counter()
  output = function(*args)
  first = time.perf_counter() - begin
  begin = time.perf_counter()
  for _ in range(5):
    output = function(*args)
  _ = [np.asarray(x) for x in _flat(output)]
  return first, (time.perf_counter() - begin) / 5, output


def _print_levels(name, structure):
  """The supernode levels' schedule, one line each."""
  rows = structure.rows
  print(f"{name}: {structure.supernodes} supernodes, {structure.steps} "
        f"levels (the last: the dense root, {structure.root_columns} "
        f"columns), {structure.update_pairs} update pairs")
  for number, level in enumerate(structure.levels):
    supernodes = sum(len(batch.columns) for batch in level.batches)
    columns = sum(int((batch.columns < rows).sum())
                  for batch in level.batches)
    batches = ", ".join(f"{len(b.columns)}x{b.columns.shape[1]}x"
                        f"{b.below.shape[1]}" for b in level.batches)
    pairs = sum(len(batch.pairs) for batch in level.batches)
    print(f"  level {number}: {supernodes} supernodes, {columns} columns, "
          f"batches {batches}, {pairs} update pairs")


def _compare_schedules(name, layout, start, schedules, rounds):
  """Times the solver of each batch schedule 'OVERHEAD:WEIGHT' in turn."""
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  from tfg_optim import _sparse_cholesky
  # pylint: enable=g-import-not-at-top
  solvers = []
  defaults = _sparse_cholesky.BATCH_OVERHEAD, _sparse_cholesky.FLOP_WEIGHT
  for schedule in schedules:
    (_sparse_cholesky.BATCH_OVERHEAD,
     _sparse_cholesky.FLOP_WEIGHT) = (float(x) for x in schedule.split(":"))
    kind = _sparse_cholesky.SparseCholeskyKind(layout)
    (_sparse_cholesky.BATCH_OVERHEAD,
     _sparse_cholesky.FLOP_WEIGHT) = defaults
    linearization = kind.at((start,), None)
    inputs = (linearization.blocks, tf.constant(1e-3, tf.float64),
              linearization.column_norms(),
              linearization.gradient(layout.residual((start,))))
    solver = tf.function(
        lambda blocks, lam, scaling, gradient, kind=kind: kind.
        linearization_class(*blocks).damped_solver(lam, scaling)(
            None, gradient).solution, autograph=False)
    solver(*inputs)
    batches = sum(len(level.batches) for level in kind.structure.levels)
    solvers.append((schedule, batches, solver, inputs, [], []))
  for _ in range(rounds):
    for _, _, solver, inputs, wall, cpu in solvers:
      begin, begin_cpu = time.perf_counter(), time.process_time()
      for _ in range(10):
        output = solver(*inputs)
      np.asarray(output)
      wall.append((time.perf_counter() - begin) / 10)
      cpu.append((time.process_time() - begin_cpu) / 10)
  for schedule, batches, _, _, wall, cpu in solvers:
    print(f"| {name} | {schedule} | {batches} | {np.median(wall):.4f} | "
          f"{np.min(wall):.4f} | {np.median(cpu):.4f} | {np.min(cpu):.4f} |",
          flush=True)


def _solver_stages(kind, inputs):
  """The solver's three stages, each its own `tf.function` on the previous
  stage's output: assembly (J^T J + lambda D into the factor's block
  storage), the numeric factorization, and both substitutions (with the
  permutations)."""
  # pylint: disable=g-import-not-at-top,protected-access
  import tensorflow as tf
  from tfg_optim import _sparse_cholesky
  # pylint: enable=g-import-not-at-top
  blocks, lam, scaling, gradient = inputs
  structure = kind.structure

  def assembly(blocks, lam, scaling):
    storage, extra = kind.linearization_class(*blocks).assemble(lam, scaling)
    return _sparse_cholesky._add_to_diagonals(structure, storage, extra)

  def factorization(damped):
    return _sparse_cholesky.factor(structure, damped)

  def substitutions(factors, gradient):
    linearization = kind.linearization_class(*blocks)
    rhs = linearization._padded(linearization.layout.split_tangent(gradient))
    x = _sparse_cholesky.substitute(structure, factors,
                                    tf.gather(rhs, structure.order))
    return -linearization._unpadded(tf.gather(x, structure.position))

  assembly = tf.function(assembly, autograph=False)
  factorization = tf.function(factorization, autograph=False)
  damped = assembly(blocks, lam, scaling)
  factors = factorization(damped)
  return [("  assembly", assembly, (blocks, lam, scaling)),
          ("  factorization", factorization, (damped,)),
          ("  substitutions", tf.function(substitutions, autograph=False),
           (factors, gradient))]


def main():
  parser = _harness.parser(__doc__)
  parser.add_argument("--data", default=None,
                      help="folder of the g2o files (default: "
                      "../shared/data/posegraph)")
  parser.add_argument("--graphs", nargs="+", default=["MIT",
                                                      "parking-garage"])
  parser.add_argument("--xla", action="store_true")
  parser.add_argument("--levels", action="store_true")
  parser.add_argument("--schedules", nargs="+", default=None)
  parser.add_argument("--rounds", type=int, default=15)
  args = parser.parse_args()
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  from tests import problems
  from tfg_optim import _block_sparse
  from tfg_optim import _sparse_cholesky
  from tfg_optim import factor_graph
  # pylint: enable=g-import-not-at-top

  if args.schedules:
    print("| graph | overhead:weight | batches | wall s median | wall s min "
          "| CPU s median | CPU s min |")
    print("|---|---|---:|---:|---:|---:|---:|")
  else:
    print("| graph | rows | etree height / steps | part | ops | trace s | "
          "first call s | per call s |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
  for name in args.graphs:
    graph, variables, terms = problems.pose_graph_problem(name, args.data)
    start = tf.constant(graph.poses)
    layout, _ = factor_graph._layout(variables, terms)  # pylint: disable=protected-access
    kind = _sparse_cholesky.SparseCholeskyKind(layout)
    if args.schedules:
      _compare_schedules(name, layout, start, args.schedules, args.rounds)
      continue
    structure = kind.structure
    prefix = (f"| {name} | {len(graph.vertex_ids)} | {structure.height} / "
              f"{structure.steps}")
    if args.levels:
      _print_levels(name, structure)

    blocks = tf.function(lambda poses: layout.blocks((poses,)),  # pylint: disable=cell-var-from-loop
                         autograph=False)
    linearization = kind.at((start,), None)
    inputs = (linearization.blocks, tf.constant(1e-3, tf.float64),
              linearization.column_norms(),
              linearization.gradient(layout.residual((start,))))

    def solver(blocks, lam, scaling, gradient):
      return kind.linearization_class(*blocks).damped_solver(  # pylint: disable=cell-var-from-loop
          lam, scaling)(None, gradient).solution

    # The same blocks by forward mode over the tiled edges (the terms
    # without their closed-form jacobian), side by side, and how far apart.
    forward_layout = _block_sparse.Layout(
        layout.tables, [term._replace(jacobian=None) for term in layout.terms])
    forward_blocks = tf.function(
        lambda poses: forward_layout.blocks((poses,)), autograph=False)  # pylint: disable=cell-var-from-loop
    reference = None
    runs = [("Jacobian blocks, closed form", blocks, (start,)),
            ("Jacobian blocks, forward mode", forward_blocks, (start,)),
            ("cost", tf.function(lambda poses: 0.5 * tf.reduce_sum(  # pylint: disable=cell-var-from-loop
                tf.square(layout.residual((poses,)))), autograph=False),  # pylint: disable=cell-var-from-loop
             (start,)),
            ("solver", tf.function(solver, autograph=False), inputs)]
    runs += _solver_stages(kind, inputs)
    if args.xla:
      runs.append(("solver, XLA", tf.function(solver, autograph=False,
                                               jit_compile=True), inputs))
    for part, function, arguments in runs:
      begin = time.perf_counter()
      concrete = function.get_concrete_function(*arguments)
      trace = time.perf_counter() - begin
      ops = len(concrete.graph.get_operations())
      first, per_call, output = _timed(function, *arguments)
      if part.startswith("solver"):
        if reference is None:
          reference = np.asarray(output)
        else:
          error = (np.linalg.norm(np.asarray(output) - reference) /
                   np.linalg.norm(reference))
          part += f" (vs graph: {error:.1e})"
      print(f"{prefix} | {part} | {ops} | {trace:.2f} | {first:.2f} | "
            f"{per_call:.4f} |", flush=True)
    gap = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
              for x, y in zip(blocks(start), forward_blocks(start)))
    scale = max(float(np.max(np.abs(np.asarray(y))))
                for y in forward_blocks(start))
    print(f"{prefix} | closed form vs forward mode: max abs difference "
          f"{gap:.1e} (largest entry {scale:.1e}) | - | - | - | - |",
          flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
