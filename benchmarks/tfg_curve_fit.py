"""Curve-fit benchmark: tfg_optim vs TensorFlow Graphics, SciPy and optimistix.

The problem (issue 2): fit y = p0 exp(-p1 t) + p2 sin(3 p3 t) to m = 10,000
noisy samples (t in [0, 4], true p = [2, 1.3, 0.5, 0.7], noise sigma 0.01,
seed 0), n = 4 parameters, float64, CPU, from p = [1, 1, 0.3, 0.6], with
30 Levenberg-Marquardt iterations (the TensorFlow solvers always run exactly
`max_iterations`).

Peers, in one process (optimistix in a subprocess); ours and scipy side by
side (interleaved rounds, benchmarks/_harness.py), then the reference's modes
side by side:
  tfg        `tensorflow_graphics.math.optimizer.levenberg_marquardt.minimize`
             (the reference), in tf.function and, with flags, eager and
             tf.function(jit_compile=True).
  tfg_optim  `tfg_optim.levenberg_marquardt.minimize`, same modes.
  scipy      `scipy.optimize.least_squares(method='lm')` (MINPACK) with the
             exact Jacobian, default tolerances (it stops when converged).
  optimistix `optimistix.LevenbergMarquardt` under `jax.jit`, rtol = atol =
             1e-8, at most 30 steps; needs a separate virtual environment:

                 python -m venv benchmarks/.venv-jax
                 benchmarks/.venv-jax/bin/pip install jax optimistix

             (skipped with a note when benchmarks/.venv-jax does not exist;
             --jax-python points to another interpreter).

Each solve is timed with time.perf_counter() around one call that returns
NumPy values, after one warm-up call (tracing / XLA compilation); the table
shows the median over the repeats (rounds). The problem's data and model:
tests/problems.py (`curve_fit_*`).

Usage (from the repository root):

    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/tfg_curve_fit.py
    ... --reference-eager        # also the reference eagerly (~100 s a solve)
    ... --skip-reference-xla     # the reference's XLA compile is slow
    ... --skip-reference         # only the fast peers (seconds)
    ... --repeats 10 --reference-repeats 3
    ... --json results.json      # also write the rows as JSON
"""

import os
import tempfile

import numpy as np
import scipy.optimize
import tensorflow as tf

import _harness
from tests import problems

MAX_ITERATIONS = 30
START = problems.CURVE_FIT_START
PROBLEM = "exp+sin m=10000 n=4"


def tf_solver(module, mode, t, y, start):
  """A no-argument function running `module.minimize` in `mode`."""
  residual = problems.curve_fit_residual(tf.constant(t), tf.constant(y))
  run = _harness.compile_for(
      lambda p0: module.minimize(residual, p0, max_iterations=MAX_ITERATIONS),
      mode)
  start = tf.constant(start, tf.float64)

  def solve():
    objective, variables = run(start)
    return float(objective.numpy()), np.asarray(variables[0].numpy())

  return solve


def scipy_solver(t, y, start):
  fun = problems.curve_fit_residual_numpy(t, y)
  jac = problems.curve_fit_jacobian_numpy(t)

  def solve():
    result = scipy.optimize.least_squares(fun, start, jac=jac, method="lm")
    return (float(result.cost), result.x,
            f"nfev={result.nfev},njev={result.njev}")

  return solve


def run_optimistix(jax_python, t, y, start, repeats):
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "curve_fit.npz")
    np.savez(path, t=t, y=y, start=start)
    return _harness.run_peer(
        jax_python, "_optimistix_curve_fit.py",
        ["--data", path, "--repeats", repeats, "--max-steps", MAX_ITERATIONS],
        what="optimistix")


def main():
  parser = _harness.parser(__doc__, repeats=5, json_output=True)
  parser.add_argument("--reference-repeats", type=int, default=2,
                      help="timed solves per TensorFlow Graphics mode "
                      "(default 2; each takes 15 s to minutes)")
  parser.add_argument("--skip-reference", action="store_true",
                      help="skip TensorFlow Graphics entirely")
  parser.add_argument("--reference-eager", action="store_true",
                      help="also time TensorFlow Graphics eagerly (slow)")
  parser.add_argument("--skip-reference-xla", action="store_true",
                      help="skip TensorFlow Graphics with jit_compile=True")
  parser.add_argument("--skip-eager", action="store_true",
                      help="skip tfg_optim eagerly")
  parser.add_argument("--skip-scipy", action="store_true")
  parser.add_argument("--skip-optimistix", action="store_true")
  parser.add_argument("--jax-python", default=_harness.DEFAULT_JAX_PYTHON,
                      help="Python of the venv with jax and optimistix")
  args = parser.parse_args()

  from tfg_optim import levenberg_marquardt as ours  # pylint: disable=g-import-not-at-top

  _harness.print_machine_info()

  t, y = problems.curve_fit_data()
  rows = []
  notes = []

  def add(peer, mode, timing, iterations):
    objective, variables = timing.output[:2]
    rows.append({"problem": PROBLEM, "peer": peer, "mode": mode,
                 "seconds": timing.seconds, "times": timing.times,
                 "first_call": timing.first_call,
                 "iterations": iterations, "objective": objective,
                 "variables": [float(v) for v in variables]})
    print(f"  done: {peer:10s} {mode:12s} median {timing.seconds:.4g} s "
          f"(first call {timing.first_call:.3g} s)", flush=True)

  modes = ["function", "jit_compile"]
  if not args.skip_eager:
    modes.insert(0, "eager")
  reference_modes = []
  if not args.skip_reference:
    reference_modes = ["function"]
    if args.reference_eager:
      reference_modes.insert(0, "eager")
    if not args.skip_reference_xla:
      reference_modes.append("jit_compile")

  print("Running:", flush=True)
  # Ours and scipy side by side (interleaved rounds).
  fast = {("tfg_optim", mode): tf_solver(ours, mode, t, y, START)
          for mode in modes}
  if not args.skip_scipy:
    fast[("scipy", "lm (MINPACK)")] = scipy_solver(t, y, START)
  fast = _harness.interleave(fast, args.repeats)
  for (peer, mode), timing in fast.items():
    if peer == "tfg_optim":
      add(peer, mode, timing, str(MAX_ITERATIONS))

  if reference_modes:
    from tensorflow_graphics.math.optimizer import levenberg_marquardt as tfg  # pylint: disable=g-import-not-at-top
    reference = {("tfg", mode): tf_solver(tfg, mode, t, y, START)
                 for mode in reference_modes}
    for (peer, mode), timing in _harness.interleave(
        reference, args.reference_repeats).items():
      add(peer, mode, timing, str(MAX_ITERATIONS))

  for (peer, mode), timing in fast.items():
    if peer == "scipy":
      add(peer, mode, timing, timing.output[2])

  if not args.skip_optimistix:
    result, note = run_optimistix(args.jax_python, t, y, START, args.repeats)
    if note:
      notes.append(note)
    else:
      add("optimistix", "jax.jit", _harness.Timing(
          None, result["first_call_seconds"], result["seconds"],
          result["times"], (result["objective"], result["variables"])),
          str(result["iterations"]))
      notes.append(f"optimistix: jax {result['jax_version']}, optimistix "
                   f"{result['optimistix_version']}")

  print_table(rows, notes)
  _harness.write_json(args.json, {"machine": _harness.machine_info(),
                                  "rows": rows})


def print_table(rows, notes):
  """Adds the derived columns and prints the table."""
  by_key = {(r["peer"], r["mode"]): r for r in rows}
  # Reference variables: TensorFlow Graphics in the same mode for our rows;
  # TensorFlow Graphics in tf.function for the others (its most common use),
  # else ours in tf.function when the reference was skipped.
  default_reference = (by_key.get(("tfg", "function")) or
                       by_key.get(("tfg_optim", "function")))
  ours_xla = by_key.get(("tfg_optim", "jit_compile"))
  header = ("problem", "peer", "mode", "time/solve [s]", "iters",
            "objective", "max|x-x_ref|", "x_ref", "ratio")
  table = []
  for row in rows:
    if row["peer"] == "tfg_optim":
      reference = by_key.get(("tfg", row["mode"]))
      ratio = (f"{reference['seconds'] / row['seconds']:.0f}x vs tfg"
               if reference else "-")
    elif row["peer"] == "tfg":
      reference = row
      own = by_key.get(("tfg_optim", row["mode"]))
      ratio = "(reference)" if own else "-"
    else:
      reference = None
      ratio = (f"{row['seconds'] / ours_xla['seconds']:.2f}x vs ours(xla)"
               if ours_xla else "-")
    if reference is None or reference is row:
      reference = default_reference if row["peer"] != "tfg" else row
    if reference is None:
      diff, ref_name = "-", "-"
    else:
      diff = np.max(np.abs(np.asarray(row["variables"]) -
                           np.asarray(reference["variables"])))
      diff = "0" if diff == 0 else f"{diff:.2e}"
      ref_name = f"{reference['peer']}/{reference['mode']}"
      if reference is row:
        diff, ref_name = "0", "itself"
    table.append((row["problem"], row["peer"], row["mode"],
                  f"{row['seconds']:.4g}", row["iterations"],
                  f"{row['objective']:.15g}", diff, ref_name, ratio))
  print()
  _harness.print_table(header, table)
  print()
  print("time/solve: median wall time of one solve after a warm-up call.")
  print("ratio: for tfg_optim, tfg time / tfg_optim time in the same mode "
        "(how many times faster ours is); for scipy/optimistix, their time / "
        "tfg_optim jit_compile time (> 1: ours is faster).")
  for row in rows:
    print(f"  {row['peer']}/{row['mode']}: times "
          f"{', '.join(f'{x:.4g}' for x in row['times'])} s; first call "
          f"{row['first_call']:.3g} s; x = {np.round(row['variables'], 8)}")
  for note in notes:
    print("note: " + note)


if __name__ == "__main__":
  main()
