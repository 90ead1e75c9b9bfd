"""Composable stopping criteria, evaluated in-graph after every iteration.

A criterion maps the solver's loop state to `(stop, reason)`, two [B...]
tensors (one entry per problem of a batch), so `tf.while_loop` really stops
early, under XLA too. Criteria combine with `|` (stop when either holds; the
reason is the first one that holds) and `&` (stop when both hold).

    criterion = (StopAfterIteration(200) | StopWhenGradientNormLess(1e-12)
                 | StopWhenStepsizeLess(1e-12))

The gradient is g = J^T F in orthonormal tangent coordinates, so ||g|| is the
Riemannian norm of the gradient of 1/2 ||F||^2. The step size is the norm of
the last finite step computed, accepted or not (as in Manopt); it is +inf until
one is, so step tests never fire on a solve whose every trial step overflowed.
"""

import numpy as np
import tensorflow as tf

from tfg_optim import _batch
from tfg_optim._engine import StopReason


class StoppingCriterion:
  """Base class: subclasses define `_check(state) -> stop` and `reason`."""

  reason = StopReason.RUNNING
  max_iterations = None  # A finite bound on iterations, when the criterion has one.

  def __call__(self, state):
    stop = self._check(state)
    return stop, _batch.full_like(stop, int(self.reason), tf.int32)

  def _check(self, state):
    raise NotImplementedError

  key = None  # The name of this criterion's threshold in `thresholds()`.

  def thresholds(self):
    """{name: value} of the thresholds that apply, e.g. for a summary."""
    if self.key is None:
      return {}
    value = (self.max_iterations if self.key == "max_iterations"
             else self.tolerance)
    return {self.key: value}

  def __or__(self, other):
    return StopWhenAny(self, other)

  def __and__(self, other):
    return StopWhenAll(self, other)


class StopAfterIteration(StoppingCriterion):
  """Stops once `max_iterations` iterations have run."""

  reason = StopReason.MAX_ITERATIONS
  key = "max_iterations"

  def __init__(self, max_iterations):
    if isinstance(max_iterations, bool) or int(max_iterations) != max_iterations:
      raise TypeError(f"'max_iterations' must be an integer, got "
                      f"{max_iterations!r}.")
    if max_iterations < 0:
      raise ValueError("'max_iterations' must be >= 0.")
    if max_iterations > 2**31 - 1:  # iteration counters are int32
      raise ValueError(f"'max_iterations' must be at most 2**31 - 1 (int32), "
                       f"got {max_iterations}.")
    self.max_iterations = int(max_iterations)

  def _check(self, state):
    return state.num_iterations >= self.max_iterations

  def __repr__(self):
    return f"StopAfterIteration({self.max_iterations})"


class _Threshold(StoppingCriterion):
  """A criterion `quantity(state) < tolerance`."""

  def __init__(self, tolerance):
    if isinstance(tolerance, bool) or not float(tolerance) >= 0:
      raise ValueError(f"'tolerance' must be >= 0, got {tolerance!r}.")
    self.tolerance = float(tolerance)

  def __repr__(self):
    return f"{type(self).__name__}({self.tolerance:g})"


class StopWhenGradientNormLess(_Threshold):
  """Stops when ||J^T F|| < tolerance."""

  reason = StopReason.GRADIENT_NORM
  key = "gradient_norm"

  def _check(self, state):
    return tf.norm(state.gradient, axis=-1) < self.tolerance


class StopWhenStepsizeLess(_Threshold):
  """Stops when the last step's norm < tolerance (after >= 1 iteration)."""

  reason = StopReason.STEP_SIZE
  key = "step_size"

  def _check(self, state):
    return (state.num_iterations > 0) & (state.step_norm < self.tolerance)


class StopWhenCostLess(_Threshold):
  """Stops when 1/2 ||F||^2 < tolerance."""

  reason = StopReason.COST
  key = "cost"

  def _check(self, state):
    return state.cost < self.tolerance


class StopWhenRelativeCostChangeLess(_Threshold):
  """Stops after an accepted step whose relative decrease < tolerance:
  (cost_before - cost_after) <= tolerance * cost_before."""

  reason = StopReason.RELATIVE_COST_CHANGE
  key = "relative_cost_change"

  def _check(self, state):
    before = state.cost + state.cost_change
    return (state.cost_change > 0) & (state.cost_change <=
                                      self.tolerance * before)


class StopWhenModelDecreaseLess(_Threshold):
  """Stops when the Gauss-Newton model promised the last finite step v
  tried, accepted or not, a relative decrease of at most `tolerance`:

      -g^T v - 1/2 ||J v||^2 <= tolerance * cost,

  unless that step was accepted and decreased the cost by more than
  `tolerance` (cost_change > tolerance * cost_before: the model was wrong,
  not the problem solved). Least-squares loops only (it reads the loop
  state's `model_decrease`).

  The model's decrease is computed from g and J, not as the difference of
  two nearly equal costs, so it stays meaningful where the actual change
  is rounding noise: a converged solve whose next step is rejected (or
  accepted) at the rounding level of the cost stops here instead of
  growing lambda until a step test fires. It is the model side of GTSAM's
  relative error decrease test and Ceres' function tolerance, which fire
  on the actual change of any step, rejected ones included. A step made
  small by the damping rather than by the problem is caught by the
  engine's honest endings (`_stop_check.StopCheck`: STALLED)."""

  reason = StopReason.MODEL_DECREASE
  key = "model_decrease"

  def _check(self, state):
    tolerance = tf.constant(self.tolerance, state.cost.dtype)
    before = state.cost + state.cost_change
    # Not logical_not(change > tolerance * before): Grappler rewrites that
    # into change <= tolerance * before in graphs only, so a NaN change
    # would fire the test eagerly and not in graphs. Here it never does.
    not_decreased = state.cost_change <= tolerance * before
    # |.|: a model decrease below -tolerance * cost is not rounding but an
    # inaccurate solve (exactly, -g^T v - 1/2 ||J v||^2 >= 0 for a damped
    # step): it certifies nothing (float32 Lanczos1/2 stopped 1e5x and 14x
    # above the reachable cost on a promise of -2.6 times the cost).
    return ((state.num_iterations > 0) & not_decreased &
            (tf.abs(state.model_decrease) <= tolerance * state.cost))


class StopWhenAny(StoppingCriterion):
  """`a | b`: stops when any criterion holds; reports the first that holds."""

  def __init__(self, *criteria):
    self.criteria = []
    for criterion in criteria:
      if not isinstance(criterion, StoppingCriterion):
        raise TypeError(f"Cannot combine {criterion!r} with a stopping "
                        "criterion.")
      self.criteria.extend(criterion.criteria
                           if isinstance(criterion, StopWhenAny)
                           else [criterion])
    bounds = [c.max_iterations for c in self.criteria
              if c.max_iterations is not None]
    self.max_iterations = min(bounds) if bounds else None

  def thresholds(self):
    merged = {}
    for criterion in self.criteria:
      merged.update(criterion.thresholds())
    return merged

  def __call__(self, state):
    results = [criterion(state) for criterion in self.criteria]
    stop, reason = results[-1]
    for other_stop, other_reason in reversed(results[:-1]):
      reason = tf.where(other_stop, other_reason, reason)
      stop = stop | other_stop
    return stop, reason

  def __repr__(self):
    return " | ".join(map(repr, self.criteria))


class StopWhenAll(StoppingCriterion):
  """`a & b`: stops when all criteria hold; reports the first one's reason."""

  def __init__(self, *criteria):
    for criterion in criteria:
      if not isinstance(criterion, StoppingCriterion):
        raise TypeError(f"Cannot combine {criterion!r} with a stopping "
                        "criterion.")
    self.criteria = list(criteria)
    bounds = [c.max_iterations for c in self.criteria]
    self.max_iterations = (max(bounds) if all(b is not None for b in bounds)
                           else None)

  def thresholds(self):
    merged = {}
    for criterion in self.criteria:
      merged.update(criterion.thresholds())
    return merged

  def __call__(self, state):
    results = [criterion(state) for criterion in self.criteria]
    stop = results[0][0]
    for other_stop, _ in results[1:]:
      stop = stop & other_stop
    return stop, results[0][1]

  def __repr__(self):
    return "(" + " & ".join(map(repr, self.criteria)) + ")"


def default_criterion():
  """Manopt's default for Levenberg-Marquardt, plus its step-size test."""
  return (StopAfterIteration(200) | StopWhenGradientNormLess(1e-12) |
          StopWhenStepsizeLess(1e-12))


class StopWhenRelativeStepLess(_Threshold):
  """Stops when the last step is small relative to the point:
  ||s|| <= tolerance * (||x|| + tolerance), after >= 1 iteration (Ceres'
  parameter tolerance; ||x|| over all entries of the point)."""

  reason = StopReason.RELATIVE_STEP
  key = "relative_step"

  def _check(self, state):
    batch_rank = state.cost.shape.rank
    squares = [tf.reduce_sum(tf.square(part),
                             axis=list(range(batch_rank, part.shape.rank)))
               for part in tf.nest.flatten(state.point)]
    point_norm = tf.sqrt(tf.add_n(squares))
    tolerance = tf.constant(self.tolerance, state.cost.dtype)
    return (state.num_iterations > 0) & (
        state.step_norm <= tolerance * (point_norm + tolerance))


class StopWhenGradientCosineLess(_Threshold):
  """Stops when F is nearly orthogonal to every column of J (MINPACK's gtol,
  invariant to the scale of F and of each variable):
      max_j |(J^T F)_j| / (||F|| ||J_j||) <= tolerance.
  A nonzero (J^T F)_j over a zero ||J_j|| (an estimate, matrix-free, that
  missed a nonzero column) is not measured: the test does not fire."""

  reason = StopReason.GRADIENT_NORM
  key = "gradient_cosine"

  def _check(self, state):
    residual_norm = _batch.norm(state.residual)
    column_norms = tf.sqrt(state.linearization.column_norms())
    denominator = residual_norm[..., tf.newaxis] * column_norms
    # A zero column (or F = 0) has a zero gradient entry: cosine 0. NaN
    # stays NaN, and NaN <= tolerance is False: no test fires on NaN. Nor
    # on an overflowed ||J_j||^2 (float32 ||J_j|| > 1.8e19): a finite
    # gradient over an infinite norm is not a zero cosine.
    denominator = tf.where(tf.math.is_finite(denominator), denominator,
                           _batch.full_like(denominator, np.nan))
    zero = tf.equal(denominator, 0)
    # A nonzero gradient entry over a zero norm: an estimated ||J_j||^2
    # (matrix-free: probe sums that cancel) that missed a nonzero column.
    # Its cosine is unknown: the test does not fire on it.
    unknown = zero & tf.not_equal(state.gradient, 0)
    cosine = tf.where(zero, tf.where(unknown, _batch.full_like(
        denominator, np.inf), tf.zeros_like(denominator)),
                      tf.abs(state.gradient) / tf.where(
                          zero, tf.ones_like(denominator), denominator))
    return tf.reduce_all(cosine <= self.tolerance, axis=-1)
