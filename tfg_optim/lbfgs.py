r"""L-BFGS and BFGS with a strong-Wolfe line search, with Paddle's interface.

`minimize_lbfgs` and `minimize_bfgs` take the arguments of Paddle's
`paddle.incubate.optimizer.functional.minimize_lbfgs` / `minimize_bfgs` and
return the same 5-tuple
`(is_converge, num_func_calls, position, objective_value, objective_gradient)`,
as TensorFlow graph ops that run eagerly, in `tf.function`, in a TF1
`Session` and under XLA (`jit_compile=True`) (for when the numbers agree
bit for bit, see "Same numbers in every mode" below).

The math. To minimize a smooth f: R^n -> R from x_0, iteration k takes

    d_k = -H_k g_k,             g_k = grad f(x_k),
    x_{k+1} = x_k + a_k d_k,    a_k from a strong-Wolfe line search,
    s_k = x_{k+1} - x_k,        y_k = g_{k+1} - g_k,   rho_k = 1 / (y_k^T s_k),

where H_k approximates the inverse Hessian. BFGS keeps H_k as a dense
n x n matrix and updates it by

    H_{k+1} = V_k^T H_k V_k + rho_k s_k s_k^T,     V_k = I - rho_k y_k s_k^T.

L-BFGS never forms H_k: it keeps the last m = `history_size` pairs (s_i, y_i)
and applies H_k to g_k by the two-loop recursion (Nocedal & Wright, Numerical
Optimization, 2nd ed., Algorithm 7.4) starting from H_k^0 = gamma_k H_0, with
H_0 the identity (applied implicitly, O(n m) memory) or the caller's SPD
matrix. gamma_k = 1 (Paddle's choice, the default here) or, with
`scale_initial_hessian=True`, the usual gamma_k = s_{k-1}^T y_{k-1} /
y_{k-1}^T y_{k-1} (N&W eq. 7.20); for BFGS that option scales H_0 once, before
the first update (N&W eq. 6.20). Both methods are one loop with two
direction/update policies.

Step lengths satisfy the strong Wolfe conditions with c1 = 1e-4, c2 = 0.9
(see `tfg_optim._line_search`). Since then y_k^T s_k > 0, every update keeps
H_k positive definite; a pair with y_k^T s_k <= 0 (possible only through
rounding) is skipped.

Stopping. Each problem ends with an int32 `stop_reason`, a
`tfg_optim.StopReason` value (full results only). Before the loop, a start
holding NaN or Inf stops at once (INVALID_INPUT), a start whose value or
gradient is not finite stops at once (NOT_FINITE), and a start with
||g_0||_inf < tolerance_grad stops at once as converged (GRADIENT_NORM: a
zero direction has nothing to search; the one case where no iteration
runs). Otherwise iterations run until, after an iteration, ||g_{k+1}||_inf <
tolerance_grad (GRADIENT_NORM) or ||s_k||_inf < tolerance_change (STEP_SIZE),
both converged; or until the line search fails: a trial point with a NaN or
Inf value or gradient (NOT_FINITE), or no strong-Wolfe step within
`max_line_search_iters` evaluations, a collapsed bracket or a non-descent
direction (STALLED), all failed, with position = the last accepted iterate;
or until `max_iters` iterations (MAX_ITERATIONS, neither converged nor
failed). The convergence tests only ever see finite values, so a NaN or Inf
never reports convergence, and it ends the run in the iteration that meets
it. An objective unbounded below ends not converged.

Checks while tracing. The objective must return a value of shape
batch_shape (Paddle's one-element [1] is accepted when unbatched) and, with
`value_and_gradient`, a gradient of shape batch_shape + [n]; a static shape
that differs raises ValueError, one unknown while tracing is checked when
the graph runs. Without `value_and_gradient`, an objective with no tape
gradient (computed in NumPy, a constant, through tf.stop_gradient, or ops
without gradients) raises ValueError: it would otherwise have a zero
gradient and report convergence at the start.

Same numbers in every mode. Eager execution, tf.function and a TF1 Session
give bit-for-bit the same results when the objective's value and gradient
are the same eagerly and in a graph. Grappler (the graph optimizer of
tf.function and Session, never run eagerly) rewrites some expressions with
different rounding; this module avoids them (`_reciprocal`, the BFGS
rank-one term), but an objective may contain them: `x ** 2` is the Pow
kernel eagerly and Square in graphs, and sums of three or more terms
(including the tape's sum of the gradients of a tensor used three times)
may be reassociated. XLA (`jit_compile=True`) fuses and reorders floating-
point operations on its own, so its iterates differ in the last bits and,
over many iterations in float32, its path differs; it reaches the same
minimum, though with tolerance_grad at the dtype's rounding noise its line
search may fail there (STALLED) where the other modes converge. See
docs/lbfgs.md for the measurements.

Batches. With keyword-only `batch_dims=k`, the first k dimensions of
`initial_position` index independent problems: `objective_func` then maps
positions of shape batch_shape + [n] to values of shape batch_shape (and
member i's value must depend on member i's position only). Each member has
its own line search, convergence and counts; a finished member is frozen
while the others go on, and its results equal those of a solve on its own.

Differences from Paddle (all keeping its interface and defaults):
- the history is a fixed-size buffer of the last `history_size` pairs: any
  number of iterations works with any `history_size >= 1` (Paddle's ring
  buffer stops making progress once it wraps);
- the default H_0 is an implicit identity, not a dense n x n matrix;
- `num_func_calls` counts every objective evaluation, the one at the start
  included;
- a NaN start returns the start, not converged, and a NaN or Inf reached
  during the run ends it as failed (full results name the reason);
- an objective with no gradient, or with a non-scalar value, is an error;
- extra keyword-only options: `value_and_gradient`, `scale_initial_hessian`,
  `batch_dims`, `return_results`, `gradients` (implicit differentiation of
  the position and value by default; see `tfg_optim._implicit`).
"""

import collections
import numpy as np
import tensorflow as tf

from tfg_optim import _eager
from tfg_optim import _implicit
from tfg_optim import _line_search
from tfg_optim import _linearization
from tfg_optim import _validation
from tfg_optim._engine import StopReason

__all__ = ["minimize_lbfgs", "minimize_bfgs", "LbfgsResults"]

# Above this history size the two-loop recursion is a tf.while_loop over the
# filled part of the buffer; up to it, a fixed unrolled loop (cheaper per
# iteration, quick to compile).
_UNROLL_LIMIT = 16

LbfgsResults = collections.namedtuple("LbfgsResults", [
    "is_converge", "num_func_calls", "position", "objective_value",
    "objective_gradient", "failed", "num_iterations", "stop_reason"])
LbfgsResults.__doc__ = """Full results (`return_results=True`).

  The first five fields are Paddle's return values, in Paddle's order.
  is_converge: bool, True where a tolerance was met.
  num_func_calls: int32, objective evaluations (the first included).
  position: the last accepted iterate.
  objective_value: the objective there.
  objective_gradient: its gradient there.
  failed: bool, True where the run stopped on a failure: neither converged
    nor out of iterations (stop_reason NOT_FINITE, STALLED or INVALID_INPUT).
  num_iterations: int32, iterations that accepted or attempted a step.
  stop_reason: int32, a `tfg_optim.StopReason` value:
    GRADIENT_NORM: ||g||_inf < tolerance_grad (at the start, or after an
      iteration); converged.
    STEP_SIZE: an iteration's step had ||s||_inf < tolerance_change;
      converged.
    MAX_ITERATIONS: `max_iters` iterations ran; not converged, not failed.
    NOT_FINITE: the objective or its gradient was NaN or Inf at the start or
      at a line-search trial point; failed.
    STALLED: the line search found no strong-Wolfe step within
      `max_line_search_iters` evaluations (or its bracket collapsed), or the
      direction was not a descent direction; failed.
    INVALID_INPUT: `initial_position` holds NaN or Inf; failed, no
      iteration.
  Each field has shape batch_shape (position and gradient: batch_shape + [n]).
"""

_LoopState = collections.namedtuple("_LoopState", [
    "stop_reason", "num_iterations", "num_evaluations", "position",
    "value", "gradient", "policy_state"])


# ---------------------------------------------------------------------------
# Public front-ends.


# Not converted by AutoGraph inside a caller's tf.function: the solver is
# explicit graph code (a tf.while_loop), and converting it only costs tracing.
@tf.autograph.experimental.do_not_convert
def minimize_lbfgs(objective_func,
                   initial_position,
                   history_size=100,
                   max_iters=50,
                   tolerance_grad=1e-8,
                   tolerance_change=1e-8,
                   initial_inverse_hessian_estimate=None,
                   line_search_fn="strong_wolfe",
                   max_line_search_iters=50,
                   initial_step_length=1.0,
                   dtype="float32",
                   name=None,
                   *,
                   value_and_gradient=False,
                   scale_initial_hessian=False,
                   batch_dims=0,
                   return_results=False,
                   gradients="implicit",
                   eager_compile="auto"):
  """Minimizes a differentiable function with L-BFGS.

  Args:
    objective_func: Callable taking a position (a tensor of shape [n], or
      batch_shape + [n] with `batch_dims`) and returning the objective, a
      scalar (or batch_shape). Gradients come from `tf.GradientTape`, unless
      `value_and_gradient=True`.
    initial_position: The start, float tensor / NumPy array of shape [n] (or
      batch_shape + [n]), of dtype `dtype`.
    history_size: Number of stored (s, y) pairs, a Python int >= 1.
    max_iters: Maximum number of iterations, a Python int >= 1.
    tolerance_grad: Converged when the infinity norm of the gradient falls
      below this, >= 0.
    tolerance_change: Converged when the infinity norm of a step (position
      change) falls below this, >= 0.
    initial_inverse_hessian_estimate: None (implicit identity) or a
      symmetric positive definite [n, n] matrix (or batch_shape + [n, n]).
    line_search_fn: Only 'strong_wolfe' is implemented.
    max_line_search_iters: Maximum objective evaluations per line search, a
      Python int >= 1.
    initial_step_length: First trial step of every line search, > 0.
    dtype: 'float32' or 'float64' (or the tf.DType); must be the dtype of
      `initial_position`.
    name: Name scope of the ops, default 'minimize_lbfgs'.
    value_and_gradient: If True, `objective_func` returns
      `(value, gradient)` itself and no tape is used.
    scale_initial_hessian: If True, the two-loop recursion starts from
      gamma_k * H_0, gamma_k = s^T y / y^T y of the newest pair (N&W eq.
      7.20). Default False: Paddle's unscaled H_0, which reproduces Paddle's
      iterates; True usually needs fewer evaluations (see docs/lbfgs.md).
    batch_dims: Number of leading batch dimensions of `initial_position`
      (independent problems), a Python int >= 0.
    return_results: If True, return an `LbfgsResults` namedtuple (the 5-tuple
      plus `failed`, `num_iterations` and `stop_reason`).
    gradients: how `position` and `objective_value` are differentiated with
      respect to the tensors and variables `objective_func` captures:
      'implicit' (default; the implicit function theorem at the returned
      point with the exact Hessian, one linear solve, the loop is not
      taped), 'unrolled' (the tape sees every iteration) or 'none'. The
      other outputs are not differentiable. See docs/differentiation.md.
    eager_compile: what an eager call does (no effect inside `tf.function`
      or a TF1 graph): 'auto' (default) runs the first call with a given
      problem op by op (compiled and solved again if still running after
      10 iterations) and later calls with the same problem (objective
      and what it captures, options, position shape and dtype; see
      `tfg_optim._eager`) as one cached compiled `tf.function`; True
      compiles at the first call; False always runs op by op.

  Returns:
    `(is_converge, num_func_calls, position, objective_value,
    objective_gradient)`: a bool tensor, an int32 tensor (evaluations of the
    objective, the first included), the last iterate, the objective and its
    gradient there, in `dtype`; each of shape batch_shape (position and
    gradient: batch_shape + [n]). Or an `LbfgsResults`.

  Raises:
    TypeError: `objective_func` is not callable, or an integer argument is
      not an integer.
    ValueError: a bad `dtype`, an integer `initial_position` or one whose
      dtype differs from `dtype`, a bad shape or n = 0, `history_size`,
      `max_iters` or `max_line_search_iters` < 1 or > 2**31 - 1, an
      `objective_func` whose value (or supplied gradient) has the wrong
      static shape, or which has no tape gradient (it does not depend on
      the position through differentiable ops), negative tolerances, a
      non-positive `initial_step_length`, or an
      `initial_inverse_hessian_estimate` that is known (eagerly, or as a
      constant while tracing) not to be symmetric positive definite. A
      non-constant estimate in a graph is not checked: if it yields a
      non-descent direction the run ends not converged (STALLED).
    NotImplementedError: `line_search_fn` is not 'strong_wolfe'.
  """
  solve = _compiled_solve(minimize_lbfgs, dict(locals()))
  history_size = _validation.positive_int(history_size, "history_size")
  if solve is not None:
    return solve()
  return _minimize(
      "minimize_lbfgs", _LbfgsPolicy(history_size, scale_initial_hessian),
      objective_func, initial_position, max_iters, tolerance_grad,
      tolerance_change, initial_inverse_hessian_estimate, line_search_fn,
      max_line_search_iters, initial_step_length, dtype, name,
      value_and_gradient, batch_dims, return_results, gradients)


# Not converted by AutoGraph inside a caller's tf.function: the solver is
# explicit graph code (a tf.while_loop), and converting it only costs tracing.
@tf.autograph.experimental.do_not_convert
def minimize_bfgs(objective_func,
                  initial_position,
                  max_iters=50,
                  tolerance_grad=1e-7,
                  tolerance_change=1e-9,
                  initial_inverse_hessian_estimate=None,
                  line_search_fn="strong_wolfe",
                  max_line_search_iters=50,
                  initial_step_length=1.0,
                  dtype="float32",
                  name=None,
                  *,
                  value_and_gradient=False,
                  scale_initial_hessian=False,
                  batch_dims=0,
                  return_results=False,
                  gradients="implicit",
                  eager_compile="auto"):
  """Minimizes a differentiable function with BFGS (dense inverse Hessian).

  Same arguments, results and errors as `minimize_lbfgs` without
  `history_size`, and with Paddle's BFGS defaults (tolerance_grad=1e-7,
  tolerance_change=1e-9). H_k is a dense [n, n] matrix (batch_shape + [n, n]
  with batches). `scale_initial_hessian=True` multiplies H_0 by
  s_0^T y_0 / y_0^T y_0 once, before the first update (N&W eq. 6.20).
  """
  solve = _compiled_solve(minimize_bfgs, dict(locals()))
  if solve is not None:
    return solve()
  return _minimize(
      "minimize_bfgs", _BfgsPolicy(scale_initial_hessian), objective_func,
      initial_position, max_iters, tolerance_grad, tolerance_change,
      initial_inverse_hessian_estimate, line_search_fn, max_line_search_iters,
      initial_step_length, dtype, name, value_and_gradient, batch_dims,
      return_results, gradients)


def _compiled_solve(front_end, arguments):
  """() -> the cached compiled solve's return value (`tfg_optim._eager`), or
  None to run op by op (not eager, the problem's first call with 'auto', or
  a start that is not a float tensor or array: the op-by-op path raises the
  right error). `arguments`: the front-end's arguments by name (its
  `locals()` on entry)."""
  options = dict(arguments)
  objective_func = options.pop("objective_func")
  initial_position = options.pop("initial_position")
  eager_compile = options.pop("eager_compile")
  if not _eager.wanted(eager_compile, None) or not isinstance(
      initial_position, (tf.Tensor, tf.Variable, np.ndarray)):
    return None
  start = tf.convert_to_tensor(initial_position)
  if not start.dtype.is_floating:
    return None
  key, kept = _eager.fingerprint((front_end.__name__, objective_func,
                                  options, start.dtype.name))

  def build():
    def solve(position):
      return front_end(objective_func, position, eager_compile=False,
                       **options)
    return solve

  function = _eager.compiled(key, kept, build, eager_compile is True)
  if isinstance(function, _eager.FirstCall):
    first_call = _eager.FirstCall(lambda: _compiled_solve(
        front_end, dict(arguments, eager_compile=True)))
    return lambda: _eager.run_first_call(first_call, lambda: front_end(
        objective_func, initial_position, eager_compile=False, **options))
  if function is None:
    return None
  return lambda: function(start)


# ---------------------------------------------------------------------------
# Direction / update policies. A policy's state is a tuple of tensors that
# rides in the while_loop state; `h0` is None or a [B or 1, n, n] tensor.


def _dot(a, b):
  return tf.reduce_sum(a * b, axis=-1)


def _reciprocal(x):
  """1 / x, correctly rounded in every mode (0 where x = 0).

  Grappler's arithmetic optimizer rewrites a graph's `1 / x` into the
  `Reciprocal` op, which on CPU is a hardware estimate refined by a Newton
  step and differs from the division in the last bit for about a third of
  float32 inputs, while eager execution divides. `div_no_nan` is left alone,
  so eager, tf.function and Session compute the same rho.
  """
  return tf.math.divide_no_nan(tf.ones_like(x), x)


def _apply_h0(h0, vector):
  return vector if h0 is None else tf.linalg.matvec(h0, vector)


def _curvature_ok(s, y, mask):
  sy = _dot(s, y)
  return mask & (sy > 0) & tf.math.is_finite(sy), sy


class _LbfgsPolicy:
  """Last-m pairs, two-loop recursion. State: (s [B,m,n], y [B,m,n],
  rho [B,m], count [B]); the newest pair is at index m-1, and unfilled slots
  hold zeros (rho = 0), which the recursion passes through unchanged."""

  def __init__(self, history_size, scale):
    self.m = history_size
    self.scale = bool(scale)

  def initial_state(self, batch, n, dtype, h0):
    del h0
    return (tf.zeros([batch, self.m, n], dtype),
            tf.zeros([batch, self.m, n], dtype),
            tf.zeros([batch, self.m], dtype),
            tf.zeros([batch], tf.int32))

  def direction(self, state, gradient, h0):
    s_hist, y_hist, rho, count = state
    m = self.m
    one_hot = tf.eye(m, dtype=gradient.dtype)

    def first(i, q, alphas):
      alpha = rho[:, i] * _dot(s_hist[:, i], q)
      return q - alpha[:, None] * y_hist[:, i], alphas + alpha[:, None] * one_hot[i]

    def second(i, r, alphas):
      beta = rho[:, i] * _dot(y_hist[:, i], r)
      return r + (tf.gather(alphas, i, axis=1) - beta)[:, None] * s_hist[:, i]

    q, alphas = gradient, tf.zeros_like(rho)
    if m <= _UNROLL_LIMIT:
      for i in reversed(range(m)):
        q, alphas = first(i, q, alphas)
    else:
      filled = tf.reduce_max(count)
      _, q, alphas = tf.while_loop(
          lambda j, q, a: j < filled,
          lambda j, q, a: (j + 1,) + first(m - 1 - j, q, a),
          (tf.constant(0), q, alphas), maximum_iterations=m)
    r = _apply_h0(h0, q)
    if self.scale:
      # gamma = s^T y / y^T y = 1 / (rho y^T y) for the newest pair.
      rho_yy = rho[:, m - 1] * _dot(y_hist[:, m - 1], y_hist[:, m - 1])
      valid = rho_yy > 0
      gamma = tf.where(valid, _reciprocal(rho_yy), 1.0)
      r = gamma[:, None] * r
    if m <= _UNROLL_LIMIT:
      for i in range(m):
        r = second(i, r, alphas)
    else:
      filled = tf.reduce_max(count)
      _, r = tf.while_loop(
          lambda i, r: i < m,
          lambda i, r: (i + 1, second(i, r, alphas)),
          (m - filled, r), maximum_iterations=m)
    return -r

  def update(self, state, s, y, mask, h0):
    del h0
    s_hist, y_hist, rho, count = state
    keep, sy = _curvature_ok(s, y, mask)
    new_rho = tf.where(keep, _reciprocal(sy), 0.0)

    def push(buffer, new):
      shifted = tf.concat([buffer[:, 1:], new[:, None]], axis=1)
      return tf.where(keep[:, None, None] if buffer.shape.rank == 3
                      else keep[:, None], shifted, buffer)

    return (push(s_hist, s), push(y_hist, y), push(rho, new_rho),
            tf.where(keep, tf.minimum(count + 1, self.m), count))


class _BfgsPolicy:
  """Dense inverse Hessian. State: (H [B,n,n], updated [B] bool)."""

  def __init__(self, scale):
    self.scale = bool(scale)

  def initial_state(self, batch, n, dtype, h0):
    h = tf.eye(n, batch_shape=[batch], dtype=dtype)
    if h0 is not None:
      h = h0 + tf.zeros_like(h)
    return (h, tf.zeros([batch], tf.bool))

  def direction(self, state, gradient, h0):
    del h0
    return -tf.linalg.matvec(state[0], gradient)

  def update(self, state, s, y, mask, h0):
    del h0
    h, updated = state
    keep, sy = _curvature_ok(s, y, mask)
    rho = tf.where(keep, _reciprocal(sy), 0.0)
    if self.scale:
      yy = _dot(y, y)
      gamma = sy / tf.where(yy > 0, yy, tf.ones_like(yy))
      first = keep & ~updated
      h = tf.where(first[:, None, None], gamma[:, None, None] * h, h)
    # V^T H V + rho s s^T, expanded: H - rho (s (Hy)^T + (Hy) s^T)
    #                                  + (rho^2 y^T H y + rho) s s^T.
    # The last term is formed as s (coef s)^T: a product of three factors
    # written coef * (s s^T) is a chain of two multiplications that
    # Grappler's arithmetic optimizer reorders in graphs (to minimize
    # broadcasts) but eager execution does not, which changes the rounding.
    hy = tf.linalg.matvec(h, y)
    outer = lambda a, b: a[:, :, None] * b[:, None, :]
    coef = rho * rho * _dot(y, hy) + rho
    new_h = (h - rho[:, None, None] * (outer(s, hy) + outer(hy, s)) +
             outer(s, coef[:, None] * s))
    return (tf.where(keep[:, None, None], new_h, h), updated | keep)


# ---------------------------------------------------------------------------
# The loop.


def _minimize(default_name, policy, objective_func, initial_position,
              max_iters, tolerance_grad, tolerance_change, h0, line_search_fn,
              max_line_search_iters, initial_step_length, dtype, name,
              value_and_gradient, batch_dims, return_results, gradients):
  """Shared front-end checks and the quasi-Newton while_loop."""
  trial_cap = _eager.claim_trial()  # (before the objective runs)
  gradients = _implicit.check_gradients(gradients)
  if not callable(objective_func):
    raise TypeError("'objective_func' must be callable, got "
                    f"{type(objective_func).__name__}.")
  if line_search_fn not in ("strong_wolfe", "strong wolfe"):
    raise NotImplementedError(
        f"'line_search_fn' {line_search_fn!r} is not implemented; only "
        "'strong_wolfe' is.")
  max_iters = _validation.positive_int(max_iters, "max_iters")
  max_line_search_iters = _validation.positive_int(max_line_search_iters,
                                                   "max_line_search_iters")
  batch_dims = _validation.positive_int(batch_dims, "batch_dims", minimum=0)
  tolerance_grad = _validation.real_number(tolerance_grad, "tolerance_grad",
                                           lower=0.0)
  tolerance_change = _validation.real_number(tolerance_change,
                                             "tolerance_change", lower=0.0)
  initial_step_length = _validation.real_number(
      initial_step_length, "initial_step_length", lower=0.0,
      lower_inclusive=False)
  dtype = _check_dtype(dtype)
  with tf.name_scope(name or default_name):
    x0 = _check_position(initial_position, dtype, batch_dims)
    batch_shape = x0.shape[:batch_dims].as_list()
    n = int(x0.shape[-1])
    batch = int(np.prod(batch_shape, dtype=np.int64))
    h0 = _check_h0(h0, dtype, batch_shape, n)
    value_and_grad = _batched_value_and_gradient(
        objective_func, value_and_gradient, batch_shape, n, dtype)
    final = _implicit.solve_untaped(lambda: _run(
        policy, value_and_grad, tf.reshape(x0, [batch, n]), h0, max_iters,
        tf.constant(tolerance_grad, dtype),
        tf.constant(tolerance_change, dtype), max_line_search_iters,
        initial_step_length, trial_cap), gradients)
    if gradients == "implicit":
      position, value = _implicit.attach_minimum(
          final.position, final.value, value_and_grad)
      final = final._replace(position=position, value=value)
    reason = final.stop_reason
    converged = (tf.equal(reason, int(StopReason.GRADIENT_NORM)) |
                 tf.equal(reason, int(StopReason.STEP_SIZE)))
    failed = ~converged & tf.not_equal(reason,
                                       int(StopReason.MAX_ITERATIONS))
    results = LbfgsResults(
        is_converge=tf.reshape(converged, batch_shape),
        num_func_calls=tf.reshape(final.num_evaluations, batch_shape),
        position=tf.reshape(final.position, batch_shape + [n]),
        objective_value=tf.reshape(final.value, batch_shape),
        objective_gradient=tf.reshape(final.gradient, batch_shape + [n]),
        failed=tf.reshape(failed, batch_shape),
        num_iterations=tf.reshape(final.num_iterations, batch_shape),
        stop_reason=tf.reshape(reason, batch_shape))
  return results if return_results else tuple(results[:5])


def _inf_norm(v):
  return tf.reduce_max(tf.abs(v), axis=-1)


def _run(policy, value_and_grad, x0, h0, max_iters, tolerance_grad,
         tolerance_change, max_line_search_iters, initial_step_length,
         trial_cap=None):
  """Runs the loop on [B, n] positions; returns the final `_LoopState`
  (`trial_cap`: as `_engine.minimize`'s).

  A member runs while its stop reason is RUNNING. The convergence tests read
  only finite values (the start's, or a successful line search's, which
  accepts finite points only), so a NaN or Inf can never look converged.
  """
  batch, n = x0.shape.as_list()
  f0, g0 = value_and_grad(x0)
  finite = tf.math.is_finite(f0) & tf.reduce_all(tf.math.is_finite(g0), -1)
  start_ok = tf.reduce_all(tf.math.is_finite(x0), -1)
  reason = tf.where(
      ~start_ok, _reason(StopReason.INVALID_INPUT),
      tf.where(~finite, _reason(StopReason.NOT_FINITE),
               tf.where(_inf_norm(g0) < tolerance_grad,
                        _reason(StopReason.GRADIENT_NORM),
                        _reason(StopReason.RUNNING))))
  initial = _LoopState(
      stop_reason=reason,
      num_iterations=tf.zeros([batch], tf.int32),
      num_evaluations=tf.ones([batch], tf.int32),
      position=x0, value=f0, gradient=g0,
      policy_state=policy.initial_state(batch, n, x0.dtype, h0))

  def cond(state):
    return tf.reduce_any(tf.equal(state.stop_reason,
                                  int(StopReason.RUNNING)))

  def body(state):
    active = tf.equal(state.stop_reason, int(StopReason.RUNNING))
    direction = policy.direction(state.policy_state, state.gradient, h0)
    direction = tf.where(active[:, None], direction, tf.zeros_like(direction))
    descent = active & (_dot(state.gradient, direction) < 0)
    search = _line_search.strong_wolfe(
        value_and_grad, state.position, direction, state.value,
        state.gradient, descent, initial_step_length, max_line_search_iters)
    ok = search.success
    position = tf.where(ok[:, None],
                        state.position + search.step[:, None] * direction,
                        state.position)
    step = position - state.position
    # The first reason that applies, in this order of precedence.
    reasons = [
        (ok & (_inf_norm(search.gradient) < tolerance_grad),
         StopReason.GRADIENT_NORM),
        (ok & (_inf_norm(step) < tolerance_change), StopReason.STEP_SIZE),
        (~ok & search.not_finite, StopReason.NOT_FINITE),
        (~ok, StopReason.STALLED),
    ]
    new_reason = _reason(StopReason.RUNNING)
    for condition, value in reversed(reasons):
      new_reason = tf.where(condition, _reason(value), new_reason)
    return (_LoopState(
        stop_reason=tf.where(active, new_reason, state.stop_reason),
        num_iterations=state.num_iterations + tf.cast(active, tf.int32),
        num_evaluations=state.num_evaluations + search.num_evaluations,
        position=position,
        value=tf.where(ok, search.value, state.value),
        gradient=tf.where(ok[:, None], search.gradient, state.gradient),
        policy_state=policy.update(state.policy_state, step,
                                   search.gradient - state.gradient, ok,
                                   h0)),)

  bound, capped = _eager.loop_bound(max_iters, trial_cap)
  final, = tf.while_loop(cond, body, (initial,), maximum_iterations=bound,
                         parallel_iterations=1)
  _eager.end_loop(capped, tf.equal(final.stop_reason, int(StopReason.RUNNING)))
  return final._replace(stop_reason=tf.where(
      tf.equal(final.stop_reason, int(StopReason.RUNNING)),
      _reason(StopReason.MAX_ITERATIONS), final.stop_reason))


def _reason(reason):
  return tf.constant(int(reason), tf.int32)


# ---------------------------------------------------------------------------
# Objective wrapper and argument checks.


def _batched_value_and_gradient(objective_func, value_and_gradient,
                                batch_shape, n, dtype):
  """Maps [B, n] positions to ([B] values, [B, n] gradients).

  Checks, while tracing (eagerly: on every call), that the value has shape
  batch_shape (unbatched, Paddle's one-element [1] is accepted too), that a
  supplied gradient has shape batch_shape + [n], and that a tape gradient
  exists: a value not connected to the position through differentiable ops
  would have a zero gradient and look converged at the start.
  """
  batch = int(np.prod(batch_shape, dtype=np.int64))

  def call(x_flat):
    x = tf.reshape(x_flat, batch_shape + [n])
    if value_and_gradient:
      value, gradient = objective_func(x)
      value = _check_output(value, dtype, "value")
      gradient = _check_output(gradient, dtype, "gradient")
    else:
      with tf.GradientTape() as tape:
        tape.watch(x)
        value = _check_output(objective_func(x), dtype, "value")
      gradient = tape.gradient(
          value, x, unconnected_gradients=tf.UnconnectedGradients.NONE)
      if gradient is None:
        raise ValueError(
            "'objective_func' does not depend on the position through "
            "differentiable TensorFlow ops (was it computed in NumPy, a "
            "constant, through tf.stop_gradient, or through ops without "
            "gradients such as round, floor or an int cast?); its gradient "
            "is undefined. Pass value_and_gradient=True to supply one.")
    value = _check_shape(value, batch_shape, batch, "a value")
    gradient = _check_shape(gradient, batch_shape + [n], batch * n,
                            "a gradient")
    return tf.reshape(value, [batch]), tf.reshape(gradient, [batch, n])

  if tf.executing_eagerly():
    return call
  # In graphs, traced once for the start, the line search and the implicit
  # gradient, and inlined where called (the arithmetic of three traces).
  return _linearization.trace_once(call, called=False)


def _check_shape(tensor, shape, size, what):
  """`tensor` if its shape is `shape` (or [1] for a scalar `shape`).

  A static shape that differs raises ValueError at once; a shape unknown
  while tracing is checked when the graph runs (InvalidArgumentError).
  """
  allowed = [shape] + ([[1]] if not shape else [])
  message = (f"'objective_func' must return {what} of shape {shape} "
             f"(batch_shape{'' if what == 'a value' else ' + [n]'})")
  if tensor.shape.is_fully_defined():
    if tensor.shape.as_list() not in allowed:
      raise ValueError(f"{message}, got shape {tensor.shape}.")
    return tensor
  if not any(tensor.shape.is_compatible_with(a) for a in allowed):
    raise ValueError(f"{message}, got shape {tensor.shape}.")
  check = tf.debugging.assert_equal(tf.size(tensor), size,
                                    message=message + ".")
  with tf.control_dependencies([check]):
    return tf.identity(tensor)


def _check_output(tensor, dtype, what):
  tensor = tf.convert_to_tensor(tensor)
  if tensor.dtype != dtype:
    raise TypeError(f"'objective_func' returned a {tensor.dtype.name} "
                    f"{what}; it must be {dtype.name}, the dtype of "
                    "'initial_position'.")
  return tensor


def _check_dtype(dtype):
  try:
    dtype = tf.as_dtype(dtype)
  except TypeError as error:
    raise ValueError(f"'dtype' must be 'float32' or 'float64', got "
                     f"{dtype!r}.") from error
  if dtype not in (tf.float32, tf.float64):
    raise ValueError(f"'dtype' must be 'float32' or 'float64', got "
                     f"{dtype.name}.")
  return dtype


def _check_position(initial_position, dtype, batch_dims):
  """initial_position as a tensor of `dtype` and rank batch_dims + 1."""
  try:
    x0 = tf.convert_to_tensor(initial_position)
  except (TypeError, ValueError) as error:
    raise ValueError("'initial_position' cannot be converted to a tensor: "
                     f"{error}") from error
  if not x0.dtype.is_floating:
    raise ValueError(f"'initial_position' must be float32 or float64, got "
                     f"{x0.dtype.name}.")
  if x0.dtype != dtype:
    raise ValueError(f"'initial_position' is {x0.dtype.name} but 'dtype' is "
                     f"{dtype.name}; they must match.")
  if x0.shape.rank != batch_dims + 1 or not x0.shape.is_fully_defined():
    raise ValueError(f"'initial_position' must have a fully defined shape of "
                     f"rank batch_dims + 1 = {batch_dims + 1}, got "
                     f"{x0.shape}.")
  if x0.shape[-1] == 0:
    raise ValueError(f"'initial_position' must have at least one coordinate "
                     f"(n >= 1), got shape {x0.shape}.")
  return x0


def _check_h0(h0, dtype, batch_shape, n):
  """None, or the estimate as a [B or 1, n, n] tensor, checked SPD if known."""
  if h0 is None:
    return None
  where = "'initial_inverse_hessian_estimate'"
  try:
    h0 = tf.convert_to_tensor(h0, dtype_hint=dtype)
  except (TypeError, ValueError) as error:
    raise ValueError(f"{where} cannot be converted to a tensor: "
                     f"{error}") from error
  if h0.dtype != dtype:
    raise ValueError(f"{where} must be {dtype.name}, got {h0.dtype.name}.")
  shapes = ([n, n], batch_shape + [n, n])
  if h0.shape.as_list() not in shapes:
    raise ValueError(f"{where} must have shape {shapes[0]} or "
                     f"{shapes[1]}, got {h0.shape}.")
  value = tf.get_static_value(h0)
  if value is not None:
    _check_spd(np.asarray(value), where)
  batch = int(np.prod(batch_shape, dtype=np.int64))
  return tf.reshape(h0, [batch if h0.shape.rank > 2 else 1, n, n])


def _check_spd(matrix, where):
  matrices = matrix.reshape((-1,) + matrix.shape[-2:])
  for m in matrices:
    scale = max(np.max(np.abs(m)), np.finfo(m.dtype).tiny)
    if not np.all(np.isfinite(m)) or not np.allclose(
        m, m.T, rtol=0, atol=100 * np.finfo(m.dtype).eps * scale):
      raise ValueError(f"{where} must be symmetric positive definite; it is "
                       "not symmetric.")
    if np.min(np.linalg.eigvalsh(m.astype(np.float64))) <= 0:
      raise ValueError(f"{where} must be symmetric positive definite; it is "
                       "not positive definite.")
