"""The first call of a chunked solve in a `tf.function` under a persistent
`tf.GradientTape`, against a plain tape, side by side.

    PYTHONPATH=. python benchmarks/persistent_tape_first_call.py [--points N]
        [--chunk K] [--watch data|variable]

The fit a exp(b t) - y (2 parameters, N float64 points, chunks of K rows)
scaled by a captured factor, in a `tf.function` that opens the tape,
solves and returns the gradient of a + 2 b + 3 cost with respect to the
data (t, y) (and to the factor with `--watch variable`, where it is a
`tf.Variable`: the tape watches it once the residual reads it; else it is
a constant). Under a persistent tape TensorFlow differentiates, while
tracing, every control-flow op whose inputs the tape watches
(`cflow_gradient_wrapper` functions); the chunked passes see the data
stopped, so `--watch data` should cost about a plain tape's first call,
while a watched captured variable still reaches the loop's `tf.cond`s.
Each configuration runs in its own process (a fresh trace); prints the
first call's wall time, the number of `cflow_gradient_wrapper` functions
in the traced graph, and the largest difference of the gradients from the
plain tape's.
"""

import argparse
import json
import subprocess
import sys
import time


def child(points, chunk, watch, persistent):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tfg_optim  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  t_np = np.linspace(-1.0, 1.0, points)
  y_np = 2.0 * np.exp(-1.3 * t_np) + 0.05 * rng.standard_normal(points)
  t, y = tf.constant(t_np), tf.constant(y_np)
  scale = (tf.Variable(1.0, dtype=tf.float64) if watch == "variable" else
           tf.constant(1.0, tf.float64))

  @tf.function
  def gradients(t, y):
    with tf.GradientTape(persistent=persistent) as tape:
      tape.watch([t, y])
      result = tfg_optim.least_squares(
          lambda a, b, t, y: scale * (a * tf.exp(b * t) - y),
          [tf.constant(1.0, tf.float64), tf.constant(0.0, tf.float64)],
          data=[t, y], data_chunk_size=chunk, geodesic_acceleration=None)
      loss = result.position[0] + 2.0 * result.position[1] + 3.0 * result.cost
    sources = [t, y] + ([scale] if watch == "variable" else [])
    return tape.gradient(loss, sources)

  start = time.perf_counter()
  values = gradients(t, y)
  seconds = time.perf_counter() - start
  library = gradients.get_concrete_function(t, y).graph.as_graph_def().library
  wrappers = sum("cflow_gradient_wrapper" in f.signature.name
                 for f in library.function)
  print(json.dumps(dict(seconds=seconds, wrappers=wrappers,
                        values=[np.asarray(v).ravel().tolist()
                                for v in values])))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--points", type=int, default=200)
  parser.add_argument("--chunk", type=int, default=64)
  parser.add_argument("--watch", choices=("data", "variable"), default="data")
  parser.add_argument("--child", choices=("plain", "persistent"))
  args = parser.parse_args()
  if args.child:
    child(args.points, args.chunk, args.watch, args.child == "persistent")
    return
  rows = {}
  for tape in ("plain", "persistent"):
    output = subprocess.run(
        [sys.executable, __file__, "--points", str(args.points), "--chunk",
         str(args.chunk), "--watch", args.watch, "--child", tape],
        capture_output=True, text=True, check=True).stdout
    rows[tape] = json.loads(output.strip().splitlines()[-1])
  import numpy as np  # pylint: disable=g-import-not-at-top
  print(f"N = {args.points}, chunks of {args.chunk}, watched: {args.watch}")
  print(f"{'tape':<12}{'first call (s)':>16}{'cflow wrappers':>16}"
        f"{'max |grad - plain|':>20}")
  for tape, row in rows.items():
    difference = max(float(np.max(np.abs(np.subtract(a, b)))) for a, b in
                     zip(row["values"], rows["plain"]["values"]))
    print(f"{tape:<12}{row['seconds']:>16.1f}{row['wrappers']:>16d}"
          f"{difference:>20.2g}")
  print(f"ratio persistent / plain: "
        f"{rows['persistent']['seconds'] / rows['plain']['seconds']:.1f}")


if __name__ == "__main__":
  main()
