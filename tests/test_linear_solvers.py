"""Linearizations and linear solvers against dense linear algebra.

The matrix-free linearization's products against the dense Jacobian; the
conjugate-gradient solve against the Cholesky solve; Steihaug's truncated
step against the trust-region's defining properties; `least_squares` with
`linear_solver='cg'` against closed forms. Every mode runs in the
conformance table (`tests/conformance.py`, factor `linear_solver`).
"""

import numpy as np
import pytest
import tensorflow as tf

import tfg_optim
from tfg_optim import _engine
from tfg_optim import _linear_solvers
from tfg_optim import _linearization

_RNG = np.random.default_rng(3)
_A = _RNG.standard_normal((2, 7, 4))  # a batch of two 7 x 4 linear maps.
_B = _RNG.standard_normal((2, 7))


def _problem():
  a, b = tf.constant(_A), tf.constant(_B)

  def residual_fn(x):  # F(x) = A x^2 - b: J = A diag(2 x).
    return tf.linalg.matvec(a, tf.square(x)) - b
  return _engine.Problem(residual_fn, lambda p, s: p + s, 4, None, None)


def _point():
  return tf.constant(_RNG.standard_normal((2, 4)) + 1.0)


def test_matrix_free_products_equal_the_dense_jacobian():
  problem, point = _problem(), _point()
  residual = problem.residual_fn(point)
  dense = _linearization.DenseKind(problem, 7).at(point, residual)
  free = _linearization.MatrixFreeKind(problem).at(point, residual)
  expected = _A * 2.0 * point.numpy()[:, np.newaxis, :]
  np.testing.assert_allclose(dense.matrix, expected, rtol=1e-14)
  v = tf.constant(_RNG.standard_normal((2, 4)))
  u = tf.constant(_RNG.standard_normal((2, 7)))
  np.testing.assert_allclose(free.matvec(v), np.einsum("bmn,bn->bm",
                                                       expected, v), rtol=1e-13)
  np.testing.assert_allclose(free.rmatvec(u), np.einsum("bmn,bm->bn",
                                                        expected, u), rtol=1e-13)
  # diag(J^T J) estimated as the mean of (J^T z)^2 over the fixed probes.
  probes = [tf.random.stateless_normal([2, 7], seed=[7, k], dtype=tf.float64)
            for k in range(8)]
  estimate = np.mean([np.einsum("bmn,bm->bn", expected, z) ** 2
                      for z in probes], axis=0)
  np.testing.assert_allclose(free.column_norms(), estimate, rtol=1e-12)
  held = free.hold_fixed(tf.constant([[1.0, 0.0, 1.0, 1.0]] * 2, tf.float64))
  assert np.all(held.rmatvec(u).numpy()[:, 1] == 0)
  assert np.all(held.matvec(tf.one_hot([1, 1], 4, dtype=tf.float64)) == 0)


@pytest.mark.parametrize("scaled", [False, True])
def test_conjugate_gradients_equal_the_cholesky_solve(scaled):
  problem, point = _problem(), _point()
  residual = problem.residual_fn(point)
  dense = _linearization.DenseKind(problem, 7).at(point, residual)
  free = _linearization.MatrixFreeKind(problem).at(point, residual)
  gradient = dense.rmatvec(residual)
  lam = tf.constant([1e-3, 0.5], tf.float64)
  scaling = dense.column_norms() if scaled else None
  want = _linear_solvers.damped_solver(dense, lam, scaling)(residual, gradient)
  got = _linear_solvers.damped_solver(free, lam, scaling)(residual, gradient)
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_conjugate_gradients_give_nan_for_a_non_finite_gradient():
  problem, point = _problem(), _point()
  residual = problem.residual_fn(point)
  free = _linearization.MatrixFreeKind(problem).at(point, residual)
  gradient = tf.constant([[np.nan, 0, 0, 0], [1.0, 2.0, 3.0, 4.0]])
  gradient = tf.cast(gradient, tf.float64)
  step = _linear_solvers.damped_solver(
      free, tf.constant([1.0, 1.0], tf.float64))(residual, gradient).numpy()
  assert np.all(np.isnan(step[0])) and np.all(np.isfinite(step[1]))


@pytest.mark.parametrize("radius", [1e3, 0.05])
def test_steihaug_step_inside_and_on_the_boundary(radius):
  problem, point = _problem(), _point()
  residual = problem.residual_fn(point)
  dense = _linearization.DenseKind(problem, 7).at(point, residual)
  free = _linearization.MatrixFreeKind(problem).at(point, residual)
  gradient = dense.rmatvec(residual)
  scale = dense.column_norms()
  radii = tf.constant([radius, radius], tf.float64)
  solve, _, lam = _linear_solvers.steihaug_solver(free, gradient, scale,
                                                  radii)
  step = solve(residual, gradient).numpy()
  scaled_length = np.sqrt(np.sum(scale.numpy() * step ** 2, axis=-1))
  jacobian = dense.matrix.numpy()
  g = gradient.numpy()
  model = lambda s: (np.einsum("bn,bn->b", g, s) + 0.5 * np.sum(
      np.einsum("bmn,bn->bm", jacobian, s) ** 2, axis=-1))
  if radius > 1:  # Inside: the Gauss-Newton step.
    gauss_newton = -np.linalg.solve(
        np.einsum("bmn,bmk->bnk", jacobian, jacobian), g[..., None])[..., 0]
    np.testing.assert_allclose(step, gauss_newton, rtol=1e-8)
    np.testing.assert_array_equal(lam, 0.0)
  else:  # On the boundary, at least the Cauchy point's decrease, lambda > 0.
    np.testing.assert_allclose(scaled_length, radius, rtol=1e-10)
    # The Cauchy point: the model's minimum along -D^-1 g within the region.
    direction = -g / scale.numpy()
    slope = np.einsum("bn,bn->b", g, direction)
    curvature = np.sum(np.einsum("bmn,bn->bm", jacobian, direction) ** 2, -1)
    t = np.minimum(-slope / curvature, radius / np.sqrt(
        np.sum(scale.numpy() * direction ** 2, -1)))
    assert np.all(model(step) <= model(t[:, None] * direction) + 1e-15)
    assert np.all(lam.numpy() > 0)


def test_auto_rule():
  rule = tfg_optim.nonlinear_least_squares.uses_matrix_free
  limit = tfg_optim.nonlinear_least_squares.AUTO_DENSE_LIMIT
  assert not rule("auto", False, limit) and rule("auto", False, limit + 1)
  assert not rule("auto", True, 10 ** 6) and not rule("dense", False, 10 ** 6)
  assert rule("cg", False, 1)


def test_tikhonov_denoising_closed_form():
  """The linear problem min ||x - y||^2 + mu^2 ||D x||^2, solved
  matrix-free: (I + mu^2 D^T D)^-1 y."""
  n, mu = 400, 1.0
  rng = np.random.default_rng(0)
  y = np.sin(np.linspace(0, 6, n)) + 0.3 * rng.standard_normal(n)
  difference = np.diff(np.eye(n), axis=0)
  want = np.linalg.solve(np.eye(n) + mu ** 2 * difference.T @ difference, y)
  y_tensor = tf.constant(y)
  residuals = [lambda x: x - y_tensor, lambda x: mu * (x[1:] - x[:-1])]
  result = tfg_optim.least_squares(residuals, tf.zeros([n], tf.float64),
                                   linear_solver="cg")
  assert result.converged, result.stop_reason
  np.testing.assert_allclose(result.position, want, atol=1e-7)


def test_cg_with_a_user_jacobian_is_an_error():
  with pytest.raises(ValueError, match="jacobian"):
    tfg_optim.least_squares(lambda x: x, tf.ones([2]), linear_solver="cg",
                            jacobian=lambda x: tf.eye(2))
  with pytest.raises(ValueError, match="linear_solver"):
    tfg_optim.least_squares(lambda x: x, tf.ones([2]), linear_solver="lu")
