"""Benchmark: many small rotation fits and one large rigid-pose fit.

Problems (float64, noisy correspondences y_i = R x_i (+ t) + noise):

* 1,000 independent rotation fits of 20 points each, solved
  (a) with `batch_dims=1`: one call, one damping and stop per problem;
  (b) as one `Power(SpecialOrthogonal(3), count)` problem, whose Jacobian is
      a dense (60 count) x (3 count) matrix: measured for growing counts to
      show why 1,000 copies are impractical that way;
* one rigid-pose fit (Product(SpecialOrthogonal(3), Euclidean(3))) with
  100,000 correspondences.

Accuracy is measured against the closed-form Kabsch solution (SVD). The
baseline is scipy.optimize.least_squares (method "lm", MINPACK) on the
rotation-vector (+ translation) parameterization, a Python loop for the
1,000 fits. The problems and Kabsch: tests/problems.py; the timer:
benchmarks/_harness.py. Reports the median wall time of several solves after
a warm-up (tracing and compilation excluded).

    PYTHONPATH=. python benchmarks/riemannian_rotations.py [--repeats 5]
"""

import os
import statistics

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import scipy.optimize
from scipy.spatial.transform import Rotation
import tensorflow as tf

import _harness
from tests import problems
from tfg_optim import manifolds
from tfg_optim import riemannian

SO3 = manifolds.SpecialOrthogonal(3)
POSE = manifolds.Product(SO3, manifolds.Euclidean(3))
kabsch = problems.kabsch


def rotation_problems(count, num_points, seed=0, noise=0.05):
  return problems.rotation_fits(
      np.random.default_rng(seed), num_points, noise, batch=(count,),
      rotations=Rotation.random(count, random_state=seed).as_matrix())


def timed(function, repeats):
  timing = _harness.time_call(function, repeats)
  return timing.seconds, timing.output


def ours_rotations(x, y, jit, repeats, power=False):
  xt, yt = tf.constant(x), tf.constant(y)
  start = tf.constant(np.tile(np.eye(3), (x.shape[0], 1, 1)))
  manifold = manifolds.Power(SO3, x.shape[0]) if power else SO3

  @tf.function(jit_compile=jit, autograph=False)
  def solve(r):
    results = riemannian.levenberg_marquardt(
        manifold, lambda r: tf.matmul(xt, r, transpose_b=True) - yt, r,
        batch_dims=0 if power else 1, return_state=True)
    return results.position, results.num_iterations, results.converged

  seconds, (position, iterations, converged) = timed(
      lambda: [v.numpy() for v in solve(start)], repeats)
  return seconds, position, iterations, converged


def scipy_rotations(x, y):
  positions, iterations = [], []
  for xb, yb in zip(x, y):
    def residual(w, xb=xb, yb=yb):
      return (xb @ Rotation.from_rotvec(w).as_matrix().T - yb).ravel()
    solution = scipy.optimize.least_squares(residual, np.zeros(3),
                                            method="lm", xtol=1e-12,
                                            ftol=1e-12, gtol=1e-12)
    positions.append(Rotation.from_rotvec(solution.x).as_matrix())
    iterations.append(solution.nfev)
  return np.stack(positions), np.array(iterations)


def pose_problem(num_points, seed=1):
  rng = np.random.default_rng(seed)
  rotation = Rotation.random(random_state=seed).as_matrix()
  return problems.pose_fit(rng, num_points, noise=0.05, rotation=rotation,
                           translation=rng.standard_normal(3))


def ours_pose(x, y, jit, repeats):
  xt, yt = tf.constant(x), tf.constant(y)

  @tf.function(jit_compile=jit, autograph=False)
  def solve(r, t):
    results = riemannian.levenberg_marquardt(
        POSE, lambda p: tf.matmul(xt, p[0], transpose_b=True) + p[1] - yt,
        (r, t), return_state=True)
    return results.position, results.num_iterations

  start = (tf.constant(np.eye(3)), tf.constant(np.zeros(3)))
  seconds, ((r, t), iterations) = timed(
      lambda: tf.nest.map_structure(lambda v: v.numpy(), solve(*start)),
      repeats)
  return seconds, (r, t), iterations


def scipy_pose(x, y):
  def residual(q):
    return (x @ Rotation.from_rotvec(q[:3]).as_matrix().T + q[3:] - y).ravel()
  solution = scipy.optimize.least_squares(residual, np.zeros(6), method="lm",
                                          xtol=1e-12, ftol=1e-12, gtol=1e-12)
  return (Rotation.from_rotvec(solution.x[:3]).as_matrix(),
          solution.x[3:]), solution.nfev


def row(name, seconds, iterations, error):
  print(f"| {name} | {seconds * 1e3:,.1f} | {iterations} | {error:.1e} |")


def main():
  parser = _harness.parser(__doc__, repeats=5)
  parser.add_argument("--count", type=int, default=1000)
  parser.add_argument("--points", type=int, default=100000)
  parser.add_argument("--power-counts", default="25,50,100,200")
  args = parser.parse_args()

  print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores, float64\n")
  print("| solve | median time (ms) | iterations (median / max) | "
        "max abs error vs Kabsch |")
  print("|---|---:|---|---:|")
  x, y = rotation_problems(args.count, 20)
  want = kabsch(x, y)
  for jit in (False, True):
    seconds, position, iterations, converged = ours_rotations(
        x, y, jit, args.repeats)
    assert converged.all()
    row(f"{args.count} rotations, batch_dims=1, "
        f"{'jit_compile' if jit else 'tf.function'}", seconds,
        f"{np.median(iterations):g} / {iterations.max()}",
        np.abs(position - want).max())
  timing = _harness.time_call(lambda: scipy_rotations(x, y), 0)
  seconds, (position, evaluations) = timing.first_call, timing.output
  row(f"{args.count} rotations, scipy least_squares loop", seconds,
      f"{np.median(evaluations):g} / {evaluations.max()} (residual evals)",
      np.abs(position - want).max())

  for count in [int(c) for c in args.power_counts.split(",") if c]:
    xs, ys = x[:count], y[:count]
    seconds, position, iterations, _ = ours_rotations(
        xs, ys, False, max(1, args.repeats // 2), power=True)
    row(f"Power(SO(3), {count}) as one problem ({60 * count} x {3 * count} "
        "Jacobian), tf.function", seconds, f"{int(iterations)}",
        np.abs(position - want[:count]).max())

  x, y, (r_want, t_want) = pose_problem(args.points)
  for jit in (False, True):
    seconds, (r, t), iterations = ours_pose(x, y, jit, args.repeats)
    error = max(np.abs(r - r_want).max(), np.abs(t - t_want).max())
    row(f"pose, {args.points:,} points, "
        f"{'jit_compile' if jit else 'tf.function'}", seconds,
        f"{int(iterations)}", error)
  timing = _harness.time_call(lambda: scipy_pose(x, y), args.repeats - 1)
  (r, t), evaluations = timing.output
  error = max(np.abs(r - r_want).max(), np.abs(t - t_want).max())
  row(f"pose, {args.points:,} points, scipy least_squares",
      statistics.median(timing.times + [timing.first_call]),
      f"{evaluations} (residual evals)", error)


if __name__ == "__main__":
  main()
