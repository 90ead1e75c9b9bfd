"""A batched strong-Wolfe line search as one `tf.while_loop`.

Along a descent direction d from x, with phi(a) = f(x + a d), it looks for a
step a > 0 satisfying the strong Wolfe conditions (Nocedal & Wright,
Numerical Optimization, 2nd ed., eq. 3.7):

    phi(a) <= phi(0) + c1 a phi'(0)          (sufficient decrease)
    |phi'(a)| <= c2 |phi'(0)|                 (curvature)

with 0 < c1 < c2 < 1. The search is Algorithm 3.5 (bracketing: trial steps
grow until one overshoots) followed by Algorithm 3.6 (zoom: the bracket
shrinks to an acceptable step). Every trial step after the first is the
minimizer of the cubic that interpolates phi and phi' at two points
(N&W eq. 3.59), safeguarded:

- in zoom, a cubic minimizer that is not finite or falls in the outer 10% of
  the bracket is replaced by the bracket's midpoint (bisection);
- while bracketing, the next step lies in [1.1 a, 4 a] (growth capped at 4).

Each member of a batch runs its own search (its own phase, bracket and
evaluation count); one loop iteration evaluates the objective once for the
whole batch. A member stops when it accepts a step, when it meets a non-finite
value or gradient, when its bracket collapses to rounding level, or after
`max_evaluations` evaluations; all but the first are failures, and the
result says which failures met a non-finite value or gradient. A non-finite
trial is never accepted: the search stops there rather than guessing a
shorter step, so a NaN or Inf fails the search at once.
"""

import collections

import numpy as np
import tensorflow as tf

# Phases of a member's search.
_BRACKET, _ZOOM, _DONE, _FAILED = 0, 1, 2, 3

LineSearchResult = collections.namedtuple(
    "LineSearchResult",
    ["success", "step", "value", "gradient", "num_evaluations",
     "not_finite"])
LineSearchResult.__doc__ = """Outcome of `strong_wolfe`, one entry per member.

  success: [B] bool, True where an accepted step satisfies strong Wolfe.
  step: [B] the accepted step length (0 where unsuccessful).
  value: [B] phi(step) (the start value where unsuccessful).
  gradient: [B, n] the gradient at x + step d (the start gradient where
    unsuccessful).
  num_evaluations: [B] int32, objective evaluations spent by the member.
  not_finite: [B] bool, True where the search failed on a trial whose value
    or gradient was NaN or Inf.
"""

_State = collections.namedtuple("_State", [
    "phase", "trial", "evals",
    "a_prev", "f_prev", "d_prev",
    "a_lo", "f_lo", "d_lo", "a_hi", "f_hi", "d_hi",
    "step", "value", "gradient", "not_finite"])


def cubic_minimizer(a, fa, da, b, fb, db):
  """The minimizer of the cubic through (a, fa, da) and (b, fb, db).

  N&W eq. 3.59. NaN where the cubic has no minimizer or the points
  coincide; callers safeguard. Every division and square root reads a safe
  operand there (the "double where"): a discarded NaN or Inf would still
  make the gradient of the caller's tf.where NaN (0 * Inf), which made
  L-BFGS's unrolled gradients NaN in graphs.
  """
  one = tf.ones_like(a)
  span = a - b
  d1 = da + db - 3.0 * (fa - fb) / tf.where(tf.equal(span, 0), one, span)
  discriminant = d1 * d1 - da * db
  positive = discriminant > 0
  d2 = tf.sign(b - a) * tf.where(
      positive, tf.sqrt(tf.where(positive, discriminant, one)),
      tf.zeros_like(a))
  denominator = db - da + 2.0 * d2
  valid = (tf.not_equal(span, 0) & (discriminant >= 0) &
           tf.not_equal(denominator, 0))
  value = b - (b - a) * (db + d2 - d1) / tf.where(valid, denominator, one)
  return tf.where(valid, value, tf.fill(tf.shape(value),
                                        tf.constant(np.nan, value.dtype)))


def _zoom_trial(a_lo, f_lo, d_lo, a_hi, f_hi, d_hi):
  """Cubic step inside the bracket, bisection when it is not safely inside."""
  cubic = cubic_minimizer(a_lo, f_lo, d_lo, a_hi, f_hi, d_hi)
  left = tf.minimum(a_lo, a_hi)
  right = tf.maximum(a_lo, a_hi)
  margin = 0.1 * (right - left)
  safe = (tf.math.is_finite(cubic) & (cubic >= left + margin) &
          (cubic <= right - margin))
  return tf.where(safe, cubic, 0.5 * (a_lo + a_hi))


def _extrapolation_trial(a_prev, f_prev, d_prev, a, f, d):
  """Next, larger step while bracketing: cubic minimizer clipped to [1.1a, 4a]."""
  cubic = cubic_minimizer(a_prev, f_prev, d_prev, a, f, d)
  cubic = tf.where(tf.math.is_finite(cubic), cubic, 4.0 * a)
  return tf.clip_by_value(cubic, 1.1 * a, 4.0 * a)


def _pick(condition, new, old):
  return tf.where(condition, new, old)


def _choose(cases, default):
  """Per member, the point of the first true case, else `default`.

  Points are tuples of [B] tensors; cases are (condition, point) pairs.
  """
  for condition, point in reversed(cases):
    default = tuple(tf.where(condition, p, d) for p, d in zip(point, default))
  return default


def strong_wolfe(value_and_gradient, position, direction, value, gradient,
                 active, initial_step, max_evaluations, c1=1e-4, c2=0.9):
  """Strong-Wolfe line search for a batch of members.

  Args:
    value_and_gradient: Callable mapping [B, n] positions to ([B] values,
      [B, n] gradients).
    position: [B, n] start points x.
    direction: [B, n] descent directions d (phi'(0) < 0 where active).
    value: [B] f(x).
    gradient: [B, n] gradient of f at x.
    active: [B] bool, members that search; the others are left untouched
      (they are evaluated at x, and those evaluations are not counted).
    initial_step: Scalar, the first trial step of every member.
    max_evaluations: Python int >= 1, evaluations allowed per member.
    c1: Sufficient-decrease constant.
    c2: Curvature constant, c1 < c2 < 1.

  Returns:
    A `LineSearchResult`.
  """
  dtype = position.dtype
  zeros = tf.zeros_like(value)
  slope0 = tf.reduce_sum(gradient * direction, axis=-1)
  # A Python number becomes `dtype` directly (tf.cast would round it to
  # float32 first).
  initial_step = (tf.cast(initial_step, dtype) if tf.is_tensor(initial_step)
                  else tf.constant(initial_step, dtype))
  eps = tf.constant(np.finfo(dtype.as_numpy_dtype).eps, dtype)

  def cond(state):
    return tf.reduce_any(state.phase < _DONE)

  def body(state):
    searching = state.phase < _DONE
    bracketing = tf.equal(state.phase, _BRACKET)
    trial = tf.where(searching, state.trial, zeros)
    f, g = value_and_gradient(position + trial[:, None] * direction)
    slope = tf.reduce_sum(g * direction, axis=-1)
    evals = state.evals + tf.cast(searching, tf.int32)

    finite = tf.math.is_finite(f) & tf.reduce_all(tf.math.is_finite(g),
                                                  axis=-1)
    armijo_fails = f > value + c1 * trial * slope0
    curvature_ok = tf.abs(slope) <= -c2 * slope0

    # Algorithm 3.5 (bracketing).
    b_hi_is_trial = armijo_fails | ((state.a_prev > 0) & (f >= state.f_prev))
    b_accept = ~b_hi_is_trial & curvature_ok
    b_lo_is_trial = ~b_hi_is_trial & ~curvature_ok & (slope >= 0)
    b_extend = ~b_hi_is_trial & ~curvature_ok & (slope < 0)
    # Algorithm 3.6 (zoom).
    z_hi_is_trial = armijo_fails | (f >= state.f_lo)
    z_accept = ~z_hi_is_trial & curvature_ok
    z_move_lo = ~z_hi_is_trial & ~curvature_ok
    z_flip = z_move_lo & (slope * (state.a_hi - state.a_lo) >= 0)

    accept = searching & finite & tf.where(bracketing, b_accept, z_accept)

    # New bracket ends, as (step, value, slope) points. "lo" becomes the
    # previous trial when a bracketing trial overshot, or the trial when it
    # went uphill or a zoom trial improved without meeting curvature; "hi"
    # becomes the trial when it overshot, the previous trial when bracketing
    # went uphill, or the old "lo" when a zoom trial's slope points away.
    trial_point = (trial, f, slope)
    prev_point = (state.a_prev, state.f_prev, state.d_prev)
    lo_point = (state.a_lo, state.f_lo, state.d_lo)
    hi_point = (state.a_hi, state.f_hi, state.d_hi)
    a_lo, f_lo, d_lo = _choose(
        [(tf.where(bracketing, b_lo_is_trial, z_move_lo), trial_point),
         (bracketing & b_hi_is_trial, prev_point)], lo_point)
    a_hi, f_hi, d_hi = _choose(
        [(tf.where(bracketing, b_hi_is_trial, z_hi_is_trial), trial_point),
         (bracketing & b_lo_is_trial, prev_point),
         (~bracketing & z_flip, lo_point)], hi_point)

    extend = bracketing & b_extend
    zooming = searching & finite & ~accept & ~extend
    next_trial = tf.where(
        extend,
        _extrapolation_trial(state.a_prev, state.f_prev, state.d_prev,
                             trial, f, slope),
        _zoom_trial(a_lo, f_lo, d_lo, a_hi, f_hi, d_hi))
    collapsed = zooming & (tf.abs(a_hi - a_lo) <=
                           eps * tf.maximum(tf.abs(a_lo), tf.abs(a_hi)))
    failed = searching & (~finite | collapsed |
                          (~accept & (evals >= max_evaluations)))

    phase = tf.where(accept, _DONE, tf.where(
        failed, _FAILED, tf.where(zooming, _ZOOM, state.phase)))
    return (_State(
        phase=tf.where(searching, phase, state.phase),
        trial=tf.where(searching, next_trial, state.trial),
        evals=evals,
        a_prev=_pick(extend, trial, state.a_prev),
        f_prev=_pick(extend, f, state.f_prev),
        d_prev=_pick(extend, slope, state.d_prev),
        a_lo=_pick(searching, a_lo, state.a_lo),
        f_lo=_pick(searching, f_lo, state.f_lo),
        d_lo=_pick(searching, d_lo, state.d_lo),
        a_hi=_pick(searching, a_hi, state.a_hi),
        f_hi=_pick(searching, f_hi, state.f_hi),
        d_hi=_pick(searching, d_hi, state.d_hi),
        step=_pick(accept, trial, state.step),
        value=_pick(accept, f, state.value),
        gradient=_pick(accept[:, None], g, state.gradient),
        not_finite=state.not_finite | (searching & ~finite)),)

  initial = _State(
      phase=tf.where(active, _BRACKET, _DONE),
      trial=tf.fill(tf.shape(value), initial_step),
      evals=tf.zeros(tf.shape(value), tf.int32),
      a_prev=zeros, f_prev=value, d_prev=slope0,
      a_lo=zeros, f_lo=value, d_lo=slope0,
      a_hi=zeros, f_hi=value, d_hi=slope0,
      step=zeros, value=value, gradient=gradient,
      not_finite=tf.zeros(tf.shape(value), tf.bool))
  final, = tf.while_loop(cond, body, (initial,), parallel_iterations=1,
                         maximum_iterations=max_evaluations)
  success = active & tf.equal(final.phase, _DONE)
  return LineSearchResult(
      success=success,
      step=tf.where(success, final.step, zeros),
      value=final.value,
      gradient=final.gradient,
      num_evaluations=final.evals,
      not_finite=final.not_finite)
