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

The linear solve (`_masked_solve`, per problem) follows the contract of
every front-end, right or NaN: a nonsingular H keeps its Cholesky solve
(refined once), a singular one (a gauge) gets the pseudo-inverse's
answer, an untrustworthy one (an eigenvalue neither null nor resolved,
an exact H with a negative eigenvalue) NaN; decisions in Jacobi-scaled
coordinates (`_factored_solve`'s rule). A problem whose residual or
Jacobian is not finite contributes a zero gradient rather than NaN.
Batches: the problems are independent, so H is block diagonal and each
problem has its own [n, n] factorization.

Mechanism. The solver runs with its outputs under `tf.stop_gradient` (and,
eagerly under a tape, in a thread of its own, so that no tape of the caller
records its iterations: memory does not grow with them). Then the residual
(or objective) is evaluated once more at the stopped x*, in the caller's
context, where every captured tensor and variable is visible to the
caller's tapes, and the outputs are rebuilt from it:

- Gauss-Newton: one `tf.custom_gradient` identity whose inputs are the
  solver's outputs and the live residual r(theta); its backward pass
  solves J^T J w = P^T x_bar + J^T r_bar with the stopped J (judged for
  every right-hand side, so linear in the cotangents) and returns
  r_bar + c_bar r - J w. The forward pass costs one residual evaluation.
  Where a forward accumulator tracks the live residual while this is
  built, plain ops instead: the Gauss-Newton step
  s(theta) = -M J^T r(theta) (M the solve's matrix) has
  ds/dtheta = dx*/dtheta, and the outputs are the solver's values plus
  terms t - stop_gradient(t) (s, r, 1/2 ||r||^2 and their images), exactly
  zero for finite t: the values are the solver's bit for bit, the
  tangents the implicit ones (a solve nested in another solver's
  residual, whose Jacobian is taken in forward mode, differentiates).
  Around a tf.function traced without an accumulator, TensorFlow
  transposes the custom gradient's backward pass.
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
import threading

import numpy as np
import tensorflow as tf

from tfg_optim import _batch
from tfg_optim import _linear_solvers
from tfg_optim import _linearization

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


def stop(value):
  """`value` under `tf.stop_gradient` if it is a floating tensor."""
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
  return tf.nest.map_structure(stop, outputs)


def _needed():
  """False only eagerly with no tape active: no gradient can be taken."""
  return not tf.executing_eagerly() or _may_record()


# -- the linear solve (Gauss-Newton: forward pass; exact, L-BFGS: backward) ---


def _masked_factor(hessian, free, norms):
  """The dense Cholesky factorization of `_masked_solve`, per problem:
  (H masked, norms, root, first, finite). H masked: its rows and columns
  off F zeroed and 1 on their diagonal, zero where H is not finite
  (finite [B...]); norms: D (default |diag(H)|) and root = D^1/2 as in
  `_factored_solve`; first(v) -> (H^-1 v on F, ok [B...]) for v
  [B..., n] or [B..., n, k]."""
  dtype = hessian.dtype
  n = hessian.shape[-1] if hessian.shape[-1] is not None else tf.shape(
      hessian)[-1]
  finite = _batch.all_finite(hessian, hessian.shape.rank - 2)
  hessian = tf.where(finite[..., tf.newaxis, tf.newaxis], hessian,
                     tf.zeros_like(hessian))
  hessian = (hessian * free[..., :, tf.newaxis] * free[..., tf.newaxis, :] +
             tf.linalg.diag(1.0 - free))
  if norms is None:
    norms = tf.abs(tf.linalg.diag_part(hessian))
  norms = tf.where(tf.math.is_finite(norms), norms, tf.zeros_like(norms))
  factor = _linear_solvers._cholesky(hessian)  # pylint: disable=protected-access
  factored = _batch.all_finite(factor, factor.shape.rank - 2)
  factor = tf.where(factored[..., tf.newaxis, tf.newaxis], factor,
                    tf.eye(n, dtype=dtype))

  def first(v):
    matrix = v.shape.rank == hessian.shape.rank
    x = tf.linalg.cholesky_solve(factor, v if matrix else v[..., tf.newaxis])
    x = (x if matrix else x[..., 0]) * (
        free[..., tf.newaxis] if matrix else free)
    return x, factored & _batch.all_finite(x, hessian.shape.rank - 2)
  root = tf.sqrt(_jacobi_scaling(norms, free))
  return hessian, norms, root, first, finite


def _spectral_pseudo_inverse(hessian, free, root, exact):
  """(M, trusted) per problem: steps 3 and 4 of `_factored_solve` for a
  dense H (masked: the identity off F) by its eigendecomposition, in
  Jacobi-scaled coordinates H_s = D^-1/2 H D^-1/2 (root = D^1/2): its
  eigenvalues at most 4 rho in size span D^1/2 N (N: H's null space, a
  gauge), P_N is N's Euclidean orthogonal projector, and

      M = (I - P_N) (H + P_N)^-1 (I - P_N),

  the pseudo-inverse's answer (H^-1 on H's range, nothing along N: what
  the iterated Tikhonov steps converge to). trusted [B...] False (M then
  NaN) where an eigenvalue lies in (4 rho, sqrt(eps)] (neither null nor
  resolved), below -4 rho, or for the exact H below -rho (H + rho D would
  not factor: indefinite). One batched `eigh`, no loop: n is a dense
  problem's."""
  dtype = hessian.dtype
  eps = float(np.finfo(dtype.as_numpy_dtype).eps)
  rho, _ = rounding_levels(dtype, tf.reduce_sum(free, axis=-1))
  rho = rho[..., tf.newaxis]
  scaled = hessian / root[..., :, tf.newaxis] / root[..., tf.newaxis, :]
  values, vectors = tf.linalg.eigh(0.5 * (scaled + tf.linalg.matrix_transpose(
      scaled)))
  null = tf.abs(values) <= 4.0 * rho
  refused = ((values > 4.0 * rho) & (values <= np.sqrt(eps))) | (
      values < -(rho if exact else 4.0 * rho))
  null = tf.cast(null, dtype)
  directions = vectors * null[..., tf.newaxis, :] / root[..., :, tf.newaxis]
  gram = tf.matmul(directions, directions, transpose_a=True) + tf.linalg.diag(
      1.0 - null)
  projector = tf.matmul(directions, tf.linalg.solve(
      gram, tf.linalg.matrix_transpose(directions)))
  complement = tf.eye(tf.shape(hessian)[-1], dtype=dtype) - projector
  complement *= free[..., :, tf.newaxis]
  factor = _linear_solvers._cholesky(hessian + projector)  # pylint: disable=protected-access
  inverse = tf.matmul(complement, tf.linalg.cholesky_solve(
      factor, tf.linalg.matrix_transpose(complement)))
  trusted = ~tf.reduce_any(refused, axis=-1) & _batch.all_finite(
      inverse, inverse.shape.rank - 2)
  return tf.where(trusted[..., tf.newaxis, tf.newaxis], inverse,
                  tf.fill(tf.shape(inverse), tf.constant(np.nan, dtype))), (
                      trusted)


def _masked_solve(hessian, rhs, free, norms=None, exact=False,
                  any_rhs=False):
  """w with H_FF w_F = rhs_F and w = 0 off F (F = `free`), per problem
  (leading axes [B...]), by the acceptance of `_factored_solve` with the
  dense Cholesky factorization (`_dense_factorization`); returns (w, ok):
  ok [B...] False where H is not finite, w NaN where no trustworthy
  answer exists (an indefinite exact H, an eigenvalue neither null nor
  resolved), never a finite wrong one.

  `norms`: D = diag(J^T J) for the Jacobi scaling (default |diag(H)|, the
  minimizers' exact Hessian: units-covariant as D is); `exact`: H is an
  exact Hessian (a failed factorization must pass H + rho D, the
  curvature of w is checked), else J^T J. All problems' first solves
  (refined once, tested for a rounding-level pivot: `_first_solve`) run
  batched; only where one of them is refused are steps 3 and 4 taken,
  by an eigendecomposition of the batch's Jacobi-scaled H
  (`_spectral_pseudo_inverse`), the accepted problems' answers kept.
  `any_rhs`: judged for every right-hand side (`_first_solve`), so that w
  is linear in rhs (the Gauss-Newton backward pass, which TensorFlow may
  transpose for forward mode). Its derivative with respect to H is not
  that of the solve (`_masked_inverse` for a derivative).
  """
  dtype = hessian.dtype
  free = tf.cast(free, dtype)
  hessian, norms, root, first, finite = _masked_factor(hessian, free, norms)
  rhs = tf.where(tf.math.is_finite(rhs), rhs, tf.zeros_like(rhs)) * free
  product = lambda v: tf.linalg.matvec(hessian, v)
  w, _, accepted = _first_solve(first, product, rhs, free, root,
                                any_rhs=any_rhs)
  if exact:
    rho, _ = rounding_levels(dtype, tf.reduce_sum(free, axis=-1))
    accepted &= _curvature_flat(product, w, free, root, rho)

  def refused():  # the pseudo-inverse's answer, or NaN
    inverse, _ = _spectral_pseudo_inverse(hessian, free, root, exact)
    return tf.where(accepted[..., tf.newaxis], w,
                    tf.linalg.matvec(inverse, rhs))

  w = tf.cond(tf.reduce_all(accepted), lambda: w, refused)
  return w, finite


def _masked_inverse(gram, free, norms):
  """M [B..., n, n], no derivative, with w = M v `_masked_solve`'s answer
  for J^T J (`gram`) and every v, judged for every v (`_first_solve`'s
  `any_rhs`: the decisions do not depend on v, so the answer is linear
  in it): the Gauss-Newton plain ops (under a forward accumulator:
  `_attach_gauss_newton_plain`) differentiate w = M v, which
  needs no derivative of the acceptance's branch (a tf.cond, whose
  gradient XLA cannot compile). M: the first solve of the identity
  refined once, H^-1 to rounding; where a problem is refused, the
  pseudo-inverse (`_spectral_pseudo_inverse`: on a gauge) or NaN. Returns (M, ok, trusted), both [B...]: ok False where J^T J is
  not finite, trusted False where no answer is (M is then 0)."""
  dtype = gram.dtype
  free = tf.cast(free, dtype)
  gram, norms, root, first, finite = _masked_factor(gram, free, norms)
  gram, norms, root = [tf.stop_gradient(t) for t in (gram, norms, root)]
  product = lambda v: tf.linalg.matvec(gram, v)
  _, _, accepted = _first_solve(first, product, tf.zeros_like(norms), free,
                                root, any_rhs=True)
  identity = tf.linalg.diag(free)
  inverse, _ = first(identity)
  correction, _ = first(identity - tf.matmul(gram, inverse))
  inverse += correction

  def refused():  # the pseudo-inverse, or NaN
    pseudo_inverse, _ = _spectral_pseudo_inverse(gram, free, root, False)
    return tf.where(accepted[..., tf.newaxis, tf.newaxis], inverse,
                    pseudo_inverse)

  inverse = tf.cond(tf.reduce_all(accepted), lambda: inverse, refused)
  trusted = _batch.all_finite(inverse, inverse.shape.rank - 2)
  inverse = tf.where(trusted[..., tf.newaxis, tf.newaxis], inverse,
                     tf.zeros_like(inverse))
  return tf.stop_gradient(inverse), finite, trusted


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
                              residual_fn, coordinates, tangent_vector)


def _zero_valued(tensor):
  """tensor - stop_gradient(tensor): exactly 0 where `tensor` is finite,
  with the derivative of `tensor` (in reverse and forward mode)."""
  return tensor - tf.stop_gradient(tensor)


def _nan_derivative(tensor, untrusted):
  """Zeros [B...] (for `tensor` [B..., m]) whose derivative (reverse and
  forward mode) is NaN where `untrusted` [B...] and 0 elsewhere: sqrt at
  0 of the square of a zero-valued copy of sum(tensor), 0 * inf. A solve
  with no trustworthy answer gives a NaN derivative, the values stay."""
  total = tf.reduce_sum(tensor, axis=-1)
  u = _zero_valued(tf.where(untrusted, total, tf.zeros_like(total)))
  inner = tf.where(untrusted, tf.square(u), tf.ones_like(u))
  return tf.where(untrusted, tf.sqrt(inner), tf.zeros_like(u))


def _attach_gauss_newton(results, point, jacobian, residual, cost,
                         residual_fn, coordinates, tangent_vector):
  """Gauss-Newton: one `tf.custom_gradient` identity (as `_attach_exact`)
  whose inputs are the solver's outputs and the live residual
  r = r(x*, theta), evaluated once more in the caller's context.

  Its backward pass forms rhs = P^T x_bar + J^T r_bar, solves
  J^T J w = rhs by `_masked_solve` (`_factored_solve`'s acceptance,
  judged for every right-hand side: its decisions do not depend on the
  cotangents, so the answer is linear in them, w = M rhs with M the
  accepted (J^T J)^-1, the pseudo-inverse's answer on a gauge, or NaN
  where no answer is trustworthy) and returns the live residual's
  cotangent r_bar + c_bar r - J w. The forward pass holds one residual
  evaluation and an identity: no factorization unless a derivative is
  asked for.

  Forward mode. Where a `tf.autodiff.ForwardAccumulator` tracks the live
  residual while this is built (eagerly, or one opened inside the same
  tf.function: the engine's own, for a solve nested in another solve's
  residual), the plain ops of `_attach_gauss_newton_plain` instead. Around
  the call of a tf.function traced without one, TensorFlow transposes
  this backward pass (linear in the cotangents, with no stop_gradient on
  their path) and the tangent is M's too.
  """
  live = residual_fn(point)
  if _forward_mode_tracks([live]) is not False:
    return _attach_gauss_newton_plain(results, point, jacobian, residual,
                                      cost, live, tangent_vector)
  flat_point = tf.nest.flatten(point)
  num_points = len(flat_point)
  jacobian, ok = _finite_problems(jacobian, residual, live)

  def backward(upstream):
    point_bar = _zeros_for_none(upstream[:num_points], flat_point)
    residual_bar, cost_bar = _zeros_for_none(upstream[num_points:],
                                             [residual, cost])
    rhs = coordinates(point, tf.nest.pack_sequence_as(results.position,
                                                      point_bar))
    rhs += tf.linalg.matvec(jacobian, residual_bar, adjoint_a=True)
    gram = tf.matmul(jacobian, jacobian, adjoint_a=True)
    w, _ = _masked_solve(gram, rhs, tf.reduce_any(
        tf.not_equal(jacobian, 0), axis=-2), norms=tf.linalg.diag_part(gram),
                         any_rhs=True)
    # (a zero rhs: w = 0, also where M is NaN; the cost needs no solve)
    w = tf.where(tf.reduce_all(tf.equal(rhs, 0), axis=-1, keepdims=True),
                 tf.zeros_like(w), w)
    live_bar = (residual_bar + residual * cost_bar[..., tf.newaxis] -
                tf.linalg.matvec(jacobian, w))
    return [None] * (num_points + 2) + [_per_problem(ok, live_bar)]

  outputs = _identity_with_gradient(flat_point + [residual, cost], [live],
                                    backward)
  return results._replace(
      position=tf.nest.pack_sequence_as(results.position,
                                        outputs[:num_points]),
      residual=outputs[num_points], cost=outputs[num_points + 1])


def _finite_problems(jacobian, residual, live):
  """(J, ok): ok [B...] where the held residual, the live one and J are
  finite; J zeroed elsewhere, so that no product with it carries NaN (a
  failed problem contributes a zero gradient, never NaN through 0 * NaN,
  to a tensor the batch shares)."""
  batch_rank = residual.shape.rank - 1
  ok = (_batch.all_finite(residual, batch_rank) &
        _batch.all_finite(live, batch_rank) &
        _batch.all_finite(jacobian, batch_rank))
  return _per_problem(ok, jacobian), ok


def _attach_gauss_newton_plain(results, point, jacobian, residual, cost,
                               live, tangent_vector):
  """Gauss-Newton under a forward accumulator: plain ops whose values are
  zero and whose derivative is the implicit one, added to the solver's
  outputs.

  With the live residual r = r(x*, theta), the Gauss-Newton step
  s(theta) = -M J^T r (M as in `_attach_gauss_newton`, here formed as a
  matrix: `_masked_inverse`) is ~0 at a solution and ds/dtheta =
  dx*/dtheta. The outputs are

      x* + P (s - stop(s)),  r* + (r - stop(r)) + J (s - stop(s)),
      c* + (1/2 ||r||^2 - stop(1/2 ||r||^2)),

  each term after the solver's value exactly zero, so the values are the
  solver's bit for bit, while every derivative (forward or reverse mode)
  is that of the implicit function; where M is not trustworthy the values
  stay and the derivative is NaN. Costs one n x n Cholesky per problem
  and its inverse in the forward pass: only built where forward mode
  asks for it.
  """
  jacobian, ok = _finite_problems(jacobian, residual, live)
  live = tf.where(tf.math.is_finite(live), live, tf.zeros_like(live))
  free = tf.reduce_any(tf.not_equal(jacobian, 0), axis=-2)
  gram = tf.matmul(jacobian, jacobian, adjoint_a=True)
  inverse, _, trusted = _masked_inverse(gram, free,
                                        tf.linalg.diag_part(gram))
  step = tf.linalg.matvec(inverse, -tf.linalg.matvec(
      jacobian, live, adjoint_a=True))
  delta = _per_problem(ok & trusted, _zero_valued(step)) + _nan_derivative(
      live, ok & ~trusted)[..., tf.newaxis]
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
    w, ok = _masked_solve(matrix, tangent_bar, free,
                          norms=tf.reduce_sum(tf.square(jacobian), axis=-2),
                          exact=True)
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
  held (bounds, `fixed_fn`) or whose Jacobian column is zero get a zero
  derivative, as in the dense path: the solve is J^T J on the free
  coordinates and the identity on the others. They are told from the
  structure and exact tests, never from the estimated diag(J^T J) alone
  (`_free_coordinates`).

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
    free = _free_coordinates(linearization, residual)
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


def _free_coordinates(linearization, residual):
  """[B..., n] 1 on the coordinates the backward pass solves for, 0 on
  those whose derivative is zero (as the dense path: the held ones and
  those whose Jacobian column is zero), in `residual`'s dtype.

  Where the column norms are exact: the nonzero columns (a held
  coordinate's column is zeroed). Where they are an estimate
  (`MatrixFree`), never the estimate alone: Rademacher probe sums that
  cancel give 0 for a nonzero column (a column of two entries +-1, with
  probability 2^-8 for 8 probes: thousands of them in a 10^6-parameter
  total-variation problem), and a `column_groups` grouping that is not
  structurally orthogonal gives 0 or less. There the structure, its
  `free` mask (the coordinates not held by bounds or `fixed_fn`), less
  the zero columns: a column is nonzero where its estimate is positive
  ((J^T z)_j != 0 for a probe z, or (J^T J e_g)_j != 0, both sums of its
  entries) or, where some free estimate is not, where (J^T g)_j != 0 for
  one fixed Gaussian probe g (one more product J^T u; a nonzero column
  fails it only where its entries times g's cancel to the last bit).
  Conjugate gradients cannot solve for a free coordinate whose column is
  zero (its right-hand side is off the range: they diverge, and the
  regularized retry refuses it), so those must be told apart.
  """
  dtype = residual.dtype
  norms = linearization.column_norms()
  if linearization.exact_column_norms:
    return tf.cast(norms > 0, dtype)
  free = tf.cast(linearization.free, dtype)

  def gaussian_test():
    probe = tf.random.stateless_normal(tf.shape(residual), seed=[11, 0],
                                       dtype=dtype)
    return tf.not_equal(linearization.rmatvec(probe), 0)

  unsure = (free > 0) & _batch.not_positive(norms)
  nonzero = (norms > 0) | tf.cond(
      tf.reduce_any(unsure), gaussian_test, lambda: tf.zeros_like(unsure))
  return free * tf.cast(nonzero, dtype)


def backward_solve(linearization, rhs, free):
  """w with J^T J w = rhs on the `free` coordinates ([B..., n], 0 or 1) and
  w = 0 on the others, by the linear solver the forward solve used (the
  dispatch of `_linear_solvers.damped_solver`); returns (w, ok), ok [B...]
  False where the problem's linearization is not finite (its gradient is
  then zero, as for every failed problem).

  - a linearization with its own `damped_solver` (`_schur`'s Schur
    complement, dense or iterative; the sparse Cholesky): that solver,
    factored once per shift (`_own_factorization`);
  - a dense one (`gram()`): the Cholesky of J^T J (`_dense_factorization`);
  - otherwise preconditioned conjugate gradients
    (`_conjugate_gradient_solve`; the linearization's own preconditioner,
    block-Jacobi for block-sparse J, else Jacobi).

  The factorizations are accepted, regularized or refused by
  `_factored_solve` (Jacobi-scaled: a nonsingular J^T J keeps its first
  solve, a singular one gets the pseudo-inverse's answer, w = NaN where
  neither can be trusted); conjugate gradients by their own rule. A NaN
  w comes with ok True: a NaN derivative, never a wrong finite one.
  """
  if getattr(linearization, "damped_solver", None) is not None:
    return _factored_solve(_own_factorization(linearization, free),
                           _gram_product(linearization, free), rhs, free,
                           linearization.column_norms(), exact=False,
                           iterative=getattr(linearization, "iterative",
                                             False))
  if linearization.dense:
    if rhs.shape.rank != 1:  # (a batch: the dense front-ends' rule)
      return _masked_solve(linearization.gram(), rhs, free,
                           norms=linearization.column_norms())
    return _factored_solve(
        _dense_factorization(linearization.gram(), free),
        _gram_product(linearization, free), rhs, free,
        linearization.column_norms(), exact=False)
  return _conjugate_gradient_solve(linearization, rhs, free)


# Where the backward conjugate gradients' retry H + delta I is accepted:
# its Tikhonov step d must have settled, ||H d|| <= RETRY_TOLERANCE ||rhs||
# (Jacobi norms; `_conjugate_gradient_solve`).
RETRY_TOLERANCE = 1e-2


def _conjugate_gradient_solve(linearization, rhs, free, hessian=None):
  r"""w with H w = rhs on the `free` coordinates ([B..., n], 0 or 1) and
  w = 0 on the others, H = J^T J (or `hessian`, an operator with
  `matvec`: the exact Hessian, restricted to the free coordinates), by
  preconditioned conjugate gradients (`_linear_solvers._cg_loop` on
  H + diag(1 - free); the linearization's own preconditioner of J^T J
  where it has one, block-Jacobi for block-sparse J, else Jacobi);
  returns (w, ok), ok [B...] False where J is not finite. Sizes are
  Jacobi-scaled (D = diag(J^T J)): ||v||_D = ||D^1/2 v|| for solutions,
  ||r||_D^-1 for right-hand sides and residuals.

  Four solves at most, in one `tf.while_loop` (one conjugate-gradient
  loop to trace and compile), each problem's stages as it needs them:

  0. w0 = CG(H, rhs). Converged (its own signal: its recursive residual
     at the tolerance, no breakdown)?
  1. Then refinement, c = CG(H, rhs - H w0): the accuracy of w0. On an
     ill-conditioned H, a residual at the tolerance tol allows an error of
     tol cond(H_s) relative; c measures it. w0 + c is accepted where
     ||c||_D <= sqrt(tol) ||w0 + c||_D (error about (tol cond)^2 <= tol),
     and is NaN otherwise (converged but not accurate: cond(H_s) beyond
     about 1 / sqrt(tol), 1e5 in float64; never a finite wrong w). A
     refinement that does not converge (its right-hand side, the rounding
     of rhs - H w0, off the range of a singular H: a gauge with a
     consistent rhs) leaves w0, accepted by its true residual
     ||H w0 - rhs||_D^-1 <= sqrt(tol) ||rhs||_D^-1.
  2. Where w0 did not converge (a singular H: a gauge, whose
     right-hand side off the range makes CG diverge; an indefinite exact
     H: breakdown), w1 = CG(H + delta I, rhs), delta = sqrt(eps)
     max_j ||J_j||^2 (Euclidean: the pseudo-inverse's convention for the
     null space of a gauge, as the dense path);
  3. and one iterated-Tikhonov step d = CG(H + delta I, rhs - H w1),
     w = w1 + d: along an eigenvalue lambda >> delta the error falls to
     (delta / lambda)^2. Accepted where both converged and d has settled,
     ||H d||_D^-1 <= RETRY_TOLERANCE ||rhs||_D^-1 (H d moves by
     lambda delta / (lambda + delta)^2 of rhs along lambda: most where
     lambda ~ delta, a range that delta cannot resolve). For an exact H
     also d^T H d >= -rho ||d||_D^2 and w^T H w >= -rho ||w||_D^2
     (`rounding_levels`): a negative eigenvalue -mu that delta hides
     grows d by delta / (delta - mu) and makes its curvature negative.
  Otherwise w is NaN.

  Not seen: a negative direction of an exact H that rhs does not excite
  (conjugate gradients then certify positive curvature on the Krylov
  space that holds the answer: the derivative of the stationary point);
  an eigenvalue far below delta on a singular H (its component of w is
  rhs / delta, not rhs / lambda). Units: delta is absolute, so a variable
  in units far smaller than the others' can fall below it (the
  factorizations' `_factored_solve` is units-invariant).
  """
  dtype = rhs.dtype
  tolerance = CG_TOLERANCES[dtype]
  fixed = 1.0 - free
  norms = linearization.column_norms()
  diagonal = norms + fixed
  diagonal = tf.where(diagonal > 0, diagonal, tf.ones_like(diagonal))
  if hessian is None:
    matvec = lambda v: linearization.rmatvec(linearization.matvec(v))
  else:
    matvec = hessian.matvec
  product = lambda v: matvec(v) + fixed * v
  delta = np.sqrt(np.finfo(dtype.as_numpy_dtype).eps) * tf.reduce_max(
      norms, axis=-1, keepdims=True)
  shifts = (0.0, 0.0, 1.0, 1.0)  # times delta

  def solve(shift, target):  # (H + shift) x = target on the free ones
    damping = fixed + shift * free
    precondition = _linear_solvers._preconditioner(  # pylint: disable=protected-access
        linearization, damping).solve
    outcome = _linear_solvers._cg_loop(  # pylint: disable=protected-access
        lambda v: product(v) + shift * free * v, target, precondition,
        CG_MAX_ITERATIONS, tolerance)
    return outcome.solution, outcome.converged

  def size(vector):  # ||.||_D^-1
    return tf.sqrt(tf.reduce_sum(tf.square(vector) / diagonal, axis=-1))

  def solution_size(vector):  # ||.||_D
    return tf.sqrt(tf.reduce_sum(tf.square(vector) * diagonal, axis=-1))

  def finite(v):
    return tf.where(tf.math.is_finite(v), v, tf.zeros_like(v))

  def next_stage(i, solutions, converged):
    """The next stage some problem needs (4: none)."""
    del solutions
    first = converged[0]
    return tf.where(
        tf.equal(i, 1), tf.where(tf.reduce_any(first), 1, 2),
        tf.where(tf.equal(i, 2) & tf.reduce_all(first), 4, i))

  def body(i, solutions, converged):
    previous = finite(tf.gather(solutions, tf.maximum(i - 1, 0)))
    target = tf.where(tf.equal(i % 2, 0), rhs, rhs - product(previous))
    shift = tf.gather(tf.constant(shifts, dtype), i) * delta
    x, done = solve(shift, target)
    solutions = tf.tensor_scatter_nd_update(solutions, [[i]], x[tf.newaxis])
    converged = tf.tensor_scatter_nd_update(converged, [[i]],
                                            done[tf.newaxis])
    return next_stage(i + 1, solutions, converged), solutions, converged

  _, solutions, converged = tf.while_loop(
      lambda i, *_: i < 4, body,
      (tf.constant(0), tf.zeros(tf.concat([[4], tf.shape(rhs)], 0), dtype),
       tf.zeros(tf.concat([[4], tf.shape(rhs)[:-1]], 0), tf.bool)),
      maximum_iterations=4)
  first = converged[0]
  unrefined = finite(solutions[0])
  refined = finite(solutions[0] + solutions[1])
  # A refinement that cannot converge: its right-hand side, the rounding
  # of rhs - H w0, is off H's range (a gauge with a consistent rhs); then
  # w0 by its true residual, as before (its breakdown on a curvature of
  # rounding size, on a null direction, cannot be told from a negative
  # one that rhs does not excite: see "Not seen").
  accurate = first & tf.where(
      converged[1],
      solution_size(finite(solutions[1])) <=
      np.sqrt(tolerance) * solution_size(refined),
      size(product(unrefined) - rhs) <= np.sqrt(tolerance) * size(rhs))
  refined = tf.where(converged[1][..., tf.newaxis], refined, unrefined)
  update = finite(solutions[3])
  retried = finite(solutions[2]) + update
  # A diagonal entry D_j <= delta / RETRY_TOLERANCE bounds an eigenvalue
  # of H from above by it: delta cannot resolve the range there.
  smallest = tf.reduce_min(tf.where(free > 0, norms, tf.fill(
      tf.shape(norms), tf.constant(np.inf, dtype))), axis=-1)
  settled = converged[2] & converged[3] & (
      size(matvec(update) * free) <= RETRY_TOLERANCE * size(rhs)) & (
          smallest > delta[..., 0] / RETRY_TOLERANCE)
  if hessian is not None:
    rho, _ = rounding_levels(dtype, tf.reduce_sum(free, axis=-1))

    def flat(v):
      return (tf.reduce_sum(v * matvec(v) * free, axis=-1) >=
              -rho * tf.square(solution_size(v * free)))
    settled &= flat(retried) & flat(update)
    accurate &= flat(refined)
  w = tf.where(first[..., tf.newaxis], refined, retried)
  solved = tf.where(first, accurate, settled)
  w = tf.where(solved[..., tf.newaxis], w, tf.constant(np.nan, dtype))
  return w, _batch.all_finite(norms, norms.shape.rank - 1)


# -- the exact Hessian of a factor graph ---------------------------------------


def exact_backward_solve(linearization, hessian, rhs, free):
  """w with H w = rhs on the `free` coordinates ([n], 0 or 1) and w = 0
  on the others, H the exact Hessian (`_block_sparse.EdgeHessian`), by
  the forward solve's kind of solver; returns (w, ok): w is NaN where no
  trustworthy answer exists (ok: J is finite).

  H is restricted to the free coordinates F for every solver
  (`EdgeHessian.restricted`: its rows and columns off F zeroed, then the
  identity's there), as the dense path's mask does: a coordinate whose
  Jacobian column is zero at x* (a held row, a row no residual moves)
  gets a zero derivative, and the others the derivative of the problem
  restricted to them, even where second derivatives couple them to it.

  - a dense linearization ('cholesky'): the Cholesky of the scattered H;
  - the block sparse Cholesky ('sparse_cholesky'): H assembled from its
    blocks in the forward solve's symbolic structure and factored; the
    Schur complement ('schur', 'iterative_schur'): the points eliminated
    from H's own blocks (`_own_factorization` with `products`: H's
    point-point part is block diagonal, as J^T J's, since an edge reads
    one point);
    these three through `_factored_solve` (exact=True: a failed
    factorization must pass H + rho D, else NaN: H indefinite);
  - otherwise ('cg'): conjugate gradients on H v, preconditioned by the
    block-Jacobi blocks of J^T J (`_conjugate_gradient_solve`: the
    curvature of w and of its Tikhonov step checked).
  """
  hessian = hessian.restricted(free)  # H_FF, as the dense path's mask
  product = lambda v: hessian.matvec(v) + (1.0 - free) * v
  if getattr(linearization, "damped_solver", None) is not None:
    return _factored_solve(
        _own_factorization(linearization, free, hessian.pair), product,
        rhs, free, linearization.column_norms(), exact=True,
        iterative=getattr(linearization, "iterative", False))
  if linearization.dense:
    return _factored_solve(_dense_factorization(hessian.dense(), free),
                           product, rhs, free, linearization.column_norms(),
                           exact=True)
  return _conjugate_gradient_solve(linearization, rhs, free, hessian)


# -- acceptance of a factored backward solve ------------------------------------


# Iterated Tikhonov steps on a singular H (`_factored_solve`).
TIKHONOV_STEPS = 3


def rounding_levels(dtype, count):
  """(rho, rho_high) for `count` free coordinates: an eigenvalue of the
  Jacobi-scaled H (`_factored_solve`) at or below rho = min(8 count eps,
  eps^(2/3) / 4) (2.5e-14 for 14 coordinates in float64) is at the level
  of rounding (a null space: a gauge); rho_high = eps^(2/3) (3.7e-11 in
  float64, 2.4e-5 in float32) bounds what a right-hand side may excite
  next to a rounding-level pivot before the first solve is refused."""
  eps = float(np.finfo(tf.as_dtype(dtype).as_numpy_dtype).eps)
  high = eps ** (2.0 / 3.0)
  return tf.minimum(8.0 * eps * count, 0.25 * high), high


def _dense_factorization(matrix, free):
  """shift [] -> solve for the dense [n, n] `matrix` (H or J^T J, its rows
  and columns off `free` zeroed) + diag(1 - free + shift D) (D passed as
  the shift's vector by `_factored_solve`): v -> ((M)^-1 v, factored)."""
  matrix = matrix * free[:, tf.newaxis] * free[tf.newaxis, :] + tf.linalg.diag(
      1.0 - free)
  finite = tf.reduce_all(tf.math.is_finite(matrix))
  matrix = tf.where(finite, matrix, tf.zeros_like(matrix))

  def factorize(shift):  # shift [n]: the added diagonal on `free`
    factor = _linear_solvers._cholesky(  # pylint: disable=protected-access
        matrix + tf.linalg.diag(shift * free))
    factored = finite & tf.reduce_all(tf.math.is_finite(factor))

    def solve(v):
      x = tf.linalg.cholesky_solve(factor, v[:, tf.newaxis])[:, 0] * free
      return x, factored & tf.reduce_all(tf.math.is_finite(x))
    return solve
  return factorize


def _own_factorization(linearization, free, products=None):
  """As `_dense_factorization` by the linearization's own
  `damped_solver(1, diag(1 - free) + shift, products)` (the block sparse
  Cholesky, the Schur complement; `products`: H's blocks instead of
  J^T J's): factored once per shift, solved per right-hand side."""
  def factorize(shift):
    damped = linearization.damped_solver(
        tf.ones([], shift.dtype), (1.0 - free) + shift * free,
        products=products)

    def solve(v):
      outcome = damped(None, v)
      x = -outcome.solution * free
      return x, outcome.converged & tf.reduce_all(tf.math.is_finite(x))
    return solve
  return factorize


def _gram_product(linearization, free):
  """v -> J^T J v on `free`, v off it; its attribute `jacobian`: v -> J v
  on `free` (`_null_projector` measures Gauss-Newton's Ritz values as
  ||J_s y||^2, resolved to eps^2, not y^T H_s y, resolved to eps)."""
  def product(v):
    return linearization.rmatvec(linearization.matvec(v * free)) * (
        free) + (1.0 - free) * v
  product.jacobian = lambda v: linearization.matvec(v * free)
  return product


# At most this many null directions are found (`_null_projector`): a 3-D
# similarity gauge has 7.
NULL_PROBES = 8


def _map_columns(function, matrix, dtype=None):
  """([m, k] whose column i is function(matrix[:, i])[0], [k] bool: the
  `ok`s function(.)[1]) in one `tf.while_loop` (`tf.map_fn`): `function`
  (a solve with a factor, a product) is traced once, not k times."""
  out, ok = tf.map_fn(function, tf.transpose(matrix),
                      fn_output_signature=(dtype or matrix.dtype, tf.bool))
  return tf.transpose(out), ok


def _null_projector(regularized, product, root, free, delta, null_level):
  """(v -> P_N v, ok): the Euclidean orthogonal projector onto the null
  space N of H (up to NULL_PROBES dimensions), found with the factor of
  H + delta D (`regularized`): one step of subspace iteration from fixed
  probes in scaled coordinates, two steps of subspace iteration
  Y = D^1/2 (H + delta D)^-1 D^1/2 X (null directions amplified by
  1 / delta, an eigenvalue lambda of H_s by 1 / (lambda + delta); the
  range's share of Y falls to (delta / lambda)^2), orthonormalized, and
  the Ritz pairs (theta, y) of H_s on it: those of |theta| <= the null
  level (the smaller of `null_level` (4 rho) and 4 eps max|theta|: the
  rounding of the products H_s y) span D^1/2 N; N is their image under
  D^-1/2. ok: every solve finite, and no Ritz value in (null level,
  delta]: an eigenvalue that is neither null nor resolved by the
  Tikhonov steps (their answer would be off along it: NaN instead).
  The probes' solves and products run in `tf.while_loop`s
  (`_map_columns`: each traced once)."""
  dtype = root.dtype
  n = root.shape[0] if root.shape[0] is not None else NULL_PROBES
  count = min(NULL_PROBES, n)
  index = tf.cast(tf.range(tf.size(root)), dtype)
  basis = tf.stack([free * tf.sin(index * (0.7548776662 * (i + 1)) +
                                  0.5698403 * i) for i in range(count)], 1)

  def step(k, basis, ok):  # subspace iteration, in scaled coordinates
    solved, solved_ok = _map_columns(regularized,
                                     root[:, tf.newaxis] * basis)
    ok &= tf.reduce_all(solved_ok)
    basis, _ = tf.linalg.qr(tf.where(ok, root[:, tf.newaxis] * solved,
                                     tf.zeros_like(basis)))
    return k + 1, basis, ok

  _, basis, ok = tf.while_loop(lambda k, *_: k < 2, step,
                               (tf.constant(0), basis, tf.constant(True)))
  eps = float(np.finfo(dtype.as_numpy_dtype).eps)
  jacobian = getattr(product, "jacobian", None)
  if jacobian is None:
    image, _ = _map_columns(
        lambda v: (product(v / root) / root, tf.constant(True)), basis)
    ritz = tf.matmul(basis, image, transpose_a=True)
    values, vectors = tf.linalg.eigh(0.5 * (ritz + tf.transpose(ritz)))
    # A null Ritz value is at the rounding of the products H_s v, a few
    # eps ||H_s||, which may be below the factorization's 4 rho.
    null_level = tf.minimum(null_level,
                            4.0 * eps * tf.reduce_max(tf.abs(values)))
  else:  # Gauss-Newton: the singular pairs of J_s Y ([m, k]), theta = s^2
    image, _ = _map_columns(
        lambda v: (jacobian(v / root), tf.constant(True)), basis)
    singular, _, vectors = tf.linalg.svd(tf.linalg.qr(image)[1])  # k x k
    values = tf.square(singular)
    # J_s y of a null y is at the rounding of the product J_s y, and its
    # Ritz vector's share of the range left by the subspace iteration,
    # (delta / lambda)^2 amplitude along eigenvalues lambda beyond the
    # subspace: theta = lambda (delta / lambda)^4 <= delta^4 / lambda^3,
    # below eps^(4/3) (6e-10 in float32, 1e-21 in float64) where
    # lambda > delta^(4/9) (0.03 in float32, 3e-4 in float64; above, a
    # null direction is taken for a weak one: NaN, never a wrong answer).
    # An eigenvalue of H_s below it is taken for null (theta: eps
    # cond(J_s^T J_s) > 1 / eps^(1/3), cond 2e9 in float32).
    null_level = tf.minimum(null_level, eps ** (4.0 / 3.0) * tf.reduce_max(
        values))
  null = tf.cast(tf.abs(values) <= null_level, dtype)
  # An eigenvalue that delta hides but that is not at the rounding level:
  # the Tikhonov answer would be wrong along it.
  ok &= tf.reduce_all((tf.abs(values) <= null_level) | (tf.abs(values) >
                                                         delta))
  directions = tf.matmul(basis, vectors) * null / root[:, tf.newaxis]
  gram = tf.matmul(directions, directions, transpose_a=True) + tf.linalg.diag(
      1.0 - null)
  ok &= tf.reduce_all(tf.math.is_finite(gram))
  gram = tf.where(ok, gram, tf.eye(count, dtype=dtype))
  directions = tf.where(ok, directions, tf.zeros_like(directions))

  def project(v):
    coefficients = tf.linalg.solve(gram, tf.linalg.matvec(
        directions, v, transpose_a=True)[:, tf.newaxis])[:, 0]
    return tf.linalg.matvec(directions, coefficients) * free
  return project, ok


def _factored_solve(factorize, product, rhs, free, norms, exact,
                    iterative=False):
  r"""w with H_FF w_F = rhs_F on the `free` coordinates F ([n], 0 or 1),
  w = 0 off F, by a factorization (`factorize(shift [n])` -> v ->
  ((H + diag(1 - free) + diag(shift))^-1 v, ok)); `product`: v -> H v on
  F, v off F. Returns (w, ok): w is NaN where no trustworthy answer exists
  (ok: J is finite, `norms` = diag(J^T J)).

  Every judgement is made in Jacobi-scaled coordinates: with
  D = diag(J^T J) (1 off F), H_s = D^-1/2 H D^-1/2, w_s = D^1/2 w,
  rhs_s = D^-1/2 rhs. Changing one variable's units (x_j -> c x_j)
  scales J's column j by c, H's row and column j by c and D_j by c^2:
  H_s, w_s and rhs_s do not change, so neither does any decision (an
  absolute shift delta I would). Let rho, rho_high = `rounding_levels`
  (eps the dtype's, rho about 8 n eps).

  1. First solve and one step of iterative refinement with the same
     factor: w = w0 + H^-1 (rhs - H w0) (its residual is the rounding of
     a backward-stable solve).
  2. Is lambda_min(H_s) at the rounding level? Two steps of inverse
     iteration with the same factor on a fixed probe q (z = H_s^-1 q,
     then H_s^-1 z / ||z||) give lambda_p = 1 / ||H_s^-1 z / ||z|| || >=
     lambda_min, and the solve itself lambda_r = ||rhs_s|| / ||w_s||
     (>= the least eigenvalue that rhs excites). The first solve is
     refused where the factorization failed (a negative or rounding-size
     pivot), where lambda_r <= rho (rhs excites a rounding-level
     direction: w is rhs_N / pivot, and the rounding of that huge w
     pollutes its range part), or where lambda_p <= rho and
     lambda_r <= rho_high (a rounding-level pivot, and rhs excites small
     directions enough that, through it, the error bound
     eps / (rho_high lambda) of the range part is not small). Otherwise
     (H nonsingular beyond rounding, however ill-conditioned: cond(H_s)
     up to 1 / rho, 4e13 in float64 for n = 14) it is accepted: the
     direct solve is then as good as H's condition allows (about
     eps cond(H_s)), which no regularization could improve.
  3. A refused first solve, exact H: H + rho D must factor (then
     lambda_min(H_s) >= -rho: H is positive semidefinite up to rounding,
     a null space); where it does not, H has an eigenvalue below -rho
     (indefinite: not a minimum) and w is NaN. A negative eigenvalue that
     a larger shift would hide is therefore never hidden. (J^T J needs no
     such check.)
  4. The null space: iterated Tikhonov with the factor of
     H + delta D, delta = sqrt(eps) (TIKHONOV_STEPS steps):
     w_{k+1} = w_k + (H + delta D)^-1 (rhs - H w_k). Along an eigenvector
     of H_s with eigenvalue lambda > 0 the error of w falls by
     delta / (lambda + delta) per step, so after k steps w is the
     pseudo-inverse's answer on H's range to (delta / lambda)^k (in
     float32, delta = 3.4e-4: 1e-3 at a range condition of 1000 where one
     step leaves 0.3), while a null direction (lambda = 0) accumulates
     k rhs_N / delta, which the derivative does not see (J w for
     Gauss-Newton; for the exact H of a gauge-invariant cost, g is
     orthogonal to the gauge for every theta, so (dg/dtheta)^T w ignores
     it).
  5. Exact H (every answer): w^T H w >= -rho ||w_s||^2 and, for the last
     Tikhonov update d, d^T H d >= -rho ||d_s||^2: a negative eigenvalue
     -mu excited by rhs grows d by (delta / (delta - mu))^k and makes its
     curvature negative (a solver that certifies nothing, the iterative
     Schur complement's conjugate gradients; for the factorizations, step
     3 already refused it).

  `iterative` (the iterative Schur complement: conjugate gradients on S,
  no factor to reuse, each solve a full CG): no probe, the first solve
  (with its refinement) accepted where its own signal says converged;
  else the conjugate-gradient backward's Euclidean retry
  (`_conjugate_gradient_solve`, stages 2 and 3: H + delta I, delta =
  sqrt(eps) max_j D_j, one Tikhonov step that must settle), 4 solves at
  most instead of about 25.

  rhs = 0 (a gradient of the final cost alone): w = 0, accepted whatever
  H's conditioning (its lambda_r = 0 is no evidence of a null space).
  The solves of steps 1 and 2 are the columns of one loop, and
  `_null_projector`'s probes and the Tikhonov steps loops too (each
  solve and product traced once: the graph's size).

  The null space of step 4 (`_null_projector`): Ritz values at most
  4 rho and at the rounding of their products, 4 eps max|theta| for an
  H given by its products; for Gauss-Newton (`product.jacobian`, set by
  `_gram_product`: v -> J v) ||J_s y||^2, resolved to eps^2, null at
  most eps^(4/3) max theta: a weak eigenvalue above it but below delta
  is NaN, not projected off.

  What is not distinguished: an eigenvalue between rho and rho_high on an
  H that also has a rounding-level one, excited by rhs, is treated as
  null (its component of w is the Tikhonov one, not rhs / lambda). The
  exact H (products only) of a weak subspace below 4 eps max|theta| is
  taken for null: a finite answer 1.0 off (float32, the review's pair
  graph: NaN at cond(H) 2e7, scaled eigenvalue 1.8e-7; 1.0 off at cond
  2e8, 2e-8; Gauss-Newton: NaN at both, down to eps^(4/3), 6e-10).
  """
  dtype = rhs.dtype
  eps = float(np.finfo(dtype.as_numpy_dtype).eps)
  rhs = tf.where(tf.math.is_finite(rhs), rhs, tf.zeros_like(rhs)) * free
  rho, rho_high = rounding_levels(dtype, tf.reduce_sum(free))
  scaling = _jacobi_scaling(norms, free)
  root = tf.sqrt(scaling)
  size = _size
  rhs_size = size(rhs / root)
  tiny = np.finfo(dtype.as_numpy_dtype).tiny

  first = factorize(tf.zeros_like(rhs))
  probe = free * tf.sin(tf.cast(tf.range(tf.size(rhs)), dtype) *
                        2.399963 + 1.0)
  probe = root * probe / size(probe)

  def stage(k, w, z, solved, probed):  # the solve and its refinement, with
    # (not iterative) the two steps of inverse iteration on the probe, as
    # the columns of one loop (`_map_columns`: one trace of the solve)
    columns = [tf.where(k > 0, rhs - product(w), rhs)]
    if not iterative:
      columns.append(tf.where(
          k > 0, root * root * z / tf.maximum(size(root * z), tiny), probe))
    x, ok = _map_columns(first, tf.stack(columns, 1))
    if not iterative:
      z, probed = x[:, 1], ok[1]
    return k + 1, w + x[:, 0], z, solved & ok[0], probed

  _, w, z, solved, probed = tf.while_loop(
      lambda k, *_: k < 2, stage,
      (tf.constant(0), tf.zeros_like(rhs), tf.zeros_like(rhs),
       tf.constant(True), tf.constant(True)))
  if iterative:  # (no probe: `accepted` is the solver's own signal)
    probe_level = tf.constant(np.inf, dtype)
  else:
    probe_level = 1.0 / tf.maximum(size(root * z), tiny)
  rhs_level = rhs_size / tf.maximum(size(root * w), tiny)
  singular = ((rhs_level <= rho) |
              ((probe_level <= rho) | ~probed) &
              (rhs_level <= rho_high))
  # (review22) rhs = 0 (a gradient of the final cost alone): w = 0 exactly,
  # whatever H's conditioning; its rhs_level 0 is no evidence of a null space.
  accepted = solved & (~singular | tf.equal(rhs_size, 0))

  def euclidean_retry():  # an iterative solver: as the CG backward's
    delta = np.sqrt(eps) * tf.reduce_max(norms)
    regularized = factorize(delta * tf.ones_like(rhs))
    w, ok = regularized(rhs)
    update, converged = regularized(rhs - product(w))
    smallest = tf.reduce_min(tf.where(free > 0, norms, tf.fill(
        tf.shape(norms), tf.constant(np.inf, dtype))))
    settled = (_size(product(update) * free / root) <=
               RETRY_TOLERANCE * rhs_size) & (
                   smallest > delta / RETRY_TOLERANCE)
    return w + update, update, ok & converged & settled

  def tikhonov():
    certified = tf.constant(True)
    if exact:
      certified = factorize(rho * scaling)(rhs)[1]
    regularized = factorize(np.sqrt(eps) * scaling)
    project, found = _null_projector(regularized, product, root, free,
                                     np.sqrt(eps), 4.0 * rho)
    consistent = rhs - project(rhs)

    def step(k, w, update, ok):  # (a loop: one trace of the solve)
      update, converged = regularized(consistent - product(w))
      return k + 1, w + update, update, ok & converged

    _, w, update, ok = tf.while_loop(
        lambda k, *_: k < TIKHONOV_STEPS, step,
        (tf.constant(0), tf.zeros_like(rhs), tf.zeros_like(rhs),
         certified & found))
    return w - project(w), update, ok

  if iterative:
    accepted = solved
  w, update, solved = tf.cond(
      accepted, lambda: (w, tf.zeros_like(w), solved),
      euclidean_retry if iterative else tikhonov)
  if exact:
    solved &= (_curvature_flat(product, w, free, root, rho) &
               _curvature_flat(product, update, free, root, rho))
  w = tf.where(solved, w, tf.fill(tf.shape(w), tf.constant(np.nan, dtype)))
  return w, _batch.all_finite(norms, 0)


def _size(v):
  """||v|| over the last axis."""
  return tf.sqrt(tf.reduce_sum(tf.square(v), axis=-1))


def _jacobi_scaling(norms, free):
  """D: `norms` on `free` where positive, 1 elsewhere."""
  scaling = tf.where(free > 0, norms, tf.ones_like(norms))
  return tf.where(scaling > 0, scaling, tf.ones_like(scaling))


def _first_solve(first, product, rhs, free, root, probe=True, any_rhs=False):
  """Steps 1 and 2 of `_factored_solve` (the same tests, written for a
  batch of dense problems: `_masked_solve`), per problem over leading axes
  ([B..., n] vectors; `first(v)` -> (H^-1 v, ok [B...]), `product(v)` ->
  H v, `root` = D^1/2): the first solve refined once, and whether it is
  accepted (its factorization succeeded and no rounding-level pivot
  pollutes it). Returns (w, solved, accepted), the last two [B...].
  `probe` False (a solver with no factor to reuse): no inverse iteration,
  the rounding test by the solve's own size only. `any_rhs`: the solve
  stands for every right-hand side (the Gauss-Newton forward pass, whose
  rhs, J^T r ~ 0, is a placeholder for the derivative's): judged as if
  rhs excited H's least eigenvalue (lambda_r = lambda_p). A zero rhs is
  solved exactly by w = 0 (lambda_r = inf)."""
  dtype = rhs.dtype
  tiny = np.finfo(dtype.as_numpy_dtype).tiny
  rho, rho_high = rounding_levels(dtype, tf.reduce_sum(free, axis=-1))
  w, solved = first(rhs)
  correction, refined = first(rhs - product(w))
  w, solved = w + correction, solved & refined
  if probe:
    q = free * tf.sin(tf.cast(tf.range(tf.shape(rhs)[-1]), dtype) *
                      2.399963 + 1.0)
    z, probed = first(root * q / _size(q)[..., tf.newaxis])
    z, probed = first(root * root * z / tf.maximum(
        _size(root * z), tiny)[..., tf.newaxis])
    probe_level = 1.0 / tf.maximum(_size(root * z), tiny)
  else:  # (the solver's own signal only)
    probed, probe_level = tf.constant(True), tf.constant(np.inf, dtype)
  rhs_size = _size(rhs / root)
  rhs_level = tf.where(rhs_size > 0, rhs_size / tf.maximum(
      _size(root * w), tiny), tf.constant(np.inf, dtype))
  if any_rhs:
    rhs_level = probe_level
  singular = ((rhs_level <= rho) |
              ((probe_level <= rho) | ~probed) &
              (rhs_level <= rho_high))
  return w, solved, solved & ~singular


def _curvature_flat(product, v, free, root, rho):
  """Step 5 of `_factored_solve`, over leading axes: v^T H v >=
  -rho ||D^1/2 v||^2 (a non-finite v counts as 0)."""
  v = tf.where(tf.math.is_finite(v), v, tf.zeros_like(v))
  return (tf.reduce_sum(v * product(v) * free, axis=-1) >=
          -rho * tf.reduce_sum(tf.square(root * v), axis=-1))


# -- chunked data ----------------------------------------------------------------


def attach_chunked(results, augmented, chunk_residual, retract, coordinates,
                   data, chunk_size, fold=None, captures=None):
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
    captures: optional; what `chunked_captures` returned for these
      arguments (before the solve, which it refused forward mode for).

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
  captured, variables = captures or chunked_captures(chunk_residual, point,
                                                     data, chunk_size)
  data_slots = [i for i, t in enumerate(data) if t.dtype.is_floating]
  live = (captured + [tf.convert_to_tensor(v) for v in variables] +
          [data[i] for i in data_slots])
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
    w, ok = _masked_solve(gram, rhs, free, norms=tf.linalg.diag_part(gram))
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
      # Not stopped: w and cost_bar are linear in the upstream cotangents,
      # and a ForwardAccumulator around a tf.function call takes the
      # tangents by transposing this pass (a stop here made them 0).
      cotangent = cost_bar * value - product
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


def chunked_captures(chunk_residual, point, data, chunk_size):
  """(tensors, variables) that `chunk_residual` captures (`_captures`),
  after a NotImplementedError if a forward accumulator tracks any of them
  or of the data: called before a chunked solve's first pass, which would
  otherwise run under the accumulator (tf.function: TensorFlow fails
  there, 'duplicate function ..._rewritten'). None where no gradient can
  be taken (eagerly, no tape or accumulator active)."""
  if not _needed():
    return None
  captured, variables = _captures(chunk_residual, point, data, chunk_size)
  _refuse_forward_mode(captured + [tf.convert_to_tensor(v) for v in variables]
                       + [t for t in data if t.dtype.is_floating])
  return captured, variables


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


def _forward_mode_tracks(tensors):
  """Whether a forward accumulator tracks any of `tensors` (eagerly or
  while tracing); None for a TensorFlow that cannot tell."""
  try:
    from tensorflow.python import pywrap_tfe  # pylint: disable=g-import-not-at-top
    _, tangents = pywrap_tfe.TFE_Py_PackJVPs(list(tensors))
  except (ImportError, AttributeError, TypeError):  # unknown TensorFlow
    return None
  return bool(tangents)


def _refuse_forward_mode(tensors):
  """Raises if a forward accumulator tracks any of `tensors` (eagerly or
  while tracing): it would get no tangent, or silently a zero one in a
  graph, through `tf.custom_gradient`."""
  if _forward_mode_tracks(tensors):
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
    w, ok = _masked_solve(matrix, position_bar, free, exact=True)
    ok &= tf.math.is_finite(live[0]) & tf.reduce_all(
        tf.math.is_finite(live[1]), axis=-1)
    return [None, None, _per_problem(ok, value_bar), _per_problem(ok, -w)]

  return tuple(_identity_with_gradient([position, value], live, backward))
