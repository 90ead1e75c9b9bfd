"""Chunked data at scale: least squares over N residuals, n = 10 parameters.

    PYTHONPATH=. python benchmarks/chunked_data.py [N] [chunk_size]

Fits y = a0 + a1 t + a2 t^2 + a3 t^3 + a4 exp(a5 t) + a6 sin(a7 t)
+ a8 cos(a9 t) to N float32 data points (t, y) (N = 10^8 by default: 800 MB
of data tensors), with `least_squares(..., data=(t, y),
data_chunk_size=K)` inside one `tf.function` (data passed as arguments of
unknown length, so the trace is made once on a tiny N). Each size runs in its
own subprocess and reports its peak RSS (`ru_maxrss`): the chunked solve at N,
and the dense (unchunked) solve at the largest N, halving from N, whose peak
stays under 4 GiB. Prints one table: peak memory, solve time, iterations,
time per iteration, and its ratio to one pass of residual + Jacobian over all
chunks (`ChunkedKind.jacobian_pass`, timed alone).
"""

import json
import sys
import time

import _harness

_LIMIT_GIB = 4.0
_TRUTH = [0.5, -1.0, 0.8, 0.3, 1.2, -0.7, 0.4, 3.0, 0.25, 5.0]
_START = [0.45, -0.9, 0.7, 0.35, 1.1, -0.6, 0.35, 2.9, 0.3, 5.1]


def _model(a, t):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return (a[0] + a[1] * t + a[2] * t * t + a[3] * t * t * t +
          a[4] * tf.exp(a[5] * t) + a[6] * tf.sin(a[7] * t) +
          a[8] * tf.cos(a[9] * t))


def _data(n):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  t = np.empty(n, np.float32)
  y = np.empty(n, np.float32)
  step = 1 << 22
  truth = np.array(_TRUTH)
  for start in range(0, n, step):
    piece = rng.random(min(step, n - start))
    a = truth
    value = (a[0] + a[1] * piece + a[2] * piece ** 2 + a[3] * piece ** 3 +
             a[4] * np.exp(a[5] * piece) + a[6] * np.sin(a[7] * piece) +
             a[8] * np.cos(a[9] * piece))
    t[start:start + len(piece)] = piece
    y[start:start + len(piece)] = value + 0.01 * rng.standard_normal(
        len(piece))
  return t, y


def _child(n, chunk):
  """One solve in this process; prints a JSON line."""
  import resource  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tfg_optim  # pylint: disable=g-import-not-at-top
  from tfg_optim import _chunked  # pylint: disable=g-import-not-at-top
  from tfg_optim import _vector_space  # pylint: disable=g-import-not-at-top

  def residual(*args):
    a, (t, y) = args[:10], args[10:]
    return _model(a, t) - y

  options = dict(geodesic_acceleration=None, max_iterations=20)
  if chunk:
    options["data_chunk_size"] = chunk
  spec = [tf.TensorSpec([None], tf.float32)] * 2

  @tf.function(input_signature=spec)
  def solve(t, y):
    start = [tf.constant(v, tf.float32) for v in _START]
    result = tfg_optim.least_squares(residual, start, data=(t, y), **options)
    return result.num_iterations, result.cost, tf.stack(result.position)

  @tf.function(input_signature=spec)
  def one_pass(t, y):  # residual + Jacobian over all chunks
    kind = _chunked.ChunkedKind(
        lambda p, c: residual(*p, *c),
        lambda p, s: _vector_space.retract(p, s, 0), 10, [t, y],
        chunk or 1 << 30, tf.float32)
    return kind.jacobian_pass([tf.constant(v, tf.float32) for v in _START])

  small_t, small_y = _data(1000)
  solve(small_t, small_y)  # Trace once.
  if chunk:
    one_pass(small_t, small_y)
  t, y = _data(n)
  t, y = tf.constant(t), tf.constant(y)
  begin = time.perf_counter()
  iterations, cost, position = solve(t, y)
  seconds = time.perf_counter() - begin
  pass_seconds = float("nan")
  if chunk:
    begin = time.perf_counter()
    one_pass(t, y).numpy()
    pass_seconds = time.perf_counter() - begin
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # GiB
  print(json.dumps(dict(n=n, chunk=chunk, peak_gib=peak, seconds=seconds,
                        iterations=int(iterations), cost=float(cost),
                        pass_seconds=pass_seconds,
                        error=float(abs(position.numpy() - _TRUTH).max()))))


def _run(n, chunk):
  row, note = _harness.run_peer(sys.executable, __file__,
                                ["--child", n, chunk], what=f"N={n}")
  return dict(n=n, chunk=chunk, failed=note[-300:].replace("\n", " ")) if note else row


def main():
  n = int(float(sys.argv[1])) if len(sys.argv) > 1 else 10 ** 8
  chunk = int(float(sys.argv[2])) if len(sys.argv) > 2 else 1 << 20
  rows = [_run(n, chunk)]
  dense_n = n
  while dense_n >= 1000:
    row = _run(dense_n, 0)
    if "failed" not in row and row["peak_gib"] <= _LIMIT_GIB:
      rows.append(row)
      break
    dense_n //= 2
  table = []
  for row in rows:
    if "failed" in row:
      table.append(("failed", row["n"], row["chunk"], row["failed"]) +
                   ("",) * 6)
      continue
    per = row["seconds"] / max(row["iterations"], 1)
    table.append(("chunked" if row["chunk"] else "dense", f"{row['n']:.3g}",
                  row["chunk"] or "-", f"{row['peak_gib']:.2f}",
                  f"{row['seconds']:.1f}", row["iterations"], f"{per:.2f}",
                  f"{row['pass_seconds']:.2f}",
                  f"{per / row['pass_seconds']:.2f}", f"{row['error']:.1e}"))
  _harness.print_table(
      ("solve", "N", "K", "peak RSS (GiB)", "solve (s)", "iterations",
       "s / iteration", "one pass (s)", "iteration / pass", "max error"),
      table)


if __name__ == "__main__":
  if sys.argv[1:2] == ["--child"]:
    _child(int(sys.argv[2]), int(sys.argv[3]))
  else:
    main()
