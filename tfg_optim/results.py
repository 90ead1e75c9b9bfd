"""The results of a least-squares solve, as a namedtuple of tensors.

Every field has the batch shape [B...] of the problem (scalars for a single
problem), except `position` (the solution, shaped like the start), `records`
(a dict of [num_records, B...] per-iteration histories, row i for
iteration i + 1, NaN from each problem's stop on;
empty unless recording was asked for) and `initial_cost`.

`results.summary()` (or `print(results)`) renders a short report from eager
tensors or from the NumPy values that `Session.run(results)` returns.
"""

import collections

import numpy as np
import tensorflow as tf

from tfg_optim import _advance
from tfg_optim import _batch

from tfg_optim._engine import StopReason

_FIELDS = (
    "position", "cost", "initial_cost", "converged", "stop_reason",
    "num_iterations", "num_accepted", "num_rejected",
    "num_residual_evaluations", "num_jacobian_evaluations", "gradient_norm",
    "damping", "step_size", "residual", "records", "num_residuals",
    "num_parameters", "wall_time", "tolerances",
    "num_linear_solver_iterations")

RECORD_NAMES = _advance.RECORD_NAMES


class LeastSquaresResults(collections.namedtuple("LeastSquaresResults",
                                                 _FIELDS)):
  """Results of a Levenberg-Marquardt solve.

  Attributes:
    position: the final point (same structure and shapes as the start).
    cost: 1/2 ||F||^2 at `position`, [B...].
    initial_cost: 1/2 ||F||^2 at the start, [B...].
    converged: bool [B...], whether a convergence criterion (not the
      iteration limit) stopped the problem.
    stop_reason: int32 [B...], a `tfg_optim.StopReason` value.
    num_iterations, num_accepted, num_rejected: int32 [B...].
    num_residual_evaluations, num_jacobian_evaluations: int32 [B...].
    num_linear_solver_iterations: int32 [B...], the conjugate-gradient
      iterations of all linear solves of the solve, rejected steps' and
      geodesic acceleration's included (Ceres' linear-solver iterations,
      summed): 0 for direct solvers (Cholesky, the eigendecomposition,
      sparse Cholesky, the dense Schur complement).
    gradient_norm: ||J^T F|| at `position`, [B...].
    damping: the final damping term (mu or lambda, by policy), [B...].
    step_size: the norm of the last finite step computed (accepted or not);
      +inf if no finite step was ever computed, [B...].
    residual: F at `position`, [B..., m].
    records: dict name -> [num_records, B...] histories (see RECORD_NAMES;
      'linear_solver_iterations' is the iteration's count, as a float).
    num_residuals, num_parameters: int32 scalars, m and n of each problem.
    wall_time: float64 scalar, seconds the solve took, measured in the graph
      with `tf.timestamp` (NaN under XLA, which cannot compile timestamps;
      time the call from Python there).
    tolerances: dict name -> float64 scalar, the thresholds of the stopping
      criterion that applied (e.g. 'relative_cost_change', 'gradient_cosine',
      'relative_step', 'max_iterations').
  """

  __slots__ = ()

  def _values(self):
    return tf.nest.map_structure(
        lambda v: v.numpy() if hasattr(v, "numpy") else np.asarray(v),
        self._asdict())

  def summary(self):
    """A short report for a person, like Ceres' Summary (needs concrete
    values: eager tensors, or what `Session.run(results)` returns)."""
    values = self._values()
    reasons = np.asarray(values["stop_reason"]).reshape(-1)
    lines = []
    sizes = (f"{int(values['num_residuals'])} residuals, "
             f"{int(values['num_parameters'])} parameters")
    tolerances = ", ".join(f"{name} {float(value):g}" for name, value in
                           sorted(values["tolerances"].items()))
    wall_time = float(values["wall_time"])
    timing = ("time not measured (XLA)" if np.isnan(wall_time) else
              f"time {wall_time:.4g} s (measured in the graph)")
    if reasons.size == 1:
      get = lambda name: np.asarray(values[name]).reshape(-1)[0]
      reason = StopReason(int(get("stop_reason")))
      head = f"({reason.name.lower()})"
      if not get("converged"):
        head = f"not converged {head}: {reason.message}"
      lines.append(f"Levenberg-Marquardt: {'converged ' if get('converged') else ''}"
                   f"{head}")
      lines.append(f"  {sizes}; {timing}")
      if tolerances:
        lines.append(f"  tolerances: {tolerances}")
      lines.append(f"  cost {get('initial_cost'):.6e} -> {get('cost'):.6e}, "
                   f"gradient norm {get('gradient_norm'):.3e}")
      lines.append(f"  iterations {get('num_iterations')} "
                   f"({get('num_accepted')} accepted, "
                   f"{get('num_rejected')} rejected); evaluations: residual "
                   f"{get('num_residual_evaluations')}, Jacobian "
                   f"{get('num_jacobian_evaluations')}" + (
                       f"; linear solver iterations "
                       f"{get('num_linear_solver_iterations')}"
                       if get("num_linear_solver_iterations") else ""))
      lines.append(f"  last step size {get('step_size'):.3e}, damping "
                   f"{get('damping'):.3e}")
      return "\n".join(lines)
    converged = np.asarray(values["converged"]).reshape(-1)
    cost = np.asarray(values["cost"]).reshape(-1)
    iterations = np.asarray(values["num_iterations"]).reshape(-1)
    counts = collections.Counter(StopReason(int(r)).name.lower()
                                 for r in reasons)
    lines.append(f"Levenberg-Marquardt on {reasons.size} problems: "
                 f"{int(converged.sum())} converged")
    lines.append(f"  each {sizes}; {timing}")
    if tolerances:
      lines.append(f"  tolerances: {tolerances}")
    lines.append("  stop reasons: " + ", ".join(
        f"{name} {count}" for name, count in sorted(counts.items())))
    lines.append(f"  cost: max {cost.max():.6e}, median "
                 f"{np.median(cost):.6e}; iterations: max {iterations.max()},"
                 f" median {np.median(iterations):g}")
    return "\n".join(lines)

  def __str__(self):
    try:
      return self.summary()
    except (TypeError, ValueError, AttributeError,
            NotImplementedError):  # symbolic tensors: no values yet
      return super().__repr__()

  def __repr__(self):
    """One line with the stop reason by name; the plain namedtuple for
    symbolic tensors."""
    try:
      values = self._values()
      reasons = [StopReason(int(r)).name for r in
                 np.asarray(values["stop_reason"]).reshape(-1)]
      cost = np.asarray(values["cost"])
      iterations = np.asarray(values["num_iterations"])
    except (TypeError, ValueError, AttributeError, NotImplementedError):
      return super().__repr__()
    reason = reasons[0] if len(reasons) == 1 else reasons
    converged = np.asarray(values["converged"]).tolist()
    return (f"LeastSquaresResults(converged={converged}, stop_reason="
            f"{reason}, cost={cost.tolist()}, num_iterations="
            f"{iterations.tolist()})")


def _size(tensor):
  """The last dimension of `tensor`, an int32 scalar: a constant where it is
  known while tracing."""
  size = tensor.shape[-1]
  return (tf.constant(size, tf.int32) if size is not None else
          tf.shape(tensor)[-1])


def from_state(state, num_records, criterion=None):
  """Builds `LeastSquaresResults` from the engine's final loop state and the
  stopping criterion that applied (for `tolerances`)."""
  reason = state.stop_reason
  converged = _batch.isin(reason, [m for m in StopReason if m.converged])
  records = {}
  if num_records:
    # Row i holds iteration i + 1. The engine writes NaN for a problem that
    # has stopped while others of its batch run on, but rows after the whole
    # loop ended keep their zero initialization: mask every row at or past
    # each problem's own iteration count.
    rows = tf.range(num_records)
    rows = tf.reshape(rows, tf.concat(
        [[num_records], tf.ones_like(tf.shape(state.num_iterations))], 0))
    valid = rows < state.num_iterations[tf.newaxis]
    records = {name: tf.where(valid, values,
                              tf.constant(float("nan"), values.dtype))
               for name, values in zip(RECORD_NAMES, state.records)}
  return LeastSquaresResults(
      position=state.point,
      cost=state.cost,
      initial_cost=state.initial_cost,
      converged=converged,
      stop_reason=reason,
      num_iterations=state.num_iterations,
      num_accepted=state.num_accepted,
      num_rejected=state.num_rejected,
      num_residual_evaluations=state.num_residual_evaluations,
      num_jacobian_evaluations=state.num_jacobian_evaluations,
      gradient_norm=_batch.norm(state.gradient),
      damping=state.damping,
      step_size=state.step_norm,
      residual=state.residual,
      records=records,
      num_residuals=_size(state.residual),
      num_parameters=_size(state.gradient),
      wall_time=state.wall_time,
      num_linear_solver_iterations=state.num_linear_solver_iterations,
      tolerances={name: tf.constant(value, tf.float64) for name, value in
                  (criterion.thresholds() if criterion else {}).items()})
