"""The one Levenberg-Marquardt loop behind every least-squares front-end.

A problem is a residual map F from points p (of a flat space or a manifold) to
R^m, and a retraction R_p(s) that moves p along a step s given by its n
coordinates in a tangent basis. The objective is

    cost(p) = 1/2 ||F(p)||^2.

The loop keeps J = d/ds F(R_p(s)) at s = 0, an m x n linearization
(`_linearization`), and the gradient g = J^T F(p) in its state, and each
iteration runs these stages, each a function in the module of its concept
(`_step`: the step tried; `_acceptance`: whether it is taken; `_advance`:
the new state; `_stop_check`: why a problem stops), and the loop body in
`minimize` is one call a stage:

    propose    `_step.propose`: the policy's solver gives the damped step
               (J^T J + lambda D) v = -J^T F(p)            (m >= n)
               v = -J^T (J J^T + lambda I)^-1 F(p)         (m <  n, D = I)
               (`_linear_solvers`: Cholesky, the same arithmetic as
               `tf.linalg.lstsq(J, F, l2_regularizer=lambda, fast=True)`;
               D is the identity, or Marquardt's diag(J^T J); a trust
               region picks lambda from a radius)
    correct    `_step.correct`: optionally (geodesic acceleration) s = v +
               a / 2, (J^T J + lambda D) a = -J^T F''(p)[v, v], reusing the
               factorization
    evaluate   `_step.evaluate`: q = R_p(s) and F(q), once
    judge      `_acceptance.judge`: the `DampingPolicy` accepts or rejects q
               and updates the damping; a failed factorization (TensorFlow
               fills the factor with NaN) or a non-finite F(q) is a
               rejection, in every execution mode
    advance    `_advance.advance`: J and g at the accepted candidates only,
               so a rejected step costs one linear solve and no derivative
    refuse     `_acceptance.refuse`: accepted steps that turn out invalid
               (a non-finite new gradient, a vanishing Jacobian column)
    commit     `_advance.commit`: the new `LoopState`
    record     `_advance.record`: per-iteration histories (optional)
    stop       `_stop_check.StopCheck`: the criterion, then the honest
               endings (`StopReason`)
    callback   `_call_back`: the caller's callback

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

import numpy as np

import tensorflow as tf

from tfg_optim import _acceptance
from tfg_optim import _batch
from tfg_optim import _advance
from tfg_optim import _eager
from tfg_optim import _linear_solvers
from tfg_optim import _linearization
from tfg_optim import _step
from tfg_optim import _stop_check
from tfg_optim._stop_check import StopReason


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
  tangent)) at t = 0, [B..., m]; None means
  `_linearization.directional_derivatives` of F at every use. `minimize` sets it, in graphs, to one traced
  function that the Jacobian's columns, its relinearization and geodesic
  acceleration all call (see `_linearization.traced_forward_product`).
tangent_product: optional (point, tangent) -> J tangent = d/dt F(R_p(t
  tangent)) at t = 0, [B..., m], preferred to `forward_product` for the
  Jacobian and its products at the point (see
  `_linearization.traced_tangent_product`: F's derivative along the ambient
  tangent vector, without the retraction).
"""
LoopState = collections.namedtuple(
    "LoopState",
    ["iteration", "point", "residual", "linearization", "gradient", "cost",
     "initial_cost", "damping", "step_norm", "cost_change", "model_decrease",
     "num_iterations", "num_accepted", "num_rejected",
     "num_residual_evaluations", "num_jacobian_evaluations", "invalid_streak",
     "stop_reason", "records", "wall_time", "num_linear_solver_iterations"])
LoopState.__doc__ = """The loop's state, one entry per problem of a batch.

`linearization` holds the tensors of J at `point` (`_linearization`: the
matrix, or what a matrix-free linearization keeps); the stopping criteria
see the bound linearization itself (`column_norms()`, `matvec`, ...).

`num_linear_solver_iterations` sums the conjugate-gradient iterations of
every trial's solves (`_step.Trial.linear_solver_iterations`; 0 for direct
solvers).

`model_decrease` is the Gauss-Newton model's decrease
-g^T v - 1/2 ||J v||^2 for the last finite step v tried, accepted or not
(+inf until one is, so no test fires on it before; read by
`stopping.StopWhenModelDecreaseLess`).

`invalid_streak` counts the consecutive iterations, up to the current one,
whose trial step was not finite (see
`_stop_check.MAX_CONSECUTIVE_INVALID_STEPS`).

`wall_time` is the start's `tf.timestamp()` while the loop runs and the
seconds the solve took, measured in the graph, once it returns (NaN under
XLA, which cannot compile timestamps)."""

def default_cost(residual):
  """1/2 ||F||^2 over the last axis."""
  return 0.5 * tf.reduce_sum(tf.square(residual), axis=-1)


# -- the loop ------------------------------------------------------------------


def _timestamp():
  """`tf.timestamp()`, or None under XLA (no kernel there)."""
  if _linear_solvers.in_xla():
    return None
  return tf.timestamp()


def _call_back(callback, state):
  """The callback stage: `callback(iteration, cost, point)` on the new
  state; the ops it returns run before the state is passed on."""
  if callback is None:
    return state
  result = callback(state.iteration, state.cost, state.point)
  if result is None:
    return state
  if not isinstance(result, (list, tuple)):
    result = [result]
  ops = [op for op in result if op is not None]
  if not ops:
    return state
  with tf.control_dependencies(ops):
    return tf.nest.map_structure(tf.identity, state)


def minimize(problem, initial_point, policy, max_iterations, stopping=None,
             callback=None, num_records=0, initial_residual=None,
             initial_jacobian=None, geodesic_acceleration=None,
             vanishing_column_tolerance=None, invalid_start=None,
             safeguards=True, initial_residual_evaluations=0,
             matrix_free=False, kind=None, trial_cap=None):
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
    vanishing_column_tolerance: None/0, or tau > 0 (scaled policies and
      linearizations whose column norms are exact, `exact_column_norms`:
      dense, chunked, block-sparse; not matrix-free, whose are estimates):
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
      `_stop_check.StopCheck`). False keeps TensorFlow Graphics' contract:
      every iteration runs, nothing else is checked.
    matrix_free: False for a dense Jacobian (`_linearization.DenseKind`);
      True for a matrix-free one (`MatrixFreeKind`: J through its products,
      solved by conjugate gradients).
    kind: optional linearization kind, overriding `matrix_free` (e.g.
      `_chunked.ChunkedKind`, whose linearization is J^T J and J^T F summed
      over data chunks; the problem's residual is then ||F||, [1]).
    trial_cap: an eager 'auto' first call's iteration cap
      (`_eager.claim_trial`): past it with a problem still running, the
      loop raises `_eager.TrialExceeded` (its front-end then compiles).

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
  elif not isinstance(kind, _linearization.DenseKind):
    # A dense J cannot seed another kind's loop state (whose `restore`
    # reads other tensors).
    raise ValueError("'initial_jacobian' needs the dense linearization, "
                     f"not {type(kind).__name__}.")
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
                    for _ in _advance.RECORD_NAMES)

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
      model_decrease=tf.fill(batch_shape, tf.constant(float("inf"), dtype)),
      num_iterations=zeros_int,
      num_accepted=zeros_int,
      num_rejected=zeros_int,
      num_residual_evaluations=zeros_int + residual_evaluations,
      num_jacobian_evaluations=zeros_int + jacobian_evaluations,
      invalid_streak=zeros_int,
      stop_reason=zeros_int,
      records=records,
      wall_time=(tf.constant(np.nan, tf.float64) if start_time is None
                 else start_time),
      num_linear_solver_iterations=zeros_int)
  check = _stop_check.StopCheck(stopping, safeguards, policy, batch_rank,
                                kind, bounded=problem.fixed_fn is not None)
  if not linearization.exact_column_norms or not policy.scaled:
    # Column norms are estimates (the linearization says so), or no running
    # maximum to compare them with.
    vanishing_column_tolerance = None

  def body(state):
    active = tf.equal(state.stop_reason, StopReason.RUNNING)
    linearization = kind.restore(state.linearization, state.point)
    trial = _step.propose(policy, state, linearization)
    trial = _step.correct(problem, state, linearization, trial,
                          geodesic_acceleration)
    candidate = _step.evaluate(problem, cost_fn, state, trial, batch_rank)
    decision = _acceptance.judge(policy, state, linearization, trial,
                                 candidate, active)
    advanced = _advance.advance(kind, state, linearization, decision,
                                candidate)
    decision = _acceptance.refuse(
        policy, state, linearization, trial, decision, advanced,
        vanishing_column_tolerance, safeguards, batch_rank)
    new_state = _advance.commit(problem, policy, kind, state, active,
                                linearization, trial, candidate, decision,
                                advanced)
    new_state = _advance.record(policy, num_records, state, new_state, active)
    new_state = check.after_step(new_state, active, trial, decision)
    return (_call_back(callback, new_state),)

  def cond(state):
    return _batch.any_entry(tf.equal(state.stop_reason, StopReason.RUNNING))

  if invalid_start is not None:
    state = state._replace(stop_reason=tf.where(
        invalid_start, tf.constant(int(StopReason.INVALID_INPUT), tf.int32),
        state.stop_reason))
  # Problems may stop before the first iteration (already converged, or not
  # finite at the start).
  state = check(state, tf.equal(state.stop_reason, StopReason.RUNNING))
  bound, capped = _eager.loop_bound(max_iterations, trial_cap)
  (state,) = tf.while_loop(cond, body, (state,), maximum_iterations=bound,
                           parallel_iterations=1)
  running = tf.equal(state.stop_reason, StopReason.RUNNING)
  _eager.end_loop(capped, running)
  if start_time is not None:
    with tf.control_dependencies(tf.nest.flatten(state)):
      state = state._replace(wall_time=_timestamp() - state.wall_time)
  return state._replace(
      damping=policy.damping_value(state.damping),
      stop_reason=tf.where(
          running, tf.constant(int(StopReason.MAX_ITERATIONS), tf.int32),
          state.stop_reason))
