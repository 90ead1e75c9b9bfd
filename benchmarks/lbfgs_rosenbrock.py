"""Extended Rosenbrock, n = 1,000: tfg_optim L-BFGS vs TFP vs scipy.

    f(x) = sum_{i<n} 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2,

from the standard start (-1.2, 1, -1.2, 1, ...), history 10, float64, until
||grad||_inf < 1e-8. Peers, side by side in one run:

- ours, `tfg_optim.lbfgs.minimize_lbfgs`, in `tf.function` and with
  `jit_compile=True`, with the identity H_0 (Paddle's default) and with
  `scale_initial_hessian=True`;
- TensorFlow Probability `tfp.optimizer.lbfgs_minimize` in the same two
  modes (skipped when not installed; install it with
  `pip install tensorflow-probability tf-keras`);
- scipy `minimize(method='L-BFGS-B')` (skipped when scipy is missing).

Prints one table: peer, mode/options, median time per solve (after a warm-up
call that traces and compiles), iterations, evaluations, final objective and
the time ratio to ours in the same mode (scaled H_0). The solvers run side
by side in interleaved rounds (benchmarks/_harness.py); the function and its
start: tests/problems.py. Run:

    PYTHONPATH=. python benchmarks/lbfgs_rosenbrock.py [--n 1000] [--repeats 3]
"""

import numpy as np
import tensorflow as tf

import _harness
from tests import problems
from tfg_optim import lbfgs

HISTORY = 10
TOLERANCE = 1e-8
MAX_ITERS = 20000
rosenbrock = problems.rosenbrock


def ours(scale, jit):
  @tf.function(jit_compile=jit, autograph=False)
  def solve(x0):
    r = lbfgs.minimize_lbfgs(
        rosenbrock, x0, history_size=HISTORY, max_iters=MAX_ITERS,
        tolerance_grad=TOLERANCE, tolerance_change=0.0, dtype="float64",
        scale_initial_hessian=scale, return_results=True)
    return (r.is_converge, r.num_iterations, r.num_func_calls,
            r.objective_value)
  return solve


def tfp_peer(jit):
  import tensorflow_probability as tfp  # pylint: disable=g-import-not-at-top

  def value_and_gradient(x):
    return tfp.math.value_and_gradient(rosenbrock, x)

  @tf.function(jit_compile=jit, autograph=False)
  def solve(x0):
    r = tfp.optimizer.lbfgs_minimize(
        value_and_gradient, x0, num_correction_pairs=HISTORY,
        tolerance=TOLERANCE, max_iterations=MAX_ITERS)
    return r.converged, r.num_iterations, r.num_objective_evaluations, \
        r.objective_value
  return solve


def scipy_peer():
  from scipy import optimize  # pylint: disable=g-import-not-at-top

  def solve(x0):
    r = optimize.minimize(
        problems.rosenbrock_value_and_gradient_numpy, x0.numpy(), jac=True,
        method="L-BFGS-B",
        options=dict(maxcor=HISTORY, gtol=TOLERANCE, ftol=0.0,
                     maxiter=MAX_ITERS, maxfun=10 * MAX_ITERS))
    return r.success, r.nit, r.nfev, r.fun
  return solve


def main():
  parser = _harness.parser(__doc__, repeats=3)
  parser.add_argument("--n", type=int, default=1000)
  args = parser.parse_args()
  x0 = tf.constant(problems.rosenbrock_start(args.n), tf.float64)

  peers = []
  for jit in (False, True):
    mode = "jit_compile" if jit else "tf.function"
    peers.append(("ours", mode, "identity H0", ours(False, jit)))
    peers.append(("ours", mode, "gamma scaling", ours(True, jit)))
  try:
    import tensorflow_probability  # pylint: disable=g-import-not-at-top,unused-import
    for jit in (False, True):
      mode = "jit_compile" if jit else "tf.function"
      peers.append(("tfp lbfgs_minimize", mode, "", tfp_peer(jit)))
  except ImportError:
    print("tensorflow-probability not installed: skipped "
          "(pip install tensorflow-probability tf-keras)")
  try:
    peers.append(("scipy L-BFGS-B", "numpy", "", scipy_peer()))
  except ImportError:
    print("scipy not installed: skipped")

  calls = {(peer, mode, options): (
      lambda solve=solve: [np.asarray(v) for v in solve(x0)])
           for peer, mode, options, solve in peers}
  timings = _harness.interleave(calls, args.repeats)
  rows = []
  for (peer, mode, options), timing in timings.items():
    converged, its, evals, value = timing.output
    rows.append((peer, mode, options, timing.seconds, int(its), int(evals),
                 float(value), bool(converged)))
  reference = {mode: seconds for peer, mode, options, seconds, *_ in rows
               if peer == "ours" and options == "gamma scaling"}

  print(f"\nExtended Rosenbrock n={args.n}, history {HISTORY}, float64, "
        f"||g||_inf < {TOLERANCE:g}; median of {args.repeats} solves "
        "(interleaved rounds)\n")
  table = []
  for peer, mode, options, seconds, its, evals, value, converged in rows:
    ours_time = reference.get(mode, reference.get("jit_compile"))
    label = f"{mode}, {options}" if options else mode
    table.append((peer, label, f"{seconds:.3f}", its, evals,
                  f"{evals / max(its, 1):.2f}", f"{value:.3e}", converged,
                  f"{seconds / ours_time:.2f}"))
  _harness.print_table(
      ("peer", "mode / options", "time / solve (s)", "iterations",
       "evaluations", "evals/it", "final objective", "converged",
       "time / ours"), table)
  print("\ntime / ours: time divided by ours with gamma scaling in the same "
        "mode (scipy: divided by ours with jit_compile).")


if __name__ == "__main__":
  main()
