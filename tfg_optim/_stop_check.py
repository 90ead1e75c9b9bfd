"""The loop's stop stage: why a problem stops, and the test that says so.

One module for the whole vocabulary of endings: `StopReason` (what the
results report), the constants and tests behind the honest endings
(`MAX_CONSECUTIVE_INVALID_STEPS`, `exhausted`, `damping_limited`,
`cauchy_decrease`) and `StopCheck`, which runs the caller's criterion and
then those endings, once before the loop and once after every iteration.
A new ending is a new test here and a new `StopReason`; the loop body does
not change.

`StopReason` is defined here, next to the only code that assigns it, and
`_engine` imports it from here (so `tfg_optim._engine.StopReason` stays the
name the front-ends, `stopping` and `results` use); the stage modules never
import `_engine`.
"""

import enum

import numpy as np

import tensorflow as tf

from tfg_optim import _batch


class StopReason(enum.IntEnum):
  """Why a problem stopped; stored per problem as an int32 tensor.

  Only the convergence tests (`converged` is True) mean success, and they
  fire only on finite values. Every other ending is named:

  RUNNING: not stopped (never in a returned result).
  MAX_ITERATIONS: the iteration bound was reached first.
  NOT_FINITE: the cost or the gradient at the current point is NaN or Inf
    (at the start, or after an accepted step). The point is returned as it
    is; nothing after it was tried.
  STALLED: no acceptable step can be found: a rejected step is zero, the
    damping is exhausted (Inf, or at its cap), the linear solve gave no
    finite step `MAX_CONSECUTIVE_INVALID_STEPS` times in a row at a finite
    point (Ceres' invalid steps: e.g. J^T J overflows while J and the
    gradient do not), the gradient test fired only
    because the whole Jacobian is zero while the cost is not, or a step
    test fired on a step that the damping, not the problem, made small while
    the Gauss-Newton model still promised a real decrease (a trust region
    collapsed against the edge of the residual's domain, say; see
    `StopCheck`). Ceres ends such solves with a failure too.
  INVALID_INPUT: the start was invalid (off the manifold, outside the
    bounds, not finite) where only a graph run can tell; the start is
    returned unchanged.
  MODEL_DECREASE: converged: the last step tried, accepted or not, was
    promised a relative decrease below the tolerance by the Gauss-Newton
    model (`stopping.StopWhenModelDecreaseLess`; the factor graphs'
    default, where rounding-level steps are rejected as often as taken).
  """
  RUNNING = 0
  MAX_ITERATIONS = 1
  GRADIENT_NORM = 2
  STEP_SIZE = 3
  COST = 4
  RELATIVE_COST_CHANGE = 5
  RELATIVE_STEP = 6
  NOT_FINITE = 7
  STALLED = 8
  INVALID_INPUT = 9
  MODEL_DECREASE = 10

  @property
  def converged(self):
    return self in (StopReason.GRADIENT_NORM, StopReason.STEP_SIZE,
                    StopReason.COST, StopReason.RELATIVE_COST_CHANGE,
                    StopReason.RELATIVE_STEP, StopReason.MODEL_DECREASE)

  @property
  def message(self):
    """One sentence for a person: what happened."""
    return _STOP_MESSAGES[self]


_STOP_MESSAGES = {
    StopReason.RUNNING: "still running",
    StopReason.MAX_ITERATIONS: "reached the iteration limit before any "
                               "convergence test fired",
    StopReason.GRADIENT_NORM: "converged: the gradient test fired",
    StopReason.STEP_SIZE: "converged: the step-size test fired",
    StopReason.COST: "converged: the cost fell below its tolerance",
    StopReason.RELATIVE_COST_CHANGE: "converged: an accepted step changed "
                                     "the cost by less than its tolerance",
    StopReason.RELATIVE_STEP: "converged: the step was small relative to "
                              "the point",
    StopReason.NOT_FINITE: "failed: the cost or gradient at the current "
                           "point is NaN or Inf",
    StopReason.STALLED: "failed: no acceptable step could be found (the "
                        "damping, not a solution, made the steps vanish, the "
                        "linear solve gave no finite step, or the Jacobian "
                        "is zero where the cost is not)",
    StopReason.INVALID_INPUT: "failed: the starting point is invalid (off "
                              "the manifold, outside the bounds or not "
                              "finite)",
    StopReason.MODEL_DECREASE: "converged: the Gauss-Newton model promised "
                               "the last step a relative decrease below its "
                               "tolerance",
}

# A problem whose linear solve gives a non-finite step this many iterations in
# a row, at a point whose cost and gradient are finite, is STALLED. A failed
# factorization at a small damping is repaired by the damping that each
# rejection raises (Nielsen: by 2^55 after ten; a trust region's radius by
# 4^-10); a J^T J that overflows is not, and would otherwise take the
# damping hundreds of iterations to exhaust. (Ceres' default is 5.)
MAX_CONSECUTIVE_INVALID_STEPS = 10


def damping_limited(step):
  """[B...]: whether the damping term, more than the curvature, shaped the
  step v of a judged `damping.Step`: lambda v^T D v > ||J v||^2, i.e. more
  than half of -g^T v = ||J v||^2 + lambda v^T D v (exact for a damped
  step)."""
  return 2.0 * step.penalty > step.curvature


def exhausted(damping_value):
  """[B...]: the damping reached its cap (1e300, 1e37 in float32), Inf or
  NaN; no step it gives can move the point."""
  dtype = damping_value.dtype
  cap = tf.constant(1e300 if dtype == tf.float64 else 1e37, dtype)
  # Not logical_not(value < cap): Grappler rewrites that to value >= cap,
  # which is False for NaN.
  return tf.logical_not(tf.math.is_finite(damping_value)) | (
      damping_value >= cap)


def cauchy_decrease(linearization, gradient, scaling=None):
  """The Gauss-Newton model's decrease at its Cauchy point, [B...]:

      (g^T D^-1 g)^2 / (2 ||J D^-1 g||^2),

  the best decrease of 1/2 ||F + J s||^2 along the scaled steepest-descent
  direction s = -t D^-1 g, hence a lower bound of the model's best decrease.
  Zero where g = 0."""
  direction = gradient if scaling is None else gradient / scaling
  slope = tf.reduce_sum(gradient * direction, axis=-1)
  curvature = linearization.curvature(direction)
  positive = curvature > 0
  return tf.where(positive, 0.5 * tf.square(slope) / tf.where(
      positive, curvature, tf.ones_like(curvature)), tf.zeros_like(slope))


# A step test that fires on a damping-limited step is STALLED where the
# undamped model (its Cauchy decrease) promises this many times more than
# the damped step did.
STRANGLED_PROMISE_RATIO = 1e3

_STEP_TESTS = (StopReason.STEP_SIZE, StopReason.RELATIVE_STEP,
               StopReason.RELATIVE_COST_CHANGE, StopReason.MODEL_DECREASE)


class StopCheck:
  """The stop stage: the caller's criterion, then (with safeguards) the
  honest endings.

  - A step or cost-change test that fires on a step shaped more by the
    damping than by the curvature (`damping_limited`) while the
    Gauss-Newton model still promises to remove more than a tenth of the
    cost, and more than eps times the initial cost (by `cauchy_decrease`,
    a lower bound of the model's promise), is STALLED:
    the damping, not the problem, made the step small (e.g. a trust region
    collapsed against the edge of the residual's domain). Converged points
    fail at least one condition: near a solution Gauss-Newton steps are
    barely damped; a large residual's promise falls with the gradient; a
    zero residual's promise is at most its cost, which is then at the
    rounding level of the initial cost (a floor of sqrt(eps) was too coarse
    in float32: MGH10 start 1 "converged" by RELATIVE_STEP at 1e-4 of its
    initial cost and 1e9 times its optimal cost); and a loose user
    tolerance stops while the promise is a small fraction of the cost. A
    step test that fires where the promise is not finite (the model cannot
    be evaluated: J^T J overflows) is STALLED too.
  - A gradient test that fires where the whole Jacobian is zero and the cost
    is not (without bounds, whose held coordinates have zeroed columns): the
    Gauss-Newton model is flat, and the point may as well be a maximum
    (x^2 - 1 at x = 0): STALLED, not converged.
  - stuck (`after_step`): a rejected step that is exactly zero, an exhausted
    damping, or `MAX_CONSECUTIVE_INVALID_STEPS` non-finite steps in a row:
    STALLED, since no later iteration can differ (or be finite); also when
    a step test fired on that iteration (a zero step is "small relative to
    the point" whatever the gradient). (A rejected
    step too small to change the point in floating point is not enough:
    the damping keeps growing until a step test fires or the damping is
    exhausted, which bounds every loop, with or without an iteration
    limit.)
  - A non-finite cost or gradient at the current point: NOT_FINITE, which
    overrides every other reason.
  """

  def __init__(self, stopping, safeguards, policy, batch_rank, kind,
               bounded=False):
    self.kind = kind
    self.bounded = bounded
    self.stopping = stopping
    self.safeguards = safeguards
    self.policy = policy
    self.batch_rank = batch_rank

  def after_step(self, state, active, trial, decision):
    """The stop stage of an iteration: `state` is the new `LoopState`,
    `trial` the `_step.Trial` tried and `decision` the
    `_acceptance.Decision` on it; `active` [B...] the problems that ran."""
    if self.stopping is None and not self.safeguards:
      return state
    zero_step = tf.reduce_all(tf.equal(trial.step, 0), axis=-1)
    stuck = active & tf.logical_not(decision.accepted) & (
        zero_step | exhausted(self.policy.damping_value(state.damping)) |
        (state.invalid_streak >= MAX_CONSECUTIVE_INVALID_STEPS))
    return self(state, active, stuck=stuck,
                limited=damping_limited(decision.judged),
                step_promise=decision.judged.model_decrease)

  def __call__(self, state, active, stuck=None, limited=None,
               step_promise=None):
    """The criterion and the honest endings on `state` for the `active`
    problems; `stuck` and `limited` ([B...] bool: `damping_limited`) and
    `step_promise` (the model decrease of the step tried, [B...]) after a
    step, None before the loop."""
    if self.stopping is None and not self.safeguards:
      return state
    linearization = self.kind.restore(state.linearization, state.point)
    if self.stopping is not None:
      stop, reason = self.stopping(state._replace(linearization=linearization))
      reason = tf.cast(reason, tf.int32)
    else:
      stop = tf.zeros_like(active)
      reason = tf.zeros_like(state.stop_reason)
    if self.safeguards:
      stalled = tf.constant(int(StopReason.STALLED), tf.int32)
      # A step or cost-change test fired.
      step_test = _batch.isin(reason, _STEP_TESTS)
      if limited is not None:  # after a step
        scaling = (self.policy.scaling(state.damping) if self.policy.scaled
                   else None)
        promise = cauchy_decrease(linearization, state.gradient, scaling)
        dtype = state.cost.dtype
        floor = tf.constant(np.finfo(dtype.as_numpy_dtype).eps,
                            dtype) * state.initial_cost
        # A damping-limited step whose test fired while the model still
        # promises a real decrease: more than 0.1 of the cost, or more than
        # STRANGLED_PROMISE_RATIO times what the damped step itself
        # promised (the damping, not the problem, made the step and its
        # decrease small; with an irreducible cost the first alone misses
        # it: F = [x - 1, 10] from 0 with lambda 1e14 "converged" 1% above
        # its minimum). A promise that cannot be evaluated (J^T J
        # overflowing, float32) certifies nothing either.
        strangled = (promise > 0.1 * state.cost) | (
            promise > STRANGLED_PROMISE_RATIO * tf.abs(step_promise))
        reason = tf.where(step_test & (
            tf.logical_not(tf.math.is_finite(promise)) |
            (limited & strangled & (promise > floor))), stalled, reason)
      if not self.bounded:
        flat = linearization.is_zero() & (state.cost > 0)
        reason = tf.where(
            flat & tf.equal(reason, int(StopReason.GRADIENT_NORM)), stalled,
            reason)
      if stuck is not None:
        # A step or cost-change test that fires on a stuck iteration (a
        # rejected zero step: the trust radius underflowed to 0) measured
        # the damping, not the problem: STALLED too.
        reason = tf.where(stop & tf.logical_not(stuck & step_test), reason,
                          stalled)
        stop |= stuck
      not_finite = tf.logical_not(
          tf.math.is_finite(state.cost) &
          _batch.all_finite(state.gradient, self.batch_rank))
      reason = tf.where(not_finite, tf.constant(int(StopReason.NOT_FINITE),
                                                tf.int32), reason)
      stop |= not_finite
    return state._replace(stop_reason=tf.where(
        active & stop, reason, state.stop_reason))
