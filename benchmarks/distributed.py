"""least_squares(strategy=...): time per iteration against replica count.

    PYTHONPATH=. python benchmarks/distributed.py [--points N] [--chunk K]
        [--repeats R] [--replicas 1 2 4] [--no-workers]

Fits y = sum_k a_k exp(-((t - c_k) / 0.3)^2) + b sin(w t) (8 bumps at
fixed centers, n = 10 parameters) to N float64 points (t, y) with
`least_squares(..., data=(t, y), data_chunk_size=K, strategy=...)`, once per
row, each row in its own process (logical devices and clusters are fixed at
TensorFlow's start):

- `one device`: no strategy (`_chunked`, the single-device solve);
- `mirrored R`: `MirroredStrategy` over R logical CPU devices of one process;
- `2 workers`: `MultiWorkerMirroredStrategy`, two processes on 127.0.0.1
  (one CPU replica each; worker 0 reports).

Each row: the first call (tracing and one solve), two untimed solves, then
the median of `repeats` solves; iterations, seconds per iteration, the Jacobian and cost
passes of a solve, and the all-reduce volume of a solve,
(n^2 + n + 1) per Jacobian pass + 1 per cost pass (+ 1 for the residual
count), next to the data volume (N rows x 2 float64 columns).

All logical CPU devices of a process share its CPU cores: on a 2-core
machine R replicas cannot run faster than 2 cores, so the rows measure the
overhead of splitting and all-reducing, not a speed-up. Every row checks its
parameters against the one-device row's.
"""

import argparse
import json
import os
import sys
import time

_N_PARAMETERS = 10
# y = sum_k a_k exp(-((t - c_k) / 0.3)^2) + b sin(w t), t in [-1, 1]: eight
# bumps at fixed centers (linear, well conditioned) and a sine whose
# frequency makes the fit nonlinear.
_CENTERS = [-1.0 + 2.0 * k / 7.0 for k in range(8)]
_TRUTH = [0.8, -0.4, 1.1, 0.3, -0.9, 0.6, 0.2, -0.5, 0.5, 7.0]
_START = [0.0] * 8 + [0.4, 6.8]


def _model(p, t, exp, sin):
  value = p[8] * sin(p[9] * t)
  for k, center in enumerate(_CENTERS):
    value = value + p[k] * exp(-(((t - center) / 0.3) ** 2))
  return value


def _data(n):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  t = rng.uniform(-1.0, 1.0, n)
  y = _model(_TRUTH, t, np.exp, np.sin)
  return t, y + 0.01 * rng.standard_normal(n)


def _child(config, n, chunk, repeats):
  """One row in this process; prints a JSON line."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if config.startswith("mirrored"):
    replicas = int(config.split(":")[1])
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    strategy = tf.distribute.MirroredStrategy(
        [f"/cpu:{i}" for i in range(replicas)])
  elif config == "worker":
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
  else:
    strategy = None
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tfg_optim  # pylint: disable=g-import-not-at-top

  def residual(*args):
    p, (t, y) = args[:10], args[10:]
    return _model(p, t, tf.exp, tf.sin) - y

  t, y = (tf.constant(v) for v in _data(n))
  start = [tf.constant(v, tf.float64) for v in _START]
  options = dict(data=(t, y), data_chunk_size=chunk, strategy=strategy,
                 geodesic_acceleration=None, max_iterations=50,
                 eager_compile=True)
  begin = time.perf_counter()
  result = tfg_optim.least_squares(residual, start, **options)
  first = time.perf_counter() - begin
  for _ in range(2):  # Warm-up: the first runs of a trace are slower.
    float(tfg_optim.least_squares(residual, start, **options).cost)
  times = []
  for _ in range(repeats):
    begin = time.perf_counter()
    result = tfg_optim.least_squares(residual, start, **options)
    float(result.cost)
    times.append(time.perf_counter() - begin)
  print(json.dumps(dict(
      config=config, n=n, chunk=chunk, first=first,
      seconds=float(np.median(times)),
      replicas=1 if strategy is None else strategy.num_replicas_in_sync,
      iterations=int(result.num_iterations),
      jacobian_passes=int(result.num_jacobian_evaluations),
      cost_passes=int(result.num_residual_evaluations),
      cost=float(result.cost),
      stop=tfg_optim.StopReason(int(result.stop_reason)).name,
      position=[float(v) for v in result.position])), flush=True)
  if config == "worker":
    try:  # Exit together (see examples/distributed_fit.py).
      from tensorflow.python.eager import context  # pylint: disable=g-import-not-at-top,line-too-long
      context.context().wait_at_barrier("benchmark_done", 60_000)
    except Exception:  # pylint: disable=broad-except
      time.sleep(1.0)
  os._exit(0)  # pylint: disable=protected-access


def _run(config, args, workers=1):
  from tfg_optim.examples import local_cluster  # pylint: disable=g-import-not-at-top
  environments = [dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")]
  if workers > 1:
    environments = local_cluster.worker_environments(
        workers, TF_CPP_MIN_LOG_LEVEL="2")
  outputs = local_cluster.run_workers(
      [sys.executable, __file__, "--child", config, str(args.points),
       str(args.chunk), str(args.repeats)], environments, timeout=1800)
  stdout, stderr = outputs[0]
  lines = [l for l in stdout.splitlines() if l.startswith("{")]
  if not lines:
    return dict(config=config, failed=stderr.strip()[-300:])
  return json.loads(lines[-1])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--points", type=int, default=2_000_000)
  parser.add_argument("--chunk", type=int, default=1 << 16)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
  parser.add_argument("--no-workers", action="store_true")
  args = parser.parse_args()
  rows = [_run("single", args)]
  rows += [_run(f"mirrored:{r}", args) for r in args.replicas]
  if not args.no_workers:
    rows.append(_run("worker", args, workers=2))
  n = _N_PARAMETERS
  unit = n * n + n + 1
  print(f"N = {args.points}, K = {args.chunk}, n = {n}, float64; data "
        f"{args.points * 2 * 8 / 2 ** 20:.1f} MiB; {os.cpu_count()} CPU "
        "cores")
  print("| solve | replicas | first call (s) | solve (s) | iterations | "
        "s / iteration | vs one device | stop | Jacobian + cost passes | "
        "all-reduced numbers / solve | bytes / solve | data bytes / "
        "all-reduced bytes | max |x - x_1| |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  base = rows[0]
  for row in rows:
    if "failed" in row:
      print(f"| {row['config']} | failed: {row['failed']} |")
      continue
    per = row["seconds"] / max(row["iterations"], 1)
    base_per = base["seconds"] / max(base["iterations"], 1)
    numbers = 0
    if row["config"] != "single":
      numbers = unit * row["jacobian_passes"] + row["cost_passes"] + 1
    ratio = (f"{args.points * 2 * 8 / (8 * numbers):.3g}" if numbers
             else "-")
    difference = max(abs(a - b) for a, b in zip(row["position"],
                                                 base["position"]))
    name = {"single": "one device", "worker": "2 workers"}.get(
        row["config"], row["config"].replace(":", " "))
    print(f"| {name} | {row['replicas']} | {row['first']:.1f} | "
          f"{row['seconds']:.2f} | {row['iterations']} | {per:.3f} | "
          f"{per / base_per:.2f} | {row['stop']} | "
          f"{row['jacobian_passes']} + "
          f"{row['cost_passes']} | {numbers} | {8 * numbers} | {ratio} | "
          f"{difference:.1e} |")


if __name__ == "__main__":
  if sys.argv[1:2] == ["--child"]:
    _child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
           int(sys.argv[5]))
  else:
    main()
