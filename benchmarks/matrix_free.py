"""Matrix-free least squares: image denoising by smooth total variation.

    r(x) = [x - y;  mu sqrt((D_h x)^2 + (D_v x)^2 + eps^2)]

over a size x size image x (n = size^2 parameters, m ~ 2n residuals), y a
noisy disc, every solver started from y, float64. Solvers:

  tfg_optim    `least_squares(..., linear_solver='cg')` (J never formed;
               CG / Steihaug steps) inside one `tf.function`, default
               tolerances and damping ('trust_region'); and the same with
               `inexact_steps=True` (CG stopped at an inexact-Newton
               forcing term instead of 1e-6: 'inexact sqrt' the default
               rule, min(0.5, sqrt(||g||)); 'inexact EW' Eisenstat and
               Walker's, `_linear_solvers.FORCING_RULE`); with `column_groups` (3 structurally
               orthogonal groups of pixels: diag(J^T J) exact instead of
               estimated from 8 probes); and under XLA
               (`tf.function(jit_compile=True)`; its compile time is the
               first call less the trace and a steady call, so each XLA
               row solves at least twice); rows named "geodesic" pass
               `geodesic_acceleration=2.0` (the default before the
               matrix-free solver turned it off). --variants picks the
               rows.
  scipy        `least_squares(method='trf', tr_solver='lsmr',
               jac_sparsity=...)`, default tolerances (finite differences
               with the sparsity's column grouping).
  optimistix   `optx.LevenbergMarquardt(rtol=atol=1e-8,
               linear_solver=lx.Normal(lx.CG(rtol=atol=1e-6)))` under
               `jax.jit` (matrix-free: `jax.linearize` and its transpose),
               in its own venv (`_optimistix_matrix_free.py`, run by
               `_harness.run_peer`; skipped with a note without the venv).

Time to equal cost. Each solver runs to its own stop; its final cost is
computed one way for all (NumPy, `cost`). The target is the worst (largest)
final cost; each solver's time to the target is the time until its cost
first is <= target (1 + 1e-9):

  tfg_optim    a second solve, told the target (`cost_tolerance`, which
               stops after the first iteration below it; the iterates are
               those of the full solve), timed like the full solve;
  scipy        the time at which its `callback` (called at the end of each
               iteration, after the Jacobian at the new point) first sees a
               cost <= the target, in the full solve (a solve that stopped
               there would have taken that long);
  optimistix   a second solve with `max_steps` = the first step count after
               which its cost (from its `verbose` hook in a first, recorded
               run) is <= the target. Its times are the median of
               1 + --peer-repeats solves after an ahead-of-time compile.

CG iterations: tfg_optim's `num_linear_solver_iterations` (every solve of
an iteration: the step, rejected steps', geodesic acceleration's); scipy's
LSMR iterations (one LSMR solve per iteration, counted by wrapping
`scipy.optimize._lsq.trf.lsmr`); optimistix's CG iterations (lineax's
`num_steps`, reported by a subclass of `lx.CG` in the recorded run). Peak
RSS: tfg_optim's is this process's `ru_maxrss` right after its solve
(a high-water mark: the second row's includes the first's; scipy runs
after both in this process), optimistix's its own process's.

tfg_optim's solve time is the steady state (the median of --repeats calls
after the first) up to n = --steady-up-to, and the first call (trace
included; the trace time is shown apart) above it.

    python benchmarks/matrix_free.py --sizes 100 200 1000
    python benchmarks/matrix_free.py --preconditioner-check 50
    python benchmarks/matrix_free.py --nearly-linear
    python benchmarks/matrix_free.py --product-hlo 1000
"""

import collections
import os
import re
import resource
import statistics
import tempfile
import time

import numpy as np
import scipy.optimize
import scipy.optimize._lsq.trf
import scipy.optimize._numdiff
import scipy.sparse
import tensorflow as tf

import _harness
import tfg_optim
from tfg_optim import _engine
from tfg_optim import _linear_solvers
from tfg_optim import _linearization

MU, EPS = 0.5, 0.1
# A cost within this relative margin of the target counts as reaching it.
MARGIN = 1e-9


def noisy_disc(size, seed=0):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  clean = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.1).astype(np.float64)
  return clean + 0.1 * rng.standard_normal(clean.shape)


def numpy_residuals(x, y):
  x = x.reshape(y.shape)
  dx = x[:-1, 1:] - x[:-1, :-1]
  dy = x[1:, :-1] - x[:-1, :-1]
  return np.concatenate([(x - y).ravel(),
                         MU * np.sqrt(dx ** 2 + dy ** 2 + EPS ** 2).ravel()])


def cost(x, y):
  return 0.5 * np.sum(numpy_residuals(x, y) ** 2)


def sparsity(size):
  """The Jacobian's pattern: identity, and each TV term touches a pixel, its
  right and its lower neighbour."""
  n = size * size
  index = np.arange(n).reshape(size, size)
  rows = [np.arange(n)]
  cols = [np.arange(n)]
  tv = np.arange((size - 1) ** 2) + n
  for neighbour in (index[:-1, :-1], index[:-1, 1:], index[1:, :-1]):
    rows.append(tv)
    cols.append(neighbour.ravel())
  rows, cols = np.concatenate(rows), np.concatenate(cols)
  return scipy.sparse.csr_matrix((np.ones(rows.size), (rows, cols)),
                                 shape=(n + (size - 1) ** 2, n))


def first_at_or_below(costs, threshold):
  """The first index whose cost is <= threshold, or None."""
  below = np.flatnonzero(np.asarray(costs) <= threshold)
  return int(below[0]) if below.size else None


# tfg_optim's rows (--variants): name -> options of `run_tfg`.
VARIANTS = {
    "default": {},
    "inexact EW": dict(inexact_steps=True, forcing="eisenstat_walker"),
    "inexact sqrt": dict(inexact_steps=True, forcing="sqrt"),
    "groups": dict(groups=True),
    "groups inexact EW": dict(groups=True, inexact_steps=True,
                              forcing="eisenstat_walker"),
    "XLA": dict(jit_compile=True),
    "XLA inexact EW": dict(jit_compile=True, inexact_steps=True,
                           forcing="eisenstat_walker"),
    "XLA groups inexact EW": dict(jit_compile=True, groups=True,
                                  inexact_steps=True,
                                  forcing="eisenstat_walker"),
    # Geodesic acceleration on (`geodesic_acceleration=2.0`; the matrix-free
    # solver's default before it turned it off): the rows before that
    # change, side by side.
    "default geodesic": dict(geodesic=True),
    "groups inexact EW geodesic": dict(groups=True, inexact_steps=True,
                                       forcing="eisenstat_walker",
                                       geodesic=True),
    "XLA groups inexact EW geodesic": dict(
        jit_compile=True, groups=True, inexact_steps=True,
        forcing="eisenstat_walker", geodesic=True),
    # The trust region's radius grown above rho > 3/4 (`TrustRegionDamping`'s
    # default, and 'trust_region' with the matrix-free solver before it grew
    # only above 0.9): the rows before that change, side by side.
    "default expand 0.75": dict(expand_threshold=0.75),
    "groups inexact EW expand 0.75": dict(groups=True, inexact_steps=True,
                                          forcing="eisenstat_walker",
                                          expand_threshold=0.75),
    "XLA groups inexact EW expand 0.75": dict(
        jit_compile=True, groups=True, inexact_steps=True,
        forcing="eisenstat_walker", expand_threshold=0.75),
}


def tv_column_groups(size):
  """3 structurally orthogonal groups of the pixels of the TV residuals:
  pixel (i, j) in group (i + 2 j) mod 3 (a TV term touches (i, j),
  (i, j + 1) and (i + 1, j), whose groups differ by 2, 1 and 1 mod 3)."""
  i, j = np.mgrid[0:size, 0:size]
  return ((i + 2 * j) % 3).ravel()


def run_tfg(y, max_iterations, damping, repeats, cost_tolerance=0.0,
            inexact_steps=False, jit_compile=False, forcing=None,
            groups=False, expand_threshold=None, geodesic=False):
  """One tfg_optim solve (traced once, timed by `_harness.time_call`).

  With `jit_compile`, the `tf.function` is compiled by XLA and at least
  one steady call is timed after the first, so that the compile time is
  the first call's excess over it. `forcing`: the forcing rule of
  `inexact_steps` (`_linear_solvers.FORCING_RULE`, None: the default);
  `groups`: `column_groups=tv_column_groups(size)` (the exact diagonal);
  `expand_threshold`: `damping=TrustRegionDamping(expand_threshold=...)`
  instead of `damping` (None: `damping`); `geodesic`:
  `geodesic_acceleration=2.0` (False: the default, off with 'cg').

  Returns a dict: position, iterations, stop, CG iterations, the cost after
  each iteration (records), trace, first-call and solve seconds.
  """
  target = tf.constant(y)

  def total_variation(x):
    dx = x[:-1, 1:] - x[:-1, :-1]
    dy = x[1:, :-1] - x[:-1, :-1]
    return MU * tf.sqrt(tf.square(dx) + tf.square(dy) + EPS ** 2)

  column_groups = tv_column_groups(y.shape[0]) if groups else None
  acceleration = dict(geodesic_acceleration=2.0) if geodesic else {}
  if expand_threshold is not None:
    damping = tfg_optim.TrustRegionDamping(expand_threshold=expand_threshold)

  @tf.function(jit_compile=jit_compile)
  def solve(start):
    result = tfg_optim.least_squares(
        [lambda x: x - target, total_variation], start, damping=damping,
        linear_solver="cg", inexact_steps=inexact_steps,
        column_groups=column_groups, **acceleration,
        max_iterations=max_iterations, cost_tolerance=cost_tolerance,
        record=True)
    return (result.position, result.num_iterations, result.stop_reason,
            result.num_linear_solver_iterations, result.records["cost"])

  default_rule = _linear_solvers.FORCING_RULE
  _linear_solvers.FORCING_RULE = forcing or default_rule  # Read in traces.
  try:
    timing = _harness.time_call(
        lambda: [v.numpy() for v in solve(target)],
        max(repeats, 1) if jit_compile else repeats,
        trace=lambda: solve.get_concrete_function(target))
  finally:
    _linear_solvers.FORCING_RULE = default_rule
  position, iterations, reason, cg, costs = timing.output
  return dict(position=position, iterations=int(iterations),
              stop=tfg_optim.StopReason(int(reason)).name, cg=int(cg),
              costs=costs[:int(iterations)], trace=timing.trace,
              first_call=timing.first_call, seconds=timing.seconds)


def _products_problem(y):
  """(kind, point, v, u, F) of the products at the start y: the
  `_linearization.MatrixFreeKind` of the TV residuals as one F, the point
  y, a tangent v = y and a residual-space u = 1."""
  target = tf.constant(y)

  def residual_fn(x):
    dx = x[:-1, 1:] - x[:-1, :-1]
    dy = x[1:, :-1] - x[:-1, :-1]
    return tf.concat([tf.reshape(x - target, [-1]), tf.reshape(
        MU * tf.sqrt(tf.square(dx) + tf.square(dy) + EPS ** 2), [-1])], 0)

  problem = _engine.Problem(
      residual_fn=residual_fn,
      retract=lambda p, s: p + tf.reshape(s, tf.shape(p)),
      tangent_dim=y.size, cost_fn=None, jacobian_fn=None)
  kind = _linearization.MatrixFreeKind(problem)
  point, vector = tf.constant(y), tf.constant(y.ravel())
  return kind, point, vector, tf.ones_like(residual_fn(point)), residual_fn


def time_products(y, calls, jit_compile=False):
  """The median seconds of `calls` J v and J^T u at y as the matrix-free
  linearization makes them (`_linearization.MatrixFreeKind`'s forward- and
  reverse-mode products of the residuals, each in a `tf.function`, compiled
  by XLA with `jit_compile`), and of one residual evaluation."""
  kind, point, vector, u, residual_fn = _products_problem(y)
  timings = {}
  compiled = lambda f: tf.function(f, jit_compile=jit_compile)
  for name, call in (("jv", compiled(lambda: kind.forward(point, vector))),
                     ("jtu", compiled(lambda: kind.reverse(point, u))),
                     ("residual", compiled(lambda: residual_fn(point)))):
    call().numpy()  # traces
    times = []
    for _ in range(calls):
      begin = time.perf_counter()
      call().numpy()
      times.append(time.perf_counter() - begin)
    timings[name] = statistics.median(times)
  return timings


def hlo_op_counts(hlo_text):
  """{op: count} of an HLO module's text (each instruction's opcode, the
  fused computations' included)."""
  return collections.Counter(re.findall(r"= \S+ ([a-z][\w-]*)\(", hlo_text))


def product_hlo(size, jax_python, data, out):
  """The optimized HLO of J v, J^T u and F at the start of the size x size
  problem, ours (`_linearization.MatrixFreeKind`'s products under
  `tf.function(jit_compile=True)`) and JAX's (`jax.jvp`, `jax.vjp`, F under
  `jax.jit`, `_optimistix_matrix_free.py --hlo`): the op counts of each
  module (fusions, and every op inside them), side by side."""
  y = noisy_disc(size)
  kind, point, vector, u, residual_fn = _products_problem(y)
  rows = {}
  for name, function, argument in (
      ("jv", lambda p, v: kind.forward(p, v), vector),
      ("jtu", lambda p, w: kind.reverse(p, w), u),
      ("residual", lambda p, unused: residual_fn(p), u)):
    compiled = tf.function(function, jit_compile=True, autograph=False)
    rows[name] = hlo_op_counts(compiled.experimental_get_compiler_ir(
        point, argument)(stage="optimized_hlo"))
  np.savez(data, y=y)
  theirs, note = _harness.run_peer(
      jax_python, "_optimistix_matrix_free.py",
      ["--data", data, "--out", out, "--hlo"], what="optimistix")
  table = []
  for what, label in (("jv", "J v"), ("jtu", "J^T u"), ("residual", "F")):
    for who, counts in (("tfg_optim (XLA)", rows[what]),
                        ("JAX (jit)", theirs and theirs[what])):
      if counts:
        table.append((f"{size}x{size}", label, who, sum(counts.values()),
                      counts.get("fusion", 0), ", ".join(
                          f"{op} {count}" for op, count in sorted(
                              counts.items(), key=lambda kv: -kv[1]))))
  _harness.print_table(("image", "product", "who", "ops", "fusions",
                        "op counts (optimized HLO)"), table)
  if theirs is None:
    print("note: " + note)


def preconditioner_check(size, seed=1):
  """CG iterations on J^T J s = -g at the start (J exact, from scipy's
  finite differences with the sparsity's grouping) with Jacobi
  preconditioners: none, the exact diag(J^T J), and the mean of (J^T z)^2
  over 8 or 32 Gaussian or Rademacher probes z (tfg_optim's estimate: 8
  Gaussian). Prints, per preconditioner, the range of its ratio to the
  exact diagonal and the CG iterations to relative residuals 1e-6, 1e-2,
  0.5 (NumPy, the M^-1 norm as in `_linear_solvers._cg_loop`), and the
  condition number of J^T J where n <= 4000."""
  y = noisy_disc(size)
  jacobian = scipy.sparse.csr_matrix(scipy.optimize._numdiff.approx_derivative(
      lambda x: numpy_residuals(x, y), y.ravel(), method="3-point",
      sparsity=sparsity(size)))
  gram = (jacobian.T @ jacobian).tocsr()
  exact = gram.diagonal()
  gradient = jacobian.T @ numpy_residuals(y.ravel(), y)
  rng = np.random.default_rng(seed)
  m = jacobian.shape[0]

  def estimate(probe, count):
    return np.mean([(jacobian.T @ probe()) ** 2 for _ in range(count)], 0)

  def iterations(diagonal, tolerance):
    x, r = np.zeros_like(gradient), -gradient
    z = r / diagonal
    p, rz = z, r @ z
    target = tolerance ** 2 * rz
    for k in range(1, 10 * len(x)):
      q = gram @ p
      alpha = rz / (p @ q)
      x, r = x + alpha * p, r - alpha * q
      z = r / diagonal
      next_rz = r @ z
      if next_rz <= target:
        return k
      p, rz = z + next_rz / rz * p, next_rz
    return None

  if size * size <= 4000:
    eigenvalues = np.linalg.eigvalsh(gram.toarray())
    print(f"{size}x{size}: condition number of J^T J at the start "
          f"{eigenvalues[-1] / eigenvalues[0]:.2f}")
  gaussian = lambda: rng.standard_normal(m)
  rademacher = lambda: rng.choice([-1.0, 1.0], m)
  rows = []
  for name, diagonal in (
      ("none", np.ones_like(exact)), ("exact diag(J^T J)", exact),
      ("8 Gaussian probes (tfg_optim before)", estimate(gaussian, 8)),
      ("8 Rademacher probes (tfg_optim)", estimate(rademacher, 8)),
      ("32 Gaussian probes", estimate(gaussian, 32)),
      ("32 Rademacher probes", estimate(rademacher, 32))):
    ratio = diagonal / exact
    rows.append((name, f"{ratio.min():.3f} .. {ratio.max():.3f}",
                 *[iterations(diagonal, t) for t in (1e-6, 1e-2, 0.5)]))
  _harness.print_table(("Jacobi preconditioner", "its / exact diagonal",
                        "CG to 1e-6", "to 1e-2", "to 0.5"), rows)


def nearly_linear_check():
  """`inexact_steps` on two small problems whose minimum is known: the
  Tikhonov denoising of tests/test_linear_solvers.py (linear, n = 400;
  x* = (I + D^T D)^-1 y) and the extended Rosenbrock function (n = 40;
  x* = 1), default trust region, one `tf.function` each: iterations, CG
  iterations and max |x - x*|, with and without."""
  n = 400
  y = np.sin(np.linspace(0, 6, n)) + 0.3 * np.random.default_rng(
      0).standard_normal(n)
  difference = np.diff(np.eye(n), axis=0)
  tikhonov_solution = np.linalg.solve(np.eye(n) + difference.T @ difference, y)
  y_tensor = tf.constant(y)
  tikhonov = [lambda x: x - y_tensor, lambda x: x[1:] - x[:-1]]

  def rosenbrock(x):
    odd, even = x[0::2], x[1::2]
    return tf.concat([10.0 * (even - tf.square(odd)), 1.0 - odd], 0)

  rows = []
  default_rule = _linear_solvers.FORCING_RULE
  for name, residuals, start, solution in (
      ("Tikhonov denoising, n = 400", tikhonov, np.zeros(n),
       tikhonov_solution),
      ("extended Rosenbrock, n = 40", rosenbrock, np.tile([-1.2, 1.0], 20),
       np.ones(40))):
    # Both problems' columns 2k and 2k + 1 share residuals, never 2k and
    # 2k + 2: grouped by parity.
    parity = np.arange(len(start)) % 2
    for inexact_steps, forcing, groups in (
        (False, None, None), (True, "sqrt", None),
        (True, "eisenstat_walker", None), (False, None, parity),
        (True, "eisenstat_walker", parity)):
      _linear_solvers.FORCING_RULE = forcing or default_rule
      try:
        result = tf.function(lambda x: tfg_optim.least_squares(
            residuals, x, linear_solver="cg", inexact_steps=inexact_steps,
            column_groups=groups))(tf.constant(start))
      finally:
        _linear_solvers.FORCING_RULE = default_rule
      rows.append((name, f"{inexact_steps} ({forcing or default_rule})"
                   if inexact_steps else "False",
                   "8 probes" if groups is None else "2 column groups",
                   int(result.num_iterations),
                   int(result.num_linear_solver_iterations),
                   tfg_optim.StopReason(int(result.stop_reason)).name,
                   f"{np.max(np.abs(result.position.numpy() - solution)):.1e}"))
  _harness.print_table(("problem", "inexact_steps (forcing)", "diag(J^T J)",
                        "iterations", "CG iterations", "stop",
                        "max |x - x*|"), rows)


def run_scipy(y, max_evaluations):
  """One scipy trf/lsmr solve with per-iteration (seconds, cost, nfev,
  LSMR iterations so far) from its callback."""
  lsmr_iterations = []
  history = []
  original = scipy.optimize._lsq.trf.lsmr

  def counted_lsmr(*args, **kwargs):
    result = original(*args, **kwargs)
    lsmr_iterations.append(int(result[2]))
    return result

  def callback(intermediate_result):
    history.append((time.perf_counter() - begin, intermediate_result.cost,
                    int(intermediate_result.nfev), sum(lsmr_iterations),
                    intermediate_result.x.copy()))

  pattern = sparsity(y.shape[0])
  scipy.optimize._lsq.trf.lsmr = counted_lsmr
  try:
    begin = time.perf_counter()
    result = scipy.optimize.least_squares(
        numpy_residuals, y.ravel(), args=(y,), method="trf",
        tr_solver="lsmr", jac_sparsity=pattern, max_nfev=max_evaluations,
        callback=callback)
    seconds = time.perf_counter() - begin
  finally:
    scipy.optimize._lsq.trf.lsmr = original
  return dict(position=result.x, iterations=len(history),
              evaluations=int(result.nfev), stop=result.message,
              cg=sum(lsmr_iterations), history=history, seconds=seconds)


def run_optimistix(python, data, out, max_steps, record, repeats=0):
  arguments = ["--data", data, "--out", out, "--max-steps", max_steps,
               "--repeats", repeats]
  result, note = _harness.run_peer(
      python, "_optimistix_matrix_free.py",
      arguments + (["--record"] if record else []), what="optimistix")
  if result is not None:
    result["position"] = np.load(out)["x"]
  return result, note


def ratio(ours, theirs):
  return f"{theirs / ours:.2f}" if ours and theirs else "-"


def main():
  parser = _harness.parser(__doc__, repeats=1)
  parser.add_argument("--sizes", type=int, nargs="+", default=[100, 200])
  parser.add_argument("--max-iterations", type=int, default=100)
  parser.add_argument("--steady-up-to", type=int, default=100000,
                      help="time tfg_optim's steady state (--repeats) up to "
                      "this n; above it, the first call only (its trace "
                      "shown apart; default 100000)")
  parser.add_argument("--damping", default="trust_region")
  parser.add_argument("--skip-scipy", action="store_true")
  parser.add_argument("--skip-optimistix", action="store_true")
  parser.add_argument("--products", type=int, default=20,
                      help="time this many J v and J^T u per size, ours and "
                      "JAX's (0: none; default 20)")
  parser.add_argument("--preconditioner-check", type=int, metavar="SIZE",
                      help="only the CG iterations of Jacobi preconditioners "
                      "at the start of the SIZE x SIZE problem (NumPy)")
  parser.add_argument("--product-hlo", type=int, metavar="SIZE",
                      help="only the optimized HLO op counts of J v, J^T u "
                      "and F at the start of the SIZE x SIZE problem, ours "
                      "under XLA and JAX's")
  parser.add_argument("--nearly-linear", action="store_true",
                      help="only inexact_steps on two small problems with "
                      "known minima (Tikhonov, extended Rosenbrock)")
  parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                      default=list(VARIANTS),
                      help="tfg_optim's rows (default: all): 'inexact': "
                      "inexact_steps=True, 'sqrt' its default forcing term, "
                      "'EW' Eisenstat-Walker's; 'groups': column_groups (the "
                      "exact diagonal from 3 column groups); 'XLA': "
                      "tf.function(jit_compile=True)")
  parser.add_argument("--skip-xla", action="store_true",
                      help="no XLA product times")
  parser.add_argument("--jax-python", default=_harness.DEFAULT_JAX_PYTHON)
  parser.add_argument("--peer-repeats", type=int, default=2,
                      help="optimistix's solves after the first (compiled "
                      "ahead, so every solve is steady): the median of all "
                      "(default 2)")
  args = parser.parse_args()
  if args.preconditioner_check:
    preconditioner_check(args.preconditioner_check)
    return
  if args.nearly_linear:
    nearly_linear_check()
    return
  if args.product_hlo:
    workdir = tempfile.mkdtemp(prefix="matrix_free_")
    product_hlo(args.product_hlo, args.jax_python,
                os.path.join(workdir, "y.npz"), os.path.join(workdir, "x.npz"))
    return
  _harness.print_machine_info()
  print(f"load average at start: {os.getloadavg()}", flush=True)
  rows, notes, products = [], [], []
  workdir = tempfile.mkdtemp(prefix="matrix_free_")
  for size in args.sizes:
    y = noisy_disc(size)
    image = f"{size}x{size}"
    runs = {}
    repeats = args.repeats if size * size <= args.steady_up_to else 0
    for variant in args.variants:
      name = "tfg_optim" if variant == "default" else f"tfg_optim {variant}"
      options = VARIANTS[variant]
      run = run_tfg(y, args.max_iterations, args.damping, repeats,
                    **options)
      run.update(options=options, peak=resource.getrusage(
          resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
      runs[name] = run
      print(f"  {image} {name}: {run['seconds']:.2f} s, "
            f"{run['iterations']} iterations, {run['cg']} CG", flush=True)
    # The ratios' reference: the default row, else the first.
    ours = runs.get("tfg_optim", next(iter(runs.values())))
    if not args.skip_scipy:
      runs["scipy"] = run_scipy(y, args.max_iterations)
      print(f"  {image} scipy: {runs['scipy']['seconds']:.2f} s", flush=True)
    if not args.skip_optimistix:
      data = os.path.join(workdir, f"y{size}.npz")
      out = os.path.join(workdir, f"x{size}.npz")
      np.savez(data, y=y)
      recorded, note = run_optimistix(args.jax_python, data, out,
                                      args.max_iterations, record=True)
      full, _ = (run_optimistix(args.jax_python, data, out,
                                args.max_iterations, record=False,
                                repeats=args.peer_repeats)
                 if recorded else (None, None))
      if full is None:
        notes.append(f"{image}: {note}")
      else:
        full.update(losses=recorded["losses"],
                    cg_per_step=recorded["cg_iterations"],
                    cg=sum(recorded["cg_iterations"]))
        runs["optimistix"] = full
        print(f"  {image} optimistix: {full['seconds']:.2f} s", flush=True)
    for run in runs.values():
      run["cost"] = cost(run["position"], y)
    target = max(run["cost"] for run in runs.values())
    threshold = target * (1 + MARGIN)

    # Time to the target.
    for name, run in runs.items():
      if not name.startswith("tfg_optim"):
        continue
      index = first_at_or_below(run["costs"], threshold)
      if index is None:
        continue
      told = run_tfg(y, args.max_iterations, args.damping, repeats,
                     cost_tolerance=threshold, **run["options"])
      run.update(to_seconds=told["seconds"], to_iterations=told["iterations"],
                 to_cg=told["cg"], to_cost=cost(told["position"], y))
      if told["iterations"] != index + 1:
        notes.append(f"{image}: {name}'s told solve stopped after "
                     f"{told['iterations']} iterations, the full one's "
                     f"records cross after {index + 1}")
    if "scipy" in runs:
      history = runs["scipy"]["history"]
      index = first_at_or_below([h[1] for h in history], threshold)
      if index is not None:
        seconds, _, evaluations, lsmr, x = history[index]
        runs["scipy"].update(to_seconds=seconds, to_iterations=index + 1,
                             to_evaluations=evaluations, to_cg=lsmr,
                             to_cost=cost(x, y))
    if "optimistix" in runs:
      peer = runs["optimistix"]
      steps = first_at_or_below(peer["losses"], threshold)
      if steps is not None:
        told, _ = run_optimistix(args.jax_python, data, out, max(steps, 1),
                                 record=False, repeats=args.peer_repeats)
        if told is not None:
          peer.update(to_seconds=told["seconds"], to_iterations=steps,
                      to_cg=sum(peer["cg_per_step"][:steps]),
                      to_cost=cost(told["position"], y))

    for name, run in runs.items():
      if name.startswith("tfg_optim"):
        options = run["options"]
        variant = (" XLA" if options.get("jit_compile") else "") + (
            " column_groups" if options.get("groups") else "") + (
                " inexact_steps" if options.get("inexact_steps") else "") + (
                    f" (forcing {options['forcing']})"
                    if options.get("forcing") else "") + (
                        f" expand above {options['expand_threshold']}"
                        if options.get("expand_threshold") else "") + (
                            " geodesic_acceleration=2"
                            if options.get("geodesic") else "")
        solver = (f"tfg_optim cg{variant} ({args.damping}; peak RSS "
                  f"{run['peak']:.2f} GB)")
        first = f"{run['first_call']:.2f} (trace {run['trace']:.2f}"
        if options.get("jit_compile"):
          first += f", compile {run['first_call'] - run['trace'] - run['seconds']:.2f}"
        first += ")"
        iterations = str(run["iterations"])
        to_iterations = str(run.get("to_iterations", "-"))
      elif name == "scipy":
        solver = "scipy trf lsmr"
        first = "-"
        iterations = f"{run['iterations']} ({run['evaluations']} evaluations)"
        to_iterations = (f"{run['to_iterations']} ({run['to_evaluations']} "
                         "evaluations)" if "to_iterations" in run else "-")
      else:
        solver = (f"optimistix LM + lineax CG (peak RSS "
                  f"{run['peak_rss_gib']:.2f} GB)")
        first = f"compile {run['compile_seconds']:.2f}"
        iterations = str(run["iterations"])
        to_iterations = str(run.get("to_iterations", "-"))
      rows.append((
          image, size * size, solver, first, f"{run['seconds']:.2f}",
          iterations, f"{run['cg']} ({run['cg'] / max(run['iterations'], 1):.1f})",
          f"{run['cost']:.10g}", str(run.get("stop", "converged" if run.get(
              "successful") else "not converged"))[:28],
          f"{run['to_seconds']:.2f}" if "to_seconds" in run else "-",
          to_iterations, run.get("to_cg", "-"),
          f"{run['to_cost']:.10g}" if "to_cost" in run else "-",
          ratio(ours.get("to_seconds"), run.get("to_seconds"))))
    print(f"  {image}: target {target:.10g} (worst final cost)", flush=True)
    if args.products:
      timings = time_products(y, args.products)
      xla_timings = (None if args.skip_xla else
                     time_products(y, args.products, jit_compile=True))
      jax_timings = None
      if not args.skip_optimistix:
        jax_timings, _ = _harness.run_peer(
            args.jax_python, "_optimistix_matrix_free.py",
            ["--data", data, "--out", out, "--products", args.products],
            what="optimistix")
      for what, label in (("jv", "J v"), ("jtu", "J^T u"),
                          ("residual", "F")):
        products.append((image, label, f"{1e3 * timings[what]:.3f}",
                         f"{1e3 * xla_timings[what]:.3f}" if xla_timings
                         else "-",
                         f"{1e3 * jax_timings[what]:.3f}"
                         if jax_timings and what in jax_timings else "-"))
  print(f"load average at end: {os.getloadavg()}", flush=True)
  _harness.print_table(
      ("image", "n", "solver", "first call s", "solve s", "iterations",
       "CG iterations (per iteration)", "final cost", "stop",
       "s to target", "iterations to target", "CG to target",
       "cost there", "their s / ours to target"), rows)
  if products:
    print("\nOne product at the start, median of --products calls (ms):")
    _harness.print_table(("image", "product", "tfg_optim (tf.function)",
                          "tfg_optim (XLA)", "JAX (jit)"), products)
  for note in notes:
    print("note: " + note)


if __name__ == "__main__":
  main()
