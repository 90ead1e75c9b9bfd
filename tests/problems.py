"""Test problems shared by the tests and the benchmarks, with their truth.

Each problem is its residual function (TensorFlow, batched over leading axes
where the tests batch it; a NumPy twin where a peer or a hand-written
reference needs one), its start(s) and, where one exists, its solution from an
independent source: a closed form (Kabsch by SVD), the known minimum, or
NIST's certified values.

  Rosenbrock    r(v) = [1 - v0, 10 (v1 - v0^2)], from (-1.2, 1), minimum
                (1, 1) with r = 0 (`rosenbrock_residuals`); the scalar
                extended form f(x) = sum_i b (x_{i+1} - x_i^2)^2 + (a - x_i)^2
                for L-BFGS (`rosenbrock`), minimum x = (a, a^2, ...) for n = 2
                and x = 1 for a = 1.
  curve fit     y = p0 exp(-p1 t) + p2 sin(3 p3 t), m = 10,000 samples of
                t in [0, 4], the problem of TensorFlow Graphics' comparison
                (`curve_fit_*`, benchmarks/tfg_curve_fit.py).
  Kabsch        y_i = R x_i (+ t) + noise; the rotation (and translation)
                minimizing sum ||R x_i (+ t) - y_i||^2 in closed form by SVD
                (`kabsch`, `rotation_fits`, `pose_fit`).
  pose graphs   the g2o benchmark graphs (MIT, CSAIL, intel, ...) in
                ../shared/data/posegraph, read as a factor-graph problem
                (`pose_graph_problem`).
  NIST StRD     the 27 nonlinear regression datasets and their certified
                values: `tests/nist.py` is their one home (a parser and 27
                models written once for TensorFlow and NumPy), re-exported
                here as `problems.nist`.

Where this module lives, and why: in `tests/`, not in the package. The
problems are test fixtures, not an API users should depend on, and the NIST
files they read live in `tests/data` (a package module would have to ship
them). The benchmarks run from the repository root, where `tests` is a
package (`PYTHONPATH=.`, which `benchmarks/_harness.py` also provides when
it is missing), so both import it as `from tests import problems`.

Data are NumPy float64 arrays; cast them (`.astype(dtype)`) for float32 runs.
"""

import os

import numpy as np
import tensorflow as tf

from tests import nist  # pylint: disable=unused-import (re-exported)

# -- Rosenbrock ----------------------------------------------------------------

ROSENBROCK_START = np.array([-1.2, 1.0])
ROSENBROCK_SOLUTION = np.array([1.0, 1.0])


def rosenbrock_residuals(v, lib=None):
  """r(v) = [1 - v0, 10 (v1 - v0^2)]; v [..., 2] -> [..., 2].

  1/2 ||r||^2 is (half) the Rosenbrock function with a = 1, b = 100; its
  minimum is v = (1, 1) with r = 0.

  Args:
    v: the point, a tensor or a NumPy array [..., 2].
    lib: `tf` or `np`; default: `np` for a NumPy array, `tf` otherwise.

  Returns:
    The residuals [..., 2], of `lib`'s kind.
  """
  if lib is None:
    lib = np if isinstance(v, np.ndarray) else tf
  return lib.stack([1.0 - v[..., 0], 10.0 * (v[..., 1] - v[..., 0] ** 2)], -1)


def rosenbrock_jacobian(v):
  """d r / d v of `rosenbrock_residuals` (NumPy), [[-1, 0], [-20 v0, 10]]."""
  return np.array([[-1.0, 0.0], [-20.0 * v[0], 10.0]])


def rosenbrock(x, a=1.0, b=100.0):
  """f(x) = sum_i b (x_{i+1} - x_i^2)^2 + (a - x_i)^2 over the last axis.

  The extended Rosenbrock function (a scalar per problem, for L-BFGS);
  x [..., n] -> [...]. Minimum 0 at x = (a, a^2) for n = 2, at x = 1 for
  a = 1 and any n.
  """
  return tf.reduce_sum(b * (x[..., 1:] - x[..., :-1] ** 2) ** 2 +
                       (a - x[..., :-1]) ** 2, axis=-1)


def rosenbrock_value_and_gradient_numpy(x):
  """`rosenbrock(x)` (a = 1, b = 100, x [n]) and its gradient, in NumPy."""
  value = np.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)
  gradient = np.zeros_like(x)
  t = x[1:] - x[:-1] ** 2
  gradient[:-1] = -400.0 * x[:-1] * t - 2.0 * (1.0 - x[:-1])
  gradient[1:] += 200.0 * t
  return value, gradient


def rosenbrock_start(n):
  """The standard start of the extended function, (-1.2, 1, -1.2, 1, ...)."""
  return np.tile(ROSENBROCK_START, n // 2)


# -- the curve fit of TensorFlow Graphics' comparison --------------------------

CURVE_FIT_TRUTH = np.array([2.0, 1.3, 0.5, 0.7])
CURVE_FIT_START = np.array([1.0, 1.0, 0.3, 0.6])
CURVE_FIT_NUM_POINTS = 10_000


def curve_fit_model(p, t, lib=np):
  """p0 exp(-p1 t) + p2 sin(3 p3 t); p [4], t [m] -> [m]."""
  return p[0] * lib.exp(-p[1] * t) + p[2] * lib.sin(3.0 * p[3] * t)


def curve_fit_data(num_points=CURVE_FIT_NUM_POINTS, noise=0.01, seed=0):
  """(t, y): t in [0, 4], y the model at `CURVE_FIT_TRUTH` plus Gaussian
  noise of deviation `noise` (float64 NumPy arrays [num_points])."""
  rng = np.random.default_rng(seed)
  t = np.linspace(0.0, 4.0, num_points)
  return t, curve_fit_model(CURVE_FIT_TRUTH, t) + (
      noise * rng.standard_normal(num_points))


def curve_fit_residual(t, y):
  """p -> model(p, t) - y in TensorFlow (t, y tensors or arrays)."""
  return lambda p: curve_fit_model(p, t, tf.math) - y


def curve_fit_residual_numpy(t, y):
  """p -> model(p, t) - y in NumPy."""
  return lambda p: curve_fit_model(p, t) - y


def curve_fit_jacobian_numpy(t):
  """p -> d r / d p [m, 4] of the curve fit, in closed form (NumPy)."""
  def jacobian(p):
    e = np.exp(-p[1] * t)
    s = np.sin(3.0 * p[3] * t)
    c = np.cos(3.0 * p[3] * t)
    return np.stack([e, -p[0] * t * e, s, 3.0 * p[2] * t * c], axis=1)
  return jacobian


# -- rotation and rigid-pose fits (Kabsch) -------------------------------------


def random_rotation(rng):
  """A rotation matrix [3, 3] from the QR decomposition of a Gaussian one."""
  q, r = np.linalg.qr(rng.standard_normal((3, 3)))
  q = q * np.sign(np.diag(r))
  if np.linalg.det(q) < 0:
    q[:, 0] = -q[:, 0]
  return q


def kabsch(x, y):
  """argmin over rotations R of sum_i ||R x_i - y_i||^2 (rows x_i, y_i).

  With x^T y = U S V^T (SVD), R = V diag(1, 1, det(V U^T)) U^T.

  Args:
    x: the points [..., n, 3].
    y: their images [..., n, 3].

  Returns:
    The rotations [..., 3, 3].
  """
  u, _, vt = np.linalg.svd(np.swapaxes(x, -1, -2) @ y)
  v, ut = np.swapaxes(vt, -1, -2), np.swapaxes(u, -1, -2)
  diagonal = np.ones(u.shape[:-2] + (3,))
  diagonal[..., 2] = np.sign(np.linalg.det(v @ ut))
  return v @ (diagonal[..., :, None] * ut)


def rotation_fits(rng, num_points=20, noise=0.05, batch=(), rotations=None):
  """Points x and noisy images y = R x + noise, for a batch of rotations.

  Draws, in this order from `rng`: x [*batch, num_points, 3], the rotations
  (`random_rotation`, unless `rotations` [*batch, 3, 3] are given), the
  noise (deviation `noise`).

  Returns:
    (x, y), NumPy float64; `kabsch(x, y)` is the least-squares rotation.
  """
  x = rng.standard_normal(batch + (num_points, 3))
  if rotations is None:
    rotations = np.stack([random_rotation(rng)
                          for _ in range(int(np.prod(batch, dtype=int)))])
    rotations = rotations.reshape(batch + (3, 3))
  y = (np.einsum("...ij,...nj->...ni", rotations, x) +
       noise * rng.standard_normal(x.shape))
  return x, y


def rotation_residual(x, y):
  """R -> x R^T - y (TensorFlow; x, y cast to R's dtype)."""
  return lambda r: tf.matmul(tf.cast(x, r.dtype), r, transpose_b=True) - (
      tf.cast(y, r.dtype))


def pose_fit(rng, num_points=30, noise=0.02, rotation=None, translation=None):
  """A rigid-pose fit y_i = R x_i + t + noise and its closed-form solution.

  Draws, in this order from `rng`: x [num_points, 3], the rotation (unless
  given), the translation (unless given), the noise (deviation `noise`). The
  solution: Kabsch on the centred points, R = kabsch(x - mean x, y - mean y),
  t = mean y - R mean x.

  Returns:
    (x, y, (R, t)), NumPy float64.
  """
  x = rng.standard_normal((num_points, 3))
  if rotation is None:
    rotation = random_rotation(rng)
  if translation is None:
    translation = rng.standard_normal(3)
  y = x @ rotation.T + translation + noise * rng.standard_normal(x.shape)
  x_mean, y_mean = x.mean(0), y.mean(0)
  r = kabsch(x - x_mean, y - y_mean)
  return x, y, (r, y_mean - r @ x_mean)


# -- small problems for eager calls --------------------------------------------

# y = 2 exp(-1.3 t) + 0.01 sin(40 t) on 50 points of [0, 1]: a two-parameter
# exponential fit (a, b) -> a exp(b t) - y whose residual is small, not zero.
EXPONENTIAL_T = np.linspace(0.0, 1.0, 50)
EXPONENTIAL_Y = 2.0 * np.exp(-1.3 * EXPONENTIAL_T) + 0.01 * np.sin(
    40.0 * EXPONENTIAL_T)


def exponential_residual(a, b):
  """a exp(b t) - y on `EXPONENTIAL_T`, `EXPONENTIAL_Y` (scalars a, b)."""
  return a * tf.exp(b * EXPONENTIAL_T) - EXPONENTIAL_Y


POWELL_START = np.array([3.0, -1.0, 0.0, 1.0])


def powell_singular(x):
  """Moré-Garbow-Hillstrom's Powell singular function, x [4] -> r [4].

  r = [x0 + 10 x1, sqrt(5) (x2 - x3), (x1 - 2 x2)^2, sqrt(10) (x0 - x3)^2];
  minimum r = 0 at x = 0, where the Jacobian is singular (Gauss-Newton
  converges only linearly there). Start `POWELL_START`.
  """
  return tf.stack([x[0] + 10.0 * x[1], np.sqrt(5.0) * (x[2] - x[3]),
                   (x[1] - 2.0 * x[2]) ** 2,
                   np.sqrt(10.0) * (x[0] - x[3]) ** 2])


# -- pose graphs (g2o files) ---------------------------------------------------

# The benchmark graphs (not in the repository: ../shared/data/posegraph).
POSE_GRAPH_DIR = os.path.join(os.path.dirname(os.path.dirname(
    os.path.dirname(os.path.abspath(__file__)))), "shared", "data", "posegraph")


def pose_graph_problem(name, data_dir=None):
  """Reads `<data_dir>/<name>.g2o` as a factor-graph problem at its poses.

  Vertices the file does not list are chained from their predecessor
  (`missing_vertices="chain"`); the start is the file's poses, float64.

  Args:
    name: the graph's file name without `.g2o` (e.g. "MIT").
    data_dir: the folder (default `POSE_GRAPH_DIR`).

  Returns:
    (graph, variables, terms): the `io.read_g2o` graph and
    `examples.pose_graph.factor_graph_problem`'s variables and terms.
  """
  # pylint: disable=g-import-not-at-top
  from tfg_optim import io
  from tfg_optim.examples import pose_graph
  # pylint: enable=g-import-not-at-top
  graph = io.read_g2o(os.path.join(data_dir or POSE_GRAPH_DIR, name + ".g2o"),
                      missing_vertices="chain")
  variables, terms = pose_graph.factor_graph_problem(
      graph, tf.constant(graph.poses))
  return graph, variables, terms
