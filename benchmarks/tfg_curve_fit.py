"""Curve-fit benchmark: tfg_optim vs TensorFlow Graphics, SciPy and optimistix.

The problem (issue 2): fit y = p0 exp(-p1 t) + p2 sin(3 p3 t) to m = 10,000
noisy samples (t in [0, 4], true p = [2, 1.3, 0.5, 0.7], noise sigma 0.01,
seed 0), n = 4 parameters, float64, CPU, from p = [1, 1, 0.3, 0.6], with
30 Levenberg-Marquardt iterations (the TensorFlow solvers always run exactly
`max_iterations`).

Peers, run one after the other in one process (optimistix in a subprocess):
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
shows the median over the repeats.

Usage (from the repository root):

    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/tfg_curve_fit.py
    ... --reference-eager        # also the reference eagerly (~100 s a solve)
    ... --skip-reference-xla     # the reference's XLA compile is slow
    ... --skip-reference         # only the fast peers (seconds)
    ... --repeats 10 --reference-repeats 3
    ... --json results.json      # also write the rows as JSON
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import scipy
import scipy.optimize
import tensorflow as tf

NUM_POINTS = 10_000
MAX_ITERATIONS = 30
START = np.array([1.0, 1.0, 0.3, 0.6])
TRUE_PARAMETERS = np.array([2.0, 1.3, 0.5, 0.7])
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_JAX_PYTHON = os.path.join(HERE, ".venv-jax", "bin", "python")
PROBLEM = "exp+sin m=10000 n=4"


def make_data(num_points=NUM_POINTS, noise=0.01, seed=0):
  rng = np.random.default_rng(seed)
  t = np.linspace(0.0, 4.0, num_points)
  p = TRUE_PARAMETERS
  y = p[0] * np.exp(-p[1] * t) + p[2] * np.sin(3.0 * p[3] * t)
  return t, y + noise * rng.standard_normal(num_points)


def machine_info():
  lines = [
      f"machine: {platform.machine()} {platform.processor() or ''}".rstrip(),
      f"cpu: {_cpu_model()}",
      f"cpu count: os.cpu_count()={os.cpu_count()}, usable="
      f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}",
      f"python {platform.python_version()}, tensorflow {tf.__version__}, "
      f"numpy {np.__version__}, scipy {scipy.__version__}",
      f"platform: {platform.platform()}",
      f"GPUs visible to TensorFlow: {len(tf.config.list_physical_devices('GPU'))}",
  ]
  return lines


def _cpu_model():
  try:
    with open("/proc/cpuinfo") as cpuinfo:
      for line in cpuinfo:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def time_solve(solve, repeats):
  """Warm-up call, then `repeats` timed calls; returns (median, times, out)."""
  begin = time.perf_counter()
  out = solve()
  first = time.perf_counter() - begin
  times = []
  for _ in range(repeats):
    begin = time.perf_counter()
    out = solve()
    times.append(time.perf_counter() - begin)
  return statistics.median(times), times, first, out


def tf_solver(module, mode, t, y, start):
  """A no-argument function running `module.minimize` in `mode`."""
  t = tf.constant(t)
  y = tf.constant(y)

  def residual(p):
    return p[0] * tf.exp(-p[1] * t) + p[2] * tf.sin(3.0 * p[3] * t) - y

  def run(p0):
    return module.minimize(residual, p0, max_iterations=MAX_ITERATIONS)

  if mode == "function":
    run = tf.function(run)
  elif mode == "jit_compile":
    run = tf.function(run, jit_compile=True)
  start = tf.constant(start, tf.float64)

  def solve():
    objective, variables = run(start)
    return float(objective.numpy()), np.asarray(variables[0].numpy())

  return solve


def scipy_solver(t, y, start):
  def fun(p):
    return p[0] * np.exp(-p[1] * t) + p[2] * np.sin(3.0 * p[3] * t) - y

  def jac(p):
    e = np.exp(-p[1] * t)
    s = np.sin(3.0 * p[3] * t)
    c = np.cos(3.0 * p[3] * t)
    return np.stack([e, -p[0] * t * e, s, 3.0 * p[2] * t * c], axis=1)

  def solve():
    result = scipy.optimize.least_squares(fun, start, jac=jac, method="lm")
    return (float(result.cost), result.x,
            f"nfev={result.nfev},njev={result.njev}")

  return solve


def run_optimistix(jax_python, t, y, start, repeats):
  if not os.path.exists(jax_python):
    return None, (f"optimistix skipped: {jax_python} not found (see the "
                  "docstring for the set-up commands)")
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "curve_fit.npz")
    np.savez(path, t=t, y=y, start=start)
    command = [jax_python, os.path.join(HERE, "_optimistix_curve_fit.py"),
               "--data", path, "--repeats", str(repeats),
               "--max-steps", str(MAX_ITERATIONS)]
    process = subprocess.run(command, capture_output=True, text=True,
                             check=False)
  if process.returncode != 0:
    return None, ("optimistix failed:\n" + process.stderr[-2000:])
  return json.loads(process.stdout.strip().splitlines()[-1]), None


def main():
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=5,
                      help="timed solves per fast peer (default 5)")
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
  parser.add_argument("--jax-python", default=DEFAULT_JAX_PYTHON,
                      help="Python of the venv with jax and optimistix")
  parser.add_argument("--json", help="also write the rows to this file")
  args = parser.parse_args()

  from tfg_optim import levenberg_marquardt as ours  # pylint: disable=g-import-not-at-top

  print("Machine:")
  for line in machine_info():
    print("  " + line)
  sys.stdout.flush()

  t, y = make_data()
  rows = []
  notes = []

  def add(peer, mode, median, times, first, objective, variables, iterations):
    rows.append({"problem": PROBLEM, "peer": peer, "mode": mode,
                 "seconds": median, "times": times, "first_call": first,
                 "iterations": iterations, "objective": objective,
                 "variables": [float(v) for v in variables]})
    print(f"  done: {peer:10s} {mode:12s} median {median:.4g} s "
          f"(first call {first:.3g} s)", flush=True)

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
  for mode in modes:
    median, times, first, (objective, variables) = time_solve(
        tf_solver(ours, mode, t, y, START), args.repeats)
    add("tfg_optim", mode, median, times, first, objective, variables,
        str(MAX_ITERATIONS))

  if reference_modes:
    from tensorflow_graphics.math.optimizer import levenberg_marquardt as tfg  # pylint: disable=g-import-not-at-top
    for mode in reference_modes:
      median, times, first, (objective, variables) = time_solve(
          tf_solver(tfg, mode, t, y, START), args.reference_repeats)
      add("tfg", mode, median, times, first, objective, variables,
          str(MAX_ITERATIONS))

  if not args.skip_scipy:
    median, times, first, (objective, variables, iterations) = time_solve(
        scipy_solver(t, y, START), args.repeats)
    add("scipy", "lm (MINPACK)", median, times, first, objective, variables,
        iterations)

  if not args.skip_optimistix:
    result, note = run_optimistix(args.jax_python, t, y, START, args.repeats)
    if note:
      notes.append(note)
    else:
      add("optimistix", "jax.jit", result["seconds"], result["times"],
          result["first_call_seconds"], result["objective"],
          result["variables"], str(result["iterations"]))
      notes.append(f"optimistix: jax {result['jax_version']}, optimistix "
                   f"{result['optimistix_version']}")

  print_table(rows, notes)
  if args.json:
    with open(args.json, "w") as out:
      json.dump({"machine": machine_info(), "rows": rows}, out, indent=1)


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
  widths = [max(len(str(line[i])) for line in [header] + table)
            for i in range(len(header))]
  print()
  for line in [header, tuple("-" * w for w in widths)] + table:
    print("| " + " | ".join(str(cell).ljust(width)
                            for cell, width in zip(line, widths)) + " |")
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
