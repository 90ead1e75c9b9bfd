"""One curve fit over two worker processes (tf.distribute, multi-worker).

Run: python -m tfg_optim.examples.distributed_fit [--points N] [--workers W]

Without `TF_CONFIG` in its environment, this program is the launcher: it
picks W free ports on 127.0.0.1 and runs itself W times as the workers of a
`tf.distribute.MultiWorkerMirroredStrategy` cluster (each with its own
`TF_CONFIG`), waits for them (bounded), and prints worker 0's report.

With `TF_CONFIG` set, it is a worker. On a real cluster, start it on every
machine with that machine's `TF_CONFIG`, e.g. on the second of two machines

    TF_CONFIG='{"cluster": {"worker": ["host0:12345", "host1:12345"]},
                "task": {"type": "worker", "index": 1}}' \\
      python -m tfg_optim.examples.distributed_fit --points 100000000

Each worker builds (or would load) the same data arrays; replica r sums the
Jacobian products of its rows [r N / R, (r + 1) N / R) only, and every
Levenberg-Marquardt iteration all-reduces n^2 + n + 1 = 21 numbers
(J^T [J | F] and the cost, n = 4 parameters). Every worker ends with the
same parameters; a worker that dies makes the others fail within the
all-reduce timeout (here 60 s), naming it.
"""

import argparse
import json
import os
import sys
import time

from tfg_optim.examples import local_cluster

_TRUE = (2.0, 1.3, 0.5, 0.7)
_START = (1.0, 1.0, 0.3, 0.6)
_TIMEOUT_SECONDS = 60


def make_data(num_points, seed=0):
  """(t, y): y = p0 exp(-p1 t) + p2 sin(3 p3 t) + noise, t in [0, 4]."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  t = np.linspace(0.0, 4.0, num_points)
  p = _TRUE
  y = p[0] * np.exp(-p[1] * t) + p[2] * np.sin(3.0 * p[3] * t)
  return t, y + 0.01 * rng.standard_normal(num_points)


def worker(num_points):
  """One worker's solve; worker 0 prints the report."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tfg_optim  # pylint: disable=g-import-not-at-top
  strategy = tf.distribute.MultiWorkerMirroredStrategy(
      communication_options=tf.distribute.experimental.CommunicationOptions(
          timeout_seconds=_TIMEOUT_SECONDS))
  t, y = make_data(num_points)

  def residual(p0, p1, p2, p3, t, y):
    return p0 * tf.exp(-p1 * t) + p2 * tf.sin(3.0 * p3 * t) - y

  start = [tf.constant(v, tf.float64) for v in _START]
  begin = time.perf_counter()
  result = tfg_optim.least_squares(residual, start, data=(t, y),
                                   strategy=strategy,
                                   data_chunk_size=1 << 16)
  elapsed = time.perf_counter() - begin
  resolver = strategy.cluster_resolver
  report = dict(
      task=resolver.task_id, replicas=strategy.num_replicas_in_sync,
      parameters=[round(float(v), 6) for v in result.position],
      cost=float(result.cost), iterations=int(result.num_iterations),
      stop=tfg_optim.StopReason(int(result.stop_reason)).name,
      residuals=int(result.num_residuals), seconds=round(elapsed, 2))
  _wait_for_all_workers()
  if resolver.task_id == 0:
    print(f"Curve fit y = p0 exp(-p1 t) + p2 sin(3 p3 t) over "
          f"{report['replicas']} workers, N = {num_points} points")
    print(f"  fitted:     {report['parameters']}")
    print(f"  true:       {list(_TRUE)}")
    print(f"  cost:       {report['cost']:.6g} after "
          f"{report['iterations']} iterations ({report['stop']})")
    print(f"  residuals:  {report['residuals']} (summed over workers)")
    print(f"  time:       {report['seconds']} s (first call: includes "
          "tracing)")
  print("REPORT " + json.dumps(report), flush=True)


def _wait_for_all_workers():
  """A barrier before exiting: a worker that exits at once could still owe
  a peer the last message of the last all-reduce."""
  try:
    from tensorflow.python.eager import context  # pylint: disable=g-import-not-at-top,line-too-long
    context.context().wait_at_barrier("tfg_optim_distributed_fit_done",
                                      _TIMEOUT_SECONDS * 1000)
  except Exception:  # pylint: disable=broad-except
    time.sleep(1.0)  # No coordination service: a grace period.


def launch(num_points, num_workers):
  """Runs `num_workers` workers of this program on 127.0.0.1."""
  outputs = local_cluster.run_workers(
      [sys.executable, "-m", "tfg_optim.examples.distributed_fit",
       "--points", str(num_points)],
      local_cluster.worker_environments(num_workers, TF_CPP_MIN_LOG_LEVEL="2"),
      timeout=10 * _TIMEOUT_SECONDS)
  reports = []
  for index, (stdout, stderr) in enumerate(outputs):
    lines = [l for l in stdout.splitlines() if l.startswith("REPORT ")]
    if not lines:
      sys.exit(f"worker {index} failed:\n{stderr[-2000:]}")
    reports.append(json.loads(lines[-1][len("REPORT "):]))
    if index == 0:
      print("\n".join(l for l in stdout.splitlines()
                      if not l.startswith("REPORT ")))
  same = all(r["parameters"] == reports[0]["parameters"] and
             r["cost"] == reports[0]["cost"] for r in reports)
  print(f"  all {num_workers} workers ended at the same point: {same}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--points", type=int, default=200_000)
  parser.add_argument("--workers", type=int, default=2)
  args = parser.parse_args()
  if os.environ.get("TF_CONFIG"):
    worker(args.points)
  else:
    launch(args.points, args.workers)


if __name__ == "__main__":
  main()
