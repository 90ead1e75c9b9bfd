"""The loop's trial step: propose, correct, evaluate.

What one iteration tries, before anything is decided about it:

    propose   v = -(J^T J + lambda D)^-1 J^T F(p), by the damping policy's
              solver (`Trial`: the velocity v, the step s = v, lambda, D)
    correct   s = v + a / 2 with Transtrum's geodesic acceleration
              (J^T J + lambda D) a = -J^T F''(p)[v, v], where admissible;
              the identity when acceleration is off
    evaluate  the candidate q = R_p(s), F(q) once, its cost, and whether s
              is finite (`Candidate`)

These three share one concept, the step the policy will judge, and one
tuple (`Trial`) that flows through them; the judgement and everything after
it are in `_acceptance` and `_advance`. A new way to shape the step (another
correction, a projection) is a new stage function here that maps a `Trial`
to a `Trial`.
"""

import collections

import numpy as np

import tensorflow as tf

from tfg_optim import _batch
from tfg_optim import _linearization

Trial = collections.namedtuple(
    "Trial", ["velocity", "step", "regularization", "scaling", "damping",
              "solve", "residual_evaluations", "linear_solver_iterations"])
Trial.__doc__ = """A proposed step.

velocity: the damped Gauss-Newton step v; step: the step tried (v, or v plus
half the geodesic acceleration); regularization: lambda, [B...]; scaling: D's
diagonal [B..., n] or None for the identity; damping: the policy's state for
`update` (a trust-region policy sets its lambda while solving); solve: this
iteration's `solve(residual, gradient)` (its factorization, reused by
`correct`; it returns a `_linear_solvers.SolveOutcome`);
residual_evaluations: the residual evaluations the step itself cost (a
Python int: 1 for the finite-difference F'' of `correct` with a user
Jacobian, else 0), besides the candidate's one; linear_solver_iterations:
int32 [B...], the conjugate-gradient iterations of the solves of this
trial (the step's, and the acceleration's; 0 for direct solvers).
"""

Candidate = collections.namedtuple(
    "Candidate", ["point", "residual", "cost", "step_finite"])
Candidate.__doc__ = """The trial step's candidate point.

point: q = R_p(s); residual: F(q), [B..., m]; cost: cost(F(q)), [B...];
step_finite: [B...] bool, whether every coordinate of the step s is finite
(computed once: the judgement's finiteness and the invalid-step streak
share it).
"""


def propose(policy, state, linearization):
  """The propose stage: the damped step v = -(J^T J + lambda D)^-1 J^T F,
  by the policy's solver, as a `Trial` whose step is v."""
  lam = policy.regularization(state.damping, state.cost)
  scaling = policy.scaling(state.damping) if policy.scaled else None
  solve, trial_damping = policy.solver(state.damping, linearization,
                                       state.gradient, lam, scaling)
  outcome = solve(state.residual, state.gradient)
  velocity = outcome.solution
  # A policy that owns its solve (the trust region) chose lambda in it.
  lam = policy.regularization(trial_damping, state.cost)
  return Trial(velocity, velocity, lam, scaling, trial_damping, solve, 0,
               outcome.iterations)


def correct(problem, state, linearization, trial, alpha):
  """The correct stage: geodesic acceleration (Transtrum & Sethna 2012),
  s = v + a / 2 with (J^T J + lambda D) a = -J^T F''(p)[v, v], where
  admissible (2 ||a||_D / ||v||_D <= alpha, finite); elsewhere s = v.
  `trial` unchanged when alpha is None (acceleration off)."""
  if alpha is None:
    return trial
  velocity = trial.velocity
  curvature, evaluations = second_directional_derivative(
      problem, state.point, velocity, state.residual, linearization)
  outcome = trial.solve(curvature, linearization.rmatvec(curvature))
  acceleration = outcome.solution
  weight = 1.0 if trial.scaling is None else trial.scaling
  ratio = 2.0 * tf.sqrt(
      tf.reduce_sum(weight * tf.square(acceleration), axis=-1) /
      tf.reduce_sum(weight * tf.square(velocity), axis=-1))
  admissible = ratio <= tf.constant(alpha, velocity.dtype)  # False for NaN
  step = _batch.select(admissible, velocity + 0.5 * acceleration, velocity)
  return trial._replace(
      step=step, residual_evaluations=evaluations,
      linear_solver_iterations=(trial.linear_solver_iterations +
                                outcome.iterations))


def evaluate(problem, cost_fn, state, trial, batch_rank):
  """The evaluate stage: the `Candidate` R_p(s) of the trial step s, with
  one residual evaluation."""
  point = problem.retract(state.point, trial.step)
  residual = problem.residual_fn(point)
  return Candidate(point, residual, cost_fn(residual),
                   _batch.all_finite(trial.step, batch_rank))


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
    value, (shifted_slope,) = _linearization.directional_derivatives(
        lambda s: problem.residual_fn(problem.retract(point, s)),
        shifted_step, [direction])
    if shifted_slope is None:
      shifted_slope = tf.zeros_like(value)
  curvature = (tf.reshape(shifted_slope, tf.shape(slope)) - slope) / tau[
      ..., tf.newaxis]
  curvature = tf.where(moving[..., tf.newaxis], curvature,
                       tf.zeros_like(curvature))
  curvature.set_shape(residual.shape)
  return curvature, 0
