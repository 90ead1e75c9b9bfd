"""JAX/optimistix peer of benchmarks/matrix_free.py (run in its own venv).

    python -m venv benchmarks/.venv-jax
    benchmarks/.venv-jax/bin/pip install jax optimistix lineax
    benchmarks/.venv-jax/bin/python benchmarks/_optimistix_matrix_free.py \
        --data /path/to/data.npz --max-steps 100

Reads the noisy image y (also the start) from the .npz written by
matrix_free.py and solves the same smooth total-variation denoising,

    r(x) = [x - y;  mu sqrt((D_h x)^2 + (D_v x)^2 + eps^2)],

with `optimistix.LevenbergMarquardt(linear_solver=lineax.Normal(lineax.CG(...)))`
(conjugate gradients on the damped normal equations J^T J + lambda I, J
applied matrix-free: optimistix linearizes the residual with `jax.linearize`
and transposes it for J^T u) under `jax.jit`, float64, on the CPU. The solve
is compiled ahead of time (`jit(...).lower(...).compile()`, timed apart) and
then run 1 + --repeats times (once with --record); its time is the median
of those runs.

Prints one JSON object on its last line of stdout: the seconds, the steps
taken, the final cost 1/2 ||r||^2 (also written with the solution to --out,
so the benchmark computes the cost its own way), and `losses`, the cost of
the accepted point after each step (entry j: after j steps), gathered by
optimistix's `verbose` hook. A run with `--max-steps k` is the time to reach
the cost after k steps (the benchmark's time-to-equal-cost row). It imports
neither TensorFlow nor tfg_optim.
"""

import collections
import re
import resource
import statistics
import time

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_platforms", "cpu")

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import lineax as lx  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import optimistix as optx  # pylint: disable=g-import-not-at-top

import _harness  # pylint: disable=g-import-not-at-top,g-bad-import-order


def main():
  parser = _harness.peer_parser(__doc__, repeats=2, max_steps=100,
                                tolerance=1e-8, out=True)
  parser.add_argument("--cg-rtol", type=float, default=1e-6)
  parser.add_argument("--cg-atol", type=float, default=1e-6)
  parser.add_argument("--mu", type=float, default=0.5)
  parser.add_argument("--eps", type=float, default=0.1)
  parser.add_argument("--products", type=int, default=0,
                      help="instead of solving: the median seconds of this "
                      "many jitted J v (jax.jvp), J^T u (jax.vjp) and F at "
                      "the start")
  parser.add_argument("--hlo", action="store_true",
                      help="instead of solving: the op counts of the "
                      "optimized HLO of the jitted J v, J^T u and F")
  parser.add_argument("--record", action="store_true",
                      help="record the cost after each step (verbose hook)")
  args = parser.parse_args()

  data = np.load(args.data)
  y = jnp.asarray(data["y"], jnp.float64)

  def residual(x, unused_args):
    dx = x[:-1, 1:] - x[:-1, :-1]
    dy = x[1:, :-1] - x[:-1, :-1]
    tv = args.mu * jnp.sqrt(dx * dx + dy * dy + args.eps ** 2)
    return jnp.concatenate([(x - y).ravel(), tv.ravel()])

  if args.hlo:
    f = lambda x: residual(x, None)
    u = jnp.ones_like(f(y))
    counts = {}
    for name, function, arguments in (
        ("jv", lambda x, v: jax.jvp(f, (x,), (v,))[1], (y, y)),
        ("jtu", lambda x, w: jax.vjp(f, x)[1](w)[0], (y, u)),
        ("residual", f, (y,))):
      text = jax.jit(function).lower(*arguments).compile().as_text()
      counts[name] = dict(collections.Counter(
          re.findall(r"= \S+ ([a-z][\w-]*)\(", text)))
    _harness.print_peer_result(counts)
    return

  if args.products:
    f = lambda x: residual(x, None)
    jvp = jax.jit(lambda x, v: jax.jvp(f, (x,), (v,))[1])
    vjp = jax.jit(lambda x, u: jax.vjp(f, x)[1](u)[0])
    u = jnp.ones_like(f(y))
    timings = {}
    evaluate = jax.jit(f)
    for name, call in (("jv", lambda: jvp(y, y)), ("jtu", lambda: vjp(y, u)),
                       ("residual", lambda: evaluate(y))):
      jax.block_until_ready(call())  # compiles
      times = []
      for _ in range(args.products):
        begin = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - begin)
      timings[name] = statistics.median(times)
    _harness.print_peer_result(timings)
    return

  losses = []  # Entry j: the cost after j steps.

  def record(**kwargs):
    # The cost of the last accepted point at the start of each step: entry j
    # is the cost after j steps.
    jax.debug.callback(lambda loss: losses.append(float(loss)),
                       kwargs["loss_last_accepted_step"][1], ordered=True)

  cg_steps = []  # Each linear solve's conjugate-gradient iterations.

  class CountedCG(lx.CG):
    """lineax's CG, reporting each solve's iterations (only with
    --record: optimistix drops the linear solver's statistics)."""

    def compute(self, state, vector, options):
      solution, result, stats = super().compute(state, vector, options)
      jax.debug.callback(lambda k: cg_steps.append(int(k)),
                         stats["num_steps"])
      return solution, result, stats

  cg = (CountedCG if args.record else lx.CG)(rtol=args.cg_rtol,
                                             atol=args.cg_atol)
  solver = optx.LevenbergMarquardt(
      rtol=args.rtol, atol=args.atol, linear_solver=lx.Normal(cg),
      verbose=record if args.record else False)

  def solve(x0):
    # throw=False: reaching max_steps is not an error for a benchmark.
    solution = optx.least_squares(residual, solver, x0,
                                  max_steps=args.max_steps, throw=False)
    r = residual(solution.value, None)
    return (solution.value, 0.5 * jnp.sum(r * r),
            solution.stats["num_steps"], solution.result == optx.RESULTS.successful)

  initial_cost = 0.5 * float(jnp.sum(residual(y, None) ** 2))
  begin = time.perf_counter()
  compiled = jax.jit(solve).lower(y).compile()
  compile_seconds = time.perf_counter() - begin
  times = []
  for _ in range(1 + args.repeats):  # Compiled already: every one steady.
    begin = time.perf_counter()
    value, objective, steps, successful = jax.block_until_ready(compiled(y))
    times.append(time.perf_counter() - begin)
    if args.record:
      break  # (the recorded run: once, for its losses and CG counts)
  np.savez(args.out, x=np.asarray(value))
  _harness.print_peer_result({
      "seconds": statistics.median(times),
      "times": times,
      "compile_seconds": compile_seconds,
      "iterations": int(steps),
      "successful": bool(successful),
      "objective": float(objective),
      # Entry j: the cost after j steps; optimistix's first step only
      # evaluates the start (its report of the last accepted cost is 0
      # there), so entry 0 is the start's cost and the last one the
      # solution's.
      "losses": ([initial_cost] + losses[1:int(steps)] + [float(objective)]
                 if losses else []),
      "cg_iterations": cg_steps,
      "peak_rss_gib": resource.getrusage(
          resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
      "jax_version": jax.__version__,
      "optimistix_version": getattr(optx, "__version__", "unknown"),
  })


if __name__ == "__main__":
  main()
