"""Bundle adjustment on BAL files: tfg_optim (Schur complement, dense or
iterative) vs Ceres.

For each BAL file (the three of ../shared/data/bal by default, plus any
synthetic problems asked for with --synthetic C,P,K: `io.synthetic_bal`
with C cameras, P points, K observations, 1 pixel of noise, seed 0),
tfg_optim runs tfg_optim/examples/bundle_adjustment.py's solve (two
Euclidean tables, one reprojection term, Nielsen damping, nothing held
fixed, one `tf.function`) with each requested linear solver, and Ceres runs
in its own venv through COLMAP's bundle adjuster (benchmarks/_ceres_bal.py:
BAL's camera as COLMAP's RADIAL camera in a flipped frame, sparse Schur,
Levenberg-Marquardt, tolerances 1e-12, no gauge fixed). tfg_optim runs
with the program's defaults, Ceres' LM defaults: lambda starts at 1e-4
(Ceres' initial trust-region radius 1e4), relative cost change 1e-12.

Every final cost is evaluated one way: `io.bal_cost` (the formula of
../shared/data/README.md) of each solver's output read back from its BAL
file. Times: tfg_optim's `trace` is `get_concrete_function`, `first` the
first call (graph optimizations included), `solve` a second call (same
start); Ceres' `solve` is `BundleAdjuster.solve()` (scene set-up apart).
`cost ratio` and `time ratio` are each solver's final cost and solve time
over those of the first Ceres linear solver listed; on the three tiny
files both reach ~1e-25 (they have fewer residuals than parameters), so
their ratios are of round-off, not of minima.

    PYTHONPATH=. python benchmarks/bundle_adjustment.py \
        [--ceres-python /work/venv-ceres/bin/python] \
        [--data ../shared/data/bal] [--synthetic 20,2000,10000 ...] \
        [--solvers schur schur+xla iterative_schur@1e-3 cg ...] \
        [--ceres-solvers auto ITERATIVE_SCHUR DENSE_SCHUR] \
        [--max-iterations 100] [--skip-schur-above C]

('+xla': the solve compiled by XLA, jit_compile=True; `first` then includes
the compilation. 'iterative_schur@TOL': the conjugate gradients' relative
tolerance instead of `_schur.ITERATIVE_TOLERANCE`. `--ceres-solvers`:
Ceres' linear solver, 'auto' COLMAP's choice by size, ITERATIVE_SCHUR with
the SCHUR_JACOBI preconditioner.) Each solve runs in a process of its own
(this script with --one), so that `peak MB`, the process' peak resident
memory (ru_maxrss; TensorFlow's own ~0.5 GB included), is that solve's.
`--skip-schur-above C`: no dense 'schur' run on problems of more than C
cameras (S alone would be (9 C)^2 doubles). `--once`: no second call
(for large problems): `solve` is then the first call, graph optimizations
(and XLA compilation) included.
"""

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import tempfile

import numpy as np

from tfg_optim import _schur
from tfg_optim import io
from tfg_optim.examples import bundle_adjustment

ROOT = pathlib.Path(__file__).resolve().parent.parent
FILES = ("dubrovnik-1-1-pre.txt", "dubrovnik-3-7-pre.txt",
         "dubrovnik-3-7-18-pre.txt")


def ceres(python, source, output, max_iterations, linear_solver="auto"):
  """Ceres' report (a dict) and its output's cost, by `io.bal_cost`."""
  completed = subprocess.run(
      [python, str(ROOT / "benchmarks" / "_ceres_bal.py"), str(source),
       str(output), "--max-iterations", str(max_iterations),
       "--linear-solver", linear_solver],
      capture_output=True, text=True, check=False)
  if completed.returncode:  # COLMAP refuses tracks of one observation
    return {"error": completed.stderr.strip().splitlines()[-1]}
  report = json.loads(completed.stdout.strip().splitlines()[-1])
  report["cost"] = float(io.bal_cost(*io.read_bal(output)))
  return report


def ours(source, output, linear_solver, max_iterations, once=False):
  """tfg_optim's solution's numbers (in a process of its own: this script
  with --one); its output's cost by `io.bal_cost`."""
  completed = subprocess.run(
      [sys.executable, __file__, "--one", linear_solver, str(source),
       str(output), "--max-iterations", str(max_iterations)] +
      (["--once"] if once else []),
      capture_output=True, text=True, check=False)
  if completed.returncode:
    return {"error": (completed.stderr.strip().splitlines() or ["?"])[-1]}
  report = json.loads(completed.stdout.strip().splitlines()[-1])
  report["cost"] = float(io.bal_cost(*io.read_bal(output)))
  return report


def one(source, output, linear_solver, max_iterations, once=False):
  """--one: solves in this process; prints its numbers as one JSON line."""
  problem = io.read_bal(source)
  linear_solver, _, tolerance = linear_solver.partition("@")
  if tolerance:  # read when the solve is traced
    _schur.ITERATIVE_TOLERANCE = float(tolerance)
  linear_solver, _, xla = linear_solver.partition("+")
  solution = bundle_adjustment.optimize(problem, max_iterations,
                                        linear_solver, xla=xla == "xla",
                                        repeat=not once)
  io.write_bal(output, solution.problem)
  results = solution.results
  print(json.dumps({
      "initial_cost": float(results.initial_cost),
      "iterations": int(results.num_iterations),
      "trace_time": solution.trace_time, "run_time": solution.run_time,
      "solve_time": solution.solve_time,
      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--ceres-python", default="/work/venv-ceres/bin/python")
  parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" /
                                            "bal"))
  parser.add_argument("--synthetic", nargs="*", default=[],
                      help="C,P,K synthetic problems")
  parser.add_argument("--solvers", nargs="+", default=["schur"])
  parser.add_argument("--ceres-solvers", nargs="+", default=["auto"])
  parser.add_argument("--max-iterations", type=int, default=100)
  parser.add_argument("--no-files", action="store_true")
  parser.add_argument("--skip-schur-above", type=int, default=None)
  parser.add_argument("--once", action="store_true",
                      help="no second call: `solve` is the first call")
  parser.add_argument("--one", nargs=3, metavar=("SOLVER", "IN", "OUT"),
                      help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    one(args.one[1], args.one[2], args.one[0], args.max_iterations,
        args.once)
    return 0
  scratch = pathlib.Path(tempfile.mkdtemp(prefix="bal-bench-"))
  sources = [] if args.no_files else [(name, pathlib.Path(args.data) / name)
                                      for name in FILES]
  for spec in args.synthetic:
    c, p, k = (int(x) for x in spec.split(","))
    start, _ = io.synthetic_bal(c, p, num_observations=k, seed=0)
    path = scratch / f"synthetic-{c}-{p}-{k}.txt"
    io.write_bal(path, start)
    sources.append((f"synthetic {c}/{p}/{k}", path))
  header = (f"{'problem':<28} {'solver':<32} {'initial cost':>14} "
            f"{'final cost':>22} {'iters':>5} {'trace s':>8} {'first s':>8} "
            f"{'solve s':>8} {'peak MB':>8} {'cost ratio':>11} "
            f"{'time ratio':>10}")
  print(header)
  print("-" * len(header))
  for name, source in sources:
    anchor = None  # the first Ceres run that succeeds
    for linear_solver in args.ceres_solvers:
      peer = ceres(args.ceres_python, source, scratch / "ceres.txt",
                   args.max_iterations, linear_solver)
      label = "Ceres " + linear_solver
      used = str(peer.get("linear_solver_type_used", "")).rpartition(".")[2]
      if linear_solver == "auto" and used:
        label += " (" + used + ")"
      if "error" in peer:
        print(f"{name:<28} {label:<32} failed: {peer['error']}")
        continue
      anchor = anchor or peer
      iterations = (peer.get("num_successful_steps", 0) +
                    peer.get("num_unsuccessful_steps", 0))
      print(f"{name:<28} {label:<32} {peer['initial_cost']:>14.6e} "
            f"{peer['cost']:>22.15e} {iterations:>5} {'':>8} {'':>8} "
            f"{peer['solve_time']:>8.3f} {peer.get('peak_mb', 0):>8.0f} "
            f"{_ratio(peer['cost'], anchor['cost']):>11.6g} "
            f"{peer['solve_time'] / anchor['solve_time']:>10.3g}", flush=True)
    anchor = anchor or {"cost": float("nan"), "solve_time": float("nan")}
    cameras = int(source.read_text().split(maxsplit=1)[0])
    for solver in args.solvers:
      label = "tfg_optim " + solver
      if (solver.partition("+")[0] == "schur" and
          args.skip_schur_above is not None and
          cameras > args.skip_schur_above):
        print(f"{'':<28} {label:<32} skipped: S would be "
              f"{(9 * cameras) ** 2 * 8 / 2 ** 20:.0f} MB")
        continue
      mine = ours(source, scratch / "ours.txt", solver, args.max_iterations,
                  args.once)
      if "error" in mine:
        print(f"{'':<28} {label:<32} failed: {mine['error']}")
        continue
      print(f"{'':<28} {label:<32} "
            f"{mine['initial_cost']:>14.6e} {mine['cost']:>22.15e} "
            f"{mine['iterations']:>5} {mine['trace_time']:>8.3f} "
            f"{mine['run_time']:>8.3f} {mine['solve_time']:>8.3f} "
            f"{mine['peak_mb']:>8.0f} "
            f"{_ratio(mine['cost'], anchor['cost']):>11.6g} "
            f"{mine['solve_time'] / max(anchor['solve_time'], 1e-9):>10.3g}",
            flush=True)
  return 0


def _ratio(cost, anchor):
  return cost / anchor if anchor > 0 else float("nan")


if __name__ == "__main__":
  np.set_printoptions(precision=17)
  sys.exit(main())
