"""Bundle adjustment on BAL files: tfg_optim (Schur complement) vs Ceres.

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
`ratio` is tfg_optim's final cost / Ceres' final cost; on the three tiny
files both reach ~1e-25 (they have fewer residuals than parameters), so
their ratios are of round-off, not of minima.

    PYTHONPATH=. python benchmarks/bundle_adjustment.py \
        [--ceres-python /work/venv-ceres/bin/python] \
        [--data ../shared/data/bal] [--synthetic 20,2000,10000 ...] \
        [--solvers schur schur+xla cg ...] [--max-iterations 100]

('+xla': the solve compiled by XLA, jit_compile=True; `first` then includes
the compilation.)
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

from tfg_optim import io
from tfg_optim.examples import bundle_adjustment

ROOT = pathlib.Path(__file__).resolve().parent.parent
FILES = ("dubrovnik-1-1-pre.txt", "dubrovnik-3-7-pre.txt",
         "dubrovnik-3-7-18-pre.txt")


def ceres(python, source, output, max_iterations):
  """Ceres' report (a dict) and its output's cost, by `io.bal_cost`."""
  completed = subprocess.run(
      [python, str(ROOT / "benchmarks" / "_ceres_bal.py"), str(source),
       str(output), "--max-iterations", str(max_iterations)],
      capture_output=True, text=True, check=False)
  if completed.returncode:  # COLMAP refuses tracks of one observation
    return {"error": completed.stderr.strip().splitlines()[-1]}
  report = json.loads(completed.stdout.strip().splitlines()[-1])
  report["cost"] = float(io.bal_cost(*io.read_bal(output)))
  return report


def ours(source, output, linear_solver, max_iterations):
  """tfg_optim's solution's numbers; its output's cost by `io.bal_cost`."""
  problem = io.read_bal(source)
  linear_solver, _, xla = linear_solver.partition("+")
  solution = bundle_adjustment.optimize(problem, max_iterations,
                                        linear_solver, xla=xla == "xla",
                                        repeat=True)
  io.write_bal(output, solution.problem)
  results = solution.results
  return {"initial_cost": float(results.initial_cost),
          "iterations": int(results.num_iterations),
          "trace_time": solution.trace_time, "run_time": solution.run_time,
          "solve_time": solution.solve_time,
          "cost": float(io.bal_cost(*io.read_bal(output)))}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--ceres-python", default="/work/venv-ceres/bin/python")
  parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" /
                                            "bal"))
  parser.add_argument("--synthetic", nargs="*", default=[],
                      help="C,P,K synthetic problems")
  parser.add_argument("--solvers", nargs="+", default=["schur"])
  parser.add_argument("--max-iterations", type=int, default=100)
  parser.add_argument("--no-files", action="store_true")
  args = parser.parse_args()
  scratch = pathlib.Path(tempfile.mkdtemp(prefix="bal-bench-"))
  sources = [] if args.no_files else [(name, pathlib.Path(args.data) / name)
                                      for name in FILES]
  for spec in args.synthetic:
    c, p, k = (int(x) for x in spec.split(","))
    start, _ = io.synthetic_bal(c, p, num_observations=k, seed=0)
    path = scratch / f"synthetic-{c}-{p}-{k}.txt"
    io.write_bal(path, start)
    sources.append((f"synthetic {c}/{p}/{k}", path))
  header = (f"{'problem':<26} {'solver':<16} {'initial cost':>14} "
            f"{'final cost':>22} {'iters':>5} {'trace s':>8} {'first s':>8} "
            f"{'solve s':>8} {'cost ratio':>11} {'time ratio':>10}")
  print(header)
  print("-" * len(header))
  for name, source in sources:
    peer = ceres(args.ceres_python, source, scratch / "ceres.txt",
                 args.max_iterations)
    if "error" in peer:
      print(f"{name:<26} {'Ceres':<16} failed: {peer['error']}")
      peer = {"cost": float("nan"), "solve_time": float("nan")}
    else:
      iterations = (peer.get("num_successful_steps", 0) +
                    peer.get("num_unsuccessful_steps", 0))
      print(f"{name:<26} {'Ceres':<16} {peer['initial_cost']:>14.6e} "
            f"{peer['cost']:>22.15e} {iterations:>5} {'':>8} {'':>8} "
            f"{peer['solve_time']:>8.3f} {'1':>11} {'1':>10}", flush=True)
    for solver in args.solvers:
      mine = ours(source, scratch / "ours.txt", solver, args.max_iterations)
      ratio = (mine["cost"] / peer["cost"] if peer["cost"] > 0 else
               float("nan"))
      print(f"{'':<26} {'tfg_optim ' + solver:<16} "
            f"{mine['initial_cost']:>14.6e} {mine['cost']:>22.15e} "
            f"{mine['iterations']:>5} {mine['trace_time']:>8.3f} "
            f"{mine['run_time']:>8.3f} {mine['solve_time']:>8.3f} "
            f"{ratio:>11.6g} "
            f"{mine['solve_time'] / max(peer['solve_time'], 1e-9):>10.3g}",
            flush=True)
  return 0


if __name__ == "__main__":
  np.set_printoptions(precision=17)
  sys.exit(main())
