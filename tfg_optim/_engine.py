"""The one Levenberg-Marquardt loop behind every least-squares front-end.

A problem is a residual map F from points p (of a flat space or a manifold) to
R^m, and a retraction R_p(s) that moves p along a step s given by its n
coordinates in a tangent basis. The objective is

    cost(p) = 1/2 ||F(p)||^2.

Each iteration of the loop:

1. linearize: J = d/ds F(R_p(s)) at s = 0, an m x n matrix, and the gradient
   g = J^T F(p). J is kept in the loop state and recomputed only when a step
   is accepted, so a rejected step costs one linear solve and no derivative.
2. solve the damped normal equations for the step s,

       (J^T J + lambda D) s = -J^T F(p),            (m >= n)
       s = -J^T (J J^T + lambda I)^-1 F(p),         (m <  n, D = I)

   by Cholesky factorization (the same arithmetic as
   `tf.linalg.lstsq(J, F, l2_regularizer=lambda, fast=True)`). D is the
   identity, or diag(J^T J) for Marquardt's scale-invariant damping. A
   policy may solve otherwise (`TrustRegionDamping` picks lambda from a
   radius by an eigendecomposition).
   Optionally (geodesic acceleration), add a / 2 to the step, where
   (J^T J + lambda D) a = -J^T F''(p)[s, s] reuses the factorization.
3. propose q = R_p(s) and evaluate F(q) once.
4. accept or reject q and update the damping, by a `DampingPolicy`.
   A failed factorization (TensorFlow fills the factor with NaN) or a
   non-finite F(q) is a rejection, in every execution mode.
5. call the callback and test the stopping criteria.

Everything carries optional leading batch dimensions: F(p) is [B..., m], J is
[B..., m, n], and every problem of the batch has its own damping, acceptance,
counters and stop. A stopped problem is frozen. The loop is a
`tf.while_loop` over a namedtuple of tensors: it runs eagerly, inside
`tf.function`, in a TF1 `Session` graph and under XLA. Eager, `tf.function`
and `Session` share TensorFlow's kernels; XLA's round differently (~1e-16
relative), which matters only where a decision hangs on rounding, e.g. whether
the factorization of an exactly singular J^T J + lambda I fails.
"""

import collections
import enum

import numpy as np

import tensorflow as tf

from tfg_optim import _batch
from tfg_optim import _linear_solvers
from tfg_optim import _linearization
from tfg_optim.damping import Step


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
    `_StopCheck`). Ceres ends such solves with a failure too.
  INVALID_INPUT: the start was invalid (off the manifold, outside the
    bounds, not finite) where only a graph run can tell; the start is
    returned unchanged.
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

  @property
  def converged(self):
    return self in (StopReason.GRADIENT_NORM, StopReason.STEP_SIZE,
                    StopReason.COST, StopReason.RELATIVE_COST_CHANGE,
                    StopReason.RELATIVE_STEP)

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
}


Problem = collections.namedtuple(
    "Problem", ["residual_fn", "retract", "tangent_dim", "cost_fn",
                "jacobian_fn", "fixed_fn", "forward_product",
                "tangent_product"],
    defaults=(None, None, None))
Problem.__doc__ = """A least-squares problem as the engine sees it.

residual_fn: point -> F(point), a [B..., m] tensor.
retract: (point, step) -> point, with step a [B..., n] tensor of coordinates.
tangent_dim: n, a Python int.
cost_fn: F -> [B...] cost tensor; None means 1/2 sum(F^2, axis=-1).
jacobian_fn: point -> [B..., m, n] Jacobian, or None for automatic
  differentiation of s -> F(retract(point, s)) at s = 0.
fixed_fn: optional (point, gradient) -> [B..., n] bool, the coordinates held
  fixed at this point (bound constraints: at a bound, with the gradient
  pointing out of the box). Their Jacobian columns and gradient entries are
  zeroed, so the step leaves them alone and the gradient tests see the
  projected gradient.
forward_product: optional (point, step, tangent) -> d/dt F(R_p(step + t
  tangent)) at t = 0, [B..., m]; None means a `tf.autodiff.ForwardAccumulator`
  around F at every use. `minimize` sets it, in graphs, to one traced
  function that the Jacobian's columns, its relinearization and geodesic
  acceleration all call (see `_linearization.traced_forward_product`).
tangent_product: optional (point, tangent) -> J tangent = d/dt F(R_p(t
  tangent)) at t = 0, [B..., m], preferred to `forward_product` for the
  Jacobian and its products at the point (see
  `_linearization.traced_tangent_product`: F's derivative along the ambient
  tangent vector, without the retraction).
"""

# A problem whose linear solve gives a non-finite step this many iterations in
# a row, at a point whose cost and gradient are finite, is STALLED. A failed
# factorization at a small damping is repaired by the damping that each
# rejection raises (Nielsen: by 2^55 after ten; a trust region's radius by
# 4^-10); a J^T J that overflows is not, and would otherwise take the
# damping hundreds of iterations to exhaust. (Ceres' default is 5.)
MAX_CONSECUTIVE_INVALID_STEPS = 10

LoopState = collections.namedtuple(
    "LoopState",
    ["iteration", "point", "residual", "linearization", "gradient", "cost",
     "initial_cost", "damping", "step_norm", "cost_change", "num_iterations", "num_accepted",
     "num_rejected", "num_residual_evaluations", "num_jacobian_evaluations",
     "invalid_streak", "stop_reason", "records", "wall_time"])
LoopState.__doc__ = """The loop's state, one entry per problem of a batch.

`linearization` holds the tensors of J at `point` (`_linearization`: the
matrix, or what a matrix-free linearization keeps); the stopping criteria
see the bound linearization itself (`column_norms()`, `matvec`, ...).

`invalid_streak` counts the consecutive iterations, up to the current one,
whose trial step was not finite (see `MAX_CONSECUTIVE_INVALID_STEPS`).

`wall_time` is the start's `tf.timestamp()` while the loop runs and the
seconds the solve took, measured in the graph, once it returns (NaN under
XLA, which cannot compile timestamps)."""

def default_cost(residual):
  """1/2 ||F||^2 over the last axis."""
  return 0.5 * tf.reduce_sum(tf.square(residual), axis=-1)


# Finite-difference step of the second directional derivative when the
# Jacobian is the user's (Transtrum & Sethna 2012 use h = 0.1).
_SECOND_DERIVATIVE_STEP = 0.1


def second_directional_derivative(problem, point, direction, residual,
                                  linearization):
  """F''(p)[v, v] = d^2/dt^2 F(R_p(t v)) at t = 0, shape [B..., m].

  A forward difference of Jacobian-vector products,

      (d/dt F(R_p(t v)) at t = tau  -  J v) / tau,
      tau = sqrt(eps) (1 + ||p||) / ||v||,

  with one forward-mode product at the shifted point (no residual
  evaluation counted; relative error about sqrt(eps), which is far below
  what geodesic acceleration needs). It works wherever the Jacobian does.
  Exact second-order automatic differentiation does not: TensorFlow cannot
  nest forward-mode accumulators over ops whose outputs have no tangent
  (comparisons in `tf.where`, `round`, `floor`, `sign`, integer casts) in
  graphs nor under an eager `GradientTape`, and under XLA the gradients of
  slices are XLA ops without gradients of their own. With a user Jacobian,
  the finite difference (2 / h) ((F(R_p(h v)) - F(p)) / h - J v), h = 0.1,
  which costs one residual evaluation. Returns (value, residual evaluations
  spent).
  """
  dtype = residual.dtype
  slope = linearization.matvec(direction)
  if problem.jacobian_fn is not None:
    h = tf.constant(_SECOND_DERIVATIVE_STEP, dtype)
    shifted = problem.residual_fn(problem.retract(point, h * direction))
    return (2.0 / h) * ((shifted - residual) / h - slope), 1
  batch_rank = direction.shape.rank - 1
  point_norm = tf.sqrt(tf.add_n([
      tf.reduce_sum(tf.square(part), axis=list(range(batch_rank,
                                                      part.shape.rank)))
      for part in tf.nest.flatten(point)]))
  direction_norm = tf.norm(direction, axis=-1)
  moving = direction_norm > 0
  tau = tf.constant(np.sqrt(np.finfo(dtype.as_numpy_dtype).eps), dtype) * (
      1.0 + point_norm) / tf.where(moving, direction_norm,
                                   tf.ones_like(direction_norm))
  shifted_step = tau[..., tf.newaxis] * direction
  if problem.forward_product:
    shifted_slope = problem.forward_product(point, shifted_step, direction)
  else:
    with tf.autodiff.ForwardAccumulator(shifted_step,
                                        direction) as accumulator:
      value = problem.residual_fn(problem.retract(point, shifted_step))
    shifted_slope = accumulator.jvp(
        value, unconnected_gradients=tf.UnconnectedGradients.ZERO)
  curvature = (tf.reshape(shifted_slope, tf.shape(slope)) - slope) / tau[
      ..., tf.newaxis]
  curvature = tf.where(moving[..., tf.newaxis], curvature,
                       tf.zeros_like(curvature))
  curvature.set_shape(residual.shape)
  return curvature, 0


# -- the loop ------------------------------------------------------------------


def _timestamp():
  """`tf.timestamp()`, or None under XLA (no kernel there)."""
  if _linear_solvers.in_xla():
    return None
  return tf.timestamp()


def _as_callback_ops(callback_result):
  if callback_result is None:
    return []
  if isinstance(callback_result, (list, tuple)):
    return [op for op in callback_result if op is not None]
  return [callback_result]


def minimize(problem, initial_point, policy, max_iterations, stopping=None,
             callback=None, num_records=0, initial_residual=None,
             initial_jacobian=None, geodesic_acceleration=None,
             vanishing_column_tolerance=None, invalid_start=None,
             safeguards=True, initial_residual_evaluations=0,
             matrix_free=False, kind=None):
  """Runs the Levenberg-Marquardt loop.

  Args:
    problem: a `Problem`.
    initial_point: the starting point, a structure of tensors.
    policy: a `DampingPolicy`.
    max_iterations: Python int or int32 scalar tensor, the most iterations.
    stopping: optional `fn(state) -> (stop [B...] bool, reason [B...] int32)`,
      evaluated after every iteration on the new state.
    callback: optional `fn(iteration, cost, point)`, called after every
      iteration; ops it returns run before the next iteration.
    num_records: when > 0, per-iteration records (cost, gradient norm, step
      norm, damping) are kept for the first `num_records` iterations.
    initial_residual, initial_jacobian: optional values at the start, to skip
      their evaluation.
    initial_residual_evaluations: residual evaluations the caller spent on
      `initial_residual` (counted in the results; 0 for a value the user
      gave).
    geodesic_acceleration: None, or alpha > 0 to add Transtrum's second-order
      correction to every step: with the velocity v (the damped step) and
      the acceleration a solving (J^T J + lambda D) a = -J^T F''(p)[v, v],
      the trial step is s = v + a / 2 where 2 ||a||_D / ||v||_D <= alpha
      (||x||_D^2 = x^T D x), else the plain step v. The ratio bounds the
      curvature of the path the step follows: where it is large the
      quadratic correction means nothing, and the plain step is still the
      damped Gauss-Newton step.
    vanishing_column_tolerance: None/0, or tau > 0 (scaled policies only):
      refuse an otherwise accepted step after which a column of J that was
      nonzero has ||J_j|| < tau max_k ||J_j(p_k)|| (the running maximum).
      Such a step has made a variable lose all influence, e.g. exp(-b x)
      underflowing for all data, and a stationary point there is a
      degenerate plateau. The refusal costs the Jacobian evaluation at the
      refused point (counted) and updates the damping as a rejection.
    invalid_start: optional [B...] bool tensor, True for problems whose start
      failed a check that only a graph run can make (off the manifold,
      outside the bounds); they stop at once with `INVALID_INPUT` and return
      the start.
    safeguards: True (every front-end with stopping tests) for the honest
      endings of `StopReason`: NOT_FINITE at a non-finite cost or gradient
      (also at the start), a step whose new gradient is not finite is
      refused like an invalid one, STALLED when the step no longer moves
      the point or the damping is exhausted, and step tests that fire while
      the model still promises a decrease are STALLED, not converged (see
      `_stop`). False keeps TensorFlow Graphics' contract: every iteration
      runs, nothing else is checked.
    matrix_free: False for a dense Jacobian (`_linearization.DenseKind`);
      True for a matrix-free one (`MatrixFreeKind`: J through its products,
      solved by conjugate gradients).
    kind: optional linearization kind, overriding `matrix_free` (e.g.
      `_chunked.ChunkedKind`, whose linearization is J^T J and J^T F summed
      over data chunks; the problem's residual is then ||F||, [1]).

  Returns:
    The final `LoopState`.
  """
  cost_fn = problem.cost_fn or default_cost
  if (problem.forward_product is None and problem.jacobian_fn is None and
      not tf.executing_eagerly()):
    problem = problem._replace(
        forward_product=_linearization.traced_forward_product(problem))
  start_time = _timestamp()
  if start_time is not None:
    with tf.control_dependencies([start_time]):
      initial_point = tf.nest.map_structure(tf.identity, initial_point)
  if initial_residual is None:
    residual = problem.residual_fn(initial_point)
    residual_evaluations = 1
  else:
    residual = tf.convert_to_tensor(initial_residual)
    residual_evaluations = initial_residual_evaluations
  dtype = residual.dtype
  batch_shape = tf.shape(residual)[:-1]
  batch_rank = residual.shape.rank - 1
  num_residuals = residual.shape[-1]
  if kind is not None:
    pass
  elif matrix_free:
    kind = _linearization.MatrixFreeKind(problem)
  else:
    kind = _linearization.DenseKind(problem, num_residuals)
  if initial_jacobian is None:
    linearization = kind.at(initial_point, residual)
    jacobian_evaluations = 1
  else:
    linearization = _linearization.Dense(
        tf.convert_to_tensor(initial_jacobian, dtype))
    jacobian_evaluations = 0
  cost = cost_fn(residual)
  damping = policy.initial(dtype, batch_shape, linearization)
  linearization, gradient = _linearization.hold_fixed(
      problem, initial_point, linearization,
      linearization.gradient(residual))
  zeros_int = tf.zeros(batch_shape, tf.int32)
  records = ()
  if num_records:
    records = tuple(tf.zeros(tf.concat([[num_records], batch_shape], 0), dtype)
                    for _ in range(4))

  state = LoopState(
      iteration=tf.constant(0, tf.int32),
      point=initial_point,
      residual=residual,
      linearization=linearization.tensors,
      gradient=gradient,
      cost=cost,
      initial_cost=cost,
      damping=damping,
      # +inf until a finite step is computed, so step tests cannot fire on it.
      step_norm=tf.fill(batch_shape, tf.constant(float("inf"), dtype)),
      cost_change=tf.zeros(batch_shape, dtype),
      num_iterations=zeros_int,
      num_accepted=zeros_int,
      num_rejected=zeros_int,
      num_residual_evaluations=zeros_int + residual_evaluations,
      num_jacobian_evaluations=zeros_int + jacobian_evaluations,
      invalid_streak=zeros_int,
      stop_reason=zeros_int,
      records=records,
      wall_time=(tf.constant(np.nan, tf.float64) if start_time is None
                 else start_time))
  check = _StopCheck(stopping, safeguards, policy, batch_rank, kind,
                     bounded=problem.fixed_fn is not None)
  if matrix_free:  # Column norms are estimates; see `_invalid_steps`.
    vanishing_column_tolerance = None

  def body(state):
    active = tf.equal(state.stop_reason, StopReason.RUNNING)
    linearization = kind.restore(state.linearization, state.point)
    trial, solve = _propose(policy, state, linearization)
    extra_evaluations = 0
    if geodesic_acceleration is not None:
      trial, extra_evaluations = _accelerate(
          problem, state, linearization, trial, solve, geodesic_acceleration)
    candidate = problem.retract(state.point, trial.step)
    candidate_residual = problem.residual_fn(candidate)
    candidate_cost = cost_fn(candidate_residual)
    judged = _judge(state, linearization, trial, candidate_cost, batch_rank)
    accepted, damping = policy.update(trial.damping, judged)
    accepted &= active
    # Advance: the linearization at the accepted candidates, then the
    # refusals that need it.
    trial_point = _batch.select_structure(accepted, candidate, state.point)

    def relinearize():
      new = kind.at(trial_point, candidate_residual)
      tensors = _linearization.select(accepted, new, linearization).tensors
      gradient = kind.restore(tensors, trial_point).gradient(
          candidate_residual)
      return tensors, gradient

    # The candidates' gradient only where one was accepted: a rejection
    # costs no J^T F (a reverse pass for a matrix-free linearization).
    relinearized = accepted
    tensors, candidate_gradient = tf.cond(
        tf.reduce_any(accepted), relinearize,
        lambda: (linearization.tensors, state.gradient))
    new_linearization = kind.restore(tensors, trial_point)
    invalid = _invalid_steps(
        state, linearization, accepted, new_linearization, candidate_gradient,
        policy, vanishing_column_tolerance if policy.scaled else None,
        safeguards, batch_rank)
    if invalid is not None:
      damping = _batch.select_structure(
          invalid, policy.invalid(trial.damping, judged), damping)
      accepted &= tf.logical_not(invalid)
    damping = _batch.select_structure(active, damping, state.damping)

    point = _batch.select_structure(accepted, candidate, state.point)
    new_linearization = kind.restore(_batch.select_structure(
        accepted, new_linearization.tensors, linearization.tensors), point)
    residual = _batch.select(accepted, candidate_residual, state.residual)
    new_cost = tf.where(accepted, candidate_cost, state.cost)
    gradient = _batch.select(accepted, candidate_gradient, state.gradient)
    damping = policy.observe_linearization(damping, new_linearization)
    new_linearization, gradient = _linearization.hold_fixed(
        problem, point, new_linearization, gradient)
    step_norm = tf.where(active & judged.finite, tf.norm(trial.step, axis=-1),
                         state.step_norm)
    cost_change = tf.where(accepted, state.cost - new_cost,
                           tf.where(active, tf.zeros_like(new_cost),
                                    state.cost_change))
    active_int = tf.cast(active, tf.int32)
    accepted_int = tf.cast(accepted, tf.int32)
    invalid_streak = tf.where(
        active & tf.logical_not(_batch.all_finite(trial.step, batch_rank)),
        state.invalid_streak + 1,
        tf.where(active, tf.zeros_like(active_int), state.invalid_streak))
    new_state = LoopState(
        iteration=state.iteration + 1,
        point=point,
        residual=residual,
        linearization=new_linearization.tensors,
        gradient=gradient,
        cost=new_cost,
        initial_cost=state.initial_cost,
        damping=damping,
        step_norm=step_norm,
        cost_change=cost_change,
        num_iterations=state.num_iterations + active_int,
        num_accepted=state.num_accepted + accepted_int,
        num_rejected=state.num_rejected + active_int - accepted_int,
        num_residual_evaluations=(state.num_residual_evaluations +
                                  active_int * (1 + extra_evaluations)),
        num_jacobian_evaluations=(state.num_jacobian_evaluations +
                                  tf.cast(relinearized, tf.int32)),
        invalid_streak=invalid_streak,
        stop_reason=state.stop_reason,
        records=state.records,
        wall_time=state.wall_time)
    if num_records:
      new_state = new_state._replace(
          records=_record(state.records, state.iteration, num_records, active,
                          (new_cost, _batch.norm(gradient), step_norm,
                           policy.damping_value(damping))))
    zero_step = tf.reduce_all(tf.equal(trial.step, 0), axis=-1)
    new_state = check(new_state, active,
                      stuck=active & tf.logical_not(accepted) & (
                          zero_step | _exhausted(
                              policy.damping_value(damping)) |
                          (invalid_streak >= MAX_CONSECUTIVE_INVALID_STEPS)),
                      damping_limited=_damping_limited(judged))

    if callback is not None:
      callback_ops = _as_callback_ops(
          callback(new_state.iteration, new_state.cost, new_state.point))
      if callback_ops:
        with tf.control_dependencies(callback_ops):
          new_state = tf.nest.map_structure(tf.identity, new_state)
    return (new_state,)

  def cond(state):
    return tf.reduce_any(tf.equal(state.stop_reason, StopReason.RUNNING))

  if invalid_start is not None:
    state = state._replace(stop_reason=tf.where(
        invalid_start, tf.constant(int(StopReason.INVALID_INPUT), tf.int32),
        state.stop_reason))
  # Problems may stop before the first iteration (already converged, or not
  # finite at the start).
  state = check(state, tf.equal(state.stop_reason, StopReason.RUNNING))
  (state,) = tf.while_loop(cond, body, (state,),
                           maximum_iterations=max_iterations,
                           parallel_iterations=1)
  running = tf.equal(state.stop_reason, StopReason.RUNNING)
  if start_time is not None:
    with tf.control_dependencies(tf.nest.flatten(state)):
      state = state._replace(wall_time=_timestamp() - state.wall_time)
  return state._replace(
      damping=policy.damping_value(state.damping),
      stop_reason=tf.where(
          running, tf.constant(int(StopReason.MAX_ITERATIONS), tf.int32),
          state.stop_reason))


# -- the loop's stages ---------------------------------------------------------

Trial = collections.namedtuple(
    "Trial", ["velocity", "step", "regularization", "scaling", "damping"])
Trial.__doc__ = """A proposed step.

velocity: the damped Gauss-Newton step v; step: the step tried (v, or v plus
half the geodesic acceleration); regularization: lambda, [B...]; scaling: D's
diagonal [B..., n] or None for the identity; damping: the policy's state for
`update` (a trust-region policy sets its lambda while solving).
"""


def _propose(policy, state, linearization):
  """The damped step v = -(J^T J + lambda D)^-1 J^T F, by the policy's solver;
  returns (`Trial`, the solve, for corrections that reuse its factor)."""
  lam = policy.regularization(state.damping, state.cost)
  scaling = policy.scaling(state.damping) if policy.scaled else None
  solve, trial_damping = policy.solver(state.damping, linearization,
                                       state.gradient, lam, scaling)
  velocity = solve(state.residual, state.gradient)
  # A policy that owns its solve (the trust region) chose lambda in it.
  lam = policy.regularization(trial_damping, state.cost)
  return Trial(velocity, velocity, lam, scaling, trial_damping), solve


def _accelerate(problem, state, linearization, trial, solve, alpha):
  """Geodesic acceleration (Transtrum & Sethna 2012): s = v + a / 2 with
  (J^T J + lambda D) a = -J^T F''(p)[v, v], where admissible
  (2 ||a||_D / ||v||_D <= alpha, finite); elsewhere s = v.
  Returns (`Trial`, residual evaluations spent)."""
  velocity = trial.velocity
  curvature, evaluations = second_directional_derivative(
      problem, state.point, velocity, state.residual, linearization)
  acceleration = solve(curvature, linearization.rmatvec(curvature))
  weight = 1.0 if trial.scaling is None else trial.scaling
  ratio = 2.0 * tf.sqrt(
      tf.reduce_sum(weight * tf.square(acceleration), axis=-1) /
      tf.reduce_sum(weight * tf.square(velocity), axis=-1))
  admissible = ratio <= tf.constant(alpha, velocity.dtype)  # False for NaN
  step = _batch.select(admissible, velocity + 0.5 * acceleration, velocity)
  return trial._replace(step=step), evaluations


def _judge(state, linearization, trial, candidate_cost, batch_rank):
  """The `Step` the policy judges: costs, the velocity's model decrease and
  damping penalty (when the policy uses them), finiteness, scaled norm."""
  finite = (_batch.all_finite(trial.step, batch_rank) &
            tf.math.is_finite(candidate_cost))
  weight = 1.0 if trial.scaling is None else trial.scaling
  velocity = trial.velocity
  curvature = linearization.curvature(velocity)  # ||J v||^2
  model_decrease = -(tf.reduce_sum(state.gradient * velocity, axis=-1) +
                     0.5 * curvature)
  penalty = 0.5 * trial.regularization * tf.reduce_sum(
      weight * tf.square(velocity), axis=-1)
  scaled_norm = tf.sqrt(tf.reduce_sum(weight * tf.square(trial.step), axis=-1))
  return Step(state.cost, candidate_cost, model_decrease, penalty, finite,
              scaled_norm, curvature)


def _damping_limited(step):
  """[B...]: whether the damping term, more than the curvature, shaped the
  step v: lambda v^T D v > ||J v||^2, i.e. more than half of
  -g^T v = ||J v||^2 + lambda v^T D v (exact for a damped step)."""
  return 2.0 * step.penalty > step.curvature


def _invalid_steps(state, linearization, accepted, new_linearization,
                   candidate_gradient, policy, vanishing_column_tolerance,
                   safeguards, batch_rank):
  """[B...] accepted steps to refuse after all (Ceres' invalid steps), or
  None when no filter is on:
  - with `safeguards`, the gradient at the candidate is not finite (e.g.
    sqrt at 0): continuing from there could only end NOT_FINITE;
  - with a tolerance tau, a Jacobian column that was nonzero has
    ||J_j||^2 < tau^2 max_k ||J_j(p_k)||^2 at the candidate.
  """
  invalid = None
  if vanishing_column_tolerance:
    old_norms = linearization.column_norms()
    new_norms = new_linearization.column_norms()
    reference = policy.scaling(state.damping)  # running max of ||J_j||^2
    invalid = accepted & tf.reduce_any(
        (old_norms > 0) &
        (new_norms < tf.constant(vanishing_column_tolerance ** 2,
                                 new_norms.dtype) * reference), axis=-1)
  if safeguards:
    not_finite = accepted & tf.logical_not(
        _batch.all_finite(candidate_gradient, batch_rank))
    invalid = not_finite if invalid is None else invalid | not_finite
  return invalid


def _exhausted(damping_value):
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


_STEP_TESTS = (StopReason.STEP_SIZE, StopReason.RELATIVE_STEP,
               StopReason.RELATIVE_COST_CHANGE)


class _StopCheck:
  """The stop stage: the caller's criterion, then (with safeguards) the
  honest endings.

  - A step or cost-change test that fires on a step shaped more by the
    damping than by the curvature (`_damping_limited`) while the
    Gauss-Newton model still promises to remove more than a tenth of the
    cost, and more than eps times the initial cost (by `cauchy_decrease`,
    a lower bound of the model's promise), is STALLED:
    the damping, not the problem, made the step small (e.g. a trust region
    collapsed against the edge of the residual's domain). Converged points
    fail at least one condition: near a solution Gauss-Newton steps are
    barely damped; a large residual's promise falls with the gradient; a
    zero residual's promise is at most its cost, which is then at the
    rounding level of the initial cost (a floor of sqrt(eps) was too
    coarse in float32: MGH10 start 1 "converged" by RELATIVE_STEP at 1e-4
    of its initial cost and 1e9 times its optimal cost); and a loose user
    tolerance stops while the promise is
    a small fraction of the cost. A step test that fires where the promise
    is not finite (the model cannot be evaluated: J^T J overflows) is
    STALLED too.
  - A gradient test that fires where the whole Jacobian is zero and the cost
    is not (without bounds, whose held coordinates have zeroed columns): the
    Gauss-Newton model is flat, and the point may as well be a maximum
    (x^2 - 1 at x = 0): STALLED, not converged.
  - `stuck`: a rejected step that is exactly zero, an exhausted damping,
    or `MAX_CONSECUTIVE_INVALID_STEPS` non-finite steps in a row: STALLED,
    since no later iteration can differ (or be finite); also when a step
    test fired on that iteration (a zero step is "small relative to the
    point" whatever the gradient). (A rejected
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

  def __call__(self, state, active, stuck=None, damping_limited=None):
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
      step_test = tf.zeros_like(stop)  # a step or cost-change test fired
      for member in _STEP_TESTS:
        step_test |= tf.equal(reason, int(member))
      if damping_limited is not None:  # after a step
        scaling = (self.policy.scaling(state.damping) if self.policy.scaled
                   else None)
        promise = cauchy_decrease(linearization, state.gradient, scaling)
        dtype = state.cost.dtype
        floor = tf.constant(np.finfo(dtype.as_numpy_dtype).eps,
                            dtype) * state.initial_cost
        # A promise that cannot be evaluated (J^T J overflowing, float32)
        # certifies nothing either.
        reason = tf.where(step_test & (
            tf.logical_not(tf.math.is_finite(promise)) |
            (damping_limited & (promise > 0.1 * state.cost) &
             (promise > floor))), stalled, reason)
      if not self.bounded:
        flat = linearization.is_zero() & (state.cost > 0)
        reason = tf.where(flat & tf.equal(reason, int(StopReason.GRADIENT_NORM)),
                          stalled, reason)
      if stuck is not None:
        # A step or cost-change test that fires on a stuck iteration (a
        # rejected zero step: the trust radius underflowed to 0) measured
        # the damping, not the problem: STALLED too.
        reason = tf.where(stop & tf.logical_not(stuck & step_test), reason,
                          stalled)
        stop |= stuck
      not_finite = tf.logical_not(tf.math.is_finite(state.cost) & _batch.all_finite(
          state.gradient, self.batch_rank))
      reason = tf.where(not_finite, tf.constant(int(StopReason.NOT_FINITE),
                                                tf.int32), reason)
      stop |= not_finite
    return state._replace(stop_reason=tf.where(
        active & stop, reason, state.stop_reason))


def _record(records, iteration, num_records, active, values):
  """Writes this iteration's values (NaN for a stopped problem) into row
  `iteration` of the fixed-size record buffers; later iterations are dropped."""
  index = tf.minimum(iteration, num_records - 1)
  keep = iteration < num_records
  updated = []
  for buffer, value in zip(records, values):
    row = tf.where(active, value, tf.fill(tf.shape(value),
                                          tf.constant(float("nan"), value.dtype)))
    new_buffer = tf.tensor_scatter_nd_update(buffer, [[index]], row[tf.newaxis])
    updated.append(tf.where(keep, new_buffer, buffer))
  return tuple(updated)
