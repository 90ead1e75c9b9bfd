"""Linearizations and linear solvers against dense linear algebra.

The matrix-free linearization's products against the dense Jacobian; the
conjugate-gradient solve against the Cholesky solve; Steihaug's truncated
step against the trust-region's defining properties; `least_squares` with
`linear_solver='cg'` against closed forms; what a CG solve reports
(`SolveOutcome`: iterations, converged, breakdown) against the closed form
of k distinct eigenvalues, eagerly, in `tf.function` and under XLA, and
the iterations a solve reports in its results; `inexact_steps`' forcing
term against its defining bound (eagerly, in `tf.function`, under XLA)
and against the closed-form minimum of a small problem. The graph modes
run in the conformance table (`tests/conformance.py`, factor
`linear_solver`); eager CG solves here (`test_tikhonov_denoising_closed_form`)
and in tests/test_implicit.py.
"""

import functools

import numpy as np
import pytest
import tensorflow as tf

import tfg_optim
from tests import modes
from tfg_optim import _engine
from tfg_optim import _linear_solvers
from tfg_optim import _linearization
from tfg_optim import factor_graph
from tfg_optim import nonlinear_least_squares

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
  # diag(J^T J) estimated as the mean of (J^T z)^2 over the fixed probes,
  # random signs.
  probes = [_linearization._rademacher([2, 7], k, tf.float64).numpy()  # pylint: disable=protected-access
            for k in range(8)]
  assert all(set(np.unique(z)) == {-1.0, 1.0} for z in probes)
  estimate = np.mean([np.einsum("bmn,bm->bn", expected, z) ** 2
                      for z in probes], axis=0)
  np.testing.assert_allclose(free.column_norms(), estimate, rtol=1e-12)
  # Exact where each column has one nonzero: F(x) = c x^2 (J = diag(2 c x)).
  scale = tf.constant([[1.0, -2.0, 3.0, 0.5], [4.0, 1.0, -1.0, 2.0]],
                      tf.float64)
  diagonal = _engine.Problem(lambda x: scale * tf.square(x),
                             lambda p, s: p + s, 4, None, None)
  np.testing.assert_allclose(
      _linearization.MatrixFreeKind(diagonal).at(
          point, diagonal.residual_fn(point)).column_norms(),
      (2.0 * scale * point) ** 2, rtol=1e-14)
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
  want = _linear_solvers.damped_solver(dense, lam, scaling)(
      residual, gradient).solution
  got = _linear_solvers.damped_solver(free, lam, scaling)(
      residual, gradient).solution
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_conjugate_gradients_give_nan_for_a_non_finite_gradient():
  problem, point = _problem(), _point()
  residual = problem.residual_fn(point)
  free = _linearization.MatrixFreeKind(problem).at(point, residual)
  gradient = tf.constant([[np.nan, 0, 0, 0], [1.0, 2.0, 3.0, 4.0]])
  gradient = tf.cast(gradient, tf.float64)
  step = _linear_solvers.damped_solver(
      free, tf.constant([1.0, 1.0], tf.float64))(
          residual, gradient).solution.numpy()
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
  step = solve(residual, gradient).solution.numpy()
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
  matrix-free: (I + mu^2 D^T D)^-1 y. Its CG iterations (Steihaug's and
  geodesic acceleration's, at most `CG_MAX_ITERATIONS` each) are reported
  in total and per iteration."""
  n, mu = 400, 1.0
  rng = np.random.default_rng(0)
  y = np.sin(np.linspace(0, 6, n)) + 0.3 * rng.standard_normal(n)
  difference = np.diff(np.eye(n), axis=0)
  want = np.linalg.solve(np.eye(n) + mu ** 2 * difference.T @ difference, y)
  y_tensor = tf.constant(y)
  residuals = [lambda x: x - y_tensor, lambda x: mu * (x[1:] - x[:-1])]
  result = tfg_optim.least_squares(residuals, tf.zeros([n], tf.float64),
                                   linear_solver="cg", record=True)
  assert result.converged, result.stop_reason
  np.testing.assert_allclose(result.position, want, atol=1e-7)
  counts = result.records["linear_solver_iterations"][
      :int(result.num_iterations)].numpy()
  assert np.all((counts >= 1) &
                (counts <= 2 * _linear_solvers.CG_MAX_ITERATIONS))
  assert int(result.num_linear_solver_iterations) == counts.sum()


def test_cg_turns_geodesic_acceleration_off_by_default():
  """With linear_solver='cg' the default is no geodesic acceleration (the
  same solve as geodesic_acceleration=None, bit for bit), an explicit 2.0
  still applies it (a different solve). Every solve reaches Rosenbrock's
  minimum x = 1 (closed form). (The dense default keeps it:
  benchmarks/bit_identity.py and the BoxBOD tests.)"""
  start = tf.constant(np.tile([-1.2, 1.0], 3))

  def residual(x):
    odd, even = x[0::2], x[1::2]
    return tf.concat([10.0 * (even - tf.square(odd)), 1.0 - odd], 0)

  def summary(result):
    return (result.position, result.num_iterations,
            result.num_linear_solver_iterations,
            result.num_residual_evaluations)

  solves = {name: functools.partial(tfg_optim.least_squares, residual,
                                    linear_solver="cg", **options)
            for name, options in (("default", {}),
                                  ("off", dict(geodesic_acceleration=None)),
                                  ("on", dict(geodesic_acceleration=2.0)))}
  results = tf.function(lambda x: {key: summary(solve(x))
                                   for key, solve in solves.items()})(start)
  results = {key: [v.numpy() for v in value]
             for key, value in results.items()}
  for value in results.values():
    np.testing.assert_allclose(value[0], np.ones(6), atol=1e-9)
  for a, b in zip(results["default"], results["off"]):
    np.testing.assert_array_equal(a, b)
  assert any(np.any(a != b) for a, b in zip(results["default"],
                                            results["on"]))


def test_cg_with_a_user_jacobian_is_an_error():
  with pytest.raises(ValueError, match="jacobian"):
    tfg_optim.least_squares(lambda x: x, tf.ones([2]), linear_solver="cg",
                            jacobian=lambda x: tf.eye(2))
  with pytest.raises(ValueError, match="linear_solver"):
    tfg_optim.least_squares(lambda x: x, tf.ones([2]), linear_solver="lu")


class _Gram:
  """A dense linearization with J^T J only (all the trust region needs)."""
  dense = True

  def __init__(self, jacobian):
    self._jacobian = jacobian

  def gram(self):
    return tf.matmul(self._jacobian, self._jacobian, adjoint_a=True)


def _trust_region_batch():
  """A batch of 8 problems n = 5, mixed: (J, F, D, radius) per problem.

  0-1: well-conditioned, on the boundary (radius 1e-3, 0.3); 2: columns
  scaled over 7 decades (D^-1/2 J^T J D^-1/2 is well conditioned: Marquardt
  scaling at work), boundary; 3: ill-conditioned after scaling (two nearly
  parallel columns), boundary; 4: a column that is twice another (J^T J
  singular), boundary; 5: a zero column (singular; D = 1 there), boundary;
  6: Gauss-Newton step inside (radius 1e3); 7: relative radius -0.5 (half
  the Gauss-Newton step's scaled length: boundary).
  """
  rng = np.random.default_rng(11)
  jacobian = rng.standard_normal((8, 9, 5))
  jacobian[2] *= np.logspace(0, -7, 5)
  jacobian[3][:, 4] = jacobian[3][:, 0] + 1e-6 * rng.standard_normal(9)
  jacobian[4][:, 3] = 2.0 * jacobian[4][:, 1]
  jacobian[5][:, 2] = 0.0
  residual = rng.standard_normal((8, 9))
  scale = np.einsum("bmn,bmn->bn", jacobian, jacobian)
  scale = np.where(scale > 0, scale, 1.0) * rng.uniform(1.0, 2.0, (8, 5))
  radius = np.array([1e-3, 0.3, 0.3, 0.3, 0.3, 0.3, 1e3, -0.5])
  return jacobian, residual, scale, radius


def _trust_region_build(method):
  def build(jacobian, residual, scale, radius, previous_lambda, other):
    gradient = tf.linalg.matvec(jacobian, residual, adjoint_a=True)
    solve, new_radius, lam = _linear_solvers.trust_region_solver(
        _Gram(jacobian), gradient, scale, radius,
        10 if method == "cholesky" else 30, method,
        previous_lambda=previous_lambda)
    return (solve(residual, gradient).solution, new_radius, lam,
            solve(None, tf.linalg.matvec(jacobian, other,
                                         adjoint_a=True)).solution)
  return build


@functools.lru_cache(maxsize=None)  # Shared by the tests below.
def _trust_region_run(method, mode, dtype, poison=False):
  jacobian, residual, scale, radius = _trust_region_batch()
  if poison:  # problem 1: a NaN in J.
    jacobian = jacobian.copy()
    jacobian[1, 0, 0] = np.nan
  other = np.random.default_rng(5).standard_normal((8, 9))
  inputs = [x.astype(dtype) for x in (jacobian, residual, scale, radius,
                                      np.full(8, 0.1), other)]
  signature = [[None, None, None], [None, None], [None, None], [None],
               [None], [None, None]]
  return modes.run(_trust_region_build(method), inputs, mode,
                   signature if mode != "eager" else None)


@pytest.mark.parametrize("mode,dtype", [
    ("eager", "float64"), ("function", "float64"), ("session", "float32"),
    ("xla", "float64")])
def test_cholesky_trust_region_step_satisfies_the_kkt_conditions(mode, dtype):
  """(J^T J + lambda D) s = -g with lambda >= 0, ||D^1/2 s|| <= 1.1 Delta
  and lambda (||D^1/2 s|| - Delta) ~ 0 (MINPACK's 0.1 Delta), against dense
  NumPy linear algebra; lambda on the same side of the eigendecomposition's
  exact root as the step's length says; `solve` of another right-hand side
  with the same factorization."""
  jacobian, residual, scale, radius = _trust_region_batch()
  step, new_radius, lam, other_step = _trust_region_run("cholesky", mode,
                                                        dtype)
  float32 = dtype == "float32"
  gram = np.einsum("bmn,bmk->bnk", jacobian, jacobian)
  gradient = np.einsum("bmn,bm->bn", jacobian, residual)
  matrix = gram + lam.astype(np.float64)[:, None, None] * np.stack(
      [np.diag(d) for d in scale])
  gauss_newton_length = np.linalg.norm(np.sqrt(scale[7]) * np.linalg.solve(
      gram[7], gradient[7]))
  want_radius = np.where(radius < 0, 0.5 * gauss_newton_length, radius)
  np.testing.assert_allclose(new_radius, want_radius, rtol=1e-5)
  length = np.linalg.norm(np.sqrt(scale) * step, axis=-1)
  ratio = length / want_radius
  assert np.all(lam >= 0)
  boundary = [0, 1, 2, 3, 4, 5, 7]
  assert lam[6] == 0 and ratio[6] < 1.0  # The Gauss-Newton step.
  assert np.all(lam[boundary] > 0)
  assert np.all(np.abs(ratio[boundary] - 1.0) <= 0.1 + (
      1e-4 if float32 else 0))
  other_gradient = np.einsum(
      "bmn,bm->bn", jacobian, np.random.default_rng(5).standard_normal((8, 9)))
  for got, rhs in ((step, gradient), (other_step, other_gradient)):
    want = -np.linalg.solve(matrix, rhs[..., None])[..., 0]
    # The singular and ill-conditioned members by their residual.
    error = np.einsum("bnk,bk->bn", matrix, got) + rhs
    assert np.all(np.linalg.norm(error, axis=-1) <= (3e-4 if float32 else 1e-9)
                  * np.linalg.norm(rhs, axis=-1)), mode
    np.testing.assert_allclose(got[[0, 1, 2, 6, 7]], want[[0, 1, 2, 6, 7]],
                               rtol=1e-3 if float32 else 1e-8,
                               atol=1e-5 if float32 else 1e-12)
  if mode == "function":  # The eigendecomposition's lambda is the root.
    _, _, exact_lam, _ = _trust_region_run("eigh", mode, dtype)
    side = np.sign(exact_lam[boundary] - lam[boundary])
    np.testing.assert_array_equal(side, np.sign(ratio[boundary] - 1.0))
    np.testing.assert_allclose(lam, exact_lam, rtol=0.5)


def test_cholesky_trust_region_non_finite_member_is_rejected():
  """A NaN in one problem's J: its step is NaN (a rejection), its radius
  comes back unchanged, and the other problems' answers do not change."""
  clean = _trust_region_run("cholesky", "function", "float64")
  step, radius, lam, other = _trust_region_run("cholesky", "function",
                                               "float64", poison=True)
  assert np.all(np.isnan(step[1])) and np.all(np.isnan(other[1]))
  assert radius[1] == 0.3 and np.isfinite(lam[1])
  keep = [0, 2, 3, 4, 5, 6, 7]
  for got, want in zip((step, radius, lam, other), clean):
    np.testing.assert_array_equal(got[keep], want[keep])


def test_trust_region_radius_expansion_threshold():
  """After a step on the boundary (||D^1/2 s|| = Delta = 1) with gain
  ratios 0.8, 0.95, 0.5 and 0.1, the radius becomes max(Delta, expansion
  ||D^1/2 s||) above `expand_threshold`, stays between 1/4 and it, and is
  min(Delta, ||D^1/2 s||) / 4 below 1/4: 3, 3, 1, 1/4 by default (rho >
  3/4, x3), 1, 2, 1, 1/4 with (0.9, 2); all four are accepted. Bad values
  are refused."""
  ones = tf.ones([4], tf.float64)
  gain = tf.constant([0.8, 0.95, 0.5, 0.1], tf.float64)
  step = tfg_optim.damping.Step(
      cost=ones, candidate_cost=ones - gain, model_decrease=ones,
      penalty=0 * ones, finite=tf.ones([4], tf.bool), scaled_norm=ones,
      curvature=ones)
  state = tfg_optim.damping.TrustRegionState(ones, 0 * ones,
                                             tf.ones([4, 3], tf.float64))
  for policy, want in (
      (tfg_optim.TrustRegionDamping(), [3.0, 3.0, 1.0, 0.25]),
      (tfg_optim.TrustRegionDamping(expand_threshold=0.9, expansion=2.0),
       [1.0, 2.0, 1.0, 0.25])):
    accepted, new_state = policy.update(state, step)
    np.testing.assert_array_equal(accepted, [True] * 4)
    np.testing.assert_array_equal(new_state.radius, want)
  for bad in (dict(expand_threshold=0.2), dict(expand_threshold=1.0),
              dict(expansion=0.5)):
    with pytest.raises(ValueError, match=list(bad)[0]):
      tfg_optim.TrustRegionDamping(**bad)
  # least_squares' 'trust_region': 0.9 for the matrix-free solver only.
  policy = nonlinear_least_squares.damping_policy
  assert policy("trust_region", matrix_free=True).expand_threshold == 0.9
  assert policy("trust_region").expand_threshold == 0.75


def test_trust_region_method_eigh_is_selectable():
  """The policy passes its method, its iteration limit and its previous
  lambda to the solver."""
  default = tfg_optim.TrustRegionDamping()
  assert default._method(tf.float64, 200) == ("cholesky", 10)
  assert default._method(tf.float64, 199) == ("eigh", 30)
  assert default._method(tf.float64, None) == ("eigh", 30)
  assert default._method(tf.float32, 1000) == ("eigh", 30)
  default = tfg_optim.TrustRegionDamping(method="cholesky")
  with pytest.raises(ValueError, match="method"):
    tfg_optim.TrustRegionDamping(method="qr")
  jacobian, residual, scale, radius = _trust_region_batch()
  gradient = tf.constant(np.einsum("bmn,bm->bn", jacobian, residual))
  state = tfg_optim.damping.TrustRegionState(
      tf.constant(radius), tf.fill([8], tf.constant(0.1, tf.float64)),
      tf.constant(scale))
  for policy, method in ((default, "cholesky"),
                         (tfg_optim.TrustRegionDamping(method="eigh"), "eigh")):
    want = _trust_region_run(method, "function", "float64")
    solve, new_state = policy.solver(state, _Gram(tf.constant(jacobian)),
                                     gradient, None, None)
    np.testing.assert_allclose(solve(None, gradient).solution, want[0],
                               rtol=1e-9)
    np.testing.assert_allclose(new_state.lam, want[2], rtol=1e-9)
    np.testing.assert_allclose(new_state.radius, want[1], rtol=1e-12)


def test_conjugate_gradients_with_a_failed_preconditioner_give_nan_not_zero():
  """A preconditioner that failed (NaN, e.g. a block's Cholesky) used to
  leave the loop at once with x = 0, a zero step that step tests could take
  for convergence; it is a NaN step (a rejection), for that member only."""
  matrix = tf.constant([[[4.0, 1.0], [1.0, 3.0]]] * 2, tf.float64)
  rhs = tf.constant([[1.0, 2.0]] * 2, tf.float64)
  poisoned = tf.constant([[1.0], [np.nan]], tf.float64)
  x = _linear_solvers._cg_loop(  # pylint: disable=protected-access
      lambda v: tf.linalg.matvec(matrix, v), rhs, lambda r: r * poisoned,
      max_iterations=10, tolerance=1e-12).solution
  np.testing.assert_allclose(x[0], np.linalg.solve(matrix[0], rhs[0]),
                             rtol=1e-10)
  assert np.all(np.isnan(x[1]))


# -- what a conjugate-gradient solve reports (`SolveOutcome`) -----------------

# Conjugate gradients on an SPD system with k distinct eigenvalues (and a
# right-hand side with a component on each eigenspace) end in exactly k
# iterations in exact arithmetic (the Krylov space has dimension k). A batch
# of 6 x 6 systems Q diag(lambda) Q^T with k = 1, 2, 3, 6 distinct
# eigenvalues, and an indefinite one, diag(1, -1, 1, 1, 1, 1), whose first
# direction e_1 + e_2 has zero curvature: a breakdown.
_EIGENVALUES = np.array([[2.0] * 6,
                         [1.0, 1.0, 1.0, 5.0, 5.0, 5.0],
                         [1.0, 1.0, 4.0, 4.0, 9.0, 9.0],
                         [1.0, 2.0, 3.0, 5.0, 8.0, 13.0]])
_DISTINCT = [1, 2, 3, 6]
_SYSTEMS = {}  # mode -> the traced outcome function, shared by the cells


def _outcome_inputs():
  basis = np.linalg.qr(np.random.default_rng(7).standard_normal((6, 6)))[0]
  matrices = np.einsum("ij,bj,kj->bik", basis, _EIGENVALUES, basis)
  indefinite = np.diag([1.0, -1.0, 1.0, 1.0, 1.0, 1.0])
  matrices = np.concatenate([matrices, indefinite[np.newaxis]])
  rhs = np.concatenate([
      np.ones((4, 6)) @ basis.T,  # every eigencomponent 1
      [[1.0, 1.0, 0.0, 0.0, 0.0, 0.0]]])
  return matrices, rhs


def _outcome(mode, cap):
  """(x, iterations, converged, breakdown) of `_cg_loop` on the batch, at
  most `cap` iterations; one trace per graph mode (cap is an input)."""
  if mode not in _SYSTEMS:
    def build(matrices, rhs, cap):
      outcome = _linear_solvers._cg_loop(  # pylint: disable=protected-access
          lambda v: tf.linalg.matvec(matrices, v), rhs, lambda r: r, cap,
          1e-10)
      return tuple(outcome)
    _SYSTEMS[mode] = build if mode == "eager" else tf.function(
        build, autograph=False, jit_compile=mode == "xla")
  matrices, rhs = _outcome_inputs()
  return [value.numpy() for value in _SYSTEMS[mode](
      tf.constant(matrices), tf.constant(rhs), tf.constant(cap))]


@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
def test_conjugate_gradients_report_iterations_convergence_and_breakdown(
    mode):
  """k distinct eigenvalues: converged in k iterations, to the solution;
  the indefinite system: a breakdown after one iteration, not converged. At
  a cap of 2 iterations: the k > 2 systems are not converged (2 iterations
  each), the others as before."""
  matrices, rhs = _outcome_inputs()
  x, iterations, converged, breakdown = _outcome(mode, 50)
  np.testing.assert_array_equal(iterations, _DISTINCT + [1])
  np.testing.assert_array_equal(converged, [True] * 4 + [False])
  np.testing.assert_array_equal(breakdown, [False] * 4 + [True])
  np.testing.assert_allclose(x[:4], np.linalg.solve(matrices[:4],
                                                    rhs[:4, :, None])[..., 0],
                             rtol=1e-9)
  if mode == "xla":
    return  # (the cap's cell: eagerly and in tf.function)
  x, iterations, converged, breakdown = _outcome(mode, 2)
  np.testing.assert_array_equal(iterations, [1, 2, 2, 2, 1])
  np.testing.assert_array_equal(converged, [True, True, False, False, False])
  np.testing.assert_array_equal(breakdown, [False] * 4 + [True])


def test_a_solve_reports_its_conjugate_gradient_iterations():
  """F(x) = J x - b with J = U diag(sigma) V^T, V a normalized Hadamard
  matrix, so that diag(J^T J) is constant, and sigma^2 in {1, 4}. As a
  factor graph of four one-dimensional rows ('cg': the block-Jacobi
  preconditioner is then Jacobi, exact, a multiple of I, as is Nielsen's
  D), every damped system J^T J + lambda D has two distinct eigenvalues:
  each CG solve takes exactly 2 iterations, so
  `num_linear_solver_iterations` = 2 per iteration and the records say 2
  for each (`least_squares`' 'cg': `test_tikhonov_denoising_closed_form`)."""
  hadamard = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1],
                       [1, -1, -1, 1]], np.float64) / 2.0
  left = np.linalg.qr(np.random.default_rng(2).standard_normal((6, 4)))[0]
  jacobian = tf.constant(left @ np.diag([1.0, 1.0, 2.0, 2.0]) @ hadamard.T)
  target = tf.constant(np.random.default_rng(4).standard_normal(6))
  start = np.array([1.0, -2.0, 0.5, 3.0])
  table = factor_graph.Variables(tf.constant(start[:, np.newaxis]), name="x")
  term = factor_graph.Term(
      lambda *rows: tf.matmul(tf.concat(rows, -1), jacobian,
                              transpose_b=True) - target,
      [(table, [row]) for row in range(4)])
  graph = factor_graph.least_squares([table], [term], linear_solver="cg",
                                     damping="nielsen", gradients="none",
                                     record=True)
  iterations = int(graph.num_iterations)
  assert bool(graph.converged) and iterations >= 3
  assert int(graph.num_linear_solver_iterations) == 2 * iterations
  np.testing.assert_array_equal(
      graph.records["linear_solver_iterations"][:iterations], 2.0)


# -- the inexact-Newton forcing term of linear_solver='cg' ------------------

_FORCING = {}
# The second problem's gradient is scaled down so that its forcing term is
# tight (sqrt(1e-10 ||g||), ~1e-4) while the first one's is the cap, 0.5.
_GRADIENT_SCALES = np.array([1.0, 1e-10])


def _forcing_outcome(mode):
  """The matrix-free damped solve of `_problem()` at `_POINT` with
  `inexact_steps` (the forcing term of the scaled gradient) and without
  (the fixed tolerance); one trace per graph mode."""
  if mode not in _FORCING:
    def build(point, scales):
      problem = _problem()
      residual = problem.residual_fn(point)
      free = _linearization.MatrixFreeKind(problem, inexact_steps=True).at(
          point, residual)
      fixed = _linearization.MatrixFreeKind(problem).at(point, residual)
      gradient = free.rmatvec(residual) * scales[:, tf.newaxis]
      lam = tf.constant([1e-3, 1e-3], tf.float64)
      scaling = free.column_norms()
      inexact = _linear_solvers.damped_solver(free, lam, scaling, gradient)(
          residual, gradient)
      exact = _linear_solvers.damped_solver(fixed, lam, scaling, gradient)(
          residual, gradient)
      return (_linear_solvers.forcing_tolerance(gradient), gradient,
              scaling, inexact.solution, inexact.iterations,
              inexact.converged, exact.iterations)
    _FORCING[mode] = build if mode == "eager" else tf.function(
        build, autograph=False, jit_compile=mode == "xla")
  return [value.numpy() for value in _FORCING[mode](
      tf.constant(_POINT), tf.constant(_GRADIENT_SCALES))]


_POINT = _RNG.standard_normal((2, 4)) + 1.0


# Eagerly and in a tf.function (the forcing term is plain ops in CG's loop,
# which compiles under XLA in test_conjugate_gradients_report_iterations_*).
@pytest.mark.parametrize("mode", ["eager", "function"])
def test_forcing_term_stops_conjugate_gradients_early_but_in_bound(mode):
  """eta = min(0.5, sqrt(||g||)) per problem (NumPy); the step's residual
  in the damped system, computed from the closed-form J = A diag(2 x),
  meets ||r||_M^-1 <= eta ||g||_M^-1 (M the Jacobi preconditioner), the step
  descends, and the loose problem takes fewer CG iterations than at the
  fixed 1e-6 (which needs all 4 on these 4 x 4 systems)."""
  eta, gradient, scaling, step, iterations, converged, exact_iterations = (
      _forcing_outcome(mode))
  want_eta = np.minimum(0.5, np.sqrt(np.linalg.norm(gradient, axis=-1)))
  np.testing.assert_allclose(eta, want_eta, rtol=1e-14)
  assert eta[0] == 0.5 and 1e-6 < eta[1] < 1e-3
  jacobian = _A * 2.0 * _POINT[:, np.newaxis, :]
  damping = 1e-3 * scaling
  system = np.einsum("bmn,bmk->bnk", jacobian, jacobian) + np.apply_along_axis(
      np.diag, -1, damping)
  residual = -gradient - np.einsum("bnk,bk->bn", system, step)
  preconditioner = scaling + damping  # diag(J^T J) estimate + lambda D
  norm = lambda v: np.sqrt(np.sum(v * v / preconditioner, axis=-1))
  assert np.all(norm(residual) <= eta * norm(gradient) * (1 + 1e-12))
  assert np.all(np.einsum("bn,bn->b", gradient, step) < 0)
  assert np.all(converged)
  np.testing.assert_array_equal(exact_iterations, [4, 4])
  assert iterations[0] < 4 and iterations[1] <= 4


def test_inexact_steps_reach_the_minimum_with_fewer_cg_iterations():
  """The extended Rosenbrock function (n = 40; its minimum: x = 1, cost 0,
  a closed form), matrix-free from the usual start, in one `tf.function`:
  with `inexact_steps` and with CG to the fixed 1e-6 (default), both reach
  x = 1, and the forcing term with fewer CG iterations in all (107 against
  116 when written; more iterations, 27 against 7: see
  docs/large_scale.md). Geodesic acceleration on, as written: it is off by
  default with 'cg' since, and without it CG to 1e-6 takes 77 CG, fewer
  than the forcing term's 108."""
  n = 40
  start = tf.constant(np.tile([-1.2, 1.0], n // 2))

  def residual(x):
    odd, even = x[0::2], x[1::2]
    return tf.concat([10.0 * (even - tf.square(odd)), 1.0 - odd], 0)

  inexact, exact = tf.function(lambda x: [tfg_optim.least_squares(
      residual, x, linear_solver="cg", inexact_steps=inexact_steps,
      geodesic_acceleration=2.0)
                                          for inexact_steps in (True, False)])(
                                              start)
  for result in (inexact, exact):
    assert bool(result.converged), result.stop_reason
    np.testing.assert_allclose(result.position, np.ones(n), atol=1e-9)
    assert float(result.cost) < 1e-20
  assert (int(inexact.num_linear_solver_iterations) <
          int(exact.num_linear_solver_iterations))
  with pytest.raises(ValueError, match="inexact_steps"):
    tfg_optim.least_squares(residual, start, inexact_steps=True)  # dense


def test_eisenstat_walker_forcing_term_closed_form():
  """eta_k = min(0.5, 0.9 (||g_k|| / ||g_k-1||)^2), at least 0.9 eta_k-1^2
  where that is above 0.1, at least 1e-6 (NumPy, case by case): the start
  (no previous gradient norm, NaN) and a non-finite gradient, the cap, the
  safeguard on and off, the floor; the same for every scale of the
  gradient norms (residuals multiplied by c scale both by c^2)."""
  ratios = np.array([np.nan, 1.0, 0.5, 0.1, 0.1, 1e-4, 0.3])
  previous_forcing = np.array([np.nan, 0.5, 0.5, 0.5, 0.3, 0.01, np.nan])
  want = np.array([0.5, 0.5, 0.225, 0.225, 0.009, 1e-6, 1e-6])
  gradient = np.tile([[3.0, 4.0]], [7, 1])  # ||g|| = 5.
  gradient[-1, 0] = np.inf  # A non-finite gradient: the fixed tolerance.
  for scale in (1.0, 1e6, 1e-6):
    eta = _linear_solvers.forcing_tolerance(
        tf.constant(scale * gradient),
        (tf.constant(scale * 5.0 / ratios), tf.constant(previous_forcing)))
    np.testing.assert_allclose(eta, want, rtol=1e-14)
  # The rule before (no history): min(0.5, sqrt(||g||)), not scale invariant.
  np.testing.assert_allclose(_linear_solvers.forcing_tolerance(
      tf.constant([[3e-4, 4e-4], [3.0, 4.0]])), [np.sqrt(5e-4), 0.5])


def test_eisenstat_walker_inexact_steps_are_scale_invariant(monkeypatch):
  """Extended Rosenbrock (n = 10; minimum x = 1) with `inexact_steps` and
  Eisenstat and Walker's forcing term (`FORCING_RULE`), its residuals as
  they are and multiplied by 1e3 (one trace, the scale an argument; no
  geodesic acceleration, whose trace costs as much again): the same
  iterations and the same CG iterations in every iteration at both scales
  (the default rule, min(0.5, sqrt(||g||)), took 27 and 33 iterations on
  the n = 40 problem), both reach x = 1, and the term tightens as the
  gradient falls (the history reaches it): the last step takes the most
  CG iterations of all."""
  monkeypatch.setattr(_linear_solvers, "FORCING_RULE", "eisenstat_walker")
  def residual(x, scale):
    odd, even = x[0::2], x[1::2]
    return scale * tf.concat([10.0 * (even - tf.square(odd)), 1.0 - odd], 0)

  solve = tf.function(lambda x, scale: tfg_optim.least_squares(
      lambda x: residual(x, scale), x, linear_solver="cg",
      inexact_steps=True, geodesic_acceleration=None, record=True),
                      autograph=False)
  start = tf.constant(np.tile([-1.2, 1.0], 5))
  results = [solve(start, tf.constant(scale, tf.float64))
             for scale in (1.0, 1e3)]
  cg = [result.records["linear_solver_iterations"].numpy()[
      :int(result.num_iterations)] for result in results]
  np.testing.assert_array_equal(cg[0], cg[1])
  for result in results:
    np.testing.assert_allclose(result.position, np.ones(10), atol=1e-9)
  # A constant eta = 0.5 (no history) ends with 1 CG iteration (of at most
  # 3 in any), this one with 5.
  assert cg[0][-1] == np.max(cg[0]) > cg[0][0], cg[0]


def test_column_groups_give_the_exact_diagonal():
  """F(x) = [x_i x_i+1 - 1; x_i - 1] (row i of the products touches
  columns i and i + 1): with the columns grouped by parity (structurally
  orthogonal), the matrix-free diag(J^T J) equals the dense Jacobian's
  column norms (reverse-mode rows, `DenseKind`), for a batch of two; one
  group for all (not orthogonal) gives row sums of J^T J instead, as the
  closed form says where they are positive, and the probes' estimate
  where a row sum is 0 or less (one exactly 0 below); a grouping of the
  wrong length is an error."""
  def residual_fn(x):
    return tf.concat([x[..., :-1] * x[..., 1:] - 1.0, x - 1.0], -1)
  problem = _engine.Problem(residual_fn, lambda p, s: p + s, 6, None, None)
  point = tf.constant(_RNG.standard_normal((2, 6)))
  residual = residual_fn(point)
  dense = _linearization.DenseKind(problem, 11).at(point, residual)
  parity = np.arange(6) % 2
  exact = _linearization.MatrixFreeKind(problem, column_groups=parity).at(
      point, residual)
  np.testing.assert_allclose(exact.column_norms(), dense.column_norms(),
                             rtol=1e-14)
  one_group = _linearization.MatrixFreeKind(
      problem, column_groups=np.zeros(6, np.int64)).at(point, residual)
  gram = np.einsum("bmn,bmk->bnk", dense.matrix, dense.matrix)
  row_sums = gram.sum(-1)  # (the point depends on the tests run before)
  probes = _linearization.MatrixFreeKind(problem).at(point, residual)
  np.testing.assert_allclose(
      one_group.column_norms(),
      np.where(row_sums > 0, row_sums, probes.column_norms()), rtol=1e-13)
  # F = [x0 - x1, x1, 0.1 x2] (columns 0 and 1 share row 0), grouped
  # [0, 0, 1]: J_0^T (J_0 + J_1) = 1 - 1 = 0, replaced by the probes'
  # exact 1 (one nonzero); J_1^T (J_0 + J_1) = 1 (wrong: ||J_1||^2 = 2)
  # stays; column 2 alone: 0.01.
  linear = _engine.Problem(
      lambda x: tf.stack([x[0] - x[1], x[1], 0.1 * x[2]]),
      lambda p, s: p + s, 3, None, None)
  start = tf.zeros([3], tf.float64)
  wrong = _linearization.MatrixFreeKind(
      linear, column_groups=np.array([0, 0, 1])).at(
          start, linear.residual_fn(start))
  np.testing.assert_allclose(wrong.column_norms(), [1.0, 1.0, 0.01],
                             rtol=1e-15)
  with pytest.raises(ValueError, match="column_groups"):
    tfg_optim.least_squares(residual_fn, point, batch_dims=1,
                            linear_solver="cg", column_groups=parity[:5])


@pytest.mark.parametrize("mode,dtype", [("eager", "float64"),
                                        ("function", "float64"),
                                        ("session", "float64"),
                                        ("xla", "float32")])
def test_column_groups_solve_reaches_the_tikhonov_closed_form(mode, dtype):
  """least_squares(linear_solver='cg', column_groups=parity) on
  F(x) = [x - y; 0.5 (x_i+1 - x_i)] (neighbours share a row: parity groups
  are structurally orthogonal) reaches x = (I + D^T D / 4)^-1 y, in every
  mode, with an unknown number of residuals in the graph modes (not under
  XLA). (The groups change only the scaling and the preconditioner, not
  the answer: test_column_groups_give_the_exact_diagonal checks them.)"""
  y = np.array([1.0, -2.0, 0.5, 3.0, 0.0, -1.0], dtype)
  difference = np.diff(np.eye(6), axis=0)
  want = np.linalg.solve(np.eye(6) + difference.T @ difference / 4.0, y)

  def build(y):
    residual = lambda x: tf.concat([x - y, 0.5 * (x[1:] - x[:-1])], 0)
    result = tfg_optim.least_squares(
        residual, tf.zeros([6], y.dtype), linear_solver="cg",
        column_groups=np.arange(6) % 2)
    return result.position, result.converged

  signature = None if mode == "xla" else [[None]]
  position, converged = modes.run(build, [y], mode, signature)
  assert converged
  np.testing.assert_allclose(position, want,
                             atol=1e-9 if dtype == "float64" else 1e-4)


def _loop_residual(x):
  return tf.while_loop(lambda i, y: i < 3,
                       lambda i, y: (i + 1, tf.sin(y) * x), (0, x))[1]


@tf.custom_gradient
def _square_stopping_its_cotangent(x):
  """x^2 whose backward stops its cotangent: reverse mode twice cannot
  transpose it (it gave a silent 0)."""
  return x * x, lambda upstream: 2.0 * x * tf.stop_gradient(upstream)


_DERIVATIVE_RESIDUALS = {
    "piecewise": lambda x: (tf.where(x > 0, x ** 2, tf.sign(x) * x) +
                            tf.floor(x)),
    "gather_atan2_norm": lambda x: tf.stack([
        tf.math.atan2(x[0], x[1]), tf.gather(x, [2, 0])[0] * x[1],
        tf.norm(x)]),
    "cholesky": lambda x: tf.reshape(tf.linalg.cholesky(
        tf.linalg.diag(x * x + 1.0) + 0.1), [-1]),
    "while_loop": _loop_residual,
    # (TensorFlow cannot differentiate a py_function's gradient: forward
    # mode is taken instead)
    "py_function": lambda x: tf.reshape(tf.py_function(
        lambda q: tf.sin(q) * q, [x], tf.float64), [3]),
    "constant": lambda x: tf.constant([1.0, 2.0], tf.float64),
    # (TensorFlow's forward mode for these two, which reverse mode twice
    # got as a silent 0: a custom gradient, and an op whose gradient has no
    # gradient; `tf.image.resize` is None in both, as before)
    "custom_gradient": lambda x: _square_stopping_its_cotangent(x) - 1.0,
    "resize": lambda x: tf.reshape(tf.image.resize(
        tf.reshape(x, [1, 3, 1, 1]), [4, 1]), [4]),
}


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "function"])
def test_directional_derivatives_equal_forward_mode(eager):
  """`_linearization.directional_derivatives` (reverse mode twice: how the
  engine takes J t) equals TensorFlow's forward mode
  (`tf.autodiff.ForwardAccumulator`, op by op) on residuals with
  piecewise ops, gathers, a Cholesky factorization, a while loop and a
  `tf.py_function` (whose gradient TensorFlow cannot differentiate: it
  failed, eagerly and in graphs, before the forward-mode fallback), a
  custom gradient that stops its cotangent and `tf.image.resize` (both
  were a silent 0 by reverse mode twice), and says None (not connected)
  for a constant."""
  x = tf.constant([0.3, -0.7, 1.1], tf.float64)
  tangents = [tf.constant(t, tf.float64) for t in np.eye(3)] + [
      tf.constant([0.5, -2.0, 1.5], tf.float64)]

  def both(x):
    results = []
    for name, f in _DERIVATIVE_RESIDUALS.items():
      if name == "resize" and eager:
        # (Eagerly neither mode transposes its gradient: a ValueError.)
        with pytest.raises(ValueError, match="no gradient, such as tf.image"):
          _linearization.directional_derivatives(f, x, tangents)
        results.append(([None] * 4, [None] * 4, []))
        continue
      forward = []
      for t in tangents:
        with tf.autodiff.ForwardAccumulator(x, t) as accumulator:
          value = f(x)
        forward.append(accumulator.jvp(value))
      seen = []
      _, products = _linearization.directional_derivatives(
          f, x, tangents, check=lambda depends, value: seen.append(
              depends(value)))
      results.append((forward, products, seen))
    return results

  results = both(x) if eager else tf.function(both, autograph=False)(x)
  for name, (forward, products, seen) in zip(_DERIVATIVE_RESIDUALS,
                                             results):
    if name == "constant":
      assert forward == [None] * 4 and products == [None] * 4
      assert seen == [False]
      continue
    if name == "resize":  # (its gradient has no gradient: not connected)
      assert forward == [None] * 4 and products == [None] * 4, name
      continue
    assert seen == [True]
    for want, got in zip(forward, products):
      np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-15,
                                 err_msg=name)


@tf.custom_gradient
def _square_with_surrogate_gradient(x):
  """x^2 whose backward says 3 x (a surrogate, not the derivative 2 x)."""
  return x * x, lambda upstream: 3.0 * x * upstream


@tf.custom_gradient
def _straight_through_round(x):
  """round(x) with the straight-through estimator's identity backward."""
  return tf.round(x), lambda upstream: upstream


@tf.function(autograph=False)
def _nested_stopping_square(x):
  return _square_stopping_its_cotangent(x)


# Residuals whose J (`directional_derivatives`) must be the reverse-mode
# Jacobian's (`tf.GradientTape.jacobian`, what TensorFlow Graphics uses),
# custom gradients included, in every mode. TensorFlow's forward mode
# disagrees on the first two in graphs (3 x instead of the surrogate's
# 4.5 x; 0 for the straight-through estimator).
_REVERSE_MODE_RESIDUALS = {
    "surrogate": lambda x: _square_with_surrogate_gradient(x) * [1.0, 2.0,
                                                                 3.0],
    "straight_through": lambda x: _straight_through_round(3.0 * x) * x,
    "map_fn": lambda x: tf.map_fn(lambda v: tf.sin(v) * v, x),
    "straight_through_in_map_fn": lambda x: tf.map_fn(
        lambda v: _straight_through_round(3.0 * v) * v, x),
}


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "function"])
def test_directional_derivatives_follow_reverse_mode(eager):
  """J t from `directional_derivatives` equals the reverse-mode Jacobian's
  (`tf.GradientTape.jacobian` row by row) in eager mode and in graphs:
  a custom gradient's backward is J^T (a surrogate gradient, a
  straight-through estimator: graphs took TensorFlow's forward mode for
  them, 3 x instead of 4.5 x and 0 instead of the estimator's 1, so eager
  and graph solves differed), also inside `tf.map_fn` (which failed in
  graphs: TensorFlow's forward mode on its TensorList ops), a custom
  gradient that stops its cotangent inside a nested `tf.function` (the
  adjoint test sends it to forward mode, in the graph too)."""
  x = tf.constant([0.3, -0.7, 1.1], tf.float64)
  tangents = [tf.constant(t, tf.float64) for t in np.eye(3)] + [
      tf.constant([0.5, -2.0, 1.5], tf.float64)]

  def both(x):
    results = []
    for f in _REVERSE_MODE_RESIDUALS.values():
      with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        pieces = tf.unstack(f(x))
      rows = tf.stack([tape.gradient(piece, x) for piece in pieces])
      _, products = _linearization.directional_derivatives(f, x, tangents)
      results.append(([tf.linalg.matvec(rows, t) for t in tangents],
                      products))
    return results

  results = both(x) if eager else tf.function(both, autograph=False)(x)
  for name, (want, got) in zip(_REVERSE_MODE_RESIDUALS, results):
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-15,
                               err_msg=name)


def test_untransposable_custom_gradient_is_an_error_or_nan():
  """A custom gradient that stops its cotangent inside a nested
  `tf.function`: neither reverse mode twice nor TensorFlow's forward mode
  (0 there) gives J; J t was t alone (the `+ x`), silently wrong. Eagerly
  a ValueError says why; in a graph the products are NaN and
  `least_squares` ends NOT_FINITE at the start, not converged."""
  x = tf.constant([0.3, -0.7, 1.1], tf.float64)
  tangent = tf.constant([0.5, -2.0, 1.5], tf.float64)
  residual = lambda x: _nested_stopping_square(x) + x
  with pytest.raises(ValueError, match="not differentiable in its upstream"):
    _linearization.directional_derivatives(residual, x, [tangent])
  product = tf.function(lambda x: _linearization.directional_derivatives(
      residual, x, [tangent])[1][0], autograph=False)(x)
  assert np.all(np.isnan(product))
  result = tf.function(lambda x: tfg_optim.least_squares(
      lambda v: residual(v) - 3.0, x), autograph=False)(x)
  assert not result.converged
  assert int(result.stop_reason) == tfg_optim.StopReason.NOT_FINITE


@pytest.mark.parametrize("mode,dtype,dynamic", [
    ("eager", "float64", False), ("function", "float32", True),
    ("xla", "float64", False), ("session", "float32", True)])
def test_straight_through_residual_solves_alike_in_every_mode(mode, dtype,
                                                               dynamic):
  """least_squares on residuals through a straight-through estimator and a
  map_fn ends at the same point with the same iterations in every mode,
  float32 and float64, with data of unknown length (graphs took J = 0
  from forward mode and stopped at the start, where eager mode solved it;
  the map_fn failed to trace)."""
  target = np.array([1.0, 2.0, -1.5], dtype)  # (reachable: multiples of 1/4)

  def build(x, c):
    result = tfg_optim.least_squares(lambda v: tf.map_fn(
        lambda q: _straight_through_round(4.0 * q) / 4.0, v) - c, x)
    return result.position, result.converged, result.num_iterations

  position, converged, iterations = modes.run(
      build, [np.array([0.1, 0.2, 0.3], dtype), target], mode,
      signature=[[3], [None]] if dynamic else None)
  assert converged and iterations == 1, (converged, iterations)
  # One Gauss-Newton step with the estimator's J = I: x0 - r(x0).
  np.testing.assert_allclose(position, [1.1, 1.95, -1.45],
                             rtol=1e-6 if dtype == "float32" else 1e-12)


@pytest.mark.parametrize("mode,dtype,dynamic", [
    ("eager", "float64", False), ("function", "float32", True),
    ("xla", "float64", False), ("session", "float32", True)])
def test_custom_gradient_residual_solves_in_every_mode(mode, dtype, dynamic):
  """A residual through a custom gradient whose backward stops its
  cotangent (reverse mode twice cannot transpose it; it gave J = 0 and
  'converged' at the start) reaches the closed form x = sqrt(c) in every
  mode, float32 and float64, with data of unknown length: TensorFlow's
  forward mode is taken for it (graphs: the custom gradient is seen;
  eagerly: the adjoint test fails)."""
  target = np.array([1.0, 2.0, 3.0], dtype)

  def build(x, c):
    result = tfg_optim.least_squares(
        lambda v: _square_stopping_its_cotangent(v) - c, x)
    return result.position, result.converged, result.num_iterations

  position, converged, iterations = modes.run(
      build, [np.ones(3, dtype), target], mode,
      signature=[[3], [None]] if dynamic else None)
  assert converged and iterations > 0
  np.testing.assert_allclose(position, np.sqrt(target),
                             rtol=1e-4 if dtype == "float32" else 1e-9)


def test_nan_member_does_not_change_a_custom_gradient_batch():
  """A batch member with NaN data next to a residual through a custom
  gradient that stops its cotangent: the other member's solve is the one it
  gets next to a finite member, bit for bit (with the first in-graph
  adjoint test, the forward-mode products were NaN for the whole batch:
  Grappler rewrites not(a > b) into a <= b, which a NaN fails; the geodesic
  correction was then dropped, 7 iterations instead of 6)."""
  solve = tf.function(lambda y: tfg_optim.least_squares(
      lambda v: _square_stopping_its_cotangent(v) - y,
      tf.ones([2, 2], tf.float64), batch_dims=1), autograph=False)
  alone = solve(tf.constant([[4.0, 9.0], [4.0, 9.0]], tf.float64))
  beside_nan = solve(tf.constant([[4.0, 9.0], [np.nan, 9.0]], tf.float64))
  np.testing.assert_array_equal(beside_nan.position[0], alone.position[0])
  assert int(beside_nan.num_iterations[0]) == int(alone.num_iterations[0])
  assert bool(alone.converged[0]) and bool(beside_nan.converged[0])
  assert int(beside_nan.stop_reason[1]) == tfg_optim.StopReason.NOT_FINITE


class _TwentyParameters:
  """The minimal problem `_linearization.jacobian` reads, n = 20 (> 16: in
  graphs, the columns are vectorized unless F has a custom gradient)."""
  tangent_product = forward_product = jacobian_fn = None
  tangent_dim = 20

  def __init__(self, residual_fn):
    self.residual_fn = residual_fn

  def retract(self, point, step):
    return point + step


_MIXING = np.random.default_rng(1).standard_normal((30, 20))


@pytest.mark.parametrize("name", ["surrogate", "surrogate_in_scan",
                                  "surrogate_in_while"])
def test_wide_jacobian_with_custom_gradients_in_graphs(name):
  """J for n = 20 in a graph (where `tf.vectorized_map` builds the
  columns) equals the reverse-mode Jacobian for a surrogate custom
  gradient, also inside tf.scan and tf.while_loop: under pfor the adjoint
  test's tf.cond made the XLA compile fail and the loops' J NaN; the
  while loop's backward bodies' arguments (Placeholder ops, 'no
  gradient') sent it to forward mode."""
  mixing = tf.constant(_MIXING)
  residual = {
      "surrogate": lambda x: _square_with_surrogate_gradient(
          tf.linalg.matvec(mixing, x)),
      "surrogate_in_scan": lambda x: tf.scan(
          lambda a, v: _square_with_surrogate_gradient(v) + 0.1 * a,
          tf.linalg.matvec(mixing, x)),
      "surrogate_in_while": lambda x: tf.while_loop(
          lambda i, v: i < 2, lambda i, v: (
              i + 1, _square_with_surrogate_gradient(v) * 0.5),
          (0, tf.linalg.matvec(mixing, x)))[1],
  }[name]
  x = tf.constant(np.random.default_rng(2).uniform(-0.5, 0.5, 20))
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    value = residual(x)
  want = tape.jacobian(value, x, experimental_use_pfor=False)
  got = tf.function(lambda x: _linearization.jacobian(
      _TwentyParameters(residual), x, [], 30), autograph=False)(x)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
