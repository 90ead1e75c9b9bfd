"""Bundle adjustment of a BAL file with `tfg_optim.factor_graph`.

Run:

    python -m tfg_optim.examples.bundle_adjustment IN.txt --output OUT.txt \
        [--max-iterations N] \
        [--linear-solver schur|iterative_schur|cholesky|cg|auto] \
        [--xla] [--plot OUT.png]

It minimizes the BAL cost (`io.bal_cost`, the formula of
../shared/data/README.md)

    F = 1/2 sum_k |f_c(k) r(p_k) p_k - o_k|^2,  P = R(w) X + t,
    p = -P_xy / P_z,  r(p) = 1 + k1 |p|^2 + k2 |p|^4,

over every camera (w, t, f, k1, k2) and every point X: two Euclidean tables
of a factor graph, cameras [C, 9] and points [P, 3], and one residual term
over the K observations (`reprojection_error`, vectorized over K). The
gauge (a similarity: rotating, translating and scaling the whole scene
leaves F unchanged) is held as Ceres' BAL example holds it: nothing is
fixed, and Levenberg-Marquardt's damping (Nielsen's lambda with Marquardt's
scaling) makes the damped normal equations regular. The default solver is
'schur' (`tfg_optim._schur`: the points eliminated in closed form, the
reduced camera system by dense Cholesky); 'iterative_schur' solves the
reduced system by conjugate gradients on the implicit Schur complement
with the SCHUR_JACOBI preconditioner (Ceres' ITERATIVE_SCHUR: memory
linear in the observations, for many cameras); 'cholesky' factors the whole
assembled J^T J, 'cg' is block-Jacobi conjugate gradients.

The solve runs inside one `tf.function` (tracing is timed apart from the
run). Afterwards the program prints one line per iteration (from
`record=`), a summary (initial and final cost, iterations, time, stop
reason), and writes OUT.txt: the input with the optimized cameras and
points, every float at full precision (reading it back gives the printed
final cost). A malformed input file ends the program with a message naming
the line and exit status 2.
"""

import argparse
import sys
import time

import numpy as np
import tensorflow as tf

from tfg_optim import damping
from tfg_optim import factor_graph
from tfg_optim import io
from tfg_optim._engine import StopReason
from tfg_optim.io import bal

LINEAR_SOLVERS = ("schur", "iterative_schur", "cholesky", "cg", "auto")


def reprojection_error(camera, point, observed):
  """f r p - observed for K edges, [K, 2] (the model of `io.bal_residuals`,
  one camera and one point per edge)."""
  moved = bal.rotate(camera[:, 0:3], point) + camera[:, 3:6]
  projected = -moved[:, :2] / moved[:, 2:3]
  radius_squared = tf.reduce_sum(projected * projected, axis=-1,
                                 keepdims=True)
  distortion = 1.0 + radius_squared * (camera[:, 7:8] +
                                       camera[:, 8:9] * radius_squared)
  return camera[:, 6:7] * distortion * projected - observed


def factor_graph_problem(problem, cameras, points):
  """([cameras table, points table], [reprojection term]) of the
  `io.BalProblem` at `cameras` [C, 9], `points` [P, 3] (tensors)."""
  camera_table = factor_graph.Variables(cameras, name="cameras")
  point_table = factor_graph.Variables(points, name="points")
  term = factor_graph.Term(
      reprojection_error,
      [(camera_table, np.asarray(problem.camera_index)),
       (point_table, np.asarray(problem.point_index))],
      data=[np.asarray(problem.observations)], name="reprojections")
  return [camera_table, point_table], [term]


# Ceres' Levenberg-Marquardt defaults (Solver::Options): lambda starts at
# 1 / initial_trust_region_radius = 1e-4 (relative to diag(J^T J)); the
# relative-cost-change test is the one benchmarks/_ceres_bal.py gives Ceres.
DEFAULTS = {"damping": "ceres", "function_tolerance": 1e-12}


def make_solver(problem, max_iterations=100, linear_solver="schur",
                xla=False, **options):
  """A `tf.function` (cameras, points) -> `LeastSquaresResults` (records
  on; `position` the pair (cameras, points)). `options` go to
  `tfg_optim.factor_graph.least_squares`, over `DEFAULTS` (damping 'ceres':
  Nielsen's with lambda starting at 1e-4)."""
  options = {**DEFAULTS, **options}
  if options["damping"] == "ceres":
    options["damping"] = damping.NielsenDamping(initial=1e-4)

  @tf.function(jit_compile=xla, reduce_retracing=True)
  def solve(cameras, points):
    variables, terms = factor_graph_problem(problem, cameras, points)
    return factor_graph.least_squares(
        variables, terms, max_iterations=max_iterations,
        linear_solver=linear_solver, record=max_iterations, **options)

  return solve


class Solution:
  """What `optimize` returns: the optimized `io.BalProblem`, the results
  (NumPy) and the time split (seconds): trace (tracing into a graph), run
  (the first call, including TensorFlow's graph optimizations and, with
  XLA, compilation) and solve (a second call when asked for, else run)."""

  def __init__(self, problem, results, trace_time, run_time, solve_time):
    self.problem = problem
    self.results = results
    self.trace_time = trace_time
    self.run_time = run_time
    self.solve_time = solve_time


def optimize(problem, max_iterations=100, linear_solver="schur", xla=False,
             repeat=False, **options):
  """Optimizes every camera and point of `problem`; returns a `Solution`."""
  solve = make_solver(problem, max_iterations, linear_solver, xla, **options)
  cameras = tf.constant(np.asarray(problem.cameras, np.float64))
  points = tf.constant(np.asarray(problem.points, np.float64))
  begin = time.perf_counter()
  solve.get_concrete_function(tf.TensorSpec(cameras.shape, cameras.dtype),
                              tf.TensorSpec(points.shape, points.dtype))
  trace_time = time.perf_counter() - begin
  begin = time.perf_counter()
  results = tf.nest.map_structure(lambda t: t.numpy(), solve(cameras, points))
  run_time = solve_time = time.perf_counter() - begin
  if repeat:
    begin = time.perf_counter()
    results = tf.nest.map_structure(lambda t: t.numpy(),
                                    solve(cameras, points))
    solve_time = time.perf_counter() - begin
  optimized = problem._replace(cameras=results.position[0],
                               points=results.position[1])
  return Solution(optimized, results, trace_time, run_time, solve_time)


def iteration_lines(results):
  """One line per iteration from the records (cost after the iteration)."""
  records = results.records
  lines = [f"{'iter':>5} {'cost':>22} {'gradient norm':>14} "
           f"{'step size':>10} {'damping':>10}"]
  lines.append(f"{0:>5} {float(results.initial_cost):>22.15e}")
  for i in range(int(results.num_iterations)):
    lines.append(f"{i + 1:>5} {records['cost'][i]:>22.15e} "
                 f"{records['gradient_norm'][i]:>14.3e} "
                 f"{records['step_size'][i]:>10.3e} "
                 f"{records['damping'][i]:>10.3e}")
  return lines


def summary_lines(solution, linear_solver):
  results, problem = solution.results, solution.problem
  reason = StopReason(int(results.stop_reason))
  cameras, points = len(problem.cameras), len(problem.points)
  return [
      f"cameras {cameras}, points {points}, observations "
      f"{len(problem.observations)}, parameters n = {9 * cameras + 3 * points}"
      f", residuals m = {int(results.num_residuals)}, linear solver "
      f"{linear_solver}",
      f"initial cost {float(results.initial_cost):.15e}",
      f"final cost   {float(results.cost):.15e}",
      f"iterations {int(results.num_iterations)} "
      f"({int(results.num_accepted)} accepted, "
      f"{int(results.num_rejected)} rejected)",
      f"time: tracing {solution.trace_time:.3f} s, solve "
      f"{solution.run_time:.3f} s (first call, includes graph optimization)",
      f"stop reason {reason.name.lower()}: {reason.message}",
  ]


def plot(path, before, after):
  """Top views (x, z) of cameras and points before and after; a message if
  there is no matplotlib."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  except ImportError:
    return ("--plot: matplotlib is not installed (pip install matplotlib, or "
            "the package's 'plot' extra); no plot written.")
  figure, axes = pyplot.subplots(1, 2, figsize=(12, 6))
  for axis, problem, title in ((axes[0], before, "before"),
                               (axes[1], after, "after")):
    cameras = np.asarray(problem.cameras)
    # Camera centers -R^T t.
    centers = -np.asarray(bal.rotate(-cameras[:, :3], cameras[:, 3:6]))
    axis.scatter(problem.points[:, 0], problem.points[:, 2], s=1,
                 label="points")
    axis.scatter(centers[:, 0], centers[:, 2], s=12, marker="^",
                 label="cameras")
    axis.set_title(title)
    axis.set_aspect("equal", adjustable="datalim")
    axis.set_xlabel("x")
    axis.set_ylabel("z")
    axis.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  pyplot.close(figure)
  return f"wrote {path}"


def main(argv=None, stdout=None):
  """The program; returns the exit status (2 for bad input)."""
  stdout = stdout or sys.stdout
  parser = argparse.ArgumentParser(
      prog="python -m tfg_optim.examples.bundle_adjustment",
      description=__doc__.split("\n", maxsplit=1)[0])
  parser.add_argument("input", help="the BAL file to optimize")
  parser.add_argument("--output", required=True, help="the BAL file to write")
  parser.add_argument("--max-iterations", type=int, default=100)
  parser.add_argument("--linear-solver", default="schur",
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
    problem = io.read_bal(args.input)
  except (OSError, ValueError) as error:
    say(f"error: {error}")
    return 2
  solution = optimize(problem, args.max_iterations, args.linear_solver,
                      args.xla)
  for line in iteration_lines(solution.results):
    say(line)
  for line in summary_lines(solution, args.linear_solver):
    say(line)
  try:
    io.write_bal(args.output, solution.problem)
  except (OSError, ValueError) as error:
    say(f"error: cannot write {args.output}: {error}")
    return 2
  say(f"wrote {args.output}")
  if args.plot:
    say(plot(args.plot, problem, solution.problem))
  return 0


if __name__ == "__main__":
  sys.exit(main())
