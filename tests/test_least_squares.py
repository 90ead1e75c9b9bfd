"""Tests of `tfg_optim.least_squares`, the robust default solver.

Independent truth: the NIST StRD certified values (all 27 nonlinear
regression datasets, both starts), scipy's `least_squares` minima for the
robust losses, the Rosenbrock minimum (1, 1), and closed-form Jacobians.
"""

import functools

import numpy as np
import pytest
import scipy.optimize
import tensorflow as tf

import tfg_optim
from tests import modes
from tests import nist
from tests import problems
from tfg_optim import StopReason
from tfg_optim import _engine
from tfg_optim import _linearization
from tfg_optim import _step
from tfg_optim import damping as damping_lib
from tfg_optim import factor_graph

MODES = modes.MODES


# -- NIST StRD: certified accuracy ---------------------------------------------


@functools.lru_cache(maxsize=None)
def _nist_fit(name, dtype):
  """Both starts of a dataset, one trace (a batch of 2), default options."""
  return nist.solve(nist.load(name), tf.as_dtype(dtype))


# Four of NIST's eight datasets of higher difficulty (the exponentials and
# the rational that overflow, sit near plateaus, or are the worst
# conditioned), and two of average difficulty that test the stopping rules
# (MGH17: a degenerate plateau; ENSO: linear convergence). All 27 (54
# starts) are benchmark-sized: `benchmarks/nist_strd.py` runs them
# (docs/nist.md: 54 / 54).
_NIST_TESTED = ("MGH09", "MGH10", "BoxBOD", "Bennett5", "MGH17", "ENSO")


# Both starts of a dataset in one test: they share one trace (a batch of
# 2), which a parallel run would otherwise make in two workers.
@pytest.mark.parametrize("name", _NIST_TESTED)
def test_nist_float64_default_options_reach_six_digits(name):
  dataset = nist.load(name)
  result = _nist_fit(name, "float64")
  for s, start in enumerate((1, 2)):
    lre = nist.lre(result.position[s], dataset.certified)
    assert lre.min() >= 6.0, (name, start, lre, result.num_iterations[s],
                              StopReason(int(result.stop_reason[s])).name)
    assert result.converged[s], (name, start)
    # Lanczos1's certified RSS (1.4e-25) is below what its 11-digit certified
    # parameters reproduce (4e-21); elsewhere the RSS is certified to 1e-10.
    if name != "Lanczos1":
      np.testing.assert_allclose(2.0 * result.cost[s], dataset.certified_rss,
                                 rtol=1e-9, err_msg=f"{name}/{start}")


# The float32 datasets whose models overflow or sit near degenerate
# plateaus (exponentials, rationals): where a NaN or Inf would come from.
# `benchmarks/nist_strd.py --float32` runs all 27 and reports "all finite".
_FLOAT32_HARD = ("MGH09", "MGH10", "BoxBOD")


@pytest.mark.parametrize("name", _FLOAT32_HARD)
def test_nist_float32_never_returns_nan(name):
  result = _nist_fit(name, "float32")
  for value in (result.position, result.cost, result.residual,
                result.gradient_norm, result.damping):
    assert np.all(np.isfinite(value)), name
  assert np.all(result.cost <= result.initial_cost)
  assert result.position.dtype == np.float32
  if name == "MGH10":
    # Start 1 is not solvable in float32 (LRE 0): its trust radius shrinks
    # to 0 and a step test fires on the zero step; that is STALLED, never
    # converged (docs/nist.md).
    dataset = nist.load(name)
    assert nist.lre(result.position[0], dataset.certified).min() < 1
    assert not result.converged[0]
    assert StopReason(int(result.stop_reason[0])) == StopReason.STALLED


# -- Rosenbrock ----------------------------------------------------------------


_rosenbrock = problems.rosenbrock_residuals


def test_rosenbrock_within_thirty_residual_evaluations():
  result = tfg_optim.least_squares(_rosenbrock,
                                   tf.constant([-1.2, 1.0], tf.float64))
  np.testing.assert_allclose(result.position.numpy(), [1.0, 1.0], atol=1e-10,
                             rtol=0)
  assert result.converged
  assert int(result.num_residual_evaluations) <= 30


# Each default safeguard is what solves some start; without it that start
# fails (measured in docs/nist.md).


def _lre(name, start, **options):
  dataset = nist.load(name)
  result = nist.solve(dataset, **options)
  return nist.lre(result.position[start - 1], dataset.certified).min()


def test_vanishing_column_refusal_keeps_boxbod_off_its_plateau():
  """Without geodesic acceleration, the first finite step from BoxBOD start 1
  sends b2 to ~115, where exp(-b2 x) = 0 and dF/db2 = 0: a degenerate
  stationary point, unless that step is refused for the vanishing column."""
  assert _lre("BoxBOD", 1, geodesic_acceleration=None) >= 6
  assert _lre("BoxBOD", 1, geodesic_acceleration=None,
              vanishing_column_tolerance=0.0) < 1


@pytest.mark.parametrize("mode", ["session", "xla"])
def test_vanishing_column_refusal_in_a_session_and_under_xla(mode):
  """The refusal (with the trust region, no acceleration) solves BoxBOD
  start 1 in a TF1 Session and under XLA too (tf.function: the test
  above)."""
  dataset = nist.load("BoxBOD")
  residual = nist.residual_fn(dataset)
  build = lambda b: _fields(tfg_optim.least_squares(
      residual, b, geodesic_acceleration=None))
  got = modes.run(build, [dataset.starts[0]], mode)
  assert nist.lre(got[0], dataset.certified).min() >= 6
  assert StopReason(int(got[4])).converged


def test_nielsen_damping_crawls_on_mgh10_start_1():
  """The trust region is the default because Nielsen's damping enters
  MGH10's curved valley (b1 -> 1e-50) and crawls for 1000 iterations."""
  assert _lre("MGH10", 1, damping="nielsen") < 1


# -- geodesic acceleration -----------------------------------------------------


def _curved(v):  # F''(v)[d, d] = [2 d0^2 v1 + 4 v0 d0 d1, -sin(v0) d0^2, 0]
  return tf.stack([v[..., 0] ** 2 * v[..., 1], tf.sin(v[..., 0]),
                   3.0 * v[..., 1]], -1)


def test_engine_refuses_a_dense_initial_jacobian_for_another_kind():
  problem = _engine.Problem(residual_fn=lambda x: x - 1.0,
                            retract=lambda x, s: x + s, tangent_dim=2,
                            cost_fn=None, jacobian_fn=None)
  x = tf.zeros([2], tf.float64)
  with pytest.raises(ValueError, match="'initial_jacobian'.*MatrixFreeKind"):
    _engine.minimize(problem, x, damping_lib.NielsenDamping(), 5,
                     initial_jacobian=tf.eye(2, dtype=tf.float64),
                     matrix_free=True)


@pytest.mark.parametrize("user_jacobian", [False, True])
def test_second_directional_derivative_closed_form(user_jacobian):
  point = tf.constant([[0.7, -1.3], [2.0, 0.5]], tf.float64)
  direction = tf.constant([[0.3, 0.2], [-1.0, 0.25]], tf.float64)
  x0, x1 = point[:, 0], point[:, 1]
  d0, d1 = direction[:, 0], direction[:, 1]
  want = tf.stack([2 * d0 ** 2 * x1 + 4 * x0 * d0 * d1,
                   -tf.sin(x0) * d0 ** 2, tf.zeros_like(x0)], -1)
  jacobian_fn = None
  if user_jacobian:
    def jacobian_fn(v):
      return tf.stack([
          tf.stack([2 * v[:, 0] * v[:, 1], v[:, 0] ** 2], -1),
          tf.stack([tf.cos(v[:, 0]), tf.zeros_like(v[:, 0])], -1),
          tf.stack([tf.zeros_like(v[:, 0]), 3.0 * tf.ones_like(v[:, 0])], -1)],
                      -2)
  problem = _engine.Problem(_curved, lambda p, s: p + s, 2, None, jacobian_fn)
  residual = _curved(point)
  linearization = _linearization.Dense(_linearization.jacobian(
      problem, point, tf.shape(point)[:-1], 3))
  got, evaluations = _step.second_directional_derivative(
      problem, point, direction, residual, linearization)
  if user_jacobian:
    # A forward difference, h = 0.1: F''[d, d] + (h / 3) F'''[d, d, d] + ...,
    # exact for the cubic x0^2 x1 with its third-order term, 6 d0^2 d1.
    assert evaluations == 1
    np.testing.assert_allclose(got[:, 0], want[:, 0] + 0.2 * d0 ** 2 * d1,
                               rtol=1e-9)
    np.testing.assert_allclose(got[:, 1], want[:, 1], atol=0.05)
  else:
    # A forward difference of Jacobian-vector products: about sqrt(eps).
    assert evaluations == 0
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_geodesic_acceleration_is_zero_on_a_linear_problem():
  matrix = np.array([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]])
  target = np.array([1.0, -2.0, 4.0])
  residual = lambda x: tf.linalg.matvec(tf.constant(matrix), x) - target
  start = tf.constant([10.0, -7.0], tf.float64)
  with_acceleration = tfg_optim.least_squares(residual, start, record=True)
  without = tfg_optim.least_squares(residual, start, record=True,
                                    geodesic_acceleration=None)
  np.testing.assert_allclose(with_acceleration.position,
                             np.linalg.lstsq(matrix, target, rcond=None)[0],
                             rtol=1e-8)
  np.testing.assert_array_equal(with_acceleration.records["cost"],
                                without.records["cost"])


def test_geodesic_acceleration_with_a_user_jacobian_takes_the_same_steps():
  """Rosenbrock's residuals are quadratic: the finite-difference F''[v, v]
  of a user Jacobian is exact, so the iterates match the autodiff ones; each
  iteration costs one more residual evaluation."""
  def jacobian(v):
    return tf.stack([tf.stack([-1.0 * tf.ones_like(v[0]), tf.zeros_like(v[0])]),
                     tf.stack([-20.0 * v[0], 10.0 * tf.ones_like(v[0])])])
  start = tf.constant([-1.2, 1.0], tf.float64)
  auto = tfg_optim.least_squares(_rosenbrock, start, record=True)
  user = tfg_optim.least_squares(_rosenbrock, start, record=True,
                                 jacobian=jacobian)
  # The last, rounding-level iterations may differ.
  assert abs(int(user.num_iterations) - int(auto.num_iterations)) <= 2
  np.testing.assert_allclose(user.position, auto.position, rtol=1e-12)
  above_rounding = auto.records["cost"].numpy() > 1e-12
  # The difference quotient's rounding (~eps / h^2) is all that differs.
  np.testing.assert_allclose(user.records["cost"].numpy()[above_rounding],
                             auto.records["cost"].numpy()[above_rounding],
                             rtol=1e-6)
  assert int(user.num_residual_evaluations) == 1 + 2 * int(user.num_iterations)
  assert int(auto.num_residual_evaluations) == 1 + int(auto.num_iterations)


# The trust region in every mode and dtype: it is the default damping, so
# test_every_mode_solves (Misra1a, DanWood, Rosenbrock) runs it.


# -- box bounds ----------------------------------------------------------------


# Eagerly and in a tf.function, both dtypes; the conformance table runs
# active and inactive bounds pairwise with every other option in every mode
# (XLA included).
@pytest.mark.parametrize("mode,dtype", [("eager", "float64"),
                                        ("function", "float32")])
def test_bounds_rosenbrock_closed_form(dtype, mode):
  """With x0 <= 0.5 the minimum of (1 - x0)^2 + 100 (x1 - x0^2)^2 has
  x1 = x0^2 and x0 = 0.5 on the bound: (0.5, 0.25)."""
  bounds = (np.array([-np.inf, -np.inf], dtype), np.array([0.5, np.inf], dtype))
  build = lambda b: _fields(tfg_optim.least_squares(_rosenbrock, b,
                                                    bounds=bounds))
  got = modes.run(build, [np.array([-1.2, 1.0], dtype)], mode)
  np.testing.assert_allclose(got[0], [0.5, 0.25],
                             atol=1e-10 if dtype == "float64" else 1e-5)
  assert got[0][0] <= 0.5
  assert StopReason(int(got[4])).converged


def test_bounds_linear_matches_scipy_lsq_linear():
  rng = np.random.default_rng(0)
  matrix, target = rng.normal(size=(20, 5)), rng.normal(size=20)
  lower, upper = np.full(5, -0.2), np.array([0.3, 0.3, 0.3, 0.3, np.inf])
  want = scipy.optimize.lsq_linear(matrix, target, bounds=(lower, upper),
                                   tol=1e-14).x
  result = tfg_optim.least_squares(
      lambda x: tf.linalg.matvec(tf.constant(matrix), x) - target,
      tf.zeros(5, tf.float64), bounds=(lower, upper))
  assert np.sum((want <= lower + 1e-12) | (want >= upper - 1e-12)) >= 2
  np.testing.assert_allclose(result.position, want, atol=1e-10)
  assert result.converged


def test_python_number_bounds_are_not_rounded_to_float32():
  """An active bound given as a Python float holds exactly in float64 (it
  used to be rounded through float32: 1.8 -> 1.7999999523)."""
  result = tfg_optim.least_squares(lambda x: x - 3.0,
                                   tf.constant([0.0, 0.0], tf.float64),
                                   bounds=(-1.0, [1.8, 2.2]))
  np.testing.assert_array_equal(result.position.numpy(), [1.8, 2.2])
  # A bound list holding a symbolic tensor is cast as a whole (a review found
  # np.asarray failing on it inside tf.function).
  solve = tf.function(lambda lower: tfg_optim.least_squares(
      lambda x: x - 3.0, tf.constant([0.0, 0.0], tf.float64),
      bounds=([lower, -1.0], 1.8)).position)
  np.testing.assert_array_equal(solve(tf.constant(-1.0, tf.float64)),
                                [1.8, 1.8])


def test_inactive_bounds_change_nothing():
  dataset = nist.load("Misra1a")
  residual = nist.residual_fn(dataset)
  # Both solves in one trace (eagerly each takes seconds).
  free, boxed = modes.run(lambda start: [
      (r.position, r.records["cost"]) for r in (
          tfg_optim.least_squares(residual, start, record=True),
          tfg_optim.least_squares(residual, start, record=True,
                                  bounds=(-1e6, 1e6)))],
                          [dataset.starts[0]], "function")
  np.testing.assert_array_equal(boxed[0], free[0])
  np.testing.assert_array_equal(boxed[1], free[1])


@pytest.mark.parametrize("bounds,message", [
    ((0.0,), "pair"),
    ((1.0, 1.0), "lower < upper"),
    ((0.5, 2.0), "within"),
    (([0.0, 0.0, 0.0], 2.0), "broadcastable"),
])
def test_invalid_bounds_name_the_argument(bounds, message):
  with pytest.raises(ValueError, match=message):
    tfg_optim.least_squares(_rosenbrock, tf.constant([0.1, 1.0], tf.float64),
                            bounds=bounds)


def test_start_outside_bounds_fails_when_the_graph_runs():
  solve = tf.function(lambda x: tfg_optim.least_squares(
      _rosenbrock, x, bounds=(0.5, 2.0)).position)
  with pytest.raises(tf.errors.InvalidArgumentError, match="within"):
    solve(tf.constant([0.1, 1.0], tf.float64))


# -- every execution mode ------------------------------------------------------


def _fields(result):
  return (result.position, result.cost, result.num_iterations,
          result.num_residual_evaluations, result.stop_reason)


def _every_mode_problem(name, dtype):
  if name == "rosenbrock":
    residual, start, solution = _rosenbrock, np.array([-1.2, 1.0]), [1.0, 1.0]
  else:
    dataset = nist.load(name)
    residual = nist.residual_fn(dataset, nist.TF, tf.as_dtype(dtype))
    start, solution = dataset.starts[0], dataset.certified
  build = lambda b: _fields(tfg_optim.least_squares(residual, b))
  return build, start.astype(dtype), solution


@functools.lru_cache(maxsize=None)
def _every_mode_solve(name, dtype, mode):
  build, start, _ = _every_mode_problem(name, dtype)
  return modes.run(build, [start], mode)


# Misra1a in float64 eagerly, in tf.function and in a Session (XLA: float32
# in test_bounds_rosenbrock_closed_form, float64 in the conformance table); Rosenbrock eagerly in float32 and in
# tf.function (the conformance table runs it pairwise with every option in
# every mode).
@pytest.mark.parametrize(
    "name,mode,dtype",
    [("Misra1a", mode, "float64") for mode in MODES if mode != "xla"] +
    [("rosenbrock", "eager", "float32"),
     ("rosenbrock", "function", "float64")])
def test_every_mode_solves(name, dtype, mode):
  _, _, solution = _every_mode_problem(name, dtype)
  got = _every_mode_solve(name, dtype, mode)
  # The eager solve, the reference of every mode, is made once per process.
  eager = _every_mode_solve(name, dtype, "eager")
  position = got[0]
  assert position.dtype == np.dtype(dtype)
  digits = 6.0 if dtype == "float64" else 3.0
  assert nist.lre(position, np.asarray(solution)).min() >= digits
  # Every mode runs the same loop: nearly the same numbers. The last few
  # iterations are decided by rounding (the float64 function tolerance, 1e-16,
  # is at the rounding floor) and kernels round differently across modes, so
  # the iteration counts may differ by several (DanWood: 19 eager, 26 XLA).
  # Geodesic acceleration's finite difference (relative error sqrt(eps))
  # carries such rounding differences into the last digits: Misra1a ends
  # 1.3e-9 apart in tf.function and eagerly.
  np.testing.assert_allclose(position, eager[0],
                             rtol=1e-8 if dtype == "float64" else 1e-4)
  if dtype == "float64":
    assert abs(int(got[2]) - int(eager[2])) <= 10
    assert int(got[3]) == int(got[2]) + 1
  assert StopReason(int(got[4])).converged


# -- robust losses against scipy -----------------------------------------------


def _outlier_problem():
  rng = np.random.default_rng(3)
  t = np.linspace(0.0, 4.0, 40)
  y = 2.5 * np.exp(-1.3 * t) + 0.5 + 0.02 * rng.standard_normal(t.size)
  y[::7] += rng.uniform(1.0, 3.0, y[::7].size)  # outliers
  model = lambda b, ops: b[..., 0:1] * ops.exp(-b[..., 1:2] * t) + b[..., 2:3]
  return t, y, model


# Every loss once, each scale twice.
@pytest.mark.parametrize("loss,scale", [("huber", 0.1), ("soft_l1", 1.0),
                                        ("cauchy", 0.1), ("arctan", 1.0)])
def test_robust_losses_match_scipy(loss, scale):
  _, y, model = _outlier_problem()
  start = np.array([1.0, 1.0, 0.0])
  want = scipy.optimize.least_squares(
      lambda b: model(b, np) - y, start, loss=loss, f_scale=scale,
      method="trf", ftol=1e-15, xtol=1e-15, gtol=1e-15, max_nfev=10000)
  # Traced (the loss, not the mode, is the point; tests/test_conformance.py
  # runs every loss in every mode): eagerly this fit takes seconds.
  result = tf.function(lambda b: tfg_optim.least_squares(
      lambda b: model(b, tf) - y, b, loss=loss, loss_scale=scale),
                       autograph=False)(tf.constant(start))
  assert result.converged
  # scipy's trf stops on its own tolerances: agree to ~6 digits, and our
  # minimum is at least as low. The reported cost is scipy's,
  # 1/2 sum C^2 rho((r / C)^2).
  np.testing.assert_allclose(result.position.numpy(), want.x, rtol=2e-6,
                             atol=1e-8)
  np.testing.assert_allclose(result.cost.numpy(), want.cost, rtol=1e-9)
  assert float(result.cost) <= want.cost * (1.0 + 1e-12)


def test_robust_loss_resists_outliers():
  _, y, model = _outlier_problem()
  start = tf.constant([1.0, 1.0, 0.0], tf.float64)
  residual = lambda b: model(b, tf) - y
  plain, robust = (p.numpy() for p in tf.function(lambda b: (
      tfg_optim.least_squares(residual, b).position,
      tfg_optim.least_squares(residual, b, loss="soft_l1",
                              loss_scale=0.1).position), autograph=False)(
                                  start))
  truth = np.array([2.5, 1.3, 0.5])
  assert np.abs(robust - truth).max() < 0.1 < np.abs(plain - truth).max()


# -- damping policies ----------------------------------------------------------


@pytest.mark.parametrize("damping", ["trust_region", "nielsen", "tfg", "manopt",
                                     damping_lib.NielsenDamping(initial=1.0)])
def test_damping_choices_reach_the_same_minimum(damping):
  # Traced: TFG's damping runs all 1000 iterations (about a minute eagerly).
  position = modes.run(lambda x: tfg_optim.least_squares(
      _rosenbrock, x, damping=damping).position, [np.array([-1.2, 1.0])],
                       "function")
  np.testing.assert_allclose(position, [1.0, 1.0], atol=1e-8)


def test_damping_policies_differ():
  dataset = nist.load("Misra1a")
  iterations = {d: tuple(nist.solve(dataset, damping=d).num_iterations)
                for d in ("trust_region", "nielsen", "tfg", "manopt")}
  assert len(set(iterations.values())) > 1, iterations


# -- results fields ------------------------------------------------------------


def test_results_fields_and_counts():
  dataset = nist.load("Rat43")
  result = nist.solve(dataset, record=True)
  np.testing.assert_array_equal(result.num_residual_evaluations,
                                1 + result.num_iterations)
  np.testing.assert_array_equal(result.num_jacobian_evaluations,
                                1 + result.num_accepted)
  np.testing.assert_array_equal(result.num_accepted + result.num_rejected,
                                result.num_iterations)
  assert np.all(result.converged)
  for s in range(2):
    assert StopReason(int(result.stop_reason[s])).converged
    history = result.records["cost"][:, s]
    n = int(result.num_iterations[s])
    assert np.all(np.diff(history[:n]) <= 0)  # the cost never increases
    assert np.all(np.isnan(history[n:]))
    assert history[n - 1] == pytest.approx(result.cost[s])
  assert result.cost.shape == (2,) and result.residual.shape == (2, 15)


def test_iteration_limit_is_not_convergence():
  dataset = nist.load("MGH09")
  result = nist.solve(dataset, max_iterations=3)
  np.testing.assert_array_equal(result.num_iterations, [3, 3])
  assert not np.any(result.converged)
  assert np.all(result.stop_reason == int(StopReason.MAX_ITERATIONS))


def test_cost_tolerance_stops():
  result = tfg_optim.least_squares(_rosenbrock,
                                   tf.constant([-1.2, 1.0], tf.float64),
                                   cost_tolerance=1e-3)
  assert StopReason(int(result.stop_reason)) == StopReason.COST
  assert float(result.cost) <= 1e-3


def test_summary_prints():
  result = tfg_optim.least_squares(_rosenbrock,
                                   tf.constant([-1.2, 1.0], tf.float64))
  assert "converged" in str(result) and "iterations" in result.summary()


# -- user-supplied Jacobian ----------------------------------------------------


@pytest.mark.parametrize("loss", ["linear", "cauchy"])
def test_user_jacobian_matches_autodiff(loss):
  dataset = nist.load("Misra1a")
  x, y = dataset.x, dataset.y
  residual = lambda b: y - b[0] * (1.0 - tf.exp(-b[1] * x))

  def jacobian(b):
    e = tf.exp(-b[1] * x)
    return tf.stack([-(1.0 - e), -b[0] * x * e], axis=-1)

  # Without acceleration (whose curvature is a finite difference with a user
  # Jacobian), both take the same steps. Both in one trace: eagerly the
  # Cauchy fit alone takes over 10 s.
  options = dict(loss=loss, loss_scale=0.1, geodesic_acceleration=None)
  auto, user = modes.run(lambda start: [
      tfg_optim.least_squares(residual, start, **options).position,
      tfg_optim.least_squares(residual, start, jacobian=jacobian,
                              **options).position],
                         [dataset.starts[0]], "function")
  # Same iterates up to rounding; the last, rounding-level steps may differ.
  np.testing.assert_allclose(user, auto, rtol=1e-8)
  if loss == "linear":
    assert nist.lre(user, dataset.certified).min() >= 6


# -- argument validation -------------------------------------------------------


@pytest.mark.parametrize("kwargs,argument", [
    (dict(max_iterations=0), "max_iterations"),
    (dict(max_iterations=2.5), "max_iterations"),
    (dict(batch_dims=-1), "batch_dims"),
    (dict(loss="l2"), "loss"),
    (dict(loss_scale=0.0), "loss_scale"),
    (dict(loss_scale=-1.0), "loss_scale"),
    (dict(damping="lm"), "damping"),
    (dict(function_tolerance=-1.0), "function_tolerance"),
    (dict(gradient_tolerance=-1.0), "gradient_tolerance"),
    (dict(parameter_tolerance=-1.0), "parameter_tolerance"),
    (dict(cost_tolerance=-1.0), "cost_tolerance"),
    (dict(stopping_criterion="gradient"), "stopping_criterion"),
    (dict(jacobian=3), "jacobian"),
    (dict(callback="print"), "callback"),
    (dict(geodesic_acceleration=0.0), "geodesic_acceleration"),
    (dict(geodesic_acceleration="yes"), "geodesic_acceleration"),
    (dict(vanishing_column_tolerance=-1.0), "vanishing_column_tolerance"),
])
def test_invalid_arguments_name_the_argument(kwargs, argument):
  with pytest.raises((ValueError, TypeError), match=argument):
    tfg_optim.least_squares(_rosenbrock, tf.constant([-1.2, 1.0]), **kwargs)


def test_invalid_variables_name_the_argument():
  with pytest.raises((ValueError, TypeError), match="variables"):
    tfg_optim.least_squares(_rosenbrock, [])
  with pytest.raises((ValueError, TypeError), match="variables"):
    tfg_optim.least_squares(_rosenbrock, tf.constant([1, 2]))
  with pytest.raises((ValueError, TypeError), match="residuals"):
    tfg_optim.least_squares(3, tf.constant([1.0, 2.0]))


# BoxBOD start 1, five iterations of the trust region without acceleration:
# the first step tried is rejected, the second (to b2 ~ 91, where
# exp(-b2 x) = 0 for all data and dF/db2 = 0) is refused for the vanishing
# column; without the refusal it is taken and the next one lands on the
# plateau b1 = mean(y) = 172.5.
_BOXBOD = dict(damping="trust_region", geodesic_acceleration=None,
               max_iterations=5, record=True)


def _boxbod_chunked(tolerance):
  """Chunked data (`_chunked.Gram`), eagerly."""
  dataset = nist.load("BoxBOD")
  result = tfg_optim.least_squares(
      lambda b1, b2, x, y: y - b1 * (1.0 - tf.exp(-b2 * x)),
      [tf.constant(value) for value in dataset.starts[0]],
      data=[tf.constant(dataset.x), tf.constant(dataset.y)],
      data_chunk_size=4, vanishing_column_tolerance=tolerance, **_BOXBOD)
  return np.array([float(value) for value in result.position]), result


def _boxbod_factor_graph(tolerance):
  """A factor graph (one row (b1, b2), one term over the data rows;
  block-sparse J, dense Cholesky), eagerly."""
  dataset = nist.load("BoxBOD")
  table = factor_graph.Variables(tf.constant(dataset.starts[0][np.newaxis]),
                                 name="b")
  term = factor_graph.Term(
      lambda b, x, y: (y - b[:, 0] * (1.0 - tf.exp(-b[:, 1] * x)))[:, None],
      [(table, np.zeros(len(dataset.y), np.int32))],
      data=[tf.constant(dataset.x), tf.constant(dataset.y)])
  result = factor_graph.least_squares(
      [table], [term], linear_solver="cholesky", gradients="none",
      vanishing_column_tolerance=tolerance, **_BOXBOD)
  return result.position[0].numpy()[0], result


@pytest.mark.parametrize("solve", [_boxbod_chunked, _boxbod_factor_graph])
def test_vanishing_column_refusal_with_chunked_data_and_factor_graphs(solve):
  """The refusal is decided by the linearization (exact column norms), not
  the front-end: with chunked data and a factor graph's block-sparse J the
  second step is refused (the cost after iteration 2 is the start's) and
  the solve moves on with b2's column alive (exp(-b2 x) > 1e-6 at x = 1),
  as the dense path does (whose refusal solves BoxBOD, tests above); with
  the refusal off that step is taken and the solve lands on the plateau
  b1 = mean(y). Both report no linear-solver iterations (direct solves)."""
  position, result = solve(None)
  assert float(result.records["cost"][1]) == float(result.initial_cost)
  assert float(result.cost) < float(result.initial_cost)
  assert np.exp(-position[1]) > 1e-6
  assert int(result.num_linear_solver_iterations) == 0
  plateau, off = solve(0.0)
  assert float(off.records["cost"][1]) < float(off.initial_cost)
  np.testing.assert_allclose(plateau[0], np.mean(nist.load("BoxBOD").y),
                             rtol=1e-12)
