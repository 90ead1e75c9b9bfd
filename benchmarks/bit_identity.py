"""Hashes of solver outputs, to check that a refactor left the numbers bit
for bit unchanged.

    PYTHONPATH=<old tree> python benchmarks/bit_identity.py > old.txt
    PYTHONPATH=<new tree> python benchmarks/bit_identity.py > new.txt
    diff old.txt new.txt && echo IDENTICAL

42 solves: curve fit and Rosenbrock under every damping with and without
geodesic acceleration, bounds, a Cauchy loss, a batch, an underdetermined
problem (m < n), eagerly and in `tf.function`, plus a Riemannian rotation
fit and TensorFlow Graphics' `minimize`. Each line is a case and the first
10 hex digits of the SHA-1 of its outputs' bytes. (The engine's
linearization refactor and the chunked-data change were checked with it.)
"""

import hashlib

import numpy as np
import tensorflow as tf

import tfg_optim
from tfg_optim import levenberg_marquardt
from tfg_optim import manifolds

_T = np.linspace(0.0, 1.0, 50)
_Y = 2.0 * np.exp(-1.3 * _T) + 0.01 * np.sin(40.0 * _T)


def curve(a, b):
  return a * tf.exp(b * _T) - _Y


def rosenbrock(x):
  return tf.stack([10.0 * (x[..., 1] - x[..., 0] ** 2), 1.0 - x[..., 0]], -1)


def wide(x):  # m = 2 < n = 3
  return tf.stack([tf.reduce_sum(x ** 2) - 1.0, x[0] - x[2]])


def _f64(*values):
  return [tf.constant(v, tf.float64) for v in values]


def cases():
  for damping in ("trust_region", "nielsen", "tfg", "manopt"):
    for acceleration in (2.0, None):
      yield "curve", damping, acceleration, {}
      yield "rosen", damping, acceleration, {}
  yield "rosen", "trust_region", 2.0, {"bounds": (-1.5, 1.8)}
  yield "rosen", "nielsen", 2.0, {"loss": "cauchy"}
  yield "batch", "trust_region", 2.0, {"batch_dims": 1}
  yield "wide", "nielsen", None, {}


def solve(name, damping, acceleration, options):
  options = dict(options, damping=damping,
                 geodesic_acceleration=acceleration)
  if name == "curve":
    result = tfg_optim.least_squares(curve, _f64(1.0, 0.0), **options)
  elif name == "rosen":
    result = tfg_optim.least_squares(
        rosenbrock, tf.constant([-1.2, 1.0], tf.float64), **options)
  elif name == "batch":
    result = tfg_optim.least_squares(
        rosenbrock, tf.constant([[-1.2, 1.0], [2.0, 2.0], [0.5, -1.0]],
                                tf.float64), **options)
  else:
    result = tfg_optim.least_squares(
        wide, tf.constant([1.0, 2.0, 3.0], tf.float64), **options)
  return tf.nest.flatten(result.position) + [
      result.cost, result.num_iterations, result.stop_reason]


def digest(values):
  return hashlib.sha1(b"".join(
      np.asarray(v).tobytes() for v in values)).hexdigest()[:10]


def main():
  lines = []
  for mode in ("eager", "function"):
    for name, damping, acceleration, options in cases():
      run = lambda: solve(name, damping, acceleration, options)
      values = run() if mode == "eager" else tf.function(run)()
      lines.append(f"{mode} {name} {damping} {acceleration} {options} "
                   f"{digest(values)}")
  points = tf.constant(np.eye(3) * [1.0, 2.0, 3.0])
  target = tf.constant(np.diag([1.0, 2.0, 3.0])[::-1].copy())
  rotation = tfg_optim.riemannian.levenberg_marquardt(
      manifolds.SpecialOrthogonal(3),
      lambda r: tf.reshape(tf.matmul(r, points) - target, [-1]),
      tf.eye(3, dtype=tf.float64))
  lines.append(f"riemannian {digest([rotation])}")
  reference = levenberg_marquardt.minimize(curve, _f64(1.0, 0.0), 20)
  lines.append(f"tfg {digest(tf.nest.flatten(reference))}")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
