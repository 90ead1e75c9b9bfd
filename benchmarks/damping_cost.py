"""Time per iteration of least_squares' damping policies as n grows.

The trust region (the default) finds lambda of each step either by a few
Cholesky factorizations (`TrustRegionDamping(method='cholesky')`, the
float64 default: Moré's secular-equation solve, MINPACK's `lmpar`) or from one n x n
eigendecomposition (`method='eigh'`); Nielsen's damping factors once by
Cholesky. Problem: r(x) = A tanh(x) - b with A a fixed random [2n, n] matrix
(seed 0), from x = 0, float64, exactly 20 iterations (all
tolerances 0), geodesic acceleration off so that only the damping differs.
The three policies are timed side by side in one run, in tf.function and
with jit_compile=True: steady time per iteration (median over --repeats
interleaved rounds after a warm-up call; each round calls every policy once)
and the first call (trace, graph optimization or XLA compilation, and one
solve). Run from the repository root:

    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/damping_cost.py \
        [--sizes 3 10 50 200 1000]

n > 200 runs 5 iterations instead of 20. The eigendecomposition under
jit_compile at n = 1000 prints "-" (not run: XLA's CPU eigendecomposition
took 0.65 s per iteration at n = 400); n = 1000 runs 2 rounds.
"""

import numpy as np
import tensorflow as tf

import _harness
import tfg_optim

POLICIES = {
    "trust_region cholesky": lambda: tfg_optim.TrustRegionDamping(),
    "trust_region eigh": lambda: tfg_optim.TrustRegionDamping(method="eigh"),
    "nielsen": lambda: "nielsen",
}


def _iterations(n):
  return 20 if n <= 200 else 5


def _solver(n, damping, jit):
  rng = np.random.default_rng(0)
  matrix = tf.constant(rng.standard_normal((2 * n, n)) / np.sqrt(n))
  target = tf.constant(rng.standard_normal(2 * n))
  residual = lambda x: tf.linalg.matvec(matrix, tf.tanh(x)) - target

  @tf.function(jit_compile=jit)
  def run(x0):
    result = tfg_optim.least_squares(
        residual, x0, damping=damping, max_iterations=_iterations(n),
        function_tolerance=0.0, gradient_tolerance=0.0,
        parameter_tolerance=0.0, geodesic_acceleration=None)
    return result.num_iterations

  start = tf.zeros(n, tf.float64)
  return lambda: int(run(start))


def main():
  parser = _harness.parser(__doc__, repeats=7)
  parser.add_argument("--sizes", type=int, nargs="*",
                      default=[3, 10, 50, 200, 1000])
  args = parser.parse_args()
  names = list(POLICIES)

  def show(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"

  rows = []
  for n in args.sizes:
    for jit in (False, True):
      solvers = {name: _solver(n, POLICIES[name](), jit) for name in names
                 # not run, see above
                 if not (jit and name.endswith("eigh") and n >= 1000)}
      # Interleaved: each round calls every policy once, so that a change
      # of the machine's load falls on all of them alike.
      timings = _harness.interleave(solvers,
                                    args.repeats if n <= 200 else 2)
      per_iteration = {name: None for name in names}
      first_call = dict(per_iteration)
      for name, timing in timings.items():
        per_iteration[name] = timing.seconds / timing.output * 1e3
        first_call[name] = timing.first_call

      def ratio(a, b):
        a, b = per_iteration[a], per_iteration[b]
        return None if a is None or b is None else a / b
      rows.append([n, "jit_compile" if jit else "tf.function"] +
                  [show(per_iteration[name]) for name in names] +
                  [show(ratio(names[1], names[0])),
                   show(ratio(names[0], names[2])),
                   ", ".join(show(first_call[name], 1) for name in names)])
      print("  done: " + " | ".join(str(cell) for cell in rows[-1]),
            flush=True)
  _harness.print_table(
      ["n", "mode"] + [f"{name} ms/iteration" for name in names] +
      ["eigh / cholesky", "cholesky / nielsen",
       "first call s: " + ", ".join(names)], rows)


if __name__ == "__main__":
  main()
