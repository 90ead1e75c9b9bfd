"""Tests of gradients through solves by implicit differentiation.

Independent truth: closed-form derivatives of linear least squares
(x = (A^T A)^-1 A^T b) and of a quadratic's minimizer (x = A^-1 b), central
finite differences of scipy re-solves of a curve fit, and of the closed-form
Kabsch (SVD) rotation. Every tolerance is far below the size of the errors
the approximations the tests tell apart would make.
"""

import functools
import tempfile

import numpy as np
import pytest
import scipy.optimize
import tensorflow as tf

import tfg_optim
from tests import modes
from tests import problems
from tfg_optim import damping
from tfg_optim import lbfgs
from tfg_optim import manifolds
from tfg_optim import riemannian
from tfg_optim import StopReason
from tfg_optim import _engine
from tfg_optim import _implicit
from tfg_optim import _linearization



def _jacobian(tape, target, source):
  """tape.jacobian without pfor (which traces the backward pass: seconds)."""
  return tape.jacobian(target, source, experimental_use_pfor=False).numpy()


# -- problems ------------------------------------------------------------------


def _linear_problem(seed=0, m=6, n=3, zero_residual=False):
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((m, n))
  b = a @ rng.standard_normal(n) if zero_residual else rng.standard_normal(m)
  return a, b


def _linear_solve(a, b, start=None, **options):
  residual = lambda x: tf.linalg.matvec(a, x) - b
  if start is None:
    start = tf.zeros(a.shape[:-2].as_list() + [a.shape[-1]], a.dtype)
  return tfg_optim.least_squares(residual, start,
                                 batch_dims=a.shape.rank - 2, **options)


def _linear_expectations(a, b, u, cost_weight, hessian):
  """Closed-form gradients of u . x + cost_weight * cost w.r.t. (a, b).

  With v = (A^T A)^-1 u and r = A x - b: d(u . x)/db = A v and
  d(u . x)/dA = -(r v^T + (A v) x^T) (the first term is what Gauss-Newton
  drops); by the envelope theorem d cost/db = -r, d cost/dA = r x^T.
  """
  x = np.linalg.lstsq(a, b, rcond=None)[0]
  r = a @ x - b
  v = np.linalg.solve(a.T @ a, u)
  grad_a = -np.outer(a @ v, x) + cost_weight * np.outer(r, x)
  if hessian == "exact":
    grad_a -= np.outer(r, v)
  return grad_a, a @ v - cost_weight * r


@pytest.mark.parametrize("hessian", ["gauss_newton", "exact"])
def test_linear_least_squares_closed_form(hessian):
  """dx/db = (A^T A)^-1 A^T; the A-gradient has the r v^T term only with
  the exact Hessian (the residual is not zero); the cost by the envelope."""
  a_np, b_np = _linear_problem()
  a, b = tf.constant(a_np), tf.constant(b_np)
  u = np.array([1.0, -2.0, 0.5])
  with tf.GradientTape(persistent=True) as tape:
    tape.watch([a, b])
    result = _linear_solve(a, b, implicit_hessian=hessian)
    loss = tf.reduce_sum(u * result.position) + 3.0 * result.cost
  np.testing.assert_allclose(_jacobian(tape, result.position, b),
                             np.linalg.pinv(a_np), atol=1e-12)
  grad_a, grad_b = tape.gradient(loss, [a, b])
  want_a, want_b = _linear_expectations(a_np, b_np, u, 3.0, hessian)
  np.testing.assert_allclose(grad_b, want_b, atol=1e-10)
  np.testing.assert_allclose(grad_a, want_a, atol=1e-10)
  assert np.abs(np.outer(result.residual, np.linalg.solve(
      a_np.T @ a_np, u))).max() > 1e-2  # the term that tells them apart


def test_gauss_newton_is_exact_at_a_zero_residual():
  a_np, b_np = _linear_problem(seed=1, zero_residual=True)
  a, b = tf.constant(a_np), tf.constant(b_np)
  u = np.array([0.3, 1.0, -1.0])
  with tf.GradientTape() as tape:
    tape.watch(a)
    loss = tf.reduce_sum(u * _linear_solve(a, b).position)
  np.testing.assert_allclose(tape.gradient(loss, a),
                             _linear_expectations(a_np, b_np, u, 0.0,
                                                  "exact")[0], atol=1e-10)


def test_active_bound_holds_its_component_fixed():
  """With x_0 held at its upper bound, x_0 does not move and the others are
  the least-squares solution of the rest: dx_{1:}/db = pinv(A[:, 1:])."""
  a_np, b_np = _linear_problem(seed=2)
  upper = np.linalg.lstsq(a_np, b_np, rcond=None)[0][0] - 0.5
  a, b = tf.constant(a_np), tf.constant(b_np)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(b)
    result = _linear_solve(a, b, start=tf.constant([upper - 1.0, 0.0, 0.0],
                                                   tf.float64),
                           bounds=([-np.inf, -np.inf, -np.inf],
                                   [upper, np.inf, np.inf]))
  assert result.converged and float(result.position[0]) == upper
  jacobian = _jacobian(tape, result.position, b)
  np.testing.assert_array_equal(jacobian[0], 0.0)
  np.testing.assert_allclose(jacobian[1:], np.linalg.pinv(a_np[:, 1:]),
                             atol=1e-12)


# -- a nonlinear curve fit against finite differences of scipy re-solves -------


_T = np.linspace(0.0, 1.0, 8)
_PARAMETERS = np.array([2.0, -1.3])


def _curve_data(noise):
  rng = np.random.default_rng(3)
  y = _PARAMETERS[0] * np.exp(_PARAMETERS[1] * _T)
  return y + noise * rng.standard_normal(_T.shape)


def _scipy_fit(t, y):
  """scipy's MINPACK fit (it stops ~1e-9 away), polished by Newton's method
  with the exact Hessian to rounding level."""
  e = lambda p: np.exp(p[1] * t)
  jacobian = lambda p: np.stack([e(p), p[0] * t * e(p)], -1)
  p = scipy.optimize.least_squares(
      lambda p: p[0] * e(p) - y, [1.0, -1.0], jac=jacobian, method="lm",
      xtol=1e-15, ftol=1e-15, gtol=1e-15).x
  for _ in range(3):
    r, j = p[0] * e(p) - y, jacobian(p)
    cross = r @ (t * e(p))
    hessian = j.T @ j + np.array([[0.0, cross],
                                  [cross, r @ (p[0] * t * t * e(p))]])
    p = p - np.linalg.solve(hessian, j.T @ r)
  return p


def _gauss_newton_derivative(y):
  """dx/dy = (J^T J)^-1 J^T of the curve fit at its polished solution."""
  p = _scipy_fit(_T, y)
  jacobian = np.stack([np.exp(p[1] * _T), p[0] * _T * np.exp(p[1] * _T)],
                      -1)
  return np.linalg.solve(jacobian.T @ jacobian, jacobian.T)


def _curve_residual(t, y):
  return lambda p: p[..., :1] * tf.exp(p[..., 1:] * t) - y


@pytest.mark.parametrize("noise, hessian", [(0.0, "gauss_newton"),
                                            (0.05, "exact")])
def test_curve_fit_matches_finite_differences_of_re_solves(noise, hessian):
  """y = a exp(b t); data held in a tf.Variable (y) and a tensor (t). Zero
  residual: Gauss-Newton; noisy data: the exact Hessian."""
  y_np = _curve_data(noise)
  y = tf.Variable(y_np)
  t = tf.constant(_T)
  u = np.array([0.7, -1.1])
  with tf.GradientTape() as tape:
    tape.watch(t)
    result = tfg_optim.least_squares(_curve_residual(t, y),
                                     tf.constant([1.0, -1.0], tf.float64),
                                     implicit_hessian=hessian)
    loss = tf.reduce_sum(u * result.position)
  grad_t, grad_y = tape.gradient(loss, [t, y])
  rng = np.random.default_rng(4)
  for value, grad, which in ((y_np, grad_y, 1), (_T, grad_t, 0)):
    direction = rng.standard_normal(value.shape)

    solves = []
    for sign in (1.0, -1.0):
      moved = value + sign * 1e-5 * direction
      solves.append(_scipy_fit(moved, y_np) if which == 0 else
                    _scipy_fit(_T, moved))
    finite_difference = u @ (solves[0] - solves[1]) / 2e-5
    np.testing.assert_allclose(np.sum(grad.numpy() * direction),
                               finite_difference, rtol=1e-6)
    if which == 1 and noise:
      # Gauss-Newton's dx/dy = (J^T J)^-1 J^T is off by percents here: the
      # approximation docs/differentiation.md describes.
      assert abs(u @ _gauss_newton_derivative(y_np) @ direction /
                 finite_difference - 1.0) > 1e-3


def test_not_converged_gradient_is_that_of_a_gauss_newton_step():
  """After 1 iteration the gradient is d/dtheta of x - (J^T J)^-1 J^T r(x,
  theta) at the returned (held) x, computed here from the explicit formula."""
  y = tf.constant(_curve_data(0.05))
  t = tf.constant(_T)
  with tf.GradientTape() as tape:
    tape.watch(y)
    result = tfg_optim.least_squares(_curve_residual(t, y),
                                     tf.constant([1.0, -0.5], tf.float64),
                                     max_iterations=1)
    loss = tf.reduce_sum(result.position)
  assert not result.converged
  got = tape.gradient(loss, y)
  p = result.position.numpy()
  jacobian = np.stack([np.exp(p[1] * _T), p[0] * _T * np.exp(p[1] * _T)], -1)
  # d/dy of -(J^T J)^-1 J^T (model(p) - y) = (J^T J)^-1 J^T.
  want = np.ones(2) @ np.linalg.solve(jacobian.T @ jacobian, jacobian.T)
  np.testing.assert_allclose(got, want, rtol=1e-9)


# -- Riemannian: the Kabsch rotation -------------------------------------------


@pytest.mark.parametrize("noise, hessian", [(0.0, "gauss_newton"),
                                            (0.1, "exact")])
def test_kabsch_rotation_derivative_matches_svd_finite_differences(noise,
                                                                   hessian):
  rng = np.random.default_rng(5)
  x_np = rng.standard_normal((6, 3))
  rotation = scipy.spatial.transform.Rotation.from_rotvec(
      [0.3, -0.2, 0.5]).as_matrix()
  y_np = x_np @ rotation.T + noise * rng.standard_normal(x_np.shape)
  x, y = tf.constant(x_np), tf.constant(y_np)
  weights = rng.standard_normal((3, 3))
  so3 = manifolds.SpecialOrthogonal(3)
  with tf.GradientTape() as tape:
    tape.watch([x, y])
    solved = riemannian.levenberg_marquardt(
        so3, lambda r: tf.matmul(x, r, transpose_b=True) - y,
        tf.eye(3, dtype=tf.float64), implicit_hessian=hessian)
    loss = tf.reduce_sum(weights * solved)
  np.testing.assert_allclose(solved, problems.kabsch(x_np, y_np), atol=1e-10)
  grads = tape.gradient(loss, [x, y])
  h = 1e-6
  for index, grad in enumerate(grads):
    direction = rng.standard_normal(x_np.shape)
    moved = [[x_np, y_np], [x_np, y_np]]
    moved[0][index] = moved[0][index] + h * direction
    moved[1][index] = moved[1][index] - h * direction
    finite_difference = np.sum(
        weights * (problems.kabsch(*moved[0]) - problems.kabsch(*moved[1]))
    ) / (2.0 * h)
    np.testing.assert_allclose(np.sum(grad.numpy() * direction),
                               finite_difference, rtol=1e-6, atol=1e-9)


# -- L-BFGS and BFGS -----------------------------------------------------------


def _quadratic(a, b):
  """1/2 x^T A x - b^T x (batched over leading axes)."""
  return lambda x: (0.5 * tf.reduce_sum(x * tf.linalg.matvec(a, x), -1) -
                    tf.reduce_sum(b * x, -1))


@pytest.mark.parametrize("method", [lbfgs.minimize_lbfgs, lbfgs.minimize_bfgs])
def test_quadratic_minimizer_derivative_is_inverse_matrix(method):
  rng = np.random.default_rng(6)
  m = rng.standard_normal((4, 4))
  a_np = m @ m.T + 4.0 * np.eye(4)
  a, b = tf.constant(a_np), tf.Variable(rng.standard_normal(4))
  with tf.GradientTape(persistent=True) as tape:
    _, _, position, value, _ = method(_quadratic(a, b), tf.zeros(4, tf.float64),
                                      dtype="float64", max_iters=100)
  np.testing.assert_allclose(_jacobian(tape, position, b), np.linalg.inv(a_np),
                             atol=1e-12)
  # The envelope theorem: d min f / db = -x*.
  np.testing.assert_allclose(tape.gradient(value, b), -position, atol=1e-12)


# -- batches -------------------------------------------------------------------


def test_batched_gradient_equals_per_problem_gradients():
  """Three curve fits solved as one batch: the Jacobian of the [3, 2]
  solutions w.r.t. the [3, 8] data is block diagonal with each problem's
  own dx/dy (its closed form at each problem's own solution). And a batch
  of two quadratics in L-BFGS."""
  y_np = np.stack([_curve_data(0.05) * scale for scale in (1.0, 0.5, 2.0)])
  t = tf.constant(_T)
  y = tf.constant(y_np)
  start = tf.constant([[1.0, -1.0]] * 3, tf.float64)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(y)
    batched = tfg_optim.least_squares(_curve_residual(t, y), start,
                                      batch_dims=1).position
  jacobian = _jacobian(tape, batched, y)
  for i in range(3):
    for j in range(3):
      want = _gauss_newton_derivative(y_np[i]) if i == j else 0.0
      np.testing.assert_allclose(jacobian[i, :, j], np.broadcast_to(
          want, (2, 8)), rtol=1e-7, atol=1e-9)

  rng = np.random.default_rng(7)
  a_np = np.stack([np.diag([1.0, 2.0, 4.0]), np.diag([3.0, 1.0, 0.5])])
  a, b = tf.constant(a_np), tf.constant(rng.standard_normal((2, 3)))
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(b)
    position = lbfgs.minimize_lbfgs(_quadratic(a, b), tf.zeros([2, 3],
                                                             tf.float64),
                                    dtype="float64", batch_dims=1)[2]
  np.testing.assert_allclose(_jacobian(tape, position, b),
                             np.einsum("ij,ikl->ikjl", np.eye(2),
                                       np.linalg.inv(a_np)), atol=1e-12)


def test_failed_problem_of_a_batch_gets_zero_not_nan_gradients():
  """A batch of three r = s A x - b + (c cbrt(x + o), 0), s shared: a
  solved problem (c = 0), one with a NaN b and one whose Jacobian is
  infinite at its start (c = 1, o = 0: d cbrt(x)/dx at 0). The failed two
  stop NOT_FINITE and contribute zero, not NaN (main: NaN for s through
  0 * inf in J (s - stop(s))); s gets the solved one's -sum(x*) / s (the
  cost's term, r . A x*, is 0 at the solution)."""
  a_np, b_np = _linear_problem(seed=8)
  b = tf.constant(np.stack([b_np, np.full_like(b_np, np.nan), b_np]))
  scale = tf.constant(1.5, tf.float64)
  c = tf.constant([[0.0], [0.0], [1.0]], tf.float64)
  offset = tf.constant([[1.0], [1.0], [0.0]], tf.float64)

  def residual(x):
    cube = c * tf.math.pow(x + offset, 1.0 / 3.0)
    return scale * tf.linalg.matvec(a_np, x) - b + tf.concat(
        [cube, tf.zeros_like(cube)], -1)

  with tf.GradientTape() as tape:
    tape.watch([b, scale])
    result = tfg_optim.least_squares(residual, tf.zeros([3, 3], tf.float64),
                                     batch_dims=1)
    finite = lambda t: tf.where(tf.math.is_finite(t), t, 0.0)
    loss = tf.reduce_sum(finite(result.position)) + tf.reduce_sum(
        finite(result.cost))
  assert [StopReason(int(k)) for k in result.stop_reason[1:]] == [
      StopReason.NOT_FINITE] * 2
  grad_b, grad_scale = tape.gradient(loss, [b, scale])
  pinv = np.linalg.pinv(a_np)
  np.testing.assert_allclose(grad_b[0], np.ones(3) @ pinv / 1.5 - (
      a_np @ pinv @ b_np - b_np), atol=1e-12)
  np.testing.assert_array_equal(grad_b[1:], 0.0)
  np.testing.assert_allclose(grad_scale, -np.sum(pinv @ b_np) / 1.5 ** 2,
                             rtol=1e-9)


# -- execution modes -----------------------------------------------------------


# The smallest loop body (quickest to trace and compile); the gradient's
# machinery does not depend on the damping.
_SMALL_LOOP = {"damping": "nielsen", "geodesic_acceleration": None}


def _mode_build(mode):
  """(A, b) -> (d/dA, d/db) of u . x + 2 cost, through a tape (tf.gradients
  in a TF1 graph), and the (position, cost, residual) of the implicit solve
  and (but in a Session, to save its time) of a solve with gradients='none'
  (which must be the same bits)."""
  def build(a, b):
    u = tf.constant([1.0, -2.0, 0.5], a.dtype)
    fields = lambda r: (r.position, r.cost, r.residual)
    if mode == "session":
      result = _linear_solve(a, b, **_SMALL_LOOP)
      loss = tf.reduce_sum(u * result.position) + 2.0 * result.cost
      return tf.gradients(loss, [a, b]), fields(result), fields(result)
    plain = fields(_linear_solve(a, b, gradients="none", **_SMALL_LOOP))
    with tf.GradientTape() as tape:
      tape.watch([a, b])
      result = _linear_solve(a, b, **_SMALL_LOOP)
      loss = tf.reduce_sum(u * result.position) + 2.0 * result.cost
    return tape.gradient(loss, [a, b]), fields(result), plain
  return build


@functools.lru_cache(maxsize=None)
def _function_mode():
  """The tf.function of the 'function' mode, traced once for two tests."""
  return tf.function(_mode_build("function"), autograph=False)


@pytest.mark.parametrize("mode, dtype", [(mode, "float64")
                                         for mode in modes.MODES] +
                         [("eager", "float32")])
def test_gradients_in_every_mode(mode, dtype):
  """The gradients, and values bit for bit those of gradients='none'."""
  a_np, b_np = _linear_problem(seed=9)
  inputs = [a_np.astype(dtype), b_np.astype(dtype)]
  if mode == "function":
    outputs = tf.nest.map_structure(lambda t: t.numpy(),
                                    _function_mode()(*inputs))
  else:
    outputs = modes.run(_mode_build(mode), inputs, mode)
  (grad_a, grad_b), values, plain = outputs
  want_a, want_b = _linear_expectations(a_np, b_np, [1.0, -2.0, 0.5], 2.0,
                                        "gauss_newton")
  tolerance = 1e-10 if dtype == "float64" else 1e-4
  np.testing.assert_allclose(grad_a, want_a, atol=tolerance)
  np.testing.assert_allclose(grad_b, want_b, atol=tolerance)
  for value, reference in zip(values, plain):
    np.testing.assert_array_equal(value, reference)


def test_forward_mode():
  """Forward mode (how the engine takes Jacobians when m > n) sees the
  implicit derivative. Eagerly: an outer solve over theta whose residual
  runs an inner linear solve, x(theta) = pinv(A) B theta, converges to the
  closed form (its Jacobian is the inner solve's tangent). In a graph,
  through the attached outputs of a gauge (pinv, `_centered_gauge`) at the
  closed-form solution (a graph's accumulator would also trace the loop's
  discarded tangents, seconds): an accumulator inside the tf.function
  (plain ops), one around the call of a tf.function traced without one
  (TensorFlow transposes the custom gradient's backward pass), whose
  reverse-mode gradient is also pinv's. The exact Hessian and L-BFGS
  refuse forward mode."""
  rng = np.random.default_rng(3)
  a_in, b_in = rng.standard_normal((4, 2)), rng.standard_normal((4, 2))
  y, z = rng.standard_normal(2), rng.standard_normal(2)
  # (one undamped step each: exact for linear problems with a right J)
  step = {"damping": damping.NielsenDamping(initial=1e-12),
          "geodesic_acceleration": None, "max_iterations": 1}
  inner = lambda theta: tfg_optim.least_squares(
      lambda x: tf.linalg.matvec(a_in, x) - tf.linalg.matvec(b_in, theta),
      tf.zeros(2, tf.float64), **step).position
  outer = tfg_optim.least_squares(
      lambda theta: tf.concat([inner(theta) - y, theta - z], 0),
      tf.zeros(2, tf.float64), **step)
  k = np.linalg.pinv(a_in) @ b_in
  np.testing.assert_allclose(outer.position, np.linalg.solve(
      k.T @ k + np.eye(2), k.T @ y + z), atol=1e-10)

  a_np = _centered_gauge(0)
  pinv = np.linalg.pinv(a_np)
  b_np = np.random.default_rng(12).standard_normal(5)
  a, b = tf.constant(a_np), tf.constant(b_np)
  tangent = tf.constant(np.arange(5.0))
  u = tf.constant([1.0, -2.0, 0.5, 3.0], tf.float64)
  x = pinv @ b_np
  r = a_np @ x - b_np
  fields = dict.fromkeys(tfg_optim.LeastSquaresResults._fields)
  fields.update(position=[tf.constant(x)], residual=tf.constant(r),
                cost=tf.constant(0.5 * r @ r))
  attach = lambda b: _implicit.attach_least_squares(
      tfg_optim.LeastSquaresResults(**fields), a,
      lambda p: tf.linalg.matvec(a, p[0]) - b, None,
      lambda p, v: v[0], lambda p, c: [c])

  @tf.function(autograph=False)
  def inside(b):
    with tf.autodiff.ForwardAccumulator(b, tangent) as accumulator:
      attached = attach(b)
    return [accumulator.jvp(t) for t in (attached.position[0],
                                          attached.cost)]

  @tf.function(autograph=False)
  def traced(b):
    with tf.GradientTape() as tape:
      tape.watch(b)
      position = attach(b).position[0]
      loss = tf.reduce_sum(u * position)
    return position, tape.gradient(loss, b)

  for position_tangent, cost_tangent in [inside(b)]:
    np.testing.assert_allclose(position_tangent, pinv @ tangent.numpy(),
                               atol=1e-12)
    np.testing.assert_allclose(cost_tangent, -r @ tangent.numpy(),
                               atol=1e-12)
  with tf.autodiff.ForwardAccumulator(b, tangent) as accumulator:
    position, gradient = traced(b)
  np.testing.assert_allclose(accumulator.jvp(position),
                             pinv @ tangent.numpy(), atol=1e-12)
  np.testing.assert_allclose(gradient, u.numpy() @ pinv, atol=1e-12)
  with tf.autodiff.ForwardAccumulator(b, tangent):
    with pytest.raises(NotImplementedError, match="gradients='unrolled'"):
      _linear_solve(a, b, implicit_hessian="exact", max_iterations=1)
    with pytest.raises(NotImplementedError, match="gradients='unrolled'"):
      lbfgs.minimize_lbfgs(lambda x: tf.reduce_sum(tf.square(x - b)),
                           tf.zeros(5, tf.float64), dtype="float64",
                           max_iters=1)


def test_loop_is_not_differentiated_in_a_graph():
  """The gradient graph holds no accumulator of the loop's intermediates
  (TensorList ops), only the implicit solve's factorization."""
  a_np, b_np = _linear_problem(seed=9)
  graph = _function_mode().get_concrete_function(
      a_np, b_np).graph.as_graph_def()
  op_types = {node.op for node in graph.node}
  for library_function in graph.library.function:
    op_types |= {node.op for node in library_function.node_def}
  assert not {op for op in op_types if op.startswith("TensorList")}, op_types
  assert "Cholesky" in op_types and "StatelessWhile" in op_types


def test_saved_model_keeps_the_implicit_gradient():
  a_np, b_np = _linear_problem(seed=10)
  module = tf.Module()
  module.solve = tf.function(
      lambda b: _linear_solve(tf.constant(a_np), b, **_SMALL_LOOP).position,
      input_signature=[tf.TensorSpec([6], tf.float64)])
  with tempfile.TemporaryDirectory() as directory:
    tf.saved_model.save(module, directory)
    loaded = tf.saved_model.load(directory)
    b = tf.constant(b_np)
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(b)
      position = loaded.solve(b)
    np.testing.assert_allclose(_jacobian(tape, position, b),
                               np.linalg.pinv(a_np), atol=1e-12)


# -- the three modes of `gradients=` -------------------------------------------


def test_unrolled_and_none():
  a_np, b_np = _linear_problem(seed=11, m=4, n=2)
  a, b = tf.constant(a_np), tf.constant(b_np)
  gradients = {}
  # The unrolled iterates' derivative tends to the implicit one as the
  # damping vanishes. (Eagerly, the trust region's unrolled position has no
  # gradient; Nielsen's damping is used here.)
  for option in ("unrolled", "none"):
    with tf.GradientTape() as tape:
      tape.watch(b)
      result = _linear_solve(a, b, gradients=option, damping="nielsen",
                             geodesic_acceleration=None)
      loss = tf.reduce_sum(result.position) + result.cost
    gradients[option] = tape.gradient(loss, b)
  assert gradients["none"] is None
  # d(sum(x) + cost)/db = 1^T pinv(A) - r: the implicit gradient (tested
  # above), which the unrolled iterates' derivative approaches.
  want = np.ones(2) @ np.linalg.pinv(a_np) - result.residual.numpy()
  np.testing.assert_allclose(gradients["unrolled"], want, atol=1e-6)


def test_none_in_riemannian_and_lbfgs():
  b = tf.constant([1.0, 2.0], tf.float64)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(b)
    point = riemannian.levenberg_marquardt(
        manifolds.Euclidean(2), lambda x: x - b, tf.zeros(2, tf.float64),
        gradients="none")
    position = lbfgs.minimize_lbfgs(
        lambda x: tf.reduce_sum(tf.square(x - b)), tf.zeros(2, tf.float64),
        dtype="float64", gradients="none")[2]
  assert tape.gradient(point, b) is None
  assert tape.gradient(position, b) is None


@pytest.mark.parametrize("call", [
    lambda **k: tfg_optim.least_squares(lambda x: x, np.ones(2), **k),
    lambda **k: riemannian.levenberg_marquardt(
        manifolds.Euclidean(2), lambda x: x, np.ones(2), **k),
    lambda **k: lbfgs.minimize_lbfgs(lambda x: tf.reduce_sum(x * x),
                                     np.ones(2, np.float32), **k),
    lambda **k: lbfgs.minimize_bfgs(lambda x: tf.reduce_sum(x * x),
                                    np.ones(2, np.float32), **k)])
def test_invalid_option_names_the_argument(call):
  with pytest.raises(ValueError, match="'gradients'"):
    call(gradients="implicitly")
  if call.__code__.co_consts and "lbfgs" not in str(call.__code__.co_names):
    with pytest.raises(ValueError, match="'implicit_hessian'"):
      call(implicit_hessian="newton")


# -- Keras ---------------------------------------------------------------------


@pytest.mark.parametrize("jit_compile", [False, True])
def test_keras_model_learns_through_a_pose_fit(jit_compile):
  keras = pytest.importorskip("keras")
  from tfg_optim.examples import learned_pose  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(0)
  features, poses = learned_pose.make_data(num_examples=128)
  model = learned_pose.build_model(jit_compile, learning_rate=0.03,
                                   max_iterations=10, **_SMALL_LOOP)
  history = model.fit(features, poses, batch_size=64, epochs=3, verbose=0)
  losses = history.history["loss"]
  assert losses[-1] < 0.6 * losses[0], losses


# -- matrix-free (linear_solver='cg') and chunked data (data_chunk_size) --------

# Their backward passes solve J^T J w = rhs by conjugate gradients to a
# relative (preconditioned) residual of 1e-10 (float64) and by Cholesky of
# the summed J^T J: with cond(A^T A) ~ 2 here, w is good to ~1e-10, and the
# solves themselves stop ~1e-10 from the least-squares solution (the
# closed-form comparisons' error), far below the O(1) size of the
# gradients and of the r v^T term that tells Gauss-Newton from exact.
_LARGE_SCALE_TOLERANCE = 1e-8


def _large_scale_solve(variant, a, b, scale, chunk_size=7, **options):
  """argmin_x 1/2 ||scale (A x - b)||^2 with linear_solver='cg', or with A
  and b as `data` in chunks (of 7 rows: for m = 20 two full chunks and a
  remainder of 6). `scale` (captured) leaves x unchanged and scales the
  cost by scale^2."""
  options = dict(_SMALL_LOOP, **options)
  start = tf.zeros([a.shape[-1]], a.dtype)
  if variant == "chunked":
    return tfg_optim.least_squares(
        lambda x, a_rows, b_rows: scale * (tf.linalg.matvec(a_rows, x) -
                                           b_rows),
        start, data=[a, b], data_chunk_size=chunk_size, **options)
  return tfg_optim.least_squares(
      lambda x: scale * (tf.linalg.matvec(a, x) - b), start,
      linear_solver=variant, **options)


def _large_scale_expectations(a_np, b_np, u, cost_weight, scale):
  """Closed-form gradients of u . x + cost_weight cost w.r.t. (A, b,
  scale): those of `_linear_expectations` with the cost scaled by scale^2,
  and d/dscale = cost_weight 2 scale (the unscaled cost)."""
  x = np.linalg.lstsq(a_np, b_np, rcond=None)[0]
  r = a_np @ x - b_np
  grad_a, grad_b = _linear_expectations(a_np, b_np, u, cost_weight * scale**2,
                                        "gauss_newton")
  return grad_a, grad_b, cost_weight * scale * (r @ r)


def test_matrix_free_and_chunked_gradients_match_the_closed_form():
  """cg and chunked solves: gradients w.r.t. A, b (a tf.Variable) and a
  captured scale equal the closed form (d/db: A (A^T A)^-1 u, the dense
  implicit solve's, tested above), Gauss-Newton's d/dA without the r v^T
  term (O(1) here); the chunked ||F|| output's derivative (by the envelope
  theorem); the exact Hessian and forward mode are refused there."""
  a_np, b_np = _linear_problem(seed=13, m=20)
  u = np.array([1.0, -2.0, 0.5])
  want = _large_scale_expectations(a_np, b_np, u, 3.0, 1.5)
  a, b = tf.constant(a_np), tf.Variable(b_np)
  scale = tf.constant(1.5, tf.float64)
  for variant in ("cg", "chunked"):
    with tf.GradientTape(persistent=True) as tape:
      tape.watch([a, scale])
      result = _large_scale_solve(variant, a, b, scale)
      loss = tf.reduce_sum(u * result.position) + 3.0 * result.cost
    for got, expected in zip(tape.gradient(loss, [a, b, scale]), want):
      np.testing.assert_allclose(got, expected, atol=_LARGE_SCALE_TOLERANCE)
    if variant == "chunked":  # residual = [||F||] = [scale ||A x - b||]
      np.testing.assert_allclose(
          tape.gradient(result.residual, scale), np.linalg.norm(
              a_np @ np.linalg.lstsq(a_np, b_np, rcond=None)[0] - b_np),
          atol=_LARGE_SCALE_TOLERANCE)
    with pytest.raises(ValueError, match="implicit_hessian"):
      _large_scale_solve(variant, a, b, scale, implicit_hessian="exact")
  # Forward mode (chunked: theta, the captured scale, is the custom
  # gradient's input; cg's is the live residual, as the exact Hessian's).
  with tf.autodiff.ForwardAccumulator(scale, tf.constant(1.0, tf.float64)):
    with pytest.raises(NotImplementedError, match="gradients='unrolled'"):
      _large_scale_solve("chunked", a, b, scale, max_iterations=1)


def test_chunked_forward_mode_around_and_inside_a_function():
  """A ForwardAccumulator around a call of a tf.function that solves with
  data chunks gets the implicit tangent pinv(A) t (TensorFlow transposes
  the custom gradient's backward pass; a stop_gradient in it made the
  tangent a silent 0); one inside the tf.function gets the
  NotImplementedError before the first pass (TensorFlow failed there with
  'duplicate function ..._rewritten')."""
  a_np, b_np = _linear_problem(seed=13, m=20)
  a, b = tf.constant(a_np), tf.constant(b_np)
  scale = tf.constant(1.5, tf.float64)
  tangent = tf.constant(np.linspace(-1.0, 2.0, 20))
  solve = tf.function(
      lambda b: _large_scale_solve("chunked", a, b, scale,
                                   chunk_size=10).position)
  with tf.autodiff.ForwardAccumulator(b, tangent) as accumulator:
    position = solve(b)
  np.testing.assert_allclose(accumulator.jvp(position),
                             np.linalg.pinv(a_np) @ tangent.numpy(),
                             atol=_LARGE_SCALE_TOLERANCE)

  @tf.function
  def inside(b):
    with tf.autodiff.ForwardAccumulator(b, tangent) as accumulator:
      position = _large_scale_solve("chunked", a, b, scale).position
    return accumulator.jvp(position)

  with pytest.raises(NotImplementedError, match="gradients='unrolled'"):
    inside(b)


def test_chunked_persistent_tape_differentiates_no_loop_cond():
  """Under a persistent tape watching the data, a chunked solve in a
  tf.function traces no gradient of the loop's tf.conds (TensorFlow wraps
  each control-flow op whose inputs a persistent tape watches in a
  'cflow_gradient_wrapper' function and differentiates it while tracing:
  benchmarks/persistent_tape_first_call.py), since the passes see the data
  stopped; the gradient is the plain tape's closed form, A (A^T A)^-1 u."""
  a_np, b_np = _linear_problem(seed=13, m=20)
  a, b = tf.constant(a_np), tf.constant(b_np)
  u = tf.constant([1.0, -2.0, 0.5], tf.float64)

  @tf.function
  def gradient(b):
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(b)
      position = _large_scale_solve("chunked", a, b,
                                    tf.constant(1.0, tf.float64),
                                    chunk_size=10).position
    return tape.gradient(position, b, output_gradients=u)

  np.testing.assert_allclose(gradient(b), np.linalg.pinv(a_np).T @ u.numpy(),
                             atol=_LARGE_SCALE_TOLERANCE)
  library = gradient.get_concrete_function(b).graph.as_graph_def().library
  assert not [f.signature.name for f in library.function
              if "cflow_gradient_wrapper" in f.signature.name]


def test_matrix_free_singular_system_gets_the_pinv_derivative():
  """A rank-deficient J (two equal columns) has a singular J^T J: conjugate
  gradients diverge on it (|gradient| ~ 1e16 without the retry), and are
  retried regularized like the dense Cholesky: the minimum-norm derivative
  u^T pinv(A) (the regularization's effect is O(sqrt(eps)) there)."""
  a_np, b_np = _linear_problem(seed=14)
  a_np[:, 2] = a_np[:, 1]
  u = np.array([1.0, 2.0, -1.0])
  a, b = tf.constant(a_np), tf.constant(b_np)
  with tf.GradientTape() as tape:
    tape.watch(b)
    position = _linear_solve(a, b, linear_solver="cg", **_SMALL_LOOP).position
    loss = tf.reduce_sum(u * position)
  np.testing.assert_allclose(tape.gradient(loss, b), u @ np.linalg.pinv(a_np),
                             atol=1e-6)


def test_matrix_free_solve_and_derivative_ignore_a_cancelled_estimate():
  """x_0 read by rows i and k (F_i = x_0^2 - t_i, F_k = x_0^2 - t_k)
  whose signs are opposite in all 8 fixed Rademacher probes: its
  estimated ||J_0||^2 (truly 8 x_0^2) is 0 at every point (asserted), and
  so is the last parameter's, whose column is truly zero (no residual
  reads it); the other rows are x_j - t_j. The gradient-cosine stopping
  test (MINPACK's gtol) fired on the unmeasured x_0 once the others had
  converged (x_0 = 1.375, cost 1.012, "converged"), and the backward pass
  held x_0 (a zero derivative). Now x_0 = sqrt((t_i + t_k) / 2), and
  d(u . x)/dt = u_0 / (4 x_0) at t_i and t_k (Gauss-Newton's is exact
  here: the residuals' curvature terms 2 (F_i + F_k) sum to 0 at x*), u_j
  at the others, 0 from the zero column (the dense path's convention),
  not NaN for all."""
  m = 16
  probes = np.stack([_linearization._rademacher([m], p, tf.float64).numpy()  # pylint: disable=protected-access
                     for p in range(8)])
  i, k = next((i, k) for i in range(m) for k in range(i + 1, m)
              if np.all(probes[:, i] == -probes[:, k]))
  others = np.setdiff1d(np.arange(m), [i, k])
  index = np.zeros(m, np.int64)
  index[others] = np.arange(1, m - 1)
  squared = np.isin(np.arange(m), [i, k])
  t_np = np.linspace(1.0, 2.0, m)
  t_np[[i, k]] = [1.0, 3.0]
  t = tf.constant(t_np)

  def residual(x):  # x: m parameters, the last one read by no residual
    read = tf.gather(x, index)
    return tf.where(squared, read * read, read) - t + 0.0 * x[-1]

  start = tf.concat([[1.0], tf.zeros([m - 1], tf.float64)], 0)
  problem = _engine.Problem(residual, lambda p, s: p + s, m, None, None)
  estimate = _linearization.MatrixFreeKind(problem).at(
      start, residual(start)).column_norms()
  assert estimate[0] == 0 and estimate[-1] == 0, estimate
  u = np.random.default_rng(15).standard_normal(m)
  with tf.GradientTape() as tape:
    tape.watch(t)
    result = tfg_optim.least_squares(residual, start, linear_solver="cg")
    loss = tf.reduce_sum(u * result.position)
  assert bool(result.converged)
  np.testing.assert_allclose(result.position[0], np.sqrt(2.0), rtol=1e-8)
  np.testing.assert_allclose(result.cost, 1.0, rtol=1e-12)
  expected = np.zeros(m)
  expected[others] = u[1:-1]
  expected[[i, k]] = u[0] / (4.0 * np.sqrt(2.0))
  np.testing.assert_allclose(tape.gradient(loss, t), expected, atol=1e-8)


def _large_scale_build(variant, mode):
  """(A, b, scale) -> gradients of u . x + 3 cost (tf.gradients in a TF1
  graph). Chunks of 10 rows: no remainder chunk to trace (the eager test
  has one)."""
  solve = functools.partial(_large_scale_solve, variant, chunk_size=10)

  def build(a, b, scale):
    u = tf.constant([1.0, -2.0, 0.5], a.dtype)
    if mode == "session":
      result = solve(a, b, scale)
      return tf.gradients(tf.reduce_sum(u * result.position) +
                          3.0 * result.cost, [a, b, scale])
    with tf.GradientTape() as tape:
      tape.watch([a, b, scale])
      result = solve(a, b, scale)
      loss = tf.reduce_sum(u * result.position) + 3.0 * result.cost
    return tape.gradient(loss, [a, b, scale])
  return build


# Rotating cells: each mode once, each variant in two modes or more (eager:
# both, above).
@pytest.mark.parametrize("mode, variant", [("function", "cg"),
                                           ("xla", "chunked"),
                                           ("session", "chunked")])
def test_matrix_free_and_chunked_gradients_in_every_mode(mode, variant):
  a_np, b_np = _linear_problem(seed=13, m=20)
  outputs = modes.run(_large_scale_build(variant, mode),
                      [a_np, b_np, np.float64(1.5)], mode)
  for got, expected in zip(outputs, _large_scale_expectations(
      a_np, b_np, np.array([1.0, -2.0, 0.5]), 3.0, 1.5)):
    np.testing.assert_allclose(got, expected, atol=_LARGE_SCALE_TOLERANCE)


# -- the dense backward solves' acceptance -----------------------------------


def _centered_gauge(seed):
  """J = A (I - 1 1^T / 4): a residual invariant to x -> x + t 1 (a gauge);
  J^T J's Cholesky meets a rounding-size pivot."""
  a = np.random.default_rng(seed).standard_normal((5, 4))
  return a @ (np.eye(4) - 0.25)


def _dense_acceptance_cases():
  """(J^T J or H, D = diag(J^T J), free, what NumPy says) per problem, four
  coordinates (a 2 x 2 problem padded with held ones): `benchmarks/
  dense_backward_acceptance.py`'s reproducers, integ22's answers there."""
  def padded(matrix, norms):
    h, d = np.eye(4), np.ones(4)
    h[:2, :2], d[:2] = matrix, norms
    return h, d, np.array([1.0, 1.0, 0.0, 0.0])
  ill = np.array([[1.0, 1.0], [1.0, 1.0 + 2e-5]])  # cond(J^T J) 4e10
  cases = {
      # exact H = diag(1, a^2 - 2 b^2) of r = (x0, a x1, b (1 - x1^2)) at
      # the saddle x1 = 0: -1e-9, hidden by main's retry delta I (1.5e-8).
      "hidden": padded(np.diag([1.0, -1e-9]), [1.0, 1e-6]),
      "gauge": (_centered_gauge(0).T @ _centered_gauge(0),
                np.sum(_centered_gauge(0) ** 2, 0), np.ones(4)),
      # a gauge and a coordinate in units whose column is 1e-5
      "units": (np.diag([0.58, 0.58, 1e-10, 1.0]) +
                np.diag([-0.58, 0.0, 0.0], 1) + np.diag([-0.58, 0.0, 0.0], -1),
                np.array([0.58, 0.58, 1e-10, 1.0]), np.ones(4)),
      "ill_conditioned": padded(ill.T @ ill, np.sum(ill ** 2, 0)),
  }
  truth = {name: (np.full((4, 4), np.nan) if name == "hidden" else
                  np.linalg.pinv(h * f[:, None] * f) * f[:, None] * f)
           for name, (h, _, f) in cases.items()}
  return cases, truth


@pytest.mark.parametrize("rule", ["exact", "gauss_newton", "minimizer"])
def test_dense_backward_solves_are_right_or_nan(rule):
  """The four reproducers in one batch (each accepted or refused on its
  own): `_masked_solve` (exact H: least squares with D = diag(J^T J), the
  minimizers with D = |diag H|; J^T J judged for any rhs, the Gauss-Newton
  backward pass) and forward mode's `_masked_inverse` against NumPy's pinv (the inverse where nonsingular)
  to rounding times the condition, NaN for the hidden negative
  eigenvalue (main: 72 and -7e7 where NumPy's saddle says -1000 and 1e9;
  the gauge 0.73 off, the units 0.011 for 1)."""
  cases, truth = _dense_acceptance_cases()
  names = list(cases)
  h, d, f = [tf.constant(np.stack([cases[k][i] for k in names]))
             for i in range(3)]
  u = np.sin(np.arange(4.0) + 1.0)
  rhs = tf.constant(np.stack([u * cases[k][2] for k in names]))
  if rule == "gauss_newton":  # (the backward pass, and forward mode's M)
    w, _ = _implicit._masked_solve(h, rhs, f, d, any_rhs=True)
    inverse, ok, trusted = _implicit._masked_inverse(h, f, d)
    got = inverse.numpy()
    got[~trusted.numpy()] = np.nan
    for i, name in enumerate(names[1:], 1):
      np.testing.assert_allclose(w[i], truth[name] @ u, rtol=1e-4 if name ==
                                 "ill_conditioned" else 1e-9, atol=1e-9,
                                 err_msg=name)
  else:
    w, ok = _implicit._masked_solve(h, rhs, f, None if rule == "minimizer"
                                    else d, exact=True)
    got = w.numpy()
  assert ok.numpy().all()
  for i, name in enumerate(names):
    want = truth[name] if rule == "gauss_newton" else truth[name] @ u
    if name == "hidden" and rule == "gauss_newton":
      continue  # (J^T J is never indefinite)
    np.testing.assert_allclose(got[i], want, rtol=1e-4 if name ==
                               "ill_conditioned" else 1e-9, atol=1e-9,
                               err_msg=name)
