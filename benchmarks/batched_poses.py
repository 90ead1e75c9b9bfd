"""Batched benchmark: 10,000 independent camera-pose fits in one call.

The problem (issue 6): B = 10,000 poses, each 6 parameters (rotation vector
w, translation t), fitted to 25 2-D pinhole projections u = pi(R(w) X + t)
(pi(x) = x[:2] / x[2]), i.e. 50 residuals per problem, float64, CPU. Points X
are uniform in [-1, 1]^3, the true rotation vectors have angle up to 0.5 rad,
true translations put the points 4-6 units in front of the camera, the
observations have Gaussian noise of sigma 1e-3, and each fit starts from the
truth perturbed by N(0, 0.1^2) per parameter (seed 0).

Peers:
  batched    one `tfg_optim.least_squares(..., batch_dims=1)` call on all B
             problems, in tf.function and in tf.function(jit_compile=True).
  loop       a Python loop of single-problem `least_squares` calls (one traced
             tf.function, fed each problem's data); only --loop-subset problems
             are timed and the time is extrapolated linearly to B (the table
             says so).
  optimistix `jax.jit(jax.vmap(...))` of `optimistix.LevenbergMarquardt`
             (rtol = atol = 1e-8, at most 100 steps), run by
             benchmarks/_optimistix_poses.py in benchmarks/.venv-jax:

                 python -m venv benchmarks/.venv-jax
                 benchmarks/.venv-jax/bin/pip install jax optimistix

             (skipped with a note when that interpreter cannot import
             optimistix; --jax-python points to another one).

Our solver runs with function_tolerance = gradient_tolerance = 1e-10 and
parameter_tolerance = 1e-8, at most 100 iterations. Each timing is the median
of --repeats calls after one warm-up (tracing / compilation) call, each call
returning NumPy values. "error" is max over problems of max(|w - w_true|,
|t - t_true|) (noise makes it nonzero); "ratio" is the peer's time over the
batched tf.function time.

Usage (from the repository root):

    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/batched_poses.py
    ... --batch 1000 --loop-subset 20 --repeats 1   # a quick run
"""

import os
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf

import _harness
import tfg_optim
from tfg_optim import manifolds

NUM_POINTS = 25
# Plain Levenberg-Marquardt steps with Nielsen's damping, like optimistix's
# and as docs/batched.md was measured: least_squares' later defaults (trust
# region, geodesic acceleration) are off.
TOLERANCES = dict(function_tolerance=1e-10, gradient_tolerance=1e-10,
                  parameter_tolerance=1e-8, max_iterations=100,
                  damping="nielsen", geodesic_acceleration=None)


def make_problems(batch, seed=0):
  rng = np.random.default_rng(seed)
  points = rng.uniform(-1.0, 1.0, (batch, NUM_POINTS, 3))
  axis = rng.standard_normal((batch, 3))
  axis /= np.linalg.norm(axis, axis=-1, keepdims=True)
  rotation = axis * rng.uniform(0.0, 0.5, (batch, 1))
  translation = np.concatenate([rng.uniform(-0.5, 0.5, (batch, 2)),
                                rng.uniform(4.0, 6.0, (batch, 1))], -1)
  truth = np.concatenate([rotation, translation], -1)
  camera = np.einsum("bij,bpj->bpi", _rotation_numpy(rotation), points)
  camera += translation[:, None, :]
  observations = camera[..., :2] / camera[..., 2:3]
  observations += 1e-3 * rng.standard_normal(observations.shape)
  starts = truth + 0.1 * rng.standard_normal(truth.shape)
  return points, observations, starts, truth


def _rotation_numpy(w):
  return np.asarray(manifolds.rodrigues(tf.constant(w)))


def pose_residual(points, observations):
  """The residual of poses [B..., 6] (batch dims those of `points`)."""
  def residual(pose):
    rotation = manifolds.rodrigues(pose[..., :3])
    camera = tf.linalg.matmul(points, rotation, transpose_b=True)
    camera += pose[..., tf.newaxis, 3:]
    return camera[..., :2] / camera[..., 2:3] - observations
  return residual


def solve(points, observations, starts, batch_dims):
  result = tfg_optim.least_squares(
      pose_residual(points, observations), starts, batch_dims=batch_dims,
      **TOLERANCES)
  return result.position, result.num_iterations, result.converged


def _timed(function, args, repeats):
  timing = _harness.time_call(lambda: tf.nest.map_structure(
      lambda t: t.numpy(), function(*args)), repeats)
  return timing.seconds, timing.output


def _error(position, truth):
  return float(np.max(np.abs(position - truth)))


def run_optimistix(python, points, observations, starts, repeats):
  with tempfile.TemporaryDirectory() as directory:
    data = os.path.join(directory, "poses.npz")
    out = os.path.join(directory, "solution.npz")
    np.savez(data, points=points, observations=observations, starts=starts)
    timing, note = _harness.run_peer(
        python, "_optimistix_poses.py",
        ["--data", data, "--out", out, "--repeats", repeats],
        what="optimistix")
    if note:
      raise RuntimeError(note)
    solution = dict(np.load(out))
  return timing, solution


def main():
  parser = _harness.parser(__doc__, repeats=3, json_output=True)
  parser.add_argument("--batch", type=int, default=10000)
  parser.add_argument("--loop-subset", type=int, default=100)
  parser.add_argument("--jax-python", default=_harness.DEFAULT_JAX_PYTHON)
  args = parser.parse_args()

  points, observations, starts, truth = make_problems(args.batch)
  rows = []
  spec = [tf.TensorSpec([args.batch, NUM_POINTS, 3], tf.float64),
          tf.TensorSpec([args.batch, NUM_POINTS, 2], tf.float64),
          tf.TensorSpec([args.batch, 6], tf.float64)]
  inputs = [tf.constant(v) for v in (points, observations, starts)]
  for mode, jit in (("tf.function", False), ("jit_compile", True)):
    function = tf.function(lambda p, o, s: solve(p, o, s, 1),
                           input_signature=spec, jit_compile=jit,
                           autograph=False)
    seconds, (position, iterations, converged) = _timed(
        function, inputs, args.repeats)
    rows.append(dict(peer="tfg_optim batched", mode=mode, seconds=seconds,
                     iterations=iterations, converged=int(converged.sum()),
                     error=_error(position, truth)))

  single = tf.function(
      lambda p, o, s: solve(p, o, s, 0), autograph=False,
      input_signature=[tf.TensorSpec(s.shape[1:], tf.float64) for s in spec])
  subset = min(args.loop_subset, args.batch)
  single(inputs[0][0], inputs[1][0], inputs[2][0])  # trace once
  begin = time.perf_counter()
  outputs = []
  for i in range(subset):
    outputs.append(tf.nest.map_structure(
        lambda t: t.numpy(), single(points[i], observations[i], starts[i])))
  elapsed = time.perf_counter() - begin
  position = np.stack([o[0] for o in outputs])
  rows.append(dict(
      peer="tfg_optim Python loop",
      mode=f"tf.function, {subset} solves x {args.batch / subset:g}",
      seconds=elapsed * args.batch / subset,
      iterations=np.array([o[1] for o in outputs]),
      converged=int(sum(o[2] for o in outputs)),
      error=_error(position, truth[:subset]), extrapolated=True))

  note = None
  if os.path.exists(args.jax_python):
    try:
      timing, solution = run_optimistix(args.jax_python, points, observations,
                                        starts, args.repeats)
      rows.append(dict(
          peer="optimistix LM",
          mode=f"jax.jit(jax.vmap) {timing['jax_version']}/"
               f"{timing['optimistix_version']}",
          seconds=timing["seconds"], iterations=solution["iterations"],
          converged=None, error=_error(solution["position"], truth)))
    except (RuntimeError, ValueError) as error:
      note = f"optimistix failed: {error}"
  else:
    note = f"optimistix skipped: {args.jax_python} not found"

  base = rows[0]["seconds"]
  print(f"{args.batch} pose fits (6 parameters, 50 residuals each), float64, "
        f"CPU ({os.cpu_count()} cores), median of {args.repeats}")
  table = []
  for row in rows:
    iterations = np.asarray(row["iterations"])
    star = "*" if row.get("extrapolated") else ""
    table.append((row["peer"], row["mode"], f"{row['seconds']:.3f}{star}",
                  f"{np.median(iterations):g} / {iterations.max():d}",
                  f"{row['error']:.2e}",
                  f"{row['seconds'] / base:.2f}x"))
  _harness.print_table(("peer", "mode", "time (s)", "iterations median/max",
                        "max error", "ratio"), table)
  print("* extrapolated linearly from the timed subset")
  if note:
    print(note)
  _harness.write_json(args.json, [
      {k: (v.tolist() if isinstance(v, np.ndarray) else v)
       for k, v in row.items()} for row in rows])
  return 0


if __name__ == "__main__":
  sys.exit(main())
