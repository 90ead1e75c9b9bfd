"""The loop's new state: advance, commit, record.

    advance  the linearization and gradient at the accepted candidates
             (`kind.at`, under a `tf.cond` that skips it when no problem of
             the batch accepted: a rejection costs no derivative; with
             what it keeps of the old one, `_linearization.succeed`)
    commit   the new `LoopState`: per problem, the candidate where the
             `_acceptance.Decision` took the step, the old values elsewhere;
             the damping, step norm, cost change, counters and the
             invalid-step streak of the running problems
    record   the iteration's row of the per-iteration histories (optional,
             `RECORD_NAMES`)

These stages are the ones that write the loop state, so they are the only
ones that know its fields besides the stop stage; what came before them
(`_step`, `_acceptance`) only reads it. A new per-iteration quantity is a new
field committed here.
"""

import collections

import tensorflow as tf

from tfg_optim import _batch
from tfg_optim import _linearization

# The per-iteration histories `record` keeps, in the order of the loop
# state's `records` buffers (`results.LeastSquaresResults.records`).
RECORD_NAMES = ("cost", "gradient_norm", "step_size", "damping",
                "linear_solver_iterations")

Advanced = collections.namedtuple(
    "Advanced", ["linearization", "gradient", "relinearized"])
Advanced.__doc__ = """The linearization at the accepted candidates.

linearization: the bound linearization at the accepted candidates (at the
current point elsewhere); gradient: J^T F there, [B..., n]; relinearized:
[B...] bool, the problems whose Jacobian was evaluated (counted even if
`_acceptance.refuse` then refuses the step).
"""


def advance(kind, state, linearization, decision, candidate):
  """The advance stage: the linearization at the `_step.Candidate` for the
  problems whose step `decision` accepted, before the refusals that need
  it."""
  accepted = decision.accepted
  trial_point = _batch.select_structure(accepted, candidate.point,
                                        state.point)

  def relinearize():
    new = _linearization.succeed(linearization, state.gradient,
                                 kind.at(trial_point, candidate.residual))
    tensors = _linearization.select(accepted, new, linearization).tensors
    gradient = kind.restore(tensors, trial_point).gradient(
        candidate.residual)
    return tensors, gradient

  # The candidates' gradient only where one was accepted: a rejection
  # costs no J^T F (a reverse pass for a matrix-free linearization).
  tensors, gradient = tf.cond(
      _batch.any_entry(accepted), relinearize,
      lambda: (linearization.tensors, state.gradient))
  return Advanced(kind.restore(tensors, trial_point), gradient, accepted)


def commit(problem, policy, kind, state, active, linearization, trial,
           candidate, decision, advanced):
  """The commit stage: the next `LoopState` from `state` (whose
  `linearization` is bound as `linearization`) for the `active` [B...]
  problems, after the `_step.Trial`, its `_step.Candidate`, the
  `_acceptance.Decision` and the `Advanced` linearization."""
  accepted = decision.accepted
  damping = _batch.select_structure(active, decision.damping, state.damping)
  point = _batch.select_structure(accepted, candidate.point, state.point)
  new_linearization = kind.restore(_batch.select_structure(
      accepted, advanced.linearization.tensors, linearization.tensors), point)
  residual = _batch.select(accepted, candidate.residual, state.residual)
  new_cost = tf.where(accepted, candidate.cost, state.cost)
  gradient = _batch.select(accepted, advanced.gradient, state.gradient)
  damping = policy.observe_linearization(damping, new_linearization)
  new_linearization, gradient = _linearization.hold_fixed(
      problem, point, new_linearization, gradient)
  step_norm = tf.where(active & decision.judged.finite,
                       tf.norm(trial.step, axis=-1), state.step_norm)
  model_decrease = tf.where(active & decision.judged.finite,
                            decision.judged.model_decrease,
                            state.model_decrease)
  cost_change = tf.where(accepted, state.cost - new_cost,
                         tf.where(active, tf.zeros_like(new_cost),
                                  state.cost_change))
  active_int = tf.cast(active, tf.int32)
  accepted_int = tf.cast(accepted, tf.int32)
  invalid_streak = tf.where(
      active & tf.logical_not(candidate.step_finite),
      state.invalid_streak + 1,
      tf.where(active, tf.zeros_like(active_int), state.invalid_streak))
  return state._replace(
      iteration=state.iteration + 1,
      point=point,
      residual=residual,
      linearization=new_linearization.tensors,
      gradient=gradient,
      cost=new_cost,
      damping=damping,
      step_norm=step_norm,
      cost_change=cost_change,
      model_decrease=model_decrease,
      num_iterations=state.num_iterations + active_int,
      num_accepted=state.num_accepted + accepted_int,
      num_rejected=state.num_rejected + active_int - accepted_int,
      num_residual_evaluations=(state.num_residual_evaluations + active_int *
                                (1 + trial.residual_evaluations)),
      num_jacobian_evaluations=(state.num_jacobian_evaluations +
                                tf.cast(advanced.relinearized, tf.int32)),
      num_linear_solver_iterations=(state.num_linear_solver_iterations +
                                    active_int *
                                    trial.linear_solver_iterations),
      invalid_streak=invalid_streak)


def record(policy, num_records, state, new_state, active):
  """The record stage: `new_state` with its cost, gradient norm, step norm,
  damping and the iteration's linear-solver iterations (`RECORD_NAMES`)
  written into row `state.iteration` of the record buffers (NaN for a
  stopped problem; later iterations are dropped); `new_state` unchanged
  when `num_records` is 0."""
  if not num_records:
    return new_state
  dtype = new_state.cost.dtype
  values = (new_state.cost, _batch.norm(new_state.gradient),
            new_state.step_norm, policy.damping_value(new_state.damping),
            tf.cast(new_state.num_linear_solver_iterations -
                    state.num_linear_solver_iterations, dtype))
  iteration = state.iteration
  index = tf.minimum(iteration, num_records - 1)
  keep = iteration < num_records
  updated = []
  for buffer, value in zip(new_state.records, values):
    row = tf.where(active, value, tf.fill(
        tf.shape(value), tf.constant(float("nan"), value.dtype)))
    new_buffer = tf.tensor_scatter_nd_update(buffer, [[index]], row[tf.newaxis])
    updated.append(tf.where(keep, new_buffer, buffer))
  return new_state._replace(records=tuple(updated))
