"""JAX/optimistix peer of benchmarks/batched_poses.py (run in its own venv).

    benchmarks/.venv-jax/bin/python benchmarks/_optimistix_poses.py \
        --data poses.npz --out solution.npz --repeats 3

Reads the pose problems (points [B, P, 3], observations [B, P, 2], starts
[B, 6]) written by batched_poses.py, solves all of them with
`jax.jit(jax.vmap(solve))`, `solve` one `optimistix.LevenbergMarquardt` fit,
in float64 on the CPU, writes the solutions and per-problem step counts to
--out and prints one JSON object (timings) on its last line of stdout.
It imports neither TensorFlow nor tfg_optim.
"""

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_platforms", "cpu")

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import optimistix as optx  # pylint: disable=g-import-not-at-top

import _harness  # pylint: disable=g-import-not-at-top,g-bad-import-order


def rotation_matrix(w):
  """expm(hat(w)) with Taylor branches near w = 0 (safe derivatives)."""
  theta2 = jnp.sum(w * w)
  small = theta2 < 1e-8
  safe = jnp.where(small, 1.0, theta2)
  theta = jnp.sqrt(safe)
  a = jnp.where(small, 1.0 - theta2 / 6.0, jnp.sin(theta) / theta)
  b = jnp.where(small, 0.5 - theta2 / 24.0, (1.0 - jnp.cos(theta)) / safe)
  k = jnp.array([[0.0, -w[2], w[1]], [w[2], 0.0, -w[0]], [-w[1], w[0], 0.0]])
  return jnp.eye(3) + a * k + b * (k @ k)


def residual(pose, data):
  points, observed = data
  camera = points @ rotation_matrix(pose[:3]).T + pose[3:]
  return (camera[:, :2] / camera[:, 2:3] - observed).reshape(-1)


def main():
  args = _harness.peer_parser(__doc__, repeats=3, max_steps=100,
                              tolerance=1e-8, out=True).parse_args()

  data = np.load(args.data)
  points = jnp.asarray(data["points"], jnp.float64)
  observed = jnp.asarray(data["observations"], jnp.float64)
  starts = jnp.asarray(data["starts"], jnp.float64)
  solver = optx.LevenbergMarquardt(rtol=args.rtol, atol=args.atol)

  def solve_one(start, p, o):
    solution = optx.least_squares(residual, solver, start, args=(p, o),
                                  max_steps=args.max_steps, throw=False)
    r = residual(solution.value, (p, o))
    return solution.value, 0.5 * jnp.sum(r * r), solution.stats["num_steps"]

  solve = jax.jit(jax.vmap(solve_one))
  timing = _harness.time_call(
      lambda: jax.block_until_ready(solve(starts, points, observed)),
      args.repeats)
  value, cost, steps = timing.output
  np.savez(args.out, position=np.asarray(value), cost=np.asarray(cost),
           iterations=np.asarray(steps))
  _harness.print_peer_result({
      "seconds": timing.seconds, "times": timing.times,
      "first_call_seconds": timing.first_call, "jax_version": jax.__version__,
      "optimistix_version": getattr(optx, "__version__", "unknown")})


if __name__ == "__main__":
  main()
