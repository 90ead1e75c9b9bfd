"""The loop's decision on a trial step: judge, then refuse.

    judge    the damping policy sees the trial as a `damping.Step` (costs,
             model decrease, damping penalty, finiteness, scaled norm) and
             answers accept or reject, and its new state (Ceres'
             StepAccepted / StepRejected)
    refuse   an accepted step that turns out invalid once the linearization
             at the candidate is known (a non-finite gradient, a vanishing
             Jacobian column) is refused after all: the outcome "invalid
             step", and the policy's state as after a rejection (Ceres'
             StepIsInvalid)

Both stages produce and refine one `Decision`, the only thing the rest of
the iteration learns of the policy's verdict. The linearization at the
accepted candidates, which `refuse` reads, is built between the two by
`_advance.advance`. A new reason to refuse a step is a new filter in
`refuse`'s list, with its own switch from `minimize`.
"""

import collections

import tensorflow as tf

from tfg_optim import _batch
from tfg_optim.damping import Step

Decision = collections.namedtuple(
    "Decision", ["judged", "accepted", "invalid", "damping"])
Decision.__doc__ = """The outcome of a trial step, per problem.

judged: the `damping.Step` the policy judged; accepted: [B...] bool, the step
is taken (only for running problems; False for an invalid step); invalid:
[B...] bool, an accepted step refused after the fact, or None when no
filter is on (before `refuse` too); damping: the policy's new state (for
every problem; the loop keeps it only for the running ones).
"""


def judge(policy, state, linearization, trial, candidate, active):
  """The judge stage: the policy's verdict on the `_step.Trial` and its
  `_step.Candidate`, for the `active` [B...] problems."""
  step = _judged_step(state, linearization, trial, candidate)
  accepted, damping = policy.update(trial.damping, step)
  return Decision(step, accepted & active, None, damping)


def _judged_step(state, linearization, trial, candidate):
  """The `Step` the policy judges: costs, the velocity's model decrease and
  damping penalty (when the policy uses them), finiteness, scaled norm."""
  finite = candidate.step_finite & tf.math.is_finite(candidate.cost)
  weight = 1.0 if trial.scaling is None else trial.scaling
  velocity = trial.velocity
  curvature = linearization.curvature(velocity)  # ||J v||^2
  model_decrease = -(tf.reduce_sum(state.gradient * velocity, axis=-1) +
                     0.5 * curvature)
  penalty = 0.5 * trial.regularization * tf.reduce_sum(
      weight * tf.square(velocity), axis=-1)
  scaled_norm = tf.sqrt(tf.reduce_sum(weight * tf.square(trial.step), axis=-1))
  return Step(state.cost, candidate.cost, model_decrease, penalty, finite,
              scaled_norm, curvature)


def refuse(policy, state, linearization, trial, decision, advanced,
           vanishing_column_tolerance, safeguards, batch_rank):
  """The refuse stage: the `decision` with the accepted steps that are
  invalid (Ceres' invalid steps) refused, `decision.invalid` set and the
  policy's state for them as after a rejection (`policy.invalid`); the
  `decision` unchanged when no filter is on. The filters:

  - with `safeguards`, the gradient at the candidate is not finite (e.g.
    sqrt at 0): continuing from there could only end NOT_FINITE;
  - with a tolerance tau (a scaled policy, whose D is the running maximum
    of diag(J^T J), with exact column norms), a Jacobian column that was
    nonzero has ||J_j||^2 < tau^2 max_k ||J_j(p_k)||^2 at the candidate.

  `advanced` is the `_advance.Advanced` linearization and gradient at the
  accepted candidates.
  """
  accepted = decision.accepted
  invalid = None
  if vanishing_column_tolerance:
    old_norms = linearization.column_norms()
    new_norms = advanced.linearization.column_norms()
    reference = policy.scaling(state.damping)  # running max of ||J_j||^2
    invalid = accepted & tf.reduce_any(
        (old_norms > 0) &
        (new_norms < tf.constant(vanishing_column_tolerance ** 2,
                                 new_norms.dtype) * reference), axis=-1)
  if safeguards:
    not_finite = accepted & tf.logical_not(
        _batch.all_finite(advanced.gradient, batch_rank))
    invalid = not_finite if invalid is None else invalid | not_finite
  if invalid is None:
    return decision
  damping = _batch.select_structure(
      invalid, policy.invalid(trial.damping, decision.judged),
      decision.damping)
  return decision._replace(accepted=accepted & tf.logical_not(invalid),
                           invalid=invalid, damping=damping)
