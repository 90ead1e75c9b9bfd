"""JAX/optimistix peer of benchmarks/implicit_gradients.py (its own venv).

    python -m venv benchmarks/.venv-jax
    benchmarks/.venv-jax/bin/pip install jax optimistix lineax
    benchmarks/.venv-jax/bin/python benchmarks/_optimistix_implicit.py \
        --data in.npz --out out.npz --repeats 50

Reads t, y and the start from the .npz written by implicit_gradients.py and
solves the same curve fit, y ~ p0 exp(-p1 t) + p2 sin(3 p3 t), with
`optimistix.LevenbergMarquardt` under `jax.jit`, float64, CPU. Forward: the
solve; forward + backward: `jax.grad` of sum(solution) w.r.t. y through
`optimistix.least_squares(..., adjoint=optimistix.ImplicitAdjoint())` (the
implicit function theorem on the gradient of 1/2 ||r||^2: the exact
Hessian, solved by lineax's default solver). Each round times both back to
back after one compiling call each. Writes the solution and the gradient to
--out and prints one JSON object on its last line of stdout. Imports neither
TensorFlow nor tfg_optim.
"""

import statistics
import time

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_platforms", "cpu")

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import lineax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import optimistix as optx  # pylint: disable=g-import-not-at-top

import _harness  # pylint: disable=g-import-not-at-top,g-bad-import-order


def main():
  args = _harness.peer_parser(__doc__, repeats=50, max_steps=100,
                              tolerance=1e-10, out=True).parse_args()

  data = np.load(args.data)
  t = jnp.asarray(data["t"], jnp.float64)
  y = jnp.asarray(data["y"], jnp.float64)
  start = jnp.asarray(data["start"], jnp.float64)

  def residual(p, y):
    return p[0] * jnp.exp(-p[1] * t) + p[2] * jnp.sin(3.0 * p[3] * t) - y

  solver = optx.LevenbergMarquardt(rtol=args.rtol, atol=args.atol)

  def solution(y):
    return optx.least_squares(residual, solver, start, args=y,
                              max_steps=args.max_steps, throw=False,
                              adjoint=optx.ImplicitAdjoint())

  @jax.jit
  def forward(y):
    found = solution(y)
    return found.value, found.stats["num_steps"]

  backward = jax.jit(jax.grad(lambda y: jnp.sum(solution(y).value)))

  def timed(function):
    begin = time.perf_counter()
    out = jax.block_until_ready(function(y))
    return time.perf_counter() - begin, out

  first_forward, (value, steps) = timed(forward)
  first_gradient, gradient = timed(backward)
  forwards, gradients = [], []
  for _ in range(args.repeats):
    forwards.append(timed(forward)[0])
    gradients.append(timed(backward)[0])
  differences = [g - f for g, f in zip(gradients, forwards)]
  middle = statistics.median(differences)
  np.savez(args.out, position=np.asarray(value), gradient=np.asarray(gradient))
  _harness.print_peer_result({
      "forward": statistics.median(forwards),
      "implicit": statistics.median(gradients),
      "implicit_backward": middle,
      "implicit_noise": statistics.median(abs(d - middle)
                                          for d in differences),
      "forward_first": first_forward, "implicit_first": first_gradient,
      "iterations": int(steps),
      "jax_version": jax.__version__,
      "optimistix_version": getattr(optx, "__version__", "unknown"),
      "lineax_version": getattr(lineax, "__version__", "unknown"),
  })


if __name__ == "__main__":
  main()
