"""Implicit gradients through least_squares(strategy=...): the backward
pass's time against the forward solve's, and its all-reduce volume.

    PYTHONPATH=. python benchmarks/distributed_gradients.py [--points N]
        [--chunk K] [--repeats R] [--replicas 2] [--no-workers] [--xla]

The fit of benchmarks/distributed.py (n = 10 parameters, N float64 points,
chunks of K rows), with the bumps' 8 centers and their width captured
tensors (theta: 9 numbers) of the residual. Each row runs in its own
process (`one device`: no strategy, the chunked single-device solve;
`mirrored R`: R logical CPU devices; `2 workers`: two processes on
127.0.0.1, worker 0 reports; with `--xla` also each strategy's
`jit_compile_replicas=True`), two functions side by side
(`_harness.interleave`: each round calls both):

- forward: `tf.function` of the solve (what training without gradients
  runs);
- forward + backward: the same solve under a `tf.GradientTape` and the
  gradient of L = sum(x*) + cost with respect to the captured centers and
  width and to the data y.

Columns: the median of R rounds of each (after a first call and two
untimed rounds), the backward's share (forward+backward - forward) /
forward, the all-reduced numbers of one backward (theta's size: its one
SUM all-reduce; the data's gradient rows are not communicated), and the
largest relative difference of theta_bar and of y_bar (at every 997th row
of the worker's own rows) from the one-device row's.
"""

import argparse
import json
import os
import sys

import distributed  # benchmarks/distributed.py: the model and its data.

_WIDTH = 0.3


def _child(config, n, chunk, repeats, xla):
  """One process's row: prints a JSON line."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  strategy = distributed.strategy_for(config)
  import numpy as np  # pylint: disable=g-import-not-at-top
  import _harness  # pylint: disable=g-import-not-at-top
  import tfg_optim  # pylint: disable=g-import-not-at-top

  t, y = (tf.constant(v) for v in distributed._data(n))  # pylint: disable=protected-access
  centers = tf.constant(distributed._CENTERS, tf.float64)  # pylint: disable=protected-access
  width = tf.constant(_WIDTH, tf.float64)
  start = [tf.constant(v, tf.float64) for v in distributed._START]  # pylint: disable=protected-access

  def solve(t, y, centers, width):
    def residual(*args):
      p, (t, y) = args[:10], args[10:]
      value = p[8] * tf.sin(p[9] * t)
      bumps = tf.exp(-tf.square((t[:, tf.newaxis] - centers) / width))
      return value + tf.linalg.matvec(bumps, tf.stack(p[:8])) - y
    return tfg_optim.least_squares(
        residual, start, data=(t, y), data_chunk_size=chunk,
        strategy=strategy, geodesic_acceleration=None, max_iterations=50,
        jit_compile_replicas=xla and strategy is not None)

  @tf.function(autograph=False)
  def forward(t, y, centers, width):
    result = solve(t, y, centers, width)
    return tf.reduce_sum(tf.stack(result.position)) + result.cost

  @tf.function(autograph=False)
  def backward(t, y, centers, width):
    with tf.GradientTape() as tape:
      tape.watch([y, centers, width])
      result = solve(t, y, centers, width)
      loss = tf.reduce_sum(tf.stack(result.position)) + result.cost
    return [loss, result.num_iterations] + tape.gradient(
        loss, [centers, width, y])

  args = (t, y, centers, width)
  calls = {"forward": lambda: float(forward(*args)),
           "backward": lambda: [np.asarray(v) for v in backward(*args)]}
  _harness.interleave(calls, 2)
  timed = _harness.interleave(calls, repeats, warm_up=False)
  loss, iterations, centers_bar, width_bar, y_bar = timed["backward"].output
  rows = np.flatnonzero(y_bar)
  print(json.dumps(dict(
      config=config, xla=xla, n=n, chunk=chunk,
      replicas=1 if strategy is None else strategy.num_replicas_in_sync,
      forward=timed["forward"].seconds, backward=timed["backward"].seconds,
      iterations=int(iterations), loss=float(loss),
      theta_bar=centers_bar.tolist() + [float(width_bar)],
      rows=[int(rows.min()), int(rows.max()) + 1],
      y_bar=y_bar[::997].tolist())), flush=True)
  if config == "worker":
    try:  # Exit together (see examples/distributed_fit.py).
      from tensorflow.python.eager import context  # pylint: disable=g-import-not-at-top,line-too-long
      context.context().wait_at_barrier("benchmark_done", 60_000)
    except Exception:  # pylint: disable=broad-except
      pass
  os._exit(0)  # pylint: disable=protected-access


def _run(config, args, xla=False, workers=1):
  from tfg_optim.examples import local_cluster  # pylint: disable=g-import-not-at-top
  environments = [dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")]
  if workers > 1:
    environments = local_cluster.worker_environments(
        workers, TF_CPP_MIN_LOG_LEVEL="2")
  outputs = local_cluster.run_workers(
      [sys.executable, __file__, "--child", config, str(args.points),
       str(args.chunk), str(args.repeats), str(int(xla))],
      environments, timeout=1800)
  stdout, stderr = outputs[0]
  lines = [l for l in stdout.splitlines() if l.startswith("{")]
  if not lines:
    return dict(config=config, xla=xla, failed=stderr.strip()[-300:])
  return json.loads(lines[-1])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--points", type=int, default=200_000)
  parser.add_argument("--chunk", type=int, default=1 << 16)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--replicas", type=int, nargs="+", default=[2])
  parser.add_argument("--no-workers", action="store_true")
  parser.add_argument("--xla", action="store_true")
  parser.add_argument("--child", nargs=5)
  args = parser.parse_args()
  if args.child:
    config, n, chunk, repeats, xla = args.child
    _child(config, int(n), int(chunk), int(repeats), bool(int(xla)))
    return
  import numpy as np  # pylint: disable=g-import-not-at-top
  import _harness  # pylint: disable=g-import-not-at-top
  _harness.print_machine_info()
  runs = [("one device", _run("one", args))]
  for replicas in args.replicas:
    for xla in (False, True) if args.xla else (False,):
      runs.append((f"mirrored {replicas}", _run(f"mirrored:{replicas}", args,
                                                xla)))
  if not args.no_workers:
    for xla in (False, True) if args.xla else (False,):
      runs.append(("2 workers", _run("worker", args, xla, workers=2)))
  one = runs[0][1]
  table = []
  for name, row in runs:
    if "failed" in row:
      table.append([name, row["xla"], "failed: " + row["failed"]] +
                   [""] * 7)
      continue
    relative = lambda got, want: float(np.max(np.abs(
        np.asarray(got) - np.asarray(want))) / np.max(np.abs(want)))
    start, stop = row["rows"]
    own = [i for i, row_index in enumerate(range(0, row["n"], 997))
           if start <= row_index < stop]
    table.append([
        name, "per replica" if row["xla"] else "-", row["iterations"],
        f"{row['forward']:.3f}", f"{row['backward']:.3f}",
        f"{(row['backward'] - row['forward']) / row['forward']:.2f}",
        0 if name == "one device" else len(row["theta_bar"]),
        f"[{start}, {stop})",
        f"{relative(row['theta_bar'], one['theta_bar']):.1e}",
        f"{relative(np.asarray(row['y_bar'])[own], np.asarray(one['y_bar'])[own]):.1e}"])
  _harness.print_table(
      ["solve", "XLA", "iterations", "forward (s)", "forward + backward (s)",
       "backward / forward", "all-reduced numbers / backward",
       "own y rows", "theta_bar vs one device", "y_bar vs one device"],
      table)


if __name__ == "__main__":
  main()
