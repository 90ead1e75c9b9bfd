"""Tests of the composable stopping criteria and the results report.

The criteria are checked on hand-made loop states (their exact semantics) and
inside the Riemannian Levenberg-Marquardt solver in every execution mode.
"""

import collections

import numpy as np
import pytest
import tensorflow as tf

from tests import modes
import tfg_optim
from tfg_optim import damping
from tfg_optim import manifolds
from tfg_optim import riemannian
from tfg_optim import stopping
from tfg_optim._engine import StopReason

MODES = modes.MODES
FakeState = collections.namedtuple(
    "FakeState", ["num_iterations", "gradient", "step_norm", "cost",
                  "cost_change", "model_decrease"])


def _state(num_iterations=3, gradient_norm=1.0, step_norm=1.0, cost=1.0,
           cost_change=0.0, model_decrease=np.inf):
  return FakeState(tf.constant([num_iterations], tf.int32),
                   tf.constant([[gradient_norm, 0.0]], tf.float64),
                   tf.constant([step_norm], tf.float64),
                   tf.constant([cost], tf.float64),
                   tf.constant([cost_change], tf.float64),
                   tf.constant([model_decrease], tf.float64))


def _decide(criterion, **state):
  stop, reason = criterion(_state(**state))
  return bool(stop.numpy()[0]), StopReason(int(reason.numpy()[0]))


def test_default_criterion():
  criterion = stopping.default_criterion()
  assert repr(criterion) == ("StopAfterIteration(200) | "
                             "StopWhenGradientNormLess(1e-12) | "
                             "StopWhenStepsizeLess(1e-12)")
  assert criterion.max_iterations == 200
  assert _decide(criterion, num_iterations=199) == (False, StopReason.RUNNING
                                                    ) or not _decide(
                                                        criterion,
                                                        num_iterations=199)[0]
  assert _decide(criterion, num_iterations=200)[0]
  assert _decide(criterion, gradient_norm=1e-13) == (
      True, StopReason.GRADIENT_NORM)
  assert _decide(criterion, step_norm=1e-13) == (True, StopReason.STEP_SIZE)
  # no step has been taken before the first iteration
  assert not _decide(criterion, num_iterations=0, step_norm=0.0)[0]


def test_or_reports_the_first_criterion_that_holds():
  criterion = (stopping.StopWhenGradientNormLess(1e-3) |
               stopping.StopWhenCostLess(1e-2) |
               stopping.StopAfterIteration(10))
  assert len(criterion.criteria) == 3  # flattened
  assert criterion.max_iterations == 10
  assert _decide(criterion) == (False, StopReason.RUNNING) or not _decide(
      criterion)[0]
  assert _decide(criterion, cost=1e-3) == (True, StopReason.COST)
  assert _decide(criterion, cost=1e-3, gradient_norm=1e-4) == (
      True, StopReason.GRADIENT_NORM)
  assert _decide(criterion, cost=1e-3, num_iterations=10) == (
      True, StopReason.COST)
  assert _decide(criterion, num_iterations=10) == (
      True, StopReason.MAX_ITERATIONS)


def test_and_needs_every_criterion():
  criterion = (stopping.StopWhenCostLess(1e-2) &
               stopping.StopWhenGradientNormLess(1e-3))
  assert criterion.max_iterations is None
  assert not _decide(criterion, cost=1e-3)[0]
  assert not _decide(criterion, gradient_norm=1e-4)[0]
  assert _decide(criterion, cost=1e-3, gradient_norm=1e-4) == (
      True, StopReason.COST)
  bounded = stopping.StopAfterIteration(5) & stopping.StopAfterIteration(8)
  assert bounded.max_iterations == 8
  assert not _decide(bounded, num_iterations=6)[0]
  assert _decide(bounded, num_iterations=8)[0]


def test_relative_cost_change():
  criterion = stopping.StopWhenRelativeCostChangeLess(1e-3)
  # cost went from 1.0005 to 1.0: relative decrease 5e-4
  assert _decide(criterion, cost=1.0, cost_change=5e-4) == (
      True, StopReason.RELATIVE_COST_CHANGE)
  assert not _decide(criterion, cost=1.0, cost_change=1e-2)[0]
  assert not _decide(criterion, cost=1.0, cost_change=0.0)[0]  # rejected step


def test_model_decrease():
  """Fires on the model's promise for the last step tried, taken or not,
  unless that step was taken and decreased the cost by more (the model was
  wrong); never before a finite step was tried (+inf)."""
  criterion = stopping.StopWhenModelDecreaseLess(1e-3)
  assert criterion.thresholds() == {"model_decrease": 1e-3}
  fired = (True, StopReason.MODEL_DECREASE)
  # rejected (cost_change 0), promised 5e-4 of the cost
  assert _decide(criterion, cost=2.0, model_decrease=1e-3) == fired
  # taken, and the cost fell by less than the tolerance too
  assert _decide(criterion, cost=2.0, cost_change=1e-3,
                 model_decrease=1e-3) == fired
  # taken, and the cost fell by 1e-2 relative: not converged
  assert not _decide(criterion, cost=2.0, cost_change=2.02e-2,
                     model_decrease=1e-3)[0]
  assert not _decide(criterion, cost=2.0, model_decrease=4e-3)[0]
  assert not _decide(criterion, cost=2.0, model_decrease=np.nan)[0]
  # a negative promise beyond rounding is an inaccurate solve (float32
  # Lanczos2: -2.6 times the cost), not convergence; rounding-level is
  assert not _decide(criterion, cost=2.0, model_decrease=-5.2)[0]
  assert _decide(criterion, cost=2.0, model_decrease=-1e-3) == fired
  assert not _decide(criterion, cost=2.0)[0]  # no finite step yet
  assert not _decide(criterion, num_iterations=0, model_decrease=0.0)[0]
  assert StopReason.MODEL_DECREASE.converged


def test_criterion_arguments():
  with pytest.raises(ValueError):
    stopping.StopAfterIteration(-1)
  with pytest.raises(TypeError):
    stopping.StopAfterIteration(2.5)
  with pytest.raises(ValueError):
    stopping.StopWhenCostLess(-1.0)
  with pytest.raises(TypeError):
    _ = stopping.StopWhenCostLess(1.0) | 3
  with pytest.raises(TypeError, match="stopping_criterion"):
    riemannian.levenberg_marquardt(manifolds.Euclidean(1), lambda q: q,
                                   np.ones(1), stopping_criterion=10)


# -- inside the solver ---------------------------------------------------------


def _rotation_fit(seed=0, batch=(), noise=0.05):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(batch + (20, 3))
  angle = 0.7
  rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0],
                       [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
  y = x @ rotation.T + noise * rng.standard_normal(x.shape)
  return lambda r: (tf.matmul(tf.cast(x, r.dtype), r, transpose_b=True) -
                    tf.cast(y, r.dtype))


# Every mode once, both dtypes.
@pytest.mark.parametrize("mode,dtype", [("eager", "float32"),
                                        ("function", "float64"),
                                        ("xla", "float32"),
                                        ("session", "float64")])
def test_loop_really_stops_early(mode, dtype):
  # With an iteration bound of 10^8 a loop that did not stop would not end.
  # Well above the gradient's rounding floor (~1e-9 in float64, ~1e-5 in
  # float32 for this fit, where every further step is rejected as noise).
  tolerance = 1e-7 if dtype == "float64" else 1e-3
  criterion = (stopping.StopAfterIteration(10**8) |
               stopping.StopWhenGradientNormLess(tolerance))

  def build(r):
    results = riemannian.levenberg_marquardt(
        manifolds.SpecialOrthogonal(3), _rotation_fit(), r,
        stopping_criterion=criterion, return_state=True)
    return (results.num_iterations, results.stop_reason, results.converged,
            results.gradient_norm)

  iterations, reason, converged, gradient_norm = modes.run(
      build, [np.eye(3, dtype=dtype)], mode)
  assert 0 < iterations < 50
  assert reason == StopReason.GRADIENT_NORM and converged
  assert gradient_norm < tolerance


@pytest.mark.parametrize("mode", ["eager", "session"])
def test_iteration_limit_is_not_convergence(mode):
  def build(r):
    results = riemannian.levenberg_marquardt(
        manifolds.SpecialOrthogonal(3), _rotation_fit(), r,
        stopping_criterion=stopping.StopAfterIteration(2), return_state=True)
    return results.num_iterations, results.stop_reason, results.converged

  assert tuple(modes.run(build, [np.eye(3)], mode)) == (
      2, StopReason.MAX_ITERATIONS, False)


def test_already_converged_start_takes_no_iteration():
  results = riemannian.levenberg_marquardt(
      manifolds.Sphere(3), lambda p: p - tf.constant([0.0, 0.0, 1.0],
                                                     tf.float64),
      np.array([0.0, 0.0, 1.0]), return_state=True, record=True)
  assert int(results.num_iterations) == 0
  assert StopReason(int(results.stop_reason)) == StopReason.GRADIENT_NORM
  assert np.all(np.isnan(results.records["cost"].numpy()))


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_cost_below(mode):
  # a zero-residual problem: the cost falls below 1e-8 at some iteration
  def build(p):
    results = riemannian.levenberg_marquardt(
        manifolds.Sphere(3),
        lambda p: p - tf.constant([0.6, 0.0, 0.8], tf.float64), p,
        expect_zero_residual=True, return_state=True, record=True,
        stopping_criterion=(stopping.StopAfterIteration(100) |
                            stopping.StopWhenCostLess(1e-8)))
    return (results.cost, results.num_iterations, results.stop_reason,
            results.records["cost"])

  cost, iterations, reason, history = modes.run(
      build, [np.array([0.0, 1.0, 0.0])], mode)
  assert reason == StopReason.COST and cost < 1e-8
  assert iterations >= 2 and np.all(history[:iterations - 1] >= 1e-8)


# One mode: the criterion's graph is the same in every mode (its exact
# semantics are checked on hand-made states above, and test_loop_really_stops
# _early runs a criterion in every mode).
@pytest.mark.parametrize("mode", ["eager"])
def test_relative_cost_change_in_the_solver(mode):
  tolerance = 1e-4

  def build(r):
    results = riemannian.levenberg_marquardt(
        manifolds.SpecialOrthogonal(3), _rotation_fit(noise=0.3), r,
        return_state=True, record=True,
        stopping_criterion=(stopping.StopAfterIteration(100) |
                            stopping.StopWhenRelativeCostChangeLess(
                                tolerance)))
    return (results.num_iterations, results.stop_reason, results.records,
            results.initial_cost)

  iterations, reason, records, initial_cost = modes.run(build, [np.eye(3)],
                                                        mode)
  assert reason == StopReason.RELATIVE_COST_CHANGE
  history = np.concatenate([[initial_cost], records["cost"][:iterations]])
  decrease = history[:-1] - history[1:]
  holds = (decrease > 0) & (decrease <= tolerance * history[:-1])
  # it stops at the first accepted step with a small relative decrease
  assert holds[-1] and not np.any(holds[:-1])


@pytest.mark.parametrize("mode", ["function"])
def test_model_decrease_in_the_solver(mode):
  """A linear least-squares problem with a nonzero residual: the first
  step (lambda 1e-10, nearly Gauss-Newton) solves it but for a 1e-10
  relative part, the model promises the next step about 1e-20 of the cost,
  taken or not: MODEL_DECREASE on the second iteration, at the
  least-squares solution (NumPy's lstsq)."""
  rng = np.random.default_rng(7)
  matrix, target = rng.normal(size=(12, 4)), rng.normal(size=12)
  solution = np.linalg.lstsq(matrix, target, rcond=None)[0]

  def build(x):
    results = tfg_optim.least_squares(
        lambda x: tf.linalg.matvec(tf.constant(matrix), x) - target, x,
        damping=damping.NielsenDamping(initial=1e-10, scaling="current"),
        geodesic_acceleration=None,
        stopping_criterion=stopping.StopWhenModelDecreaseLess(1e-12))
    return results.position, results.num_iterations, results.stop_reason

  position, iterations, reason = modes.run(build, [np.zeros(4)], mode)
  assert StopReason(int(reason)) == StopReason.MODEL_DECREASE
  assert iterations == 2
  # The second step, promising 1e-20 of the cost, is lost in rounding (here
  # rejected): the first step's 1e-10 relative damping stays in x.
  np.testing.assert_allclose(position, solution, rtol=1e-9)


# One mode (traced; eagerly this batch is slow): per-problem stops in every
# mode are also checked by tests/test_batched.py.
@pytest.mark.parametrize("mode", ["function"])
def test_batch_problems_stop_independently(mode):
  def build(r):
    results = riemannian.levenberg_marquardt(
        manifolds.SpecialOrthogonal(3), _rotation_fit(batch=(4,)), r,
        batch_dims=1, return_state=True,
        stopping_criterion=(stopping.StopAfterIteration(30) |
                            stopping.StopWhenGradientNormLess(1e-7)))
    return results.num_iterations, results.stop_reason, results.gradient_norm

  start = np.stack([np.eye(3), np.eye(3), np.diag([1.0, -1.0, -1.0]),
                    np.diag([-1.0, -1.0, 1.0])])
  iterations, reasons, gradient_norm = modes.run(build, [start], mode)
  assert np.all(reasons == StopReason.GRADIENT_NORM)
  assert np.all(gradient_norm < 1e-7)
  assert len(set(iterations.tolist())) > 1


# -- the report ----------------------------------------------------------------


def test_summary_of_one_problem():
  results = riemannian.levenberg_marquardt(
      manifolds.SpecialOrthogonal(3), _rotation_fit(), np.eye(3),
      return_state=True)
  text = results.summary()
  assert str(results) == text
  assert text.startswith("Levenberg-Marquardt: converged (")
  assert f"iterations {int(results.num_iterations)} (" in text
  assert f"{int(results.num_accepted)} accepted" in text
  assert f"{float(results.cost):.6e}" in text
  assert f"{float(results.initial_cost):.6e}" in text


def test_summary_of_a_batch_and_from_a_session():
  limited = riemannian.levenberg_marquardt(
      manifolds.SpecialOrthogonal(3), _rotation_fit(batch=(3,)),
      np.tile(np.eye(3), (3, 1, 1)), batch_dims=1, return_state=True,
      stopping_criterion=stopping.StopAfterIteration(3))
  text = limited.summary()
  assert text.splitlines()[0] == "Levenberg-Marquardt on 3 problems: 0 converged"
  assert "max_iterations 3" in text
  with tf.Graph().as_default():
    results = riemannian.levenberg_marquardt(
        manifolds.SpecialOrthogonal(3), _rotation_fit(batch=(3,)),
        tf.constant(np.tile(np.eye(3), (3, 1, 1))), batch_dims=1,
        return_state=True)
    assert "LeastSquaresResults(" in str(results)  # symbolic: no values yet
    with tf.compat.v1.Session() as session:
      values = session.run(results)
  report = values.summary()  # Session.run returns the namedtuple of values
  assert report.splitlines()[0] == (
      "Levenberg-Marquardt on 3 problems: 3 converged")
  assert "iterations: max " in report
