"""least_squares(data=tf.data.Dataset): the cost of reading chunks from a
dataset against slicing data tensors, on one device.

    PYTHONPATH=. python benchmarks/dataset_data.py [--points N]
        [--chunks K ...] [--repeats R]

Fits y = p0 exp(-p1 t) + p2 sin(3 p3 t) (n = 4, float64, the fit of
`tfg_optim.examples.distributed_fit`) to N points, in one `tf.function`
per row, the same chunks in the same order:

- `tensors`: the data (t, y) as arguments, `data_chunk_size=K`;
- `rows.batch`: `tf.data.Dataset.from_tensor_slices((t, y)).batch(K)` as
  argument (tf.data makes N row elements and batches them, every pass);
- `rows.batch.cache`: the same, `.cache()`d (the first pass fills the
  cache, the later passes read the batches from it);
- `range.map`: `Dataset.range(ceil(N / K)).map(i -> rows [i K, (i + 1) K))`
  (one element per batch: tf.data's cost per batch, not per row).

Each row:
the first call (tracing and one solve), one untimed solve, then the
median of R solves, the rows' repeats interleaved (the machine's load
falls on both alike). A pass is one iteration over all chunks (cost,
Jacobian, and the final residual count); "per pass" is the solve's time
over its passes. "vs tensors": the ratio of the medians.
"""

import argparse
import time

import numpy as np
import tensorflow as tf

import tfg_optim
from tfg_optim.examples import distributed_fit

_START = (1.0, 1.0, 0.3, 0.6)


def _residual(p0, p1, p2, p3, t, y):
  return p0 * tf.exp(-p1 * t) + p2 * tf.sin(3.0 * p3 * t) - y


def _result(result):
  return (tf.stack(result.position), result.num_iterations,
          result.num_residual_evaluations, result.num_jacobian_evaluations,
          result.stop_reason)


def _solvers(chunk):
  start = lambda: [tf.constant(v, tf.float64) for v in _START]

  @tf.function(autograph=False)
  def tensors(t, y):
    return _result(tfg_optim.least_squares(
        _residual, start(), data=(t, y), data_chunk_size=chunk))

  @tf.function(autograph=False)
  def dataset(batches):
    return _result(tfg_optim.least_squares(_residual, start(), data=batches))

  return tensors, dataset


def _timed(call):
  begin = time.perf_counter()
  outputs = call()
  outputs[0].numpy()
  return time.perf_counter() - begin, outputs


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--points", type=int, default=200_000)
  parser.add_argument("--chunks", type=int, nargs="+",
                      default=[4096, 32768])
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  t, y = (tf.constant(v) for v in distributed_fit.make_data(args.points))
  print(f"N = {args.points}, n = 4, float64, one device (CPU)")
  print("| K | data | first call (s) | solve (s) | iterations | passes | "
        "per pass (ms) | vs tensors | max |x - x_tensors| | stop |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for chunk in args.chunks:
    tensors, dataset = _solvers(chunk)
    rows = lambda: tf.data.Dataset.from_tensor_slices((t, y)).batch(chunk)
    slices = lambda: tf.data.Dataset.range(-(-args.points // chunk)).map(
        lambda i: (t[i * chunk:(i + 1) * chunk], y[i * chunk:(i + 1) * chunk]))
    calls = {"tensors": lambda: tensors(t, y),
             "rows.batch": lambda: dataset(rows()),
             "rows.batch.cache": lambda: dataset(rows().cache()),
             "range.map": lambda: dataset(slices())}
    first, outputs, times = {}, {}, {name: [] for name in calls}
    for name, call in calls.items():
      first[name], outputs[name] = _timed(call)
      _timed(call)
    for _ in range(args.repeats):
      for name, call in calls.items():
        seconds, outputs[name] = _timed(call)
        times[name].append(seconds)
    base = np.median(times["tensors"])
    for name in calls:
      position, iterations, costs, jacobians, stop = (
          v.numpy() for v in outputs[name])
      passes = int(costs) + int(jacobians) + 1
      median = np.median(times[name])
      difference = np.max(np.abs(position - outputs["tensors"][0].numpy()))
      print(f"| {chunk} | {name} | {first[name]:.2f} | {median:.3f} | "
            f"{int(iterations)} | {passes} | {1e3 * median / passes:.1f} | "
            f"{median / base:.2f} | {difference:.1e} | "
            f"{tfg_optim.StopReason(int(stop)).name} |")


if __name__ == "__main__":
  main()
