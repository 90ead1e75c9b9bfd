"""JAX/optimistix peer of benchmarks/tfg_curve_fit.py (run in its own venv).

    python -m venv benchmarks/.venv-jax
    benchmarks/.venv-jax/bin/pip install jax optimistix
    benchmarks/.venv-jax/bin/python benchmarks/_optimistix_curve_fit.py \
        --data /path/to/data.npz --repeats 5

Reads t, y and the starting point from the .npz written by tfg_curve_fit.py,
solves the same curve fit with `optimistix.LevenbergMarquardt` under
`jax.jit` in float64 on the CPU, and prints one JSON object on its last line
of stdout: median seconds per solve after one compiling call, steps taken,
final objective 1/2 ||r||^2 and the parameters found. It imports neither
TensorFlow nor tfg_optim.
"""

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_platforms", "cpu")

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import optimistix as optx  # pylint: disable=g-import-not-at-top

import _harness  # pylint: disable=g-import-not-at-top,g-bad-import-order


def main():
  args = _harness.peer_parser(__doc__, repeats=5, max_steps=30,
                              tolerance=1e-8).parse_args()

  data = np.load(args.data)
  t = jnp.asarray(data["t"], jnp.float64)
  y = jnp.asarray(data["y"], jnp.float64)
  start = jnp.asarray(data["start"], jnp.float64)

  def residual(p, unused_args):
    return p[0] * jnp.exp(-p[1] * t) + p[2] * jnp.sin(3.0 * p[3] * t) - y

  solver = optx.LevenbergMarquardt(rtol=args.rtol, atol=args.atol)

  @jax.jit
  def solve(p0):
    # throw=False: reaching max_steps is not an error for a benchmark.
    solution = optx.least_squares(residual, solver, p0,
                                  max_steps=args.max_steps, throw=False)
    r = residual(solution.value, None)
    return solution.value, 0.5 * jnp.sum(r * r), solution.stats["num_steps"]

  timing = _harness.time_call(lambda: jax.block_until_ready(solve(start)),
                              args.repeats)
  value, objective, steps = timing.output
  _harness.print_peer_result({
      "seconds": timing.seconds,
      "times": timing.times,
      "first_call_seconds": timing.first_call,
      "iterations": int(steps),
      "objective": float(objective),
      "variables": [float(v) for v in np.asarray(value)],
      "jax_version": jax.__version__,
      "optimistix_version": getattr(optx, "__version__", "unknown"),
  })


if __name__ == "__main__":
  main()
