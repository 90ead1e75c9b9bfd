r"""Gradients of a solve by implicit differentiation.

A solver returns x* = argmin_x f(x, theta), where theta is every tensor (or
`tf.Variable`) that the residual or objective captures. At a stationary
point g(x*, theta) = grad_x f(x*, theta) = 0, so by the implicit function
theorem

    dx*/dtheta = -H^-1 d^2 f / (dx dtheta),        H = d^2 f / dx^2,

and for a loss L(x*) the vector-Jacobian product is

    H w = dL/dx*,        dL/dtheta = -d/dtheta [g(x*, theta) . w]

with x* and w held constant: one linear solve and one ordinary reverse pass
through g. The `tf.while_loop` of the solver is never differentiated.

Least squares, f = 1/2 ||r(x, theta)||^2, J = dr/dx:

- Gauss-Newton (default): H = J^T J and d^2 f / (dx dtheta) = J^T dr/dtheta,
  dropping the terms sum_i r_i d^2 r_i in both, so

      dL/dtheta = -(dr/dtheta)^T (J w).

  This is the derivative of the solution of the problem linearized at x*; it
  is exact where the residual vanishes at the solution, and for residuals
  linear in x whose Jacobian does not depend on theta (r = A x - b(theta)).
  Otherwise its error is of the order of ||r(x*)|| times the curvature of r.
- exact: H and the mixed derivative of f itself, by nested tapes (one
  Hessian of f in the tangent coordinates, n reverse passes).

The final cost c(theta) = f(x*(theta), theta) has, by the envelope theorem,
dc/dtheta = df/dtheta at fixed x* (the term through x* is g . dx*/dtheta = 0):
no solve. The final residual r(x*(theta), theta) has dr/dtheta + J dx*/dtheta.
When several outputs are used, their cotangents are summed before the one
solve: (x_bar, c_bar, r_bar) -> H w = P^T x_bar + J^T r_bar, and
theta_bar = (dr/dtheta)^T (r_bar + c_bar r - J w) (Gauss-Newton).

Manifolds. The solver's Jacobian is that of c -> r(R_{x*}(c)) in the
orthonormal tangent coordinates c at x*; the same coordinates are used here,
and P = dR_{x*}(c)/dc at c = 0 maps them to the point's ambient values, so a
point's cotangent x_bar enters the solve as P^T x_bar (the projection onto
the tangent space, in coordinates).

Bounds and unidentified variables. A coordinate whose Jacobian column is
exactly zero at x* (held fixed at an active bound by the solver, or without
influence on the residual) gets a zero derivative: its rows and columns of H
are replaced by those of the identity and its right-hand side by 0.

The linear solve is a Cholesky factorization of H; a problem whose factor is
not finite (H singular) is refactored as H + delta I with
delta = sqrt(eps) max_j |H_jj| (a tiny regularization, only then); a problem
whose residual, Jacobian or solution is still not finite contributes a zero
gradient rather than NaN. Batches: the problems are independent, so H is
block diagonal and each problem has its own [n, n] factorization.

Mechanism. The solver runs with its outputs under `tf.stop_gradient` (and,
eagerly under a tape, in a thread of its own, so that no tape of the caller
records its iterations: memory does not grow with them). Then the residual
(or objective) is evaluated once more at the stopped x*, in the caller's
context, where every captured tensor and variable is visible to the
caller's tapes, and the outputs are rebuilt from it:

- Gauss-Newton: with the live residual r(theta) and the stopped J, the
  Gauss-Newton step s(theta) = -(J^T J)^-1 J^T r(theta) has
  ds/dtheta = dx*/dtheta, and the outputs are the solver's values plus terms
  t - stop_gradient(t) (s, r, 1/2 ||r||^2 and their images), which are
  exactly zero for finite t: the values are the solver's bit for bit, the
  derivatives the implicit ones, in reverse and forward mode alike, with
  plain ops (no custom gradient), at the price of one residual evaluation
  and one n x n Cholesky per problem in the forward pass.
- exact Hessian, L-BFGS: one `tf.custom_gradient` identity whose inputs are
  the solver's outputs and the live evaluation (value and gradient of f);
  its backward pass forms H with tapes and solves, and returns the
  cotangent of the live evaluation; forward mode is refused.
- matrix-free least squares (linear_solver='cg', `attach_matrix_free`):
  the same identity with the live residual as input; the backward pass
  solves J^T J w = rhs by preconditioned conjugate gradients through the
  products J v, J^T u at x* (no J, no n x n matrix).
- a linearization through its products (`attach_linearization`; the
  matrix-free one above, and the block-sparse J of
  `tfg_optim.factor_graph`): the same identity; the backward pass solves
  by the forward solve's linear solver (`backward_solve`: the
  linearization's own damped solver, e.g. the Schur complement; the
  Cholesky of its J^T J where it is dense; else preconditioned conjugate
  gradients, block-Jacobi for block-sparse J).
- the exact Hessian of a factor graph (`attach_linearization` with
  `hessian_at`): the identity of `_attach_exact` (the live residual and
  gradient g = J^T r, by one reverse pass), with H as its per-edge blocks
  (reverse over reverse, in the backward pass only: no n x n matrix unless
  the forward solve was the dense Cholesky) and solved by
  `exact_backward_solve`.
- chunked data (`attach_chunked`): J never exists, only the state's J^T J.
  The identity's inputs are theta itself (the data tensors, and the tensors
  and variables the chunk residual captures, found by tracing it once); the
  backward pass Cholesky-solves J^T J and sums the reverse passes of one
  more pass over the chunks.

Either way ordinary automatic differentiation carries the result from the
live evaluation to closures over tensors and `tf.Variable`s alike. The
outputs are differentiated as one (Gauss-)Newton step x* - H^-1 g(x*, theta)
from the held point: away from a stationary point (a solve stopped early)
that is what the gradient means.
"""

import contextlib
import functools
import threading
import types

import numpy as np
import tensorflow as tf

from tfg_optim import _batch
from tfg_optim import _linear_solvers
from tfg_optim import _linearization
from tfg_optim import _sparse_cholesky

GRADIENTS = ("implicit", "unrolled", "none")
HESSIANS = ("gauss_newton", "exact")


def check_gradients(gradients):
  """`gradients` if it is one of GRADIENTS; ValueError naming it otherwise."""
  if not isinstance(gradients, str) or gradients not in GRADIENTS:
    raise ValueError(f"'gradients' must be one of {GRADIENTS}, got "
                     f"{gradients!r}.")
  return gradients


def check_hessian(hessian):
  """`implicit_hessian` if it is one of HESSIANS; ValueError otherwise."""
  if not isinstance(hessian, str) or hessian not in HESSIANS:
    raise ValueError(f"'implicit_hessian' must be one of {HESSIANS}, got "
                     f"{hessian!r}.")
  return hessian


# -- running the solver out of the tapes' view ---------------------------------


def _may_record():
  """Whether a tape or forward accumulator is active on this thread."""
  try:
    from tensorflow.python.eager import record  # pylint: disable=g-import-not-at-top
    return record.could_possibly_record()
  except (ImportError, AttributeError):  # an unknown TensorFlow: assume so
    return True


def _current_device():
  try:
    from tensorflow.python.eager import context  # pylint: disable=g-import-not-at-top
    return context.context().device_name
  except (ImportError, AttributeError):
    return None


def _in_own_thread(function):
  """function() in a new thread, with this thread's device scope.

  Tapes are thread-local: no tape of the caller records what runs there,
  while the tapes and accumulators the solver opens itself work as usual
  (`tape.stop_recording()` needs the tape object, and TensorFlow's global
  stop would silence the solver's own Jacobian tapes too).
  """
  device = _current_device()
  box = {}

  def target():
    try:
      with tf.device(device) if device else contextlib.nullcontext():
        box["value"] = function()
    except BaseException as error:  # pylint: disable=broad-except
      box["error"] = error

  thread = threading.Thread(target=target, name="tfg_optim_solve")
  thread.start()
  thread.join()
  if "error" in box:
    raise box["error"]
  return box["value"]


def _stop(value):
  if isinstance(value, (tf.Tensor, tf.Variable)) and value.dtype.is_floating:
    return tf.stop_gradient(value)
  return value


def solve_untaped(solve, gradients):
  """Runs `solve()` (the solver's loop) as `gradients` asks; returns its
  outputs.

  'unrolled': as is (a tape sees the loop). 'implicit' and 'none': floating
  outputs under `tf.stop_gradient`, so no gradient is ever built through the
  loop (no accumulated intermediates in graphs, nothing for XLA to compile),
  and eagerly under an active tape in a thread of its own (see
  `_in_own_thread`), so no tape holds the iterations' tensors.
  """
  if gradients == "unrolled":
    return solve()
  if tf.executing_eagerly() and _may_record():
    outputs = _in_own_thread(solve)
  else:
    outputs = solve()
  return tf.nest.map_structure(_stop, outputs)


def _needed():
  """False only eagerly with no tape active: no gradient can be taken."""
  return not tf.executing_eagerly() or _may_record()


# -- the linear solve (Gauss-Newton: forward pass; exact, L-BFGS: backward) ---


def _diagonal_finite(factor):
  return tf.reduce_all(tf.math.is_finite(tf.linalg.diag_part(factor)),
                       axis=-1)


def _masked_solve(hessian, rhs, free):
  """w with H_FF w_F = rhs_F and w = 0 off F (F = `free`), per problem;
  returns (w, ok), ok [B...] False where no finite solution was found.

  Cholesky of H; where its factor is not finite, of H + delta I with
  delta = sqrt(eps) max_j |H_jj| (+ tiny).
  """
  dtype = hessian.dtype
  free = tf.cast(free, dtype)
  n = tf.shape(hessian)[-1]
  identity = tf.eye(n, dtype=dtype)
  finite = tf.reduce_all(tf.math.is_finite(hessian), axis=[-2, -1])
  hessian = tf.where(finite[..., tf.newaxis, tf.newaxis], hessian,
                     tf.zeros_like(hessian))
  hessian = (hessian * free[..., :, tf.newaxis] * free[..., tf.newaxis, :] +
             tf.linalg.diag(1.0 - free))
  factor = tf.linalg.cholesky(hessian)
  factored = _diagonal_finite(factor)

  def regularized():
    finfo = np.finfo(dtype.as_numpy_dtype)
    delta = (np.sqrt(finfo.eps) * tf.reduce_max(
        tf.abs(tf.linalg.diag_part(hessian)), axis=-1) + finfo.tiny)
    shifted = tf.linalg.cholesky(
        hessian + delta[..., tf.newaxis, tf.newaxis] * identity)
    return tf.where(factored[..., tf.newaxis, tf.newaxis], factor, shifted)

  factor = tf.cond(tf.reduce_all(factored), lambda: factor, regularized)
  ok = finite & _diagonal_finite(factor)
  factor = tf.where(ok[..., tf.newaxis, tf.newaxis], factor,
                    tf.broadcast_to(identity, tf.shape(factor)))
  rhs = tf.where(tf.math.is_finite(rhs), rhs, tf.zeros_like(rhs)) * free
  w = tf.linalg.cholesky_solve(factor, rhs[..., tf.newaxis])[..., 0] * free
  ok &= tf.reduce_all(tf.math.is_finite(w), axis=-1)
  return tf.where(ok[..., tf.newaxis], w, tf.zeros_like(w)), ok


def _zeros_for_none(values, like):
  return [tf.zeros_like(t) if v is None else tf.convert_to_tensor(v)
          for v, t in zip(values, like)]


def _per_problem(ok, tensor):
  """`tensor` [B..., ...] where ok [B...], zero elsewhere."""
  extra = tensor.shape.rank - ok.shape.rank
  condition = tf.reshape(ok, _batch.concat_shapes(
      _batch.leading_shape(ok, ok.shape.rank), [1] * extra))
  return tf.where(condition, tensor, tf.zeros_like(tensor))


def _batch_jacobian(function, flat, eager):
  """d function(flat) / d flat per row: [B, k] -> [B, k, n] for `flat`
  [B, n] whose rows are independent problems."""
  with tf.GradientTape(watch_accessed_variables=False,
                       persistent=eager) as tape:
    tape.watch(flat)
    value = function(flat)
  return tape.batch_jacobian(
      value, flat, unconnected_gradients=tf.UnconnectedGradients.ZERO,
      experimental_use_pfor=not eager)


# -- least squares -------------------------------------------------------------


def attach_least_squares(results, jacobian, residual_fn, retract,
                         coordinates, tangent_vector, hessian="gauss_newton"):
  """`results` (a `LeastSquaresResults` from a stopped solve) whose
  position, cost and residual have implicit gradients.

  Args:
    results: the solve's results; `position` a structure of tensors
      [B..., ...], `residual` [B..., m], `cost` [B...] (1/2 ||residual||^2).
    jacobian: J [B..., m, n] at the position in the solver's tangent
      coordinates; a zero column marks a coordinate held fixed.
    residual_fn: point -> [B..., m], the problem's (robust) residuals; its
      closures hold the tensors to differentiate.
    retract: (point, coordinates [B..., n]) -> point, the solver's map from
      tangent coordinates (x + c in a flat space).
    coordinates: (point, ambient cotangent) -> [B..., n], P^T v for
      P = d retract(point, c) / dc at c = 0: the manifold's `coordinates`
      (an orthonormal basis for the Frobenius inner product), or the
      flattening of a flat space.
    tangent_vector: (point, [B..., n]) -> ambient P c (the manifold's
      `tangent_vector`, or the split of a flat space's step).
    hessian: 'gauss_newton' or 'exact'.

  Returns:
    `results` with `position`, `cost` and `residual` replaced by tensors of
    bit for bit the same values.
  """
  if not _needed():
    return results
  flat_point = [tf.stop_gradient(t) for t in tf.nest.flatten(
      results.position)]
  point = tf.nest.pack_sequence_as(results.position, flat_point)
  jacobian = tf.stop_gradient(jacobian)
  residual = tf.stop_gradient(results.residual)
  cost = tf.stop_gradient(results.cost)
  if hessian == "exact":
    return _attach_exact(results, point, jacobian, residual, cost,
                         residual_fn, retract, coordinates)
  return _attach_gauss_newton(results, point, jacobian, residual, cost,
                              residual_fn, tangent_vector)


def _zero_valued(tensor):
  """tensor - stop_gradient(tensor): exactly 0 where `tensor` is finite,
  with the derivative of `tensor` (in reverse and forward mode)."""
  return tensor - tf.stop_gradient(tensor)


def _attach_gauss_newton(results, point, jacobian, residual, cost,
                         residual_fn, tangent_vector):
  """Gauss-Newton: plain ops whose values are zero and whose derivative is
  the implicit one, added to the solver's outputs.

  With r = r(x*, theta) evaluated once more (x* held), the Gauss-Newton
  step s(theta) = -(J^T J)^-1 J^T r is ~0 at a solution and
  ds/dtheta = dx*/dtheta. The outputs are

      x* + P (s - stop(s)),  r* + (r - stop(r)) + J (s - stop(s)),
      c* + (1/2 ||r||^2 - stop(1/2 ||r||^2)),

  each term after the solver's value exactly zero, so the values are the
  solver's bit for bit, while every derivative (reverse or forward mode,
  with respect to anything r captures) is that of the implicit function.
  No custom gradient: it works wherever automatic differentiation does
  (forward-mode accumulators included, so a solve nested in another
  solver's residual differentiates). Costs, in the forward pass, one
  residual evaluation and one n x n Cholesky per problem.
  """
  batch_rank = residual.shape.rank - 1
  live = residual_fn(point)
  free = tf.reduce_any(tf.not_equal(jacobian, 0), axis=-2)
  step, ok = _masked_solve(
      tf.matmul(jacobian, jacobian, adjoint_a=True),
      -tf.linalg.matvec(jacobian, live, adjoint_a=True), free)
  ok &= tf.reduce_all(tf.math.is_finite(residual), axis=-1)
  ok &= tf.reduce_all(tf.math.is_finite(live), axis=-1)
  ok &= tf.reduce_all(tf.math.is_finite(jacobian),
                      axis=list(range(batch_rank, batch_rank + 2)))
  delta = _per_problem(ok, _zero_valued(step))
  moved = tf.nest.flatten(tangent_vector(point, delta))
  position = [x + _per_problem(ok, v) for x, v in
              zip(tf.nest.flatten(point), moved)]
  residual_out = residual + _per_problem(
      ok, _zero_valued(live) + tf.linalg.matvec(jacobian, delta))
  cost_out = cost + tf.where(ok, _zero_valued(
      0.5 * tf.reduce_sum(tf.square(live), axis=-1)), tf.zeros_like(cost))
  return results._replace(
      position=tf.nest.pack_sequence_as(results.position, position),
      residual=residual_out, cost=cost_out)


def _attach_exact(results, point, jacobian, residual, cost, residual_fn,
                  retract, coordinates):
  """The exact Hessian: a custom gradient (H is formed in the backward pass
  only, by nested tapes)."""
  flat_point = tf.nest.flatten(point)
  eager = tf.executing_eagerly()
  batch_shape = tf.shape(residual)[:-1]
  n = jacobian.shape[-1] if jacobian.shape[-1] is not None else tf.shape(
      jacobian)[-1]
  coordinate_shape = tf.concat([batch_shape, [n]], 0)
  zero = tf.zeros(coordinate_shape, residual.dtype)

  def residual_at(coordinates_value):
    return residual_fn(retract(point, coordinates_value))

  # r(R(c)) and the gradient of f(R(c)) at c = 0, recorded by the caller's
  # tapes (which then differentiate the gradient: second order).
  with tf.GradientTape(watch_accessed_variables=False) as tape:
    tape.watch(zero)
    live_residual = residual_at(zero)
    objective = 0.5 * tf.reduce_sum(tf.square(live_residual))
  live = [live_residual, tape.gradient(
      objective, zero, unconnected_gradients=tf.UnconnectedGradients.ZERO)]
  _refuse_forward_mode(live)
  num_points = len(flat_point)

  def backward(upstream):
    _require_tapes()
    point_bar = _zeros_for_none(upstream[:num_points], flat_point)
    residual_bar, cost_bar = _zeros_for_none(upstream[num_points:],
                                             [residual, cost])
    tangent_bar = coordinates(
        point, tf.nest.pack_sequence_as(results.position, point_bar))
    tangent_bar += tf.linalg.matvec(jacobian, residual_bar, adjoint_a=True)
    free = tf.reduce_any(tf.not_equal(jacobian, 0), axis=-2)

    def gradient_of(flat):
      with tf.GradientTape(watch_accessed_variables=False) as inner:
        inner.watch(flat)
        value = residual_at(tf.reshape(flat, coordinate_shape))
        objective = 0.5 * tf.reduce_sum(tf.square(value))
      return inner.gradient(
          objective, flat, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    matrix = tf.reshape(
        _batch_jacobian(gradient_of, tf.reshape(zero, tf.stack([-1, n])),
                        eager),
        tf.concat([coordinate_shape, [n]], 0))
    w, ok = _masked_solve(matrix, tangent_bar, free)
    batch_rank = residual.shape.rank - 1
    ok &= tf.reduce_all(tf.math.is_finite(residual), axis=-1)
    ok &= tf.reduce_all(tf.math.is_finite(jacobian),
                        axis=list(range(batch_rank, batch_rank + 2)))
    live_bar = residual_bar + residual * cost_bar[..., tf.newaxis]
    return [None] * (num_points + 2) + [_per_problem(ok, live_bar),
                                        _per_problem(ok, -w)]

  outputs = _identity_with_gradient(flat_point + [residual, cost], live,
                                    backward)
  return results._replace(
      position=tf.nest.pack_sequence_as(results.position,
                                        outputs[:num_points]),
      residual=outputs[num_points], cost=outputs[num_points + 1])


# -- matrix-free (conjugate gradients) -----------------------------------------


# The backward pass's conjugate gradients stop when the Jacobi-preconditioned
# residual of J^T J w = rhs has fallen by this factor (relative to rhs), or
# after CG_MAX_ITERATIONS (1000) iterations. Tighter than the solver's own
# steps (`_linear_solvers.CG_TOLERANCE`, 1e-6): a step only needs descent,
# a gradient is used as it is. The gradient's relative error is about the
# tolerance times the condition number of J^T J.
CG_TOLERANCES = {tf.float64: 1e-10, tf.float32: 1e-5}
CG_MAX_ITERATIONS = 1000


def attach_matrix_free(results, linearization_tensors, problem, coordinates):
  """`results` of a matrix-free (linear_solver='cg') solve whose position,
  cost and residual have Gauss-Newton implicit gradients.

  J is never formed: the backward pass solves J^T J w = P^T x_bar +
  J^T r_bar by Jacobi-preconditioned conjugate gradients
  (`_linear_solvers.conjugate_gradient_solver`, two products J v, J^T u per
  iteration, by `_linearization.MatrixFreeKind` at x*), and returns the
  live residual's cotangent r_bar + c_bar r - J w (one more J v); ordinary
  automatic differentiation carries it to theta (one reverse pass of the
  residual). The forward pass adds one residual evaluation. Coordinates
  whose (held) Jacobian column is zero get a zero derivative, as in the
  dense path: the solve is J^T J on the free coordinates and the identity
  on the others.

  Args:
    results: the solve's results (see `attach_least_squares`).
    linearization_tensors: the final state's `linearization` (a
      `_linearization.MatrixFree`'s free mask and column norms at x*, with
      the solver's fixed coordinates held).
    problem: the solver's `_engine.Problem` (residual_fn, retract,
      tangent_dim): J is that of c -> residual_fn(retract(x*, c)).
    coordinates: (point, ambient cotangent) -> [B..., n], P^T v.

  Returns:
    `results` with `position`, `cost` and `residual` replaced by
    `tf.identity`s of theirs (a custom gradient; forward mode is refused).
  """
  if not _needed():
    return results
  kind = _linearization.MatrixFreeKind(problem._replace(forward_product=None))
  return attach_linearization(
      results, linearization_tensors, kind, problem.residual_fn, coordinates)


def attach_linearization(results, linearization_tensors, kind, residual_fn,
                         coordinates, hessian_at=None, retract=None):
  r"""`results` whose position, cost and residual have implicit gradients,
  J known through a linearization at x* (its products): Gauss-Newton, or
  the exact Hessian given its products (`hessian_at`: a factor graph's,
  implicit_hessian='exact').

  Gauss-Newton: the forward pass adds one evaluation of the live residual
  r(x*, theta) (x* held); the backward pass solves J^T J w = P^T x_bar +
  J^T r_bar by `backward_solve` (the solver the forward solve used: the
  linearization's own damped solver, the dense Cholesky of its J^T J, or
  preconditioned conjugate gradients) and returns the live residual's
  cotangent r_bar + c_bar r - J w, which ordinary automatic
  differentiation carries to theta (one reverse pass of the residual).
  Coordinates whose Jacobian column is exactly zero (held) get a zero
  derivative.

  Exact Hessian (as `_attach_exact`, the dense front-ends): with the
  pullback f(c, theta) = 1/2 ||r(R_{x*}(c), theta)||^2 in the tangent
  coordinates c at x*, g = grad_c f at c = 0 and H = d^2 f / dc^2 at c = 0
  (J^T J plus sum_i r_i d^2 r_i / dc^2, the retraction's own curvature
  included: at a stationary point, the Riemannian Hessian),

      H w = P^T x_bar + J^T r_bar,
      theta_bar = (dr/dtheta)^T (r_bar + c_bar r) - (dg/dtheta)^T w.

  The forward pass adds r and g = J^T r (one reverse pass through the
  retraction and the residual at x*, under the caller's tapes, which then
  differentiate it: second order). The backward pass forms H as its
  per-edge blocks (`hessian_at(point)`: one reverse-over-reverse pass per
  term; no n x n matrix) and solves by `exact_backward_solve`, only when
  the right-hand side is not zero (the final cost alone needs no solve:
  the envelope theorem). H is positive semidefinite at a minimum but need
  not be elsewhere (a saddle point, a solve stopped early): where the
  solve fails (a factorization that fails even with the regularized
  retry, conjugate gradients stopped by negative curvature or short of
  their tolerance) the derivatives through w are NaN, not zero (one
  problem: a wrong zero gradient would go unnoticed).

  Args:
    results: the solve's results (see `attach_least_squares`).
    linearization_tensors: the final state's `linearization` tensors at x*.
    kind: the linearization kind that restores them (`restore(tensors,
      point)`): a `_linearization.MatrixFreeKind`, a
      `_block_sparse.BlockSparseKind`, ...
    residual_fn: point -> [B..., m], the problem's (robust) residuals; its
      closures hold the tensors to differentiate.
    coordinates: (point, ambient cotangent) -> [B..., n], P^T v.
    hessian_at: None (Gauss-Newton), or point -> the exact Hessian there,
      a `_block_sparse.EdgeHessian` (one unbatched problem).
    retract: with `hessian_at`: (point, coordinates [n]) -> point.

  Returns:
    `results` with `position`, `cost` and `residual` replaced by
    `tf.identity`s of theirs (a custom gradient; forward mode is refused).
  """
  if not _needed():
    return results
  flat_point = [tf.stop_gradient(t) for t in tf.nest.flatten(
      results.position)]
  point = tf.nest.pack_sequence_as(results.position, flat_point)
  residual = tf.stop_gradient(results.residual)
  cost = tf.stop_gradient(results.cost)
  linearization = kind.restore(
      [tf.stop_gradient(t) for t in linearization_tensors], point)
  if hessian_at is None:
    live = [residual_fn(point)]
  else:  # r and g = grad_c f(R(c)) at c = 0, recorded by the caller's tapes
    zero = tf.zeros([kind.layout.tangent_dim], residual.dtype)
    with tf.GradientTape(watch_accessed_variables=False) as tape:
      tape.watch(zero)
      live_residual = residual_fn(retract(point, zero))
      objective = 0.5 * tf.reduce_sum(tf.square(live_residual))
    live = [live_residual, tape.gradient(
        objective, zero, unconnected_gradients=tf.UnconnectedGradients.ZERO)]
  _refuse_forward_mode(live)
  num_points = len(flat_point)
  dtype = residual.dtype

  def backward(upstream):
    _require_tapes()
    point_bar = _zeros_for_none(upstream[:num_points], flat_point)
    residual_bar, cost_bar = _zeros_for_none(upstream[num_points:],
                                             [residual, cost])
    free = tf.cast(linearization.column_norms() > 0, dtype)
    rhs = free * coordinates(
        point, tf.nest.pack_sequence_as(results.position, point_bar))
    rhs += linearization.rmatvec(residual_bar)
    rhs = tf.where(tf.math.is_finite(rhs), rhs, tf.zeros_like(rhs))
    if hessian_at is not None:
      def solve():
        w, ok = exact_backward_solve(linearization, hessian_at(point), rhs,
                                     free)
        return tf.where(ok, w, tf.fill(tf.shape(w),
                                       tf.constant(np.nan, dtype)))

      w = tf.cond(tf.reduce_any(tf.not_equal(rhs, 0)), solve,
                  lambda: tf.zeros_like(rhs))
      live_bar = residual_bar + residual * cost_bar
      return [None] * (num_points + 2) + [live_bar, -w]
    w, ok = backward_solve(linearization, rhs, free)
    ok &= tf.reduce_all(tf.math.is_finite(residual), axis=-1)
    ok &= tf.reduce_all(tf.math.is_finite(live[0]), axis=-1)
    w = _per_problem(ok, w)
    live_bar = (residual_bar + residual * cost_bar[..., tf.newaxis] -
                linearization.matvec(w))
    return [None] * (num_points + 2) + [_per_problem(ok, live_bar)]

  outputs = _identity_with_gradient(flat_point + [residual, cost], live,
                                    backward)
  return results._replace(
      position=tf.nest.pack_sequence_as(results.position,
                                        outputs[:num_points]),
      residual=outputs[num_points], cost=outputs[num_points + 1])


def backward_solve(linearization, rhs, free):
  """w with J^T J w = rhs on the `free` coordinates ([B..., n], 0 or 1) and
  w = 0 on the others, by the linear solver the forward solve used (the
  dispatch of `_linear_solvers.damped_solver`); returns (w, ok), ok [B...]
  False where the problem's linearization is not finite (its gradient is
  then zero, as for every failed problem).

  - a linearization with its own `damped_solver` (`_schur`'s Schur
    complement, dense or iterative; the sparse Cholesky): that solver with
    lambda = 0 (`_own_solve`);
  - a dense one (`gram()`): the Cholesky of J^T J (`_masked_solve`);
  - otherwise preconditioned conjugate gradients
    (`_conjugate_gradient_solve`; the linearization's own preconditioner,
    block-Jacobi for block-sparse J, else Jacobi).

  Each regularizes a singular J^T J as the dense path does: a retry with
  J^T J + delta I, delta = sqrt(eps) max_j ||J_j||^2, only where the
  unregularized solve failed: by the solver's own signal
  (`_linear_solvers.SolveOutcome`: a failed factorization, conjugate
  gradients that stopped at their iteration cap or broke down, a
  non-finite w). Where the retry fails too, the own and conjugate-gradient
  solves give w = NaN with ok True: a NaN derivative, never a wrong
  finite one.
  """
  if getattr(linearization, "damped_solver", None) is not None:
    return _own_solve(linearization, rhs, free)
  if linearization.dense:
    return _masked_solve(linearization.gram(), rhs, free)
  return _conjugate_gradient_solve(linearization, rhs, free)


def _own_solve(linearization, rhs, free):
  """`backward_solve` by the linearization's `damped_solver(lambda, D)`
  (one unbatched problem: the Schur complement of a factor graph, dense or
  by conjugate gradients, or the sparse Cholesky), whose zero diagonal
  entries (held coordinates) are set to 1: w = 0 there for rhs = 0 there.
  Where it fails (its `SolveOutcome` not converged: a failed factorization,
  conjugate gradients at their cap or broken down, e.g. on the singular
  J^T J of a gauge), it is solved again with
  lambda = delta = sqrt(eps) max_j ||J_j||^2; where that fails too, w is
  NaN (ok stays True where J is finite)."""
  dtype = rhs.dtype
  rhs = rhs * free
  norms = linearization.column_norms()

  def solve(shift):  # solver(., g) = -(J^T J + shift I)^-1 g
    outcome = linearization.damped_solver(shift)(None, rhs)
    w = -outcome.solution * free
    return w, outcome.converged & tf.reduce_all(tf.math.is_finite(w))

  w, solved = solve(tf.zeros([], dtype))

  def regularized():
    delta = np.sqrt(np.finfo(dtype.as_numpy_dtype).eps) * tf.reduce_max(
        norms)
    return solve(delta)

  w, solved = tf.cond(solved, lambda: (w, solved), regularized)
  w = tf.where(solved, w, tf.constant(np.nan, dtype))
  return w, _batch.all_finite(norms, 0)


def _conjugate_gradient_solve(linearization, rhs, free, hessian=None):
  """w with H w = rhs on the `free` coordinates ([B..., n], 0 or 1) and
  w = 0 on the others, H = J^T J (or `hessian`, an operator with
  `matvec`: the exact Hessian), by preconditioned conjugate gradients
  (`_linear_solvers._cg_loop` on H + diag(1 - free); the linearization's
  own preconditioner of J^T J where it has one, block-Jacobi for
  block-sparse J, else Jacobi); returns (w, ok), ok [B...] False where J
  is not finite.

  Where the solve does not reach its tolerance (by its own signal: the
  `SolveOutcome` not converged, i.e. at the iteration cap or broken down
  on a non-positive curvature; and checked with one more product:
  ||H w - rhs||_M^-1 > sqrt(tolerance) ||rhs||_M^-1, in the Jacobi norm),
  H is singular (a rank-deficient J: its null space makes conjugate
  gradients diverge), too ill-conditioned or, an exact Hessian, indefinite:
  those problems are solved again with H + delta I on the free
  coordinates, delta = sqrt(eps) max_j ||J_j||^2, the dense path's
  regularization. Where that solve does not converge either, w is NaN (a
  NaN derivative, not a wrong one).
  """
  dtype = rhs.dtype
  tolerance = CG_TOLERANCES[dtype]
  fixed = 1.0 - free
  norms = linearization.column_norms()
  diagonal = norms + fixed
  diagonal = tf.where(diagonal > 0, diagonal, tf.ones_like(diagonal))
  if hessian is None:
    product = lambda v: linearization.rmatvec(linearization.matvec(v))
  else:
    product = hessian.matvec

  def solve(shift):  # (H + shift) w = rhs on the free coordinates.
    damping = fixed + shift * free
    precondition = _linear_solvers._preconditioner(  # pylint: disable=protected-access
        linearization, damping).solve
    outcome = _linear_solvers._cg_loop(  # pylint: disable=protected-access
        lambda v: product(v) + damping * v, rhs, precondition,
        CG_MAX_ITERATIONS, tolerance)
    return outcome.solution, outcome.converged

  def size(vector):
    return tf.sqrt(tf.reduce_sum(tf.square(vector) / diagonal, axis=-1))

  w, converged = solve(tf.zeros_like(rhs[..., :1]))
  reached = converged & (size(product(w) + fixed * w - rhs) <=
                         np.sqrt(tolerance) * size(rhs))

  def regularized():
    delta = np.sqrt(np.finfo(dtype.as_numpy_dtype).eps) * tf.reduce_max(
        norms, axis=-1, keepdims=True)
    retried, retry_converged = solve(delta)
    return (tf.where(reached[..., tf.newaxis], w, retried),
            reached | retry_converged)

  w, solved = tf.cond(tf.reduce_all(reached), lambda: (w, reached),
                      regularized)
  w = tf.where(solved[..., tf.newaxis], w, tf.constant(np.nan, dtype))
  return w, _batch.all_finite(norms, norms.shape.rank - 1)


# -- the exact Hessian of a factor graph ---------------------------------------


def exact_backward_solve(linearization, hessian, rhs, free):
  """w with H w = rhs on the `free` coordinates ([n], 0 or 1) and w = 0
  on the others, H the exact Hessian (`_block_sparse.EdgeHessian`), by
  the forward solve's kind of solver; returns (w, ok): a failed solve
  gives w = NaN (the Cholesky of a dense H: ok False).

  - a dense linearization ('cholesky'): the Cholesky of the scattered H
    (`_masked_solve`: a retry with H + delta I, delta = sqrt(eps)
    max_j |H_jj|, where the factor is not finite; not ok where it still
    is not: H not positive definite);
  - the block sparse Cholesky ('sparse_cholesky'): H assembled from its
    blocks in the forward solve's symbolic structure and factored
    (`_sparse_cholesky_solve`);
  - otherwise ('cg', 'schur', 'iterative_schur'): conjugate gradients on
    H v (`_conjugate_gradient_solve` with the `hessian`), preconditioned
    by the block-Jacobi blocks of J^T J; w = NaN where it stops short of
    its tolerance (negative curvature) even with H + delta I.
  """
  if isinstance(linearization, _sparse_cholesky.SparseCholesky):
    return _sparse_cholesky_solve(linearization, hessian, rhs, free)
  if (getattr(linearization, "damped_solver", None) is None and
      linearization.dense):
    return _masked_solve(hessian.dense(), rhs, free)
  return _conjugate_gradient_solve(linearization, rhs, free, hessian)


def _sparse_cholesky_solve(linearization, hessian, rhs, free):
  """(w, ok): H w = rhs by the block sparse Cholesky of H (the held
  coordinates' diagonal set to 1, as for J^T J): `_own_solve` with the
  linearization's damped solver assembling H's blocks instead of J^T J's
  (where the factorization fails, of H + delta I, delta = sqrt(eps)
  max_j ||J_j||^2; w = NaN where that fails too: H not positive
  definite)."""
  of_hessian = types.SimpleNamespace(
      damped_solver=functools.partial(linearization.damped_solver,
                                      products=hessian.pair),
      column_norms=linearization.column_norms)
  return _own_solve(of_hessian, rhs, free)


# -- chunked data ----------------------------------------------------------------


def attach_chunked(results, augmented, chunk_residual, retract, coordinates,
                   data, chunk_size, fold=None):
  """`results` of a chunked-data solve (`data_chunk_size`, or a
  `strategy`) whose position, cost and residual ||F|| have Gauss-Newton
  implicit gradients, with respect to the `data` tensors and to the
  tensors and `tf.Variable`s that the residual captures.

  J (N x n) never exists; the solver's state holds J^T [J | F] at x*. The
  backward pass Cholesky-solves J^T J w = P^T x_bar (`_masked_solve`, as the
  dense path: zero columns held, a regularized retry where singular), and
  one more pass over the chunks, per chunk c,

      u_c = c_bar' F_c - J_c w            (J_c w: one forward-mode product)
      theta_bar += (dF_c / dtheta)^T u_c  (one reverse pass of the chunk)
      data_bar[c] = (dF_c / d data_c)^T u_c

  with c_bar' = c_bar + rho_bar / rho (rho = ||F|| = sqrt(2 cost), whose
  derivative is that of the cost over rho by the envelope theorem): memory
  O(K n) plus the data's own gradient, not O(N) intermediates. The pass is
  a sum over rows, so it splits over any partition of them (`fold`: over
  the replicas of a strategy, whose J^T J is the all-reduced one, the same
  on every replica): each part sums its own theta_bar terms (added over
  the parts) and owns its rows of data_bar. The forward
  pass adds nothing but one trace of the chunk residual, which names the
  tensors and variables it captures (theta): they are the inputs of the
  custom gradient, so its cotangents reach them (and, through ordinary
  automatic differentiation, whatever they were computed from).

  Args:
    results: the solve's results; `residual` is the [1] vector ||F||.
    augmented: J^T [J | F], [n, n + 1], at x* (fixed coordinates held: zero
      rows and columns).
    chunk_residual: (point, chunk) -> [K_c] residuals of the chunk's rows.
    retract, coordinates: as in `attach_least_squares`.
    data: the list of data tensors [N, ...].
    chunk_size: K, or None for one chunk of all the rows (of each part, with
      `fold`).
    fold: optional; fold(local_pass) -> (sums, rows) runs the backward
      pass over parts of the data and combines them: local_pass(part) (a
      list of rows of the data tensors) returns the pass over that part's
      chunks, (sums, rows): the theta_bar terms summed over its chunks and
      the part's data_bar rows; `fold` returns the sums added over the
      parts and the rows [N, ...] of every data tensor. Default:
      local_pass(data), one part. `_distributed.DistributedKind.fold` runs
      it on every replica's shard, with one SUM all-reduce of the sums.

  Returns:
    `results` with `position`, `cost` and `residual` replaced by
    `tf.identity`s of theirs (a custom gradient; forward mode is refused).
  """
  if not _needed():
    return results
  flat_point = [tf.stop_gradient(t) for t in tf.nest.flatten(
      results.position)]
  point = tf.nest.pack_sequence_as(results.position, flat_point)
  residual = tf.stop_gradient(results.residual)
  cost = tf.stop_gradient(results.cost)
  augmented = tf.stop_gradient(augmented)
  dtype = cost.dtype
  n = augmented.shape[-1] - 1
  captured, variables = _captures(chunk_residual, point, data, chunk_size)
  data_slots = [i for i, t in enumerate(data) if t.dtype.is_floating]
  live = (captured + [tf.convert_to_tensor(v) for v in variables] +
          [data[i] for i in data_slots])
  _refuse_forward_mode(live)
  num_points = len(flat_point)

  def backward(upstream):
    _require_tapes()
    point_bar = _zeros_for_none(upstream[:num_points], flat_point)
    norm_bar, cost_bar = _zeros_for_none(upstream[num_points:],
                                         [residual, cost])
    norm = residual[0]
    safe_norm = tf.where(norm > 0, norm, tf.ones_like(norm))
    cost_bar += tf.where(norm > 0, norm_bar[0] / safe_norm,
                         tf.zeros_like(norm))
    gram = augmented[..., :-1]
    free = tf.linalg.diag_part(gram) > 0
    rhs = coordinates(point,
                      tf.nest.pack_sequence_as(results.position, point_bar))
    w, ok = _masked_solve(gram, rhs, free)
    ok &= tf.math.is_finite(cost)
    zero_step = tf.zeros([n], dtype)

    def chunk_bars(chunk):
      pieces = [chunk[i] for i in data_slots]
      with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(captured + pieces)
        tape.watch(variables)
        with tf.autodiff.ForwardAccumulator(zero_step, w) as accumulator:
          value = chunk_residual(retract(point, zero_step), chunk)
      product = accumulator.jvp(
          value, unconnected_gradients=tf.UnconnectedGradients.ZERO)
      cotangent = tf.stop_gradient(cost_bar * value - product)
      return tape.gradient(value, captured + variables + pieces,
                           output_gradients=cotangent,
                           unconnected_gradients=tf.UnconnectedGradients.ZERO)

    local_pass = lambda part: _map_chunks(
        part, chunk_size, chunk_bars, captured + variables,
        [part[i] for i in data_slots])
    sums, rows = (fold or (lambda run: run(data)))(local_pass)
    bars = [tf.where(ok, bar, tf.zeros_like(bar)) for bar in sums + rows]
    return [None] * (num_points + 2) + bars

  outputs = _identity_with_gradient(flat_point + [residual, cost], live,
                                    backward)
  return results._replace(
      position=tf.nest.pack_sequence_as(results.position,
                                        outputs[:num_points]),
      residual=outputs[num_points], cost=outputs[num_points + 1])


def _captures(chunk_residual, point, data, chunk_size):
  """(tensors, variables) that `chunk_residual` captures: the floating
  tensors from outside it (in this context's graph, or eager tensors) and
  the `tf.Variable`s it reads, found by tracing it once on a chunk of the
  first chunk's static shape."""
  flat_point = tf.nest.flatten(point)
  specs = [tf.TensorSpec(t.shape, t.dtype) for t in flat_point]
  rows = next((t.shape[0] for t in data if t.shape[0] is not None), None)
  if chunk_size is not None:
    rows = chunk_size if rows is None else min(rows, chunk_size)
  chunk_specs = [tf.TensorSpec([rows] + t.shape[1:].as_list(), t.dtype)
                 for t in data]

  def traced(*args):
    return chunk_residual(
        tf.nest.pack_sequence_as(point, list(args[:len(specs)])),
        list(args[len(specs):]))

  graph = tf.function(traced, autograph=False).get_concrete_function(
      *(specs + chunk_specs)).graph
  tensors = [t for t in graph.external_captures
             if t.dtype.is_floating and not any(t is d for d in data)]
  return tensors, list(graph.variables)


def _map_chunks(data, chunk_size, function, sum_like, row_like):
  """One pass over the chunks of `data`, as `_chunked.ChunkedData.fold`:
  `function(chunk)` returns one tensor per `sum_like` tensor (summed over
  chunks), then one [K_c, ...] tensor per `row_like` tensor [N, ...]
  (concatenated over chunks, in a `tf.TensorArray` of static size where N
  is static; `chunk_size` None: one chunk of all the rows). Returns
  (sums, rows)."""
  num_sums = len(sum_like)
  if chunk_size is None:
    values = function(list(data))
    return list(values[:num_sums]), list(values[num_sums:])
  k = chunk_size
  length = next((t.shape[0] for t in data if t.shape[0] is not None),
                None)
  if length is None:
    length = tf.shape(data[0])[0]

  def rows(start, size):
    chunk = []
    for tensor in data:
      rank = tensor.shape.rank
      piece = tf.slice(tensor, tf.stack([start] + [0] * (rank - 1)),
                       [size] + [-1] * (rank - 1))
      if isinstance(size, int) and size >= 0:
        piece.set_shape([size] + tensor.shape[1:].as_list())
      chunk.append(piece)
    return chunk

  full = length // k
  sums = [tf.zeros_like(t) for t in sum_like]
  pieces = [[] for _ in row_like]
  if not isinstance(full, int) or full > 0:
    arrays = [tf.TensorArray(t.dtype, size=full, element_shape=[k] +
                             t.shape[1:].as_list()) for t in row_like]

    def body(i, sums, arrays):
      values = function(rows(i * k, k))
      return (i + 1, [a + b for a, b in zip(sums, values[:num_sums])],
              [a.write(i, v) for a, v in zip(arrays, values[num_sums:])])

    _, sums, arrays = tf.while_loop(
        lambda i, sums, arrays: i < full, body,
        (tf.constant(0), sums, arrays), maximum_iterations=full,
        parallel_iterations=1)
    for piece, array, like in zip(pieces, arrays, row_like):
      piece.append(tf.reshape(array.stack(), tf.concat(
          [[-1], tf.shape(like)[1:]], 0)))
  size = length % k if isinstance(length, int) else -1
  if size:  # The remainder chunk (dynamic N: possibly empty).
    values = function(rows(full * k, size))
    sums = [a + b for a, b in zip(sums, values[:num_sums])]
    for piece, value in zip(pieces, values[num_sums:]):
      piece.append(value)
  return list(sums), [p[0] if len(p) == 1 else tf.concat(p, 0)
                      for p in pieces]


_FORWARD_MODE_MESSAGE = (
    "Forward-mode differentiation (tf.autodiff.ForwardAccumulator) of a "
    "solve with implicit_hessian='exact', linear_solver='cg' or "
    "data_chunk_size, of L-BFGS/BFGS, or of factor_graph.least_squares, "
    "is not supported: their implicit "
    "derivative is a custom gradient (its linear solve is made with tapes "
    "in the backward pass), which forward mode cannot use. Use "
    "gradients='unrolled', or the default Gauss-Newton least squares with "
    "the dense solver.")


def _refuse_forward_mode(tensors):
  """Raises if a forward accumulator tracks any of `tensors` (eagerly or
  while tracing): it would get no tangent, or silently a zero one in a
  graph, through `tf.custom_gradient`."""
  try:
    from tensorflow.python import pywrap_tfe  # pylint: disable=g-import-not-at-top
    _, tangents = pywrap_tfe.TFE_Py_PackJVPs(list(tensors))
  except (ImportError, AttributeError, TypeError):  # unknown TensorFlow
    return
  if tangents:
    raise NotImplementedError(_FORWARD_MODE_MESSAGE)


def _require_tapes():
  """Raises where the backward pass cannot use a tape: TensorFlow's forward
  mode (`ForwardAccumulator`) runs backward functions with recording
  stopped, and the exact Hessian would silently come out zero."""
  probe = tf.constant(1.0)
  with tf.GradientTape() as tape:
    tape.watch(probe)
    doubled = 2.0 * probe
  if tape.gradient(doubled, probe) is None:
    raise NotImplementedError(_FORWARD_MODE_MESSAGE)


def _identity_with_gradient(outputs, live, backward):
  """`outputs` unchanged (tf.identity), differentiated by `backward`.

  `backward(upstream)` gets the cotangents of `outputs` (None where unused)
  and returns one per input, `outputs + live`, in order.
  """
  count = len(outputs)

  @tf.custom_gradient
  def identity(*args):
    def grad(*upstream):
      return backward(list(upstream))
    return [tf.identity(a) for a in args[:count]], grad

  return identity(*(outputs + live))


# -- minimization (L-BFGS, BFGS) ----------------------------------------------


def attach_minimum(position, value, value_and_gradient):
  """(position, value) of a stopped minimization, with implicit gradients.

  Args:
    position: x* [B, n] (rows are independent problems).
    value: f(x*) [B].
    value_and_gradient: x [B, n] -> (f [B], grad_x f [B, n]); its closures
      hold the tensors to differentiate.

  Returns:
    (position, value), bit for bit the same values. H is the exact Hessian
    of f (n reverse passes through the gradient, in the backward pass only).
  """
  if not _needed():
    return position, value
  position = tf.stop_gradient(position)
  value = tf.stop_gradient(value)
  eager = tf.executing_eagerly()
  live = list(value_and_gradient(position))
  _refuse_forward_mode(live)

  def backward(upstream):
    _require_tapes()
    position_bar, value_bar = _zeros_for_none(upstream, [position, value])
    matrix = _batch_jacobian(lambda x: value_and_gradient(x)[1], position,
                             eager)
    free = tf.ones_like(position, tf.bool)
    w, ok = _masked_solve(matrix, position_bar, free)
    ok &= tf.math.is_finite(live[0]) & tf.reduce_all(
        tf.math.is_finite(live[1]), axis=-1)
    return [None, None, _per_problem(ok, value_bar), _per_problem(ok, -w)]

  return tuple(_identity_with_gradient([position, value], live, backward))
