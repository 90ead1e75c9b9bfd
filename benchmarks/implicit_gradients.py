"""Gradients through a solve: implicit vs unrolled, time and memory.

Two problems, float64, CPU, inside `tf.function` (and under XLA):

- curve fit: y = p0 exp(-p1 t) + p2 sin(3 p3 t), m = 10,000 samples, n = 4,
  `tfg_optim.least_squares`; the loss is sum(position) and the gradient is
  taken w.r.t. the data y (a captured tensor);
- rotation fit: R = argmin over SO(3) of sum_i ||R x_i - y_i||^2, 10,000
  point pairs, `tfg_optim.riemannian.levenberg_marquardt`; gradient w.r.t.
  the target points y.

Part 1 (one process, side by side): the time of the solve alone
(gradients='none', forward), and of solve + gradient with
gradients='implicit' and with gradients='unrolled', called in turn in each
round; backward = the median over rounds of (solve + gradient) - solve,
with the median absolute deviation of those differences as its noise, and
its ratio to the forward time. Default tolerances (converged solves). The
implicit "backward" includes what the implicit mode adds to the forward
pass (one residual evaluation, one n x n Cholesky).

Part 2 (one subprocess per row): the peak resident set size of solve +
gradient with exactly k iterations (`StopAfterIteration(k)`, the trust
region runs all of them on the curve fit), for both modes, minus the RSS
after tracing (VmHWM - VmRSS from /proc/self/status; the tracing's own
transient peak counts too, if it was higher): implicit stays flat in k,
unrolled keeps every iteration's intermediates for the backward pass. On
CPU `get_memory_info` is unavailable; RSS includes allocator slack, so
differences of a few MiB mean nothing.

--large-scale: part 1 for the curve fit solved with linear_solver='cg' and
with t, y as `data` in chunks (--chunk-size rows), whose implicit gradients
are the matrix-free and chunked backward passes, and each implicit
gradient's largest difference from the dense solver's, relative to its
largest entry.

--factor-graph: part 1 for a pose graph of ../shared/data/posegraph
(--graph, default smallGrid3D: 125 SE(3) poses, n = 750, the first held),
`tfg_optim.factor_graph.least_squares` with linear_solver='cholesky' and
'cg' (block-Jacobi conjugate gradients, forward and backward), the loss
sum(W * poses) for a fixed random W, gradient w.r.t. the measurements (a
term's `data`); "implicit vs dense" is each implicit gradient's largest
difference from the 'cholesky' one, relative to its largest entry. With
the columns of implicit_hessian='exact' (timed in the same rounds, side
by side with the default Gauss-Newton 'implicit'), and "exact vs
implicit", the exact gradient's largest difference from the Gauss-Newton
one of the same solver, relative to the latter's largest entry.

Part 3 (--optimistix; --only-optimistix for it alone): the curve fit side by
side with `optimistix.LevenbergMarquardt` and its implicit adjoint
(`optimistix.ImplicitAdjoint`, which differentiates the gradient of
1/2 ||r||^2: the exact Hessian), on the same t, y and start, in a JAX
virtual environment (benchmarks/_optimistix_implicit.py, run by subprocess
after this process's rounds): forward and forward + backward (gradient of
sum(solution) w.r.t. y) of each, tfg_optim with implicit_hessian=
'gauss_newton' (default) and 'exact', backward = median over rounds of the
difference, and the relative difference of each gradient from optimistix's,
max |g - g_optimistix| / max |g_optimistix|.

    python -m venv benchmarks/.venv-jax
    benchmarks/.venv-jax/bin/pip install jax optimistix lineax

Usage (from the repository root):

    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/implicit_gradients.py
    ... --repeats 5 --iterations 10,100,400 --memory-m 50000 --skip-xla
    ... --only-optimistix --repeats 50
    ... --large-scale --repeats 20
    ... --factor-graph --graph smallGrid3D --repeats 10
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MIB = 1024.0 ** 2
CURVE_START = [1.0, 1.0, 0.3, 0.6]


def _problems(tf, m):
  """name -> (build(y, gradients, **options) -> (loss, iterations), y)."""
  import tfg_optim  # pylint: disable=g-import-not-at-top
  from tfg_optim import manifolds, riemannian  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  t = tf.constant(np.linspace(0.0, 4.0, m))
  p = np.array([2.0, 1.3, 0.5, 0.7])
  y_curve = (p[0] * np.exp(-p[1] * t.numpy()) +
             p[2] * np.sin(3.0 * p[3] * t.numpy()) +
             0.01 * rng.standard_normal(m))

  def curve(y, gradients, **options):
    def residual(q):
      return q[0] * tf.exp(-q[1] * t) + q[2] * tf.sin(3.0 * q[3] * t) - y
    result = tfg_optim.least_squares(
        residual, tf.constant(CURVE_START, tf.float64),
        gradients=gradients, **options)
    return tf.reduce_sum(result.position), result.num_iterations

  x_np = rng.standard_normal((m, 3))
  angle = 0.8
  rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0],
                       [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
  y_rotation = x_np @ rotation.T + 0.05 * rng.standard_normal((m, 3))
  x = tf.constant(x_np)

  def rotation_fit(y, gradients, **options):
    criterion = options.pop("stopping_criterion", None)
    result = riemannian.levenberg_marquardt(
        manifolds.SpecialOrthogonal(3),
        lambda r: tf.matmul(x, r, transpose_b=True) - y,
        tf.eye(3, dtype=tf.float64), gradients=gradients, return_state=True,
        stopping_criterion=criterion, **options)
    return tf.reduce_sum(result.position), result.num_iterations

  return {"curve fit": (curve, tf.constant(y_curve)),
          "rotation fit": (rotation_fit, tf.constant(y_rotation))}


def _functions(tf, build, jit_compile, **options):
  """(forward, implicit forward+backward, unrolled forward+backward,
  implicit_hessian='exact' forward+backward)."""
  def forward(y):
    return build(y, "none", **options)

  def with_gradient(gradients, **extra):
    def run(y):
      with tf.GradientTape() as tape:
        tape.watch(y)
        loss, iterations = build(y, gradients, **options, **extra)
      return tape.gradient(loss, y), iterations
    return run

  make = lambda f: tf.function(f, jit_compile=jit_compile, autograph=False)
  return (make(forward), make(with_gradient("implicit")),
          make(with_gradient("unrolled")),
          make(with_gradient("implicit", implicit_hessian="exact")))


def _timed(function, y):
  begin = time.perf_counter()
  out = function(y)
  out[0].numpy()
  return time.perf_counter() - begin, int(np.asarray(out[1]))


def _large_scale_problems(tf, m, chunk_size):
  """The curve fit of `_problems` solved with linear_solver='cg', and with
  t and y as `data` in chunks of `chunk_size` rows; and its dense
  implicit gradient (the reference)."""
  import tfg_optim  # pylint: disable=g-import-not-at-top
  build, y = _problems(tf, m)["curve fit"]
  t = tf.constant(np.linspace(0.0, 4.0, m))
  start = tf.constant(CURVE_START, tf.float64)

  def cg(y, gradients, **options):
    return build(y, gradients, linear_solver="cg", **options)

  def chunked(y, gradients, **options):
    def residual(q, t_rows, y_rows):
      return (q[0] * tf.exp(-q[1] * t_rows) +
              q[2] * tf.sin(3.0 * q[3] * t_rows) - y_rows)
    result = tfg_optim.least_squares(
        residual, start, data=[t, y], data_chunk_size=chunk_size,
        gradients=gradients, **options)
    return tf.reduce_sum(result.position), result.num_iterations

  reference = _functions(tf, build, False)[1](y)[0].numpy()
  return {"curve fit, cg": (cg, y),
          f"curve fit, chunks of {chunk_size:,d}": (chunked, y)}, reference


def _factor_graph_problems(tf, path):
  """The pose graph at `path` solved by `factor_graph.least_squares` with
  'cholesky' and 'cg' (measurements -> (sum(W * poses), iterations)); and
  the 'cholesky' implicit gradient (the reference)."""
  from tfg_optim import io  # pylint: disable=g-import-not-at-top
  from tfg_optim.examples import pose_graph  # pylint: disable=g-import-not-at-top
  from tfg_optim import factor_graph  # pylint: disable=g-import-not-at-top
  graph = io.read_g2o(path, missing_vertices="chain")
  start = tf.constant(graph.poses)
  weights = tf.constant(np.random.default_rng(0).normal(
      size=np.shape(graph.poses)))
  edges = np.asarray(graph.edges, np.int64).reshape(-1, 2)
  root = tf.constant(io.square_root_information(graph))

  def build(linear_solver):
    def solve(measurements, gradients, **options):
      poses = factor_graph.Variables(start, manifold=graph.manifold,
                                     fixed=[0], name="poses")
      term = factor_graph.Term(
          pose_graph.between_error,
          [(poses, edges[:, 0]), (poses, edges[:, 1])],
          data=[measurements, root], name="edges")
      results = factor_graph.least_squares(
          [poses], [term], linear_solver=linear_solver, gradients=gradients,
          **options)
      return (tf.reduce_sum(weights * results.position[0]),
              results.num_iterations)
    return solve

  name = os.path.splitext(os.path.basename(path))[0]
  measurements = tf.constant(np.asarray(graph.measurements))
  reference = _functions(tf, build("cholesky"), False)[1](
      measurements)[0].numpy()
  return {f"{name}, {solver}": (build(solver), measurements)
          for solver in ("cholesky", "cg")}, reference


def time_table(args, large_scale=False, factor_graph=False):
  """Medians over `repeats` rounds; each round calls the three functions in
  turn, so a slow spell of a shared machine hits them alike. `large_scale`:
  the curve fit with linear_solver='cg' and data_chunk_size, and each
  implicit gradient's largest difference from the dense one relative to
  its largest entry."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rows = []
  reference = None
  if large_scale:
    problems, reference = _large_scale_problems(tf, args.m, args.chunk_size)
  elif factor_graph:
    problems, reference = _factor_graph_problems(
        tf, os.path.join(args.data, args.graph + ".g2o"))
  else:
    problems = _problems(tf, args.m)
  for name, (build, y) in problems.items():
    for jit in ([False] if args.skip_xla else [False, True]):
      labels = ("forward", "implicit", "unrolled") + (
          ("exact",) if factor_graph else ())
      functions = dict(zip(labels, _functions(tf, build, jit)))
      row = {"problem": name, "mode": "XLA" if jit else "tf.function"}
      for label, function in list(functions.items()):
        try:
          row[label + "_first"], count = _timed(function, y)
          if label == "forward":
            row["iterations"] = count
        except Exception as error:  # pylint: disable=broad-except
          row[label + "_error"] = type(error).__name__
          row[label + "_message"] = " ".join(str(error).split())[:300]
          del functions[label]
      samples = {label: [] for label in functions}
      for _ in range(args.repeats):
        for label, function in functions.items():
          samples[label].append(_timed(function, y)[0])
      row["forward"] = statistics.median(samples["forward"])
      for label in labels[1:]:
        if label not in samples:
          row[label] = row[label + "_backward"] = None
          continue
        row[label] = statistics.median(samples[label])
        # Backward: the median over rounds of (solve + gradient) - solve,
        # each round's pair measured back to back; its noise: the median
        # absolute deviation of those differences.
        differences = [a - b for a, b in zip(samples[label],
                                              samples["forward"])]
        middle = statistics.median(differences)
        row[label + "_backward"] = middle
        row[label + "_noise"] = statistics.median(
            abs(d - middle) for d in differences)
      if reference is not None and "implicit" in functions:
        gradient = functions["implicit"](y)[0].numpy()
        row["difference"] = float(np.max(np.abs(gradient - reference)) /
                                  np.max(np.abs(reference)))
        if "exact" in functions:  # exact vs Gauss-Newton, same solve
          exact = functions["exact"](y)[0].numpy()
          row["exact_difference"] = float(np.max(np.abs(exact - gradient)) /
                                          np.max(np.abs(gradient)))
      rows.append(row)
      print(f"  {name}, {row['mode']}: done", flush=True)
  return rows


def _status_bytes(field):
  """A /proc/self/status memory field (VmRSS, VmHWM) in bytes.

  VmHWM, the peak RSS of this process image, is used rather than
  getrusage's ru_maxrss, which Linux carries over from the parent at fork
  and exec (it reported the parent's ~800 MiB for every child)."""
  with open("/proc/self/status") as status:
    for line in status:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  return 0


def child(problem, gradients, iterations, m):
  """One solve + gradient with exactly `iterations` iterations; prints JSON."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tfg_optim import stopping  # pylint: disable=g-import-not-at-top
  build, y = _problems(tf, m)[problem]

  @tf.function(autograph=False)
  def run(y):
    with tf.GradientTape() as tape:
      tape.watch(y)
      loss, count = build(y, gradients, stopping_criterion=(
          stopping.StopAfterIteration(iterations)))
    return tape.gradient(loss, y), count

  run.get_concrete_function(y)  # Trace first: the baseline has the graph.
  baseline = _status_bytes("VmRSS")
  begin = time.perf_counter()
  gradient, count = run(y)
  seconds = time.perf_counter() - begin
  peak = _status_bytes("VmHWM")
  print(json.dumps({"problem": problem, "gradients": gradients,
                    "iterations": int(count), "requested": iterations,
                    "extra": peak - baseline, "seconds": seconds,
                    "finite": bool(np.all(np.isfinite(gradient.numpy())))}))


def memory_table(args):
  rows = []
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  for problem in ("curve fit", "rotation fit"):
    for gradients in ("implicit", "unrolled"):
      for k in [int(v) for v in args.iterations.split(",")]:
        process = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", problem,
             gradients, str(k), "--memory-m", str(args.memory_m)],
            capture_output=True, text=True, env=env, check=False)
        if process.returncode:
          tail = (process.stderr.strip().splitlines() or ["?"])[-1]
          rows.append({"problem": problem, "gradients": gradients,
                       "requested": k, "error": tail[:100]})
        else:
          rows.append(json.loads(process.stdout.strip().splitlines()[-1]))
        print(f"  {problem}, {gradients}, k={k}: done", flush=True)
  return rows


def optimistix_table(args):
  """The curve fit: tfg_optim (tf.function, XLA; Gauss-Newton and exact
  Hessian) and optimistix's implicit adjoint, on the same data."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  build, y = _problems(tf, args.m)["curve fit"]
  rows = []
  for jit in ([False] if args.skip_xla else [False, True]):
    make = lambda f: tf.function(f, jit_compile=jit, autograph=False)  # pylint: disable=cell-var-from-loop

    def with_gradient(hessian):
      def run(y):
        with tf.GradientTape() as tape:
          tape.watch(y)
          loss, iterations = build(y, "implicit", implicit_hessian=hessian)
        return tape.gradient(loss, y), iterations
      return make(run)

    functions = {"forward": make(lambda y: build(y, "none")),
                 "gauss_newton": with_gradient("gauss_newton"),
                 "exact": with_gradient("exact")}
    first = {label: _timed(function, y) for label, function in
             functions.items()}
    samples = {label: [] for label in functions}
    for _ in range(args.repeats):
      for label, function in functions.items():
        samples[label].append(_timed(function, y)[0])
    for hessian in ("gauss_newton", "exact"):
      differences = [a - b for a, b in zip(samples[hessian],
                                            samples["forward"])]
      middle = statistics.median(differences)
      rows.append({
          "peer": f"tfg_optim ({hessian})",
          "mode": "XLA" if jit else "tf.function",
          "iterations": first["forward"][1],
          "forward": statistics.median(samples["forward"]),
          "implicit_backward": middle,
          "implicit_noise": statistics.median(abs(d - middle)
                                              for d in differences),
          "gradient": functions[hessian](y)[0].numpy()})
    print(f"  tfg_optim, {'XLA' if jit else 'tf.function'}: done", flush=True)
  with tempfile.TemporaryDirectory() as directory:
    data = os.path.join(directory, "curve.npz")
    out = os.path.join(directory, "optimistix.npz")
    np.savez(data, t=np.linspace(0.0, 4.0, args.m), y=y.numpy(),
             start=np.array(CURVE_START))
    process = subprocess.run(
        [args.jax_python, os.path.join(HERE, "_optimistix_implicit.py"),
         "--data", data, "--out", out, "--repeats", str(args.repeats)],
        capture_output=True, text=True, check=False)
    if process.returncode:
      raise RuntimeError(process.stderr[-2000:])
    peer = json.loads(process.stdout.strip().splitlines()[-1])
    peer.update(peer="optimistix (ImplicitAdjoint)", mode="jax.jit",
                gradient=np.load(out)["gradient"])
  print(f"  optimistix {peer['optimistix_version']}, jax "
        f"{peer['jax_version']}: done", flush=True)
  reference = peer["gradient"]
  for row in rows + [peer]:
    row["gradient_difference"] = float(
        np.max(np.abs(row["gradient"] - reference)) /
        np.max(np.abs(reference)))
    row["gradient"] = None
  return rows + [peer]


def print_optimistix(rows, args):
  print(f"\nCurve fit side by side with optimistix (ms; medians of "
        f"{args.repeats} rounds), m = {args.m:,d}, float64, CPU; gradient "
        "of sum(solution) w.r.t. y; difference: max |g - g_optimistix| / "
        "max |g_optimistix|")
  lines = [("peer", "mode", "iters", "solve", "implicit backward",
            "bwd/fwd", "gradient vs optimistix")]
  for row in rows:
    lines.append((
        row["peer"], row["mode"], str(row["iterations"]),
        _format_time(row["forward"]),
        f"{row['implicit_backward'] * 1e3:.2f} +- "
        f"{row['implicit_noise'] * 1e3:.2f}",
        f"{row['implicit_backward'] / row['forward']:.2f}",
        f"{row['gradient_difference']:.1e}"))
  _print_lines(lines)


def _format_time(seconds):
  return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def print_tables(times, memory, args):
  size = (args.graph if getattr(args, "factor_graph", False) else
          f"m = {args.m:,d}")
  print(f"\nTime (ms; medians of {args.repeats} rounds), {size}, "
        f"float64, CPU ({os.cpu_count()} cores). backward = median over "
        "rounds of (solve + gradient) - solve, +- its median absolute "
        "deviation")
  exact = any("exact_backward" in row for row in times)
  header = ("problem", "mode", "iters", "solve", "implicit backward",
            "implicit bwd/fwd", "unrolled backward", "unrolled bwd/fwd",
            "unrolled/implicit")
  compared = any("difference" in row for row in times)
  if compared:
    header += ("implicit vs dense",)
  if exact:
    header += ("exact backward", "exact bwd/fwd", "exact vs implicit")
  lines = [header]
  for row in times:
    cells = []
    for label in ("implicit", "unrolled"):
      back = row.get(label + "_backward")
      if back is None:
        cells += ["fails: " + row.get(label + "_error", "?"), "-"]
        continue
      cells += [f"{back * 1e3:.2f} +- {row[label + '_noise'] * 1e3:.2f}",
                f"{back / row['forward']:.2f}"]
    implicit, unrolled = row.get("implicit_backward"), row.get(
        "unrolled_backward")
    if implicit is None or unrolled is None:
      ratio = "-"
    elif implicit <= 2.0 * row["implicit_noise"]:
      ratio = "implicit within noise"
    else:
      ratio = f"{unrolled / implicit:.0f}"
    if compared:
      ratio = (ratio, f"{row['difference']:.1e}" if "difference" in row
               else "-")
    else:
      ratio = (ratio,)
    if exact:
      back = row.get("exact_backward")
      ratio += (("fails: " + row.get("exact_error", "?"), "-", "-")
                if back is None else
                (f"{back * 1e3:.2f} +- {row['exact_noise'] * 1e3:.2f}",
                 f"{back / row['forward']:.2f}",
                 f"{row['exact_difference']:.1e}"
                 if "exact_difference" in row else "-"))
    lines.append((row["problem"], row["mode"], str(row["iterations"]),
                  _format_time(row["forward"])) + tuple(cells) + ratio)
  _print_lines(lines)
  for row in times:
    for label in ("implicit", "unrolled", "exact"):
      if row.get(label + "_message"):
        print(f"  {row['problem']}, {row['mode']}, {label}: "
              f"{row[label + '_message'][:160]}")
  if memory:
    print(f"\nPeak RSS of solve + gradient minus RSS after tracing (MiB), "
          f"m = {args.memory_m:,d}, tf.function, k iterations (first call: "
          "includes graph optimization)")
    lines = [("problem", "gradients", "k requested", "iterations run",
              "extra RSS [MiB]", "first call [s]", "gradient finite")]
    for row in memory:
      if "error" in row:
        lines.append((row["problem"], row["gradients"], str(row["requested"]),
                      "-", row["error"], "-", "-"))
        continue
      lines.append((row["problem"], row["gradients"], str(row["requested"]),
                    str(row["iterations"]), f"{row['extra'] / MIB:.0f}",
                    f"{row['seconds']:.2f}", str(row["finite"])))
    _print_lines(lines)


def _print_lines(lines):
  widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
  for index, line in enumerate(lines):
    print("| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) +
          " |")
    if index == 0:
      print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def main():
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
  parser.add_argument("--m", type=int, default=10_000,
                      help="residual blocks of the timed problems")
  parser.add_argument("--repeats", type=int, default=50)
  parser.add_argument("--skip-xla", action="store_true")
  parser.add_argument("--skip-memory", action="store_true")
  parser.add_argument("--iterations", default="10,100,400",
                      help="iteration counts of the memory rows")
  parser.add_argument("--memory-m", type=int, default=50_000)
  parser.add_argument("--optimistix", action="store_true",
                      help="also part 3, optimistix side by side")
  parser.add_argument("--only-optimistix", action="store_true")
  parser.add_argument("--large-scale", action="store_true",
                      help="part 1 with linear_solver='cg' and "
                      "data_chunk_size instead (no memory part)")
  parser.add_argument("--chunk-size", type=int, default=1000)
  parser.add_argument("--factor-graph", action="store_true",
                      help="part 1 for a pose graph (factor_graph, "
                      "'cholesky' and 'cg') instead (no memory part)")
  parser.add_argument("--graph", default="smallGrid3D")
  parser.add_argument("--data", default=os.path.join(
      ROOT, "..", "shared", "data", "posegraph"))
  parser.add_argument("--jax-python", default=os.path.join(
      HERE, ".venv-jax", "bin", "python"))
  parser.add_argument("--json", help="also write the rows to this file")
  args = parser.parse_args()
  if args.child:
    child(args.child[0], args.child[1], int(args.child[2]), args.memory_m)
    return
  if args.only_optimistix:
    print("Side by side with optimistix ...", flush=True)
    rows = optimistix_table(args)
    print_optimistix(rows, args)
    if args.json:
      with open(args.json, "w") as output:
        json.dump({"optimistix": rows}, output, indent=1)
    return
  if args.large_scale or args.factor_graph:
    print("Timing, " + ("a factor graph" if args.factor_graph else
                        "cg and chunked") + " (one process) ...", flush=True)
    times = time_table(args, large_scale=args.large_scale,
                       factor_graph=args.factor_graph)
    print_tables(times, [], args)
    if args.json:
      with open(args.json, "w") as output:
        json.dump({"times": times}, output, indent=1)
    return
  print("Timing (one process) ...", flush=True)
  times = time_table(args)
  memory = []
  if not args.skip_memory:
    print("Memory (one subprocess per row) ...", flush=True)
    memory = memory_table(args)
  peers = []
  if args.optimistix:
    print("Side by side with optimistix ...", flush=True)
    peers = optimistix_table(args)
  print_tables(times, memory, args)
  if peers:
    print_optimistix(peers, args)
  if args.json:
    with open(args.json, "w") as output:
      json.dump({"times": times, "memory": memory, "optimistix": peers},
                output, indent=1)


if __name__ == "__main__":
  main()
