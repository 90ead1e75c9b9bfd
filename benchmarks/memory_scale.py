"""Peak memory vs number of residuals m: tfg_optim vs TensorFlow Graphics.

The problem: fit a sum of five exponentials

    y(t) = sum_{k=0..4} a_k exp(-b_k t),    n = 10 parameters (a_k, b_k),

to m samples (t in [0, 4], float64, CPU), inside `tf.function`, for a few
Levenberg-Marquardt iterations (memory does not grow with the iteration
count: the loop is a `tf.while_loop`).

TensorFlow Graphics computes J with `GradientTape.jacobian`, which vectorizes
the backward pass over the m outputs: the backward pass of every elementwise
op on the [m] residual path carries an [m, m] tensor (m^2 * 8 bytes: 800 MB
at m = 10,000), so its memory grows like m^2. tfg_optim computes J with n
forward-mode products ([n, m] tensors), so its memory grows like m * n.

Every (solver, m) runs in its own subprocess. The child reports its peak
resident set size (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) and its RSS
just before the solve (the TensorFlow baseline); the parent polls the
child's RSS in /proc and kills it when it passes --cap-gib (default 12), so a
size that does not fit is recorded as "over cap" instead of taking the
machine down. For each solver the script then fits peak - baseline to
c * m^p over the sizes that fit and extrapolates the largest m whose peak
fits in --machine-gib (default: this machine's physical memory).

Usage (from the repository root):

    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/memory_scale.py
    ... --ours 100000,1000000,2000000 --reference 1000,2000,4000,8000
    ... --iterations 3 --cap-gib 12 --json memory.json
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TRUE_A = np.array([1.0, 0.8, 0.6, 0.4, 0.2])
TRUE_B = np.array([0.3, 0.9, 1.7, 2.9, 4.5])
START = np.concatenate([TRUE_A * 1.1, TRUE_B * 0.9])
GIB = 1024.0 ** 3


def rss_bytes(pid="self"):
  try:
    with open(f"/proc/{pid}/status") as status:
      for line in status:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def child(solver, m, iterations):
  """Runs one solve and prints a JSON line with its memory and time."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if solver == "tfg_optim":
    from tfg_optim import levenberg_marquardt as module  # pylint: disable=g-import-not-at-top
  else:
    from tensorflow_graphics.math.optimizer import levenberg_marquardt as module  # pylint: disable=g-import-not-at-top

  t_np = np.linspace(0.0, 4.0, m)
  y_np = (TRUE_A[:, None] * np.exp(-TRUE_B[:, None] * t_np)).sum(axis=0)
  y_np += 1e-3 * np.random.default_rng(0).standard_normal(m)
  t = tf.constant(t_np)
  y = tf.constant(y_np)
  del t_np, y_np

  def residual(p):
    a = p[:5, tf.newaxis]
    b = p[5:, tf.newaxis]
    return tf.reduce_sum(a * tf.exp(-b * t), axis=0) - y

  @tf.function
  def solve(p0):
    return module.minimize(residual, p0, max_iterations=iterations)

  start = tf.constant(START)
  # Trace without running, so the baseline includes TensorFlow, the data and
  # the graph but no solve.
  solve.get_concrete_function(start)
  baseline = rss_bytes()
  begin = time.perf_counter()
  objective, _ = solve(start)
  objective = float(objective.numpy())
  seconds = time.perf_counter() - begin
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(json.dumps({"solver": solver, "m": m, "peak": peak,
                    "baseline": baseline, "seconds": seconds,
                    "objective": objective}))


def run_one(solver, m, iterations, cap_bytes):
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  process = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), "--child", solver, str(m),
       "--iterations", str(iterations)],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  seen = 0
  killed = False
  while process.poll() is None:
    seen = max(seen, rss_bytes(process.pid))
    if seen > cap_bytes:
      process.kill()  # Only this child, by its handle.
      killed = True
      break
    time.sleep(0.02)
  stdout, stderr = process.communicate()
  if killed:
    return {"solver": solver, "m": m, "status": "over cap",
            "peak": seen, "baseline": None, "seconds": None}
  if process.returncode != 0:
    tail = stderr.strip().splitlines()[-1:] or ["?"]
    status = "out of memory" if "ResourceExhausted" in stderr or \
        process.returncode in (-9, 137) else f"failed: {tail[0][:120]}"
    return {"solver": solver, "m": m, "status": status, "peak": seen,
            "baseline": None, "seconds": None}
  result = json.loads(stdout.strip().splitlines()[-1])
  result["status"] = "ok"
  return result


def fit_power_law(results):
  """Fits peak - baseline = c m^p (least squares in log-log)."""
  points = [(r["m"], r["peak"] - r["baseline"]) for r in results
            if r["status"] == "ok" and r["peak"] - r["baseline"] > 0]
  if len(points) < 2:
    return None
  # Use the two largest sizes: small sizes are dominated by fixed costs.
  points = sorted(points)[-2:]
  log_m = np.log([p[0] for p in points])
  log_b = np.log([p[1] for p in points])
  power, log_c = np.polyfit(log_m, log_b, 1)
  return float(np.exp(log_c)), float(power)


def main():
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--child", nargs=2, metavar=("SOLVER", "M"),
                      help=argparse.SUPPRESS)
  parser.add_argument("--ours", default="100000,300000,1000000,2000000",
                      help="comma-separated m for tfg_optim")
  parser.add_argument("--reference", default="1000,2000,4000,6000,8000",
                      help="comma-separated m for TensorFlow Graphics "
                      "('' to skip)")
  parser.add_argument("--iterations", type=int, default=3)
  parser.add_argument("--cap-gib", type=float, default=12.0,
                      help="kill a child whose RSS passes this (default 12)")
  parser.add_argument("--machine-gib", type=float, default=None,
                      help="memory to extrapolate to (default: physical)")
  parser.add_argument("--json", help="also write the results to this file")
  args = parser.parse_args()

  if args.child:
    child(args.child[0], int(args.child[1]), args.iterations)
    return

  machine_bytes = (args.machine_gib * GIB if args.machine_gib else
                   os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
  cap_bytes = args.cap_gib * GIB
  print(f"cpu count {os.cpu_count()}, physical memory "
        f"{machine_bytes / GIB:.1f} GiB, cap per run {args.cap_gib} GiB, "
        f"n = 10, float64, tf.function, {args.iterations} iterations",
        flush=True)
  plans = [("tfg_optim", [int(v) for v in args.ours.split(",") if v]),
           ("tfg", [int(v) for v in args.reference.split(",") if v])]
  results = {}
  for solver, sizes in plans:
    results[solver] = []
    for m in sizes:
      result = run_one(solver, m, args.iterations, cap_bytes)
      results[solver].append(result)
      print(f"  {solver:9s} m={m:>11,d}: {result['status']}, peak "
            f"{result['peak'] / GIB:.2f} GiB", flush=True)
      if result["status"] != "ok":
        break  # Larger sizes will not fit either.

  header = ("solver", "m", "status", "peak RSS [GiB]", "baseline [GiB]",
            "peak-baseline [GiB]", "bytes/m", "first solve [s]")
  table = []
  for solver, rows in results.items():
    for r in rows:
      ok = r["status"] == "ok"
      extra = r["peak"] - r["baseline"] if ok else None
      table.append((
          solver, f"{r['m']:,d}", r["status"],
          f"{r['peak'] / GIB:.2f}" + ("" if ok else " (when killed)"),
          f"{r['baseline'] / GIB:.2f}" if ok else "-",
          f"{extra / GIB:.3f}" if ok else "-",
          f"{extra / r['m']:.0f}" if ok else "-",
          f"{r['seconds']:.2f}" if ok else "-"))
  widths = [max(len(str(line[i])) for line in [header] + table)
            for i in range(len(header))]
  print()
  for line in [header, tuple("-" * w for w in widths)] + table:
    print("| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) +
          " |")
  print()
  summary = {}
  for solver, rows in results.items():
    fitted = [r for r in rows if r["status"] == "ok"]
    if not fitted:
      continue
    largest = max(fitted, key=lambda r: r["m"])
    fit = fit_power_law(rows)
    line = (f"{solver}: largest m measured to fit under the "
            f"{args.cap_gib:g} GiB cap: {largest['m']:,d}")
    if fit:
      c, power = fit
      budget = machine_bytes - largest["baseline"]
      m_max = (budget / c) ** (1.0 / power)
      line += (f"; peak - baseline ~ {c:.3g} * m^{power:.2f} bytes -> "
               f"extrapolated largest m in {machine_bytes / GIB:.1f} GiB: "
               f"~{m_max:,.0f}")
      summary[solver] = {"largest_measured": largest["m"], "c": c,
                         "power": power, "extrapolated_max_m": m_max}
    print(line)
  if args.json:
    with open(args.json, "w") as out:
      json.dump({"results": results, "summary": summary}, out, indent=1)


if __name__ == "__main__":
  main()
