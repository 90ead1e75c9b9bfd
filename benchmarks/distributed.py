"""least_squares(strategy=...): time per iteration against replica count.

    PYTHONPATH=. python benchmarks/distributed.py [--points N] [--chunk K]
        [--repeats R] [--replicas 1 2 4] [--no-workers] [--xla]
    PYTHONPATH=. python benchmarks/distributed.py --passes [--points N]
        [--chunk K] [--repeats R]

Fits y = sum_k a_k exp(-((t - c_k) / 0.3)^2) + b sin(w t) (8 bumps at
fixed centers, n = 10 parameters) to N float64 points (t, y) with
`least_squares(..., data=(t, y), data_chunk_size=K, strategy=...)`, once per
row, each row in its own process (logical devices and clusters are fixed at
TensorFlow's start):

- `one device`: no strategy (`_chunked`, the single-device solve);
- `mirrored R`: `MirroredStrategy` over R logical CPU devices of one process;
- `2 workers`: `MultiWorkerMirroredStrategy`, two processes on 127.0.0.1
  (one CPU replica each; worker 0 reports).

With `--xla`, each process also runs its solve with XLA, side by side
with the plain one (`_harness.interleave`: each round calls both, so a
change of the machine's load falls on both): with a strategy,
`jit_compile_replicas=True` (each replica's passes compiled by XLA, the
all-reduces and the loop outside); on one device, the whole solve inside
`tf.function(jit_compile=True)` (what a single-device user would do).

`--passes` times instead what one replica runs per pass, on one device:
the fold over the N rows' chunks of `_chunked.chunk_terms` (Jacobian pass)
and of the cost (cost pass), each as a plain `tf.function` and under XLA,
interleaved (the median of `repeats` rounds).

Each row: the first call (tracing, XLA compilation and one solve), two
untimed rounds, then the median of `repeats` rounds; iterations, seconds
per iteration, its ratio to the one-device row and (XLA rows) to the plain
solve of the same process, the Jacobian and cost passes of a solve, and
the all-reduce volume of a solve, (n^2 + n + 1) per Jacobian pass + 1 per
cost pass (+ 1 for the residual count), next to the data volume (N rows x
2 float64 columns).

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


def strategy_for(config):
  """The strategy of a row: 'mirrored:R' (R logical CPU devices, set up
  before TensorFlow starts), 'worker' (MultiWorker from TF_CONFIG), or None
  (one device)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if config.startswith("mirrored"):
    replicas = int(config.split(":")[1])
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    return tf.distribute.MirroredStrategy(
        [f"/cpu:{i}" for i in range(replicas)])
  if config == "worker":
    return tf.distribute.MultiWorkerMirroredStrategy()
  return None


def _child(config, n, chunk, repeats, xla):
  """One process's rows (the plain solve; with `xla`, also the XLA one,
  interleaved); prints a JSON line per row."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  strategy = strategy_for(config)
  import numpy as np  # pylint: disable=g-import-not-at-top
  import _harness  # pylint: disable=g-import-not-at-top
  import tfg_optim  # pylint: disable=g-import-not-at-top

  def residual(*args):
    p, (t, y) = args[:10], args[10:]
    return _model(p, t, tf.exp, tf.sin) - y

  t, y = (tf.constant(v) for v in _data(n))
  start = [tf.constant(v, tf.float64) for v in _START]
  options = dict(data_chunk_size=chunk, strategy=strategy,
                 geodesic_acceleration=None, max_iterations=50)

  def plain():
    return tfg_optim.least_squares(residual, start, data=(t, y),
                                   eager_compile=True, **options)

  if strategy is None:  # One device: the whole solve under XLA.
    whole = tf.function(
        lambda t, y, *start: tfg_optim.least_squares(
            residual, list(start), data=(t, y), **options),
        jit_compile=True, autograph=False)
    compiled = lambda: whole(t, y, *start)
  else:  # Each replica's passes under XLA.
    compiled = lambda: tfg_optim.least_squares(
        residual, start, data=(t, y), jit_compile_replicas=True, **options)

  def numbers(solve):
    def call():
      result = solve()
      return dict(
          iterations=int(result.num_iterations),
          jacobian_passes=int(result.num_jacobian_evaluations),
          cost_passes=int(result.num_residual_evaluations),
          cost=float(result.cost),
          stop=tfg_optim.StopReason(int(result.stop_reason)).name,
          position=[float(v) for v in result.position])
    return call

  calls = {"": numbers(plain)}
  if xla:
    calls["xla"] = numbers(compiled)
  # First calls and two warm-up rounds (the first runs of a trace are
  # slower), then the timed rounds.
  first = _harness.interleave(calls, 2)
  timed = _harness.interleave(calls, repeats, warm_up=False)
  for mode in calls:
    print(json.dumps(dict(
        config=config, xla=mode, n=n, chunk=chunk,
        first=first[mode].first_call, seconds=timed[mode].seconds,
        replicas=1 if strategy is None else strategy.num_replicas_in_sync,
        **timed[mode].output)), flush=True)
  if config == "worker":
    try:  # Exit together (see examples/distributed_fit.py).
      from tensorflow.python.eager import context  # pylint: disable=g-import-not-at-top,line-too-long
      context.context().wait_at_barrier("benchmark_done", 60_000)
    except Exception:  # pylint: disable=broad-except
      time.sleep(1.0)
  os._exit(0)  # pylint: disable=protected-access


def _run(config, args, workers=1):
  """The rows of one process (or of worker 0 of `workers`)."""
  from tfg_optim.examples import local_cluster  # pylint: disable=g-import-not-at-top
  environments = [dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")]
  if workers > 1:
    environments = local_cluster.worker_environments(
        workers, TF_CPP_MIN_LOG_LEVEL="2")
  outputs = local_cluster.run_workers(
      [sys.executable, __file__, "--child", config, str(args.points),
       str(args.chunk), str(args.repeats), str(int(args.xla))],
      environments, timeout=1800)
  stdout, stderr = outputs[0]
  lines = [l for l in stdout.splitlines() if l.startswith("{")]
  if not lines:
    return [dict(config=config, xla="", failed=stderr.strip()[-300:])]
  return [json.loads(line) for line in lines]


def _passes(args):
  """One replica's Jacobian and cost passes over N rows, plain and XLA."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import _harness  # pylint: disable=g-import-not-at-top
  from tfg_optim import _chunked  # pylint: disable=g-import-not-at-top
  from tfg_optim import _vector_space  # pylint: disable=g-import-not-at-top
  t, y = (tf.constant(v) for v in _data(args.points))
  start = [tf.constant(v, tf.float64) for v in _START]
  residual = lambda p, chunk: _model(p, chunk[0], tf.exp, tf.sin) - chunk[1]
  retract = lambda p, step: _vector_space.retract(p, step, 0)
  zero = lambda *shape: tf.zeros(shape, tf.float64)
  fold = lambda function, zeros, t, y: _chunked.ChunkedData(
      [t, y], args.chunk).fold(function, zeros)[0]
  passes = {
      "Jacobian": lambda p, t, y: fold(
          lambda chunk: _chunked.chunk_terms(residual, retract,
                                             _N_PARAMETERS, p, chunk),
          (zero(_N_PARAMETERS, _N_PARAMETERS + 1), zero()), t, y),
      "cost": lambda p, t, y: fold(
          lambda chunk: (0.5 * tf.reduce_sum(tf.square(residual(p, chunk))),),
          (zero(),), t, y)}
  calls = {}
  for name, function in passes.items():
    for xla in (False, True):
      compiled = tf.function(function, jit_compile=xla, autograph=False)
      calls[(name, xla)] = (lambda compiled: lambda: np.asarray(
          compiled(start, t, y)))(compiled)
  timings = _harness.interleave(calls, args.repeats)
  print(f"N = {args.points}, K = {args.chunk}, n = {_N_PARAMETERS}, "
        f"float64, one device; {os.cpu_count()} CPU cores; load average "
        f"{os.getloadavg()[0]:.1f} at the end")
  print("| pass | plain (ms) | XLA (ms) | XLA / plain | max |XLA - plain| "
        "/ max |plain| |")
  print("|---|---|---|---|---|")
  for name in passes:
    plain, xla = timings[(name, False)], timings[(name, True)]
    difference = (np.max(np.abs(xla.output - plain.output)) /
                  np.max(np.abs(plain.output)))
    print(f"| {name} | {1000 * plain.seconds:.0f} | {1000 * xla.seconds:.0f}"
          f" | {xla.seconds / plain.seconds:.2f} | {difference:.1e} |")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--points", type=int, default=2_000_000)
  parser.add_argument("--chunk", type=int, default=1 << 16)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
  parser.add_argument("--no-workers", action="store_true")
  parser.add_argument("--xla", action="store_true",
                      help="also the XLA solve, side by side in each "
                      "process (jit_compile_replicas=True with a strategy)")
  parser.add_argument("--passes", action="store_true",
                      help="time one replica's passes, plain and XLA")
  args = parser.parse_args()
  if args.passes:
    return _passes(args)
  rows = _run("single", args)
  for r in args.replicas:
    rows += _run(f"mirrored:{r}", args)
  if not args.no_workers:
    rows += _run("worker", args, workers=2)
  n = _N_PARAMETERS
  unit = n * n + n + 1
  print(f"N = {args.points}, K = {args.chunk}, n = {n}, float64; data "
        f"{args.points * 2 * 8 / 2 ** 20:.1f} MiB; {os.cpu_count()} CPU "
        f"cores; load average {os.getloadavg()[0]:.1f} at the end")
  print("| solve | XLA | replicas | first call (s) | solve (s) | iterations "
        "| s / iteration | vs one device | vs without XLA | stop | Jacobian "
        "+ cost passes | all-reduced numbers / solve | bytes / solve | data "
        "bytes / all-reduced bytes | max |x - x_1| |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  base = rows[0]
  per_iteration = lambda row: row["seconds"] / max(row["iterations"], 1)
  plain = {row["config"]: row for row in rows
           if not row["xla"] and "failed" not in row}
  for row in rows:
    if "failed" in row:
      print(f"| {row['config']} {row['xla']} | failed: {row['failed']} |")
      continue
    per = per_iteration(row)
    numbers = 0
    if row["config"] != "single":
      numbers = unit * row["jacobian_passes"] + row["cost_passes"] + 1
    ratio = (f"{args.points * 2 * 8 / (8 * numbers):.3g}" if numbers
             else "-")
    difference = max(abs(a - b) for a, b in zip(row["position"],
                                                 base["position"]))
    name = {"single": "one device", "worker": "2 workers"}.get(
        row["config"], row["config"].replace(":", " "))
    xla = "-"
    versus = "-"
    if row["xla"]:
      xla = "whole solve" if row["config"] == "single" else "per replica"
      if row["config"] in plain:
        versus = f"{per / per_iteration(plain[row['config']]):.2f}"
    print(f"| {name} | {xla} | {row['replicas']} | {row['first']:.1f} | "
          f"{row['seconds']:.2f} | {row['iterations']} | {per:.3f} | "
          f"{per / per_iteration(base):.2f} | {versus} | {row['stop']} | "
          f"{row['jacobian_passes']} + "
          f"{row['cost_passes']} | {numbers} | {8 * numbers} | {ratio} | "
          f"{difference:.1e} |")


if __name__ == "__main__":
  if sys.argv[1:2] == ["--child"]:
    _child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
           int(sys.argv[5]), bool(int(sys.argv[6])))
  else:
    main()
