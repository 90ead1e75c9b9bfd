"""First-call cost: tracing (and XLA compilation) of each front-end.

The problem: fit y = a exp(-b t) + c to m = 200 noisy samples (t in [0, 4],
true (a, b, c) = (2, 1.3, 0.5), noise sigma 0.01, seed 0), n = 3, float64,
CPU, from (1, 1, 0); and, for the Riemannian front-end, one rotation fit on
SO(3) (20 points, noise 0.05, seed 0, from the identity).

Rows (each in `tf.function(autograph=False)` and, but for the reference,
also with `jit_compile=True`):
  tfg                 `tensorflow_graphics...levenberg_marquardt.minimize`,
                      10 iterations (the reference, tf.function only: its
                      XLA compile takes minutes)
  lm                  `tfg_optim.levenberg_marquardt.minimize`, 10 iterations
  least_squares       `tfg_optim.least_squares`, defaults (trust region,
                      geodesic acceleration)
  least_squares/nls   `least_squares(damping='nielsen',
                      geodesic_acceleration=None)`
  least_squares/cg    `least_squares(linear_solver='cg')` (matrix-free:
                      J v and J^T u in every CG iteration)
  sphere/cg           `least_squares(manifold=Sphere(3), linear_solver='cg',
                      batch_dims=1)`: the nearest unit vector p to
                      B p = B q (B 5 x 3, seed 7), two starts in a batch
                      (a cell of tests/conformance.py)
  riemannian          `tfg_optim.riemannian.levenberg_marquardt` on SO(3)
  lbfgs               `tfg_optim.lbfgs.minimize_lbfgs` on 1/2 ||r||^2

Every row runs in a fresh subprocess (no tracing or compilation cache from
an earlier row), `--repeats` times; the table shows medians. In a row:
  trace       `get_concrete_function` of a fresh tf.function (Python
              tracing alone), after an unrelated warm-up function so that
              TensorFlow's own start-up is not counted;
  first call  the trace plus the first call of that function: graph
              optimization or XLA compilation, and one solve;
  second call median of 3 further calls (the solve alone);
  ops         operations in the traced graph (while-loop bodies included);
  nodes       nodes of its GraphDef plus those of every function in its
              library (the same count from the serialized graph);
  retrace     with --retraces K, the fastest of K more traces of fresh
              tf.functions in the same process (Python tracing once the
              process is warm: less noisy than the cold trace on a loaded
              machine), in wall-clock seconds and in the process's CPU
              seconds (`time.process_time`, which other processes' load
              does not inflate);
  calls       with --retraces, the Python function calls of one more warm
              trace (`cProfile`): a count that no load can blur;
  ratio       first call / the reference's trace time.

Usage (from the repository root):

    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/first_call.py
    ... --repeats 5                 # more subprocesses per row
    ... --rows lm,least_squares     # a subset (the reference always runs)
    ... --json results.json         # also write every timing as JSON
    ... --trees /old/tree,/new/tree # each row once per tree (PYTHONPATH),
                                    # interleaved: a refactor's before/after
    ... --retraces 10               # also the warm retrace time
    ... --autograph                 # tf.function's default AutoGraph on
                                    # (what `@tf.function` gives a user):
                                    # it converts what it calls, the
                                    # reference's code included
    ... --inline                    # each row also with the traced products
                                    # inlined (`_linearization.NOINLINE =
                                    # None`), interleaved: what calling
                                    # them instead saves
"""

import argparse
import json
import os
import statistics
import sys
import time

import _harness

ROWS = ("tfg", "lm", "least_squares", "least_squares/nls", "least_squares/cg",
        "sphere/cg", "riemannian", "lbfgs")
INLINE = "inline"  # A pseudo-tree: this tree, traced products inlined.
NUM_POINTS = 200
MAX_ITERATIONS = 10


def _curve_data():
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  t = np.linspace(0.0, 4.0, NUM_POINTS)
  y = 2.0 * np.exp(-1.3 * t) + 0.5 + 0.01 * rng.standard_normal(NUM_POINTS)
  return t, y, np.array([1.0, 1.0, 0.0])


def _rotation_data():
  import numpy as np  # pylint: disable=g-import-not-at-top
  from scipy.spatial.transform import Rotation  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  rotation = Rotation.random(random_state=0).as_matrix()
  x = rng.standard_normal((20, 3))
  y = x @ rotation.T + 0.05 * rng.standard_normal(x.shape)
  return x, y, np.eye(3)


def _solver(row):
  """(function of one tensor to wrap in tf.function, its argument)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if row == "riemannian":
    from tfg_optim import manifolds, riemannian  # pylint: disable=g-import-not-at-top
    x, y, start = _rotation_data()
    x, y = tf.constant(x), tf.constant(y)

    def solve(r):
      result = riemannian.levenberg_marquardt(
          manifolds.SpecialOrthogonal(3),
          lambda r: tf.matmul(x, r, transpose_b=True) - y, r,
          return_state=True)
      return result.cost, result.position
    return solve, tf.constant(start)

  if row == "sphere/cg":
    import numpy as np  # pylint: disable=g-import-not-at-top
    import tfg_optim  # pylint: disable=g-import-not-at-top
    from tfg_optim import manifolds  # pylint: disable=g-import-not-at-top
    b = np.random.default_rng(7).standard_normal((5, 3))
    target = tf.constant(b @ np.array([0.48, -0.6, 0.64]))
    b = tf.constant(b)

    def solve(p):
      result = tfg_optim.least_squares(
          lambda p: tf.linalg.matvec(b, p) - target, p,
          manifold=manifolds.Sphere(3), linear_solver="cg", batch_dims=1)
      return tf.reduce_sum(result.cost), result.position
    return solve, tf.constant([[0.0, 0.0, 1.0], [0.6, 0.0, 0.8]], tf.float64)

  t, y, start = _curve_data()
  t, y = tf.constant(t), tf.constant(y)

  def residual(p):
    return p[0] * tf.exp(-p[1] * t) + p[2] - y

  if row == "tfg":
    from tensorflow_graphics.math.optimizer import levenberg_marquardt  # pylint: disable=g-import-not-at-top

    def solve(p):
      return levenberg_marquardt.minimize(residual, p, MAX_ITERATIONS)
  elif row == "lm":
    from tfg_optim import levenberg_marquardt  # pylint: disable=g-import-not-at-top

    def solve(p):
      return levenberg_marquardt.minimize(residual, p, MAX_ITERATIONS)
  elif row.startswith("least_squares"):
    import tfg_optim  # pylint: disable=g-import-not-at-top
    options = {}
    if row == "least_squares/nls":
      options = dict(damping="nielsen", geodesic_acceleration=None)
    if row == "least_squares/cg":
      options = dict(linear_solver="cg")

    def solve(p):
      result = tfg_optim.least_squares(residual, p, **options)
      return result.cost, result.position
  elif row == "lbfgs":
    from tfg_optim import lbfgs  # pylint: disable=g-import-not-at-top

    def solve(p):
      result = lbfgs.minimize_lbfgs(
          lambda p: 0.5 * tf.reduce_sum(tf.square(residual(p))), p,
          dtype="float64", return_results=True)
      return result.objective_value, result.position
  else:
    raise ValueError(f"unknown row {row!r}")
  return solve, tf.constant(start)


def _count_ops(graph):
  """Operations in a graph and in the function bodies it calls."""
  total = len(graph.get_operations())
  for function in getattr(graph, "_functions", {}).values():
    definition = function.cached_definition if hasattr(
        function, "cached_definition") else function.definition
    total += len(definition.node_def)
  return total


def _count_nodes(graph):
  """Nodes of a graph's GraphDef and of the functions in its library."""
  definition = graph.as_graph_def()
  return len(definition.node) + sum(
      len(function.node_def) for function in definition.library.function)


def child(row, jit, retraces=0):
  """Measures one row in this (fresh) process; prints one JSON line."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if os.environ.get("FIRST_CALL_INLINE"):
    from tfg_optim import _linearization  # pylint: disable=g-import-not-at-top
    _linearization.NOINLINE = None
  autograph = bool(os.environ.get("FIRST_CALL_AUTOGRAPH"))
  solve, argument = _solver(row)
  # Warm up TensorFlow itself (kernels, the first tf.function, XLA's
  # initialization) on an unrelated function, so the row pays only for
  # itself.
  warm = tf.function(lambda x: tf.reduce_sum(x * x), jit_compile=jit,
                     autograph=False)
  warm(argument).numpy()

  # A fresh tf.function: trace it (cold), then its first call (graph
  # optimization or XLA compilation, and one solve), then 3 more calls.
  fresh = tf.function(solve, jit_compile=jit, autograph=autograph)
  concrete = []
  timing = _harness.time_call(
      lambda: tf.nest.map_structure(lambda x: x.numpy(), fresh(argument)), 3,
      trace=lambda: concrete.append(fresh.get_concrete_function(argument)))
  ops = _count_ops(concrete[0].graph)
  nodes = _count_nodes(concrete[0].graph)
  out = timing.output
  cost = float(tf.nest.flatten(out)[0])
  retrace, retrace_cpu = [], []
  for _ in range(retraces):
    again = tf.function(solve, jit_compile=jit, autograph=autograph)
    begin, begin_cpu = time.perf_counter(), time.process_time()
    again.get_concrete_function(argument)
    retrace.append(time.perf_counter() - begin)
    retrace_cpu.append(time.process_time() - begin_cpu)
  calls = None
  if retraces:
    import cProfile  # pylint: disable=g-import-not-at-top
    import pstats  # pylint: disable=g-import-not-at-top
    again = tf.function(solve, jit_compile=jit, autograph=autograph)
    profiler = cProfile.Profile()
    profiler.enable()
    again.get_concrete_function(argument)
    profiler.disable()
    calls = pstats.Stats(profiler).total_calls
  print(json.dumps(dict(row=row, jit=jit, trace=timing.trace,
                        first=timing.first_call,
                        retrace=min(retrace) if retrace else None,
                        retrace_cpu=min(retrace_cpu) if retrace else None,
                        calls=calls,
                        second=timing.seconds, ops=ops, nodes=nodes,
                        cost=cost)))


def run_child(row, jit, tree=None, retraces=0):
  """Runs `child` in a fresh process with `tree` (default: this script's
  repository) first on PYTHONPATH."""
  env = dict(os.environ)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if tree == INLINE:
    env["FIRST_CALL_INLINE"] = "1"
    tree = None
  here = tree or _harness.ROOT
  env["PYTHONPATH"] = here + os.pathsep + env.get("PYTHONPATH", "")
  arguments = ["--child", row] + (["--jit"] if jit else []) + (
      ["--retraces", retraces] if retraces else [])
  result, note = _harness.run_peer(sys.executable, os.path.abspath(__file__),
                                   arguments, what=row, env=env)
  if note:
    raise RuntimeError(note)
  return result


def main():
  parser = _harness.parser(__doc__, repeats=3, json_output=True)
  parser.add_argument("--rows", default=",".join(ROWS[1:]),
                      help="comma-separated rows besides the reference")
  parser.add_argument("--skip-xla", action="store_true",
                      help="only tf.function rows")
  parser.add_argument("--trees", help="comma-separated source trees: every "
                      "row but the reference runs once per tree")
  parser.add_argument("--inline", action="store_true",
                      help="every row but the reference also with the "
                      "traced products inlined")
  parser.add_argument("--retraces", type=int, default=0,
                      help="also time this many warm retraces per process")
  parser.add_argument("--autograph", action="store_true",
                      help="tf.function with AutoGraph on (its default)")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  parser.add_argument("--jit", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.autograph:  # (read by the children)
    os.environ["FIRST_CALL_AUTOGRAPH"] = "1"
  if args.child:
    child(args.child, args.jit, args.retraces)
    return

  trees = args.trees.split(",") if args.trees else [None]
  if args.inline:
    if args.trees:
      parser.error("--inline compares this tree with itself: not with --trees")
    trees = [None, INLINE]
  plan = [("tfg", False, trees[0])]
  for row in args.rows.split(","):
    if row not in ROWS[1:]:
      parser.error(f"unknown row {row!r}; rows: {', '.join(ROWS[1:])}")
    for jit in (False,) if args.skip_xla else (False, True):
      plan.extend((row, jit, tree) for tree in trees)
  runs = {key: [] for key in plan}
  # Round-robin, so a load spike on the shared machine spreads over rows.
  for repeat in range(args.repeats):
    for key in plan:
      result = run_child(*key, retraces=args.retraces)
      runs[key].append(result)
      print(f"  [{repeat + 1}/{args.repeats}] {key[0]:18s} "
            f"{'xla' if key[1] else 'function':8s} trace {result['trace']:.3f} "
            f"s, first call {result['first']:.3f} s"
            f"{'' if key[2] is None else ', ' + key[2]}", flush=True)

  median = lambda key, field: statistics.median(r[field] for r in runs[key])
  reference = median(plan[0], "trace")
  compared = args.trees or args.inline
  header = ["front-end", "mode"] + (["tree"] if compared else []) + [
      "trace [s]"] + (["retrace [s]", "retrace CPU [s]", "calls"]
                      if args.retraces else []) + [
          "first call [s]", "second call [s]", "ops", "nodes", "cost",
          "first call / tfg trace"]
  table = [header]
  for key in plan:
    row, jit, tree = key
    table.append([
        row, "jit_compile" if jit else "function"] + (
            [(tree or "called") if row != "tfg" else ""] if compared
            else []) + [
        f"{median(key, 'trace'):.3f}"] + (
            [f"{min(r['retrace'] for r in runs[key]):.3f}",
             f"{min(r['retrace_cpu'] for r in runs[key]):.3f}",
             str(runs[key][0]["calls"])]
            if args.retraces else []) + [
        f"{median(key, 'first'):.3f}",
        f"{median(key, 'second'):.4f}", str(runs[key][0]["ops"]),
        str(runs[key][0]["nodes"]),
        f"{runs[key][0]['cost']:.6g}",
        f"{median(key, 'first') / reference:.2f}"])
  print()
  _harness.print_table(table[0], table[1:])
  print()
  if args.retraces:
    print(f"retrace: the fastest of {args.retraces} warm traces in each of "
          f"the {args.repeats} subprocesses per row (wall clock, and the "
          f"process's CPU time).")
  print(f"Medians over {args.repeats} fresh subprocesses per row; m = "
        f"{NUM_POINTS}, n = 3, float64; ratio = first call / tfg trace "
        f"({reference:.3f} s).")
  _harness.write_json(args.json, [dict(row=k[0], jit=k[1], tree=k[2], runs=v)
                                  for k, v in runs.items()])


if __name__ == "__main__":
  main()
