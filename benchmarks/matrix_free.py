"""Matrix-free least squares: image denoising by smooth total variation.

    r(x) = [x - y;  mu sqrt((D_h x)^2 + (D_v x)^2 + eps^2)]

over a size x size image x (n = size^2 parameters, m ~ 2n residuals), y a
noisy disc. tfg_optim: `least_squares(..., linear_solver='cg')` (J never
formed; CG / Steihaug steps) inside one `tf.function`. Peer: scipy
`least_squares(method='trf', tr_solver='lsmr', jac_sparsity=...)` (finite
differences with the sparsity's column grouping). Both start from y; the
table reports each solver's final cost (the same formula, in NumPy),
iterations, solve time and, for tfg_optim, the first call (trace + solve)
and the peak resident memory of this process.

    python benchmarks/matrix_free.py --sizes 100 300 --max-iterations 100
    python benchmarks/matrix_free.py --sizes 1000 --skip-scipy
"""

import resource

import numpy as np
import scipy.optimize
import scipy.sparse
import tensorflow as tf

import _harness
import tfg_optim

MU, EPS = 0.5, 0.1


def noisy_disc(size, seed=0):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  clean = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.1).astype(np.float64)
  return clean + 0.1 * rng.standard_normal(clean.shape)


def numpy_residuals(x, y):
  x = x.reshape(y.shape)
  dx = x[:-1, 1:] - x[:-1, :-1]
  dy = x[1:, :-1] - x[:-1, :-1]
  return np.concatenate([(x - y).ravel(),
                         MU * np.sqrt(dx ** 2 + dy ** 2 + EPS ** 2).ravel()])


def cost(x, y):
  return 0.5 * np.sum(numpy_residuals(x, y) ** 2)


def sparsity(size):
  """The Jacobian's pattern: identity, and each TV term touches a pixel, its
  right and its lower neighbour."""
  n = size * size
  index = np.arange(n).reshape(size, size)
  rows = [np.arange(n)]
  cols = [np.arange(n)]
  tv = np.arange((size - 1) ** 2) + n
  for neighbour in (index[:-1, :-1], index[:-1, 1:], index[1:, :-1]):
    rows.append(tv)
    cols.append(neighbour.ravel())
  rows, cols = np.concatenate(rows), np.concatenate(cols)
  return scipy.sparse.csr_matrix((np.ones(rows.size), (rows, cols)),
                                 shape=(n + (size - 1) ** 2, n))


def run_tfg(y, max_iterations, damping):
  target = tf.constant(y)

  def total_variation(x):
    dx = x[:-1, 1:] - x[:-1, :-1]
    dy = x[1:, :-1] - x[:-1, :-1]
    return MU * tf.sqrt(tf.square(dx) + tf.square(dy) + EPS ** 2)

  @tf.function
  def solve(start):
    result = tfg_optim.least_squares(
        [lambda x: x - target, total_variation], start, damping=damping,
        linear_solver="cg", max_iterations=max_iterations)
    return (result.position, result.num_iterations, result.stop_reason)

  timing = _harness.time_call(
      lambda: [v.numpy() for v in solve(target)], 1)
  position, iterations, reason = timing.output
  return (position, int(iterations), tfg_optim.StopReason(int(reason)).name,
          timing.first_call, timing.seconds)


def run_scipy(y, max_iterations):
  timing = _harness.time_call(lambda: scipy.optimize.least_squares(
      numpy_residuals, y.ravel(), args=(y,), method="trf", tr_solver="lsmr",
      jac_sparsity=sparsity(y.shape[0]), max_nfev=max_iterations), 0)
  result = timing.output
  return result.x, int(result.nfev), result.message, timing.first_call


def main():
  parser = _harness.parser(__doc__)
  parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300])
  parser.add_argument("--max-iterations", type=int, default=100)
  parser.add_argument("--damping", default="trust_region")
  parser.add_argument("--skip-scipy", action="store_true")
  args = parser.parse_args()
  rows = []
  for size in args.sizes:
    y = noisy_disc(size)
    x, iterations, reason, first, elapsed = run_tfg(y, args.max_iterations,
                                                    args.damping)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    rows.append((f"{size}x{size}", size * size,
                 f"tfg_optim cg ({args.damping}; peak RSS {peak:.1f} GB)",
                 f"{first:.2f}", f"{elapsed:.2f}", iterations,
                 f"{cost(x, y):.10g}", reason, 1))
    print("  done: " + " | ".join(str(cell) for cell in rows[-1]),
          flush=True)
    if args.skip_scipy:
      continue
    x, evaluations, message, scipy_time = run_scipy(y, args.max_iterations)
    rows.append((f"{size}x{size}", size * size, "scipy trf lsmr", "-",
                 f"{scipy_time:.2f}", f"{evaluations} evaluations",
                 f"{cost(x, y):.10g}", message[:40],
                 f"{scipy_time / elapsed:.2f}"))
    print("  done: " + " | ".join(str(cell) for cell in rows[-1]),
          flush=True)
  _harness.print_table(
      ("image", "n", "solver", "first call s", "solve s", "iterations",
       "final cost", "stop", "time ratio"), rows)


if __name__ == "__main__":
  main()
