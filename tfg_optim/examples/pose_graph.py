"""Optimizes a 2-D or 3-D g2o pose graph with `tfg_optim.factor_graph`.

Run:

    python -m tfg_optim.examples.pose_graph IN.g2o --output OUT.g2o \
        [--max-iterations N] [--xla] [--plot OUT.png] \
        [--linear-solver auto|cholesky|cg|sparse_cholesky|dense]

It minimizes the g2o cost

    F(X) = 1/2 sum_edges e_ij^T Omega_ij e_ij,  e_ij = Log(Z_ij^-1 X_i^-1 X_j)

(`io.pose_graph_cost`, GTSAM's `graph.error`) over all poses but the first,
which is held at its value in the file (the gauge: F is invariant under
moving every pose by one rigid motion). The poses are one table of a factor
graph on SE(2) or SE(3) (retraction X Exp(c), body twists) with the first
row held, and the edges one residual term, U_ij e_ij (U^T U = Omega_ij):
the block-sparse linearization (docs/sparse.md; the edges' blocks in
closed form, `between_error_blocks`) with Nielsen's lambda
damping, solved by 'cholesky' (the dense Cholesky of the J^T J assembled
from the blocks), 'sparse_cholesky' (block sparse Cholesky), 'cg'
(block-Jacobi conjugate gradients) or 'auto' (factor_graph.picked_solver:
the dense Cholesky up to factor_graph.AUTO_SPARSE_MIN (1000) coordinates,
the sparse one beyond). 'dense' is the
former program: `tfg_optim.least_squares` over `Power(SE2 or SE3, N - 1)`
with a dense Jacobian (10-25 s of tracing, gigabytes on the larger
graphs). The solve runs inside one `tf.function`: tracing is timed apart
from the run. Afterwards it prints one line per iteration (from
`record=True`), a summary, and writes OUT.g2o: the input graph with the
optimized poses, same vertex ids, every float at full precision (reading it
back gives the same cost).

A malformed input file ends the program with a message naming the line and
exit status 2. Files without VERTEX lines (CSAIL.g2o) are read with
`missing_vertices="chain"` (GTSAM's odometry initialization).
"""

import argparse
import sys
import time

import numpy as np
import tensorflow as tf

from tfg_optim import factor_graph
from tfg_optim import io
from tfg_optim import nonlinear_least_squares
from tfg_optim._engine import StopReason
from tfg_optim.manifolds import lie_groups
from tfg_optim.manifolds import product


def free_manifold(graph):
  """Power(SE2 or SE3, N - 1): the manifold of every pose but the first."""
  count = len(graph.vertex_ids) - 1
  if count < 1:
    raise ValueError("the pose graph needs at least two vertices (the first "
                     "one is held fixed).")
  return product.Power(graph.manifold, count)


def residual_function(graph):
  """free poses [N - 1, 3 or 7] -> whitened residuals [K * d] (first pose
  held at graph.poses[0])."""
  first = tf.constant(graph.poses[:1])
  root = tf.constant(io.square_root_information(graph))
  def residuals(free):
    poses = tf.concat([tf.cast(first, free.dtype), free], axis=0)
    errors = io.pose_graph_errors(graph, poses)
    whitened = tf.einsum("kab,kb->ka", tf.cast(root, free.dtype), errors)
    return tf.reshape(whitened, [-1])
  return residuals


LINEAR_SOLVERS = factor_graph.LINEAR_SOLVERS + ("dense",)


def between_error(first, second, measurement, root):
  """U (Log(Z^-1 X_i^-1 X_j)) for K edges: [K, d], vectorized."""
  errors = lie_groups.log(lie_groups.between(
      measurement, lie_groups.between(first, second)))
  return tf.einsum("kab,kb->ka", root, errors)


def between_error_blocks(first, second, measurement, root):
  """The Jacobian blocks of `between_error` in the poses' twists, [K, d, d]
  each: U de/dc_i and U de/dc_j in closed form
  (`lie_groups.between_error_jacobians`)."""
  _, first_block, second_block = lie_groups.between_error_jacobians(
      measurement, first, second)
  return [tf.matmul(root, first_block), tf.matmul(root, second_block)]


def factor_graph_problem(graph, poses):
  """([poses table], [edge term]) of the graph at `poses` [N, 3 or 7] (the
  first row held)."""
  table = factor_graph.Variables(poses, manifold=graph.manifold, fixed=[0],
                                 name="poses")
  edges = np.asarray(graph.edges, np.int64).reshape(-1, 2)
  term = factor_graph.Term(
      between_error, [(table, edges[:, 0]), (table, edges[:, 1])],
      data=[np.asarray(graph.measurements),
            io.square_root_information(graph)], name="edges",
      jacobian=between_error_blocks)
  return [table], [term]


def make_solver(graph, max_iterations=100, linear_solver="auto", xla=False,
                **options):
  """A `tf.function` poses [N, 3 or 7] -> `LeastSquaresResults` (records
  on; `position` the [N, ...] poses, the first unchanged).

  `options` go to `tfg_optim.factor_graph.least_squares` (or, for 'dense',
  `tfg_optim.least_squares`: tolerances, damping, ...).
  """
  if linear_solver == "dense":
    manifold = free_manifold(graph)
    residuals = residual_function(graph)

    @tf.function(jit_compile=xla, reduce_retracing=True)
    def dense_solve(poses):
      results = nonlinear_least_squares.least_squares(
          residuals, poses[1:], manifold=manifold,
          max_iterations=max_iterations, linear_solver="dense",
          record=max_iterations, **options)
      return results._replace(position=tf.concat(
          [poses[:1], results.position], 0))

    return dense_solve

  @tf.function(jit_compile=xla, reduce_retracing=True)
  def solve(poses):
    variables, terms = factor_graph_problem(graph, poses)
    results = factor_graph.least_squares(
        variables, terms, max_iterations=max_iterations,
        linear_solver=linear_solver, record=max_iterations, **options)
    return results._replace(position=results.position[0])

  return solve


def picked_solver(graph, linear_solver):
  """What linear_solver='auto' resolves to for this graph
  (`factor_graph.picked_solver`)."""
  if linear_solver == "dense":
    return linear_solver
  return factor_graph.picked_solver(
      linear_solver, len(graph.vertex_ids) * graph.tangent_size)


class Solution:
  """What `optimize` returns: the optimized graph, the results (NumPy) and
  the time split (seconds): trace (tracing into a graph), run (the first
  call of the traced function, which includes TensorFlow's graph
  optimizations and, with XLA, compilation) and solve (a second call, if
  asked for)."""

  def __init__(self, graph, results, trace_time, run_time, solve_time):
    self.graph = graph
    self.results = results
    self.trace_time = trace_time
    self.run_time = run_time
    self.solve_time = solve_time


def optimize(graph, max_iterations=100, linear_solver="auto", xla=False,
             repeat=False, **options):
  """Optimizes every pose of `graph` but the first; returns a `Solution`.

  With repeat=True the solve is run a second time (same start) and that
  call's time is `solve_time`; else solve_time is the first call's.
  """
  solve = make_solver(graph, max_iterations, linear_solver, xla, **options)
  start = tf.constant(graph.poses)
  begin = time.perf_counter()
  concrete = solve.get_concrete_function(
      tf.TensorSpec(start.shape, start.dtype))
  trace_time = time.perf_counter() - begin
  del concrete
  begin = time.perf_counter()
  results = solve(start)
  results = tf.nest.map_structure(lambda t: t.numpy(), results)
  run_time = time.perf_counter() - begin
  solve_time = run_time
  if repeat:
    begin = time.perf_counter()
    results = tf.nest.map_structure(lambda t: t.numpy(), solve(start))
    solve_time = time.perf_counter() - begin
  return Solution(graph._replace(poses=results.position), results,
                  trace_time, run_time,
                  solve_time)


def iteration_lines(results):
  """One line per iteration from the records (cost after the iteration)."""
  records = results.records
  count = int(results.num_iterations)
  lines = [f"{'iter':>5} {'cost':>22} {'gradient norm':>14} "
           f"{'step size':>10} {'damping':>10}"]
  lines.append(f"{0:>5} {float(results.initial_cost):>22.15e}")
  for i in range(count):
    lines.append(f"{i + 1:>5} {records['cost'][i]:>22.15e} "
                 f"{records['gradient_norm'][i]:>14.3e} "
                 f"{records['step_size'][i]:>10.3e} "
                 f"{records['damping'][i]:>10.3e}")
  return lines


def summary_lines(solution, linear_solver):
  results, graph = solution.results, solution.graph
  reason = StopReason(int(results.stop_reason))
  n = (len(graph.vertex_ids) - 1) * graph.tangent_size  # free coordinates
  return [
      f"poses {len(graph.vertex_ids)} (first held fixed), edges "
      f"{len(graph.edges)}, parameters n = {n}, residuals "
      f"m = {int(results.num_residuals)}, linear solver "
      f"{picked_solver(graph, linear_solver)}",
      f"initial cost {float(results.initial_cost):.15e}",
      f"final cost   {float(results.cost):.15e}",
      f"iterations {int(results.num_iterations)} "
      f"({int(results.num_accepted)} accepted, "
      f"{int(results.num_rejected)} rejected)",
      f"time: tracing {solution.trace_time:.3f} s, solve {solution.run_time:.3f}"
      " s (first call, includes graph optimization)",
      f"stop reason {reason.name.lower()}: {reason.message}",
  ]


def plot(path, before, after):
  """Top views of the trajectory before and after; a message if no
  matplotlib."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  except ImportError:
    return ("--plot: matplotlib is not installed (pip install matplotlib, or "
            "the package's 'plot' extra); no plot written.")
  figure, axes = pyplot.subplots(1, 2, figsize=(12, 6))
  for axis, poses, title in ((axes[0], before, "before"),
                             (axes[1], after, "after")):
    axis.plot(poses[:, 0], poses[:, 1], linewidth=0.6)
    axis.set_title(title)
    axis.set_aspect("equal", adjustable="datalim")
    axis.set_xlabel("x")
    axis.set_ylabel("y")
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  pyplot.close(figure)
  return f"wrote {path}"


def main(argv=None, stdout=None):
  """The program; returns the exit status (2 for bad input)."""
  stdout = stdout or sys.stdout
  parser = argparse.ArgumentParser(
      prog="python -m tfg_optim.examples.pose_graph",
      description=__doc__.split("\n")[0])
  parser.add_argument("input", help="the g2o file to optimize")
  parser.add_argument("--output", required=True, help="the g2o file to write")
  parser.add_argument("--max-iterations", type=int, default=100)
  parser.add_argument("--linear-solver", default="auto",
                      choices=LINEAR_SOLVERS)
  parser.add_argument("--xla", action="store_true",
                      help="compile the solve with XLA (jit_compile=True)")
  parser.add_argument("--plot", metavar="OUT.png")
  args = parser.parse_args(argv)
  say = lambda line: print(line, file=stdout)
  if args.max_iterations < 1:
    say("error: --max-iterations must be at least 1")
    return 2
  try:
    graph = io.read_g2o(args.input, missing_vertices="chain")
    free_manifold(graph)
    io.square_root_information(graph)
  except (OSError, ValueError) as error:
    say(f"error: {error}")
    return 2
  solution = optimize(graph, args.max_iterations, args.linear_solver,
                      args.xla)
  for line in iteration_lines(solution.results):
    say(line)
  for line in summary_lines(solution, args.linear_solver):
    say(line)
  try:
    io.write_g2o(args.output, solution.graph)
  except (OSError, ValueError) as error:
    say(f"error: cannot write {args.output}: {error}")
    return 2
  say(f"wrote {args.output}")
  if args.plot:
    say(plot(args.plot, graph.poses, solution.graph.poses))
  return 0


if __name__ == "__main__":
  sys.exit(main())
