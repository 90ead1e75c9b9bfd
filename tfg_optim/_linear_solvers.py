"""Linear solvers of the damped Gauss-Newton system.

Each takes a linearization (`_linearization`: J through its products, and
J^T J where it is dense) and what its method needs, and returns
`solve(residual, gradient)`, a function that solves the system for a
right-hand side: F (used by the dual form) and g = J^T F (used by the normal
form), and returns a `SolveOutcome`: the solution and what the solve did
(its conjugate-gradient iterations, whether it reached its tolerance,
whether it broke down; a direct solve: no iterations, converged where
finite). The factorization is made once, so the same `solve` serves the
step, geodesic acceleration's second solve and the backward pass of
implicit differentiation (`_implicit.backward_solve`). A failed
factorization gives NaN steps, which the loop treats as a rejection, in
every mode.

- `damped_solver`: Cholesky of the damped normal equations
      (J^T J + lambda D) s = -J^T F                    (m >= n, or D given)
  or of the dual form
      s = -J^T (J J^T + lambda I)^-1 F                 (m < n, D = I),
  the arithmetic of `tf.linalg.lstsq(J, F, l2_regularizer=lambda,
  fast=True)`.
- `trust_region_solver`: the step of a trust region in the scaled norm
  ||D^1/2 s|| <= Delta, lambda found from an eigendecomposition of
  D^-1/2 J^T J D^-1/2 by Newton's method on the secular equation, or
  (`cholesky_trust_region_solver`, More 1978 / MINPACK's `lmpar`) by a few
  Cholesky factorizations of J^T J + lambda D, to within 0.1 Delta.
- `conjugate_gradient_solver`: the damped normal equations by conjugate
  gradients with the Jacobi preconditioner diag(J^T J) + lambda D, two
  products (J v, J^T u) per iteration and O(n) memory: for matrix-free
  linearizations.
- `steihaug_solver`: the trust-region step by Steihaug-Toint truncated
  conjugate gradients in the scaled norm (matrix-free).

A linearization with a `preconditioner(damping_diagonal)` method (the
block-sparse one: block-Jacobi) supplies its own preconditioner to both
(`_preconditioner`); Jacobi otherwise.

`damped_solver` and `trust_region_solver` pick the matrix-free method for a
matrix-free linearization.
"""

import collections

import numpy as np
import tensorflow as tf

from tfg_optim import _batch


SolveOutcome = collections.namedtuple(
    "SolveOutcome", ["solution", "iterations", "converged", "breakdown"])
SolveOutcome.__doc__ = """What one `solve(residual, gradient)` returns.

solution: the solution, [B..., n] (NaN where the solve failed outright: a
  failed factorization, a non-finite right-hand side).
iterations: int32 [B...], the conjugate-gradient iterations this problem
  ran (0 for a direct solve).
converged: bool [B...], the solve ended as its method intends: conjugate
  gradients at their tolerance, ||r_k||_M^-1 <= tolerance ||rhs||_M^-1
  (Steihaug-Toint also on the trust region's boundary); a direct solve
  where its solution is finite. False where the iteration cap ended it or
  it broke down.
breakdown: bool [B...], conjugate gradients met a non-positive curvature
  p^T A p <= 0 on a system that should be positive definite (not for
  Steihaug-Toint, which then ends on the boundary), or a non-finite value.
"""


def direct_outcome(solution):
  """The `SolveOutcome` of a direct solve: no iterations, converged where
  `solution` ([B..., n]) is finite."""
  finite = _batch.all_finite(solution, solution.shape.rank - 1)
  return SolveOutcome(solution, tf.zeros_like(finite, tf.int32), finite,
                      tf.logical_not(finite))


def in_xla():
  """Whether the ops being built will be compiled by XLA."""
  from tensorflow.python.ops import control_flow_util  # pylint: disable=g-import-not-at-top
  return (not tf.executing_eagerly() and
          control_flow_util.GraphOrParentsInXlaContext(
              tf.compat.v1.get_default_graph()))


def damped_solver(linearization, regularization, scaling=None,
                  gradient=None):
  """Factors the damped normal equations once; returns `solve`.

  Args:
    linearization: J (`_linearization.Dense` or `MatrixFree`; the latter
      is solved by `conjugate_gradient_solver`).
    regularization: lambda, [B...].
    scaling: D's diagonal, [B..., n], or None for the identity.
    gradient: g = J^T F at the point, [B..., n], or None: sets the
      conjugate-gradient tolerance of a linearization that asks for inexact
      steps (`step_tolerance`).
  """
  # A linearization with its own solver (`_schur.SchurComplement`) uses it.
  if getattr(linearization, "damped_solver", None) is not None:
    return linearization.damped_solver(regularization, scaling)
  if not linearization.dense:
    return conjugate_gradient_solver(
        linearization, regularization, scaling,
        tolerance=step_tolerance(linearization, gradient))
  # A `_chunked.Gram` linearization has J^T J only: the normal form.
  jacobian_matrix = getattr(linearization, "matrix", None)
  lam = regularization[..., tf.newaxis, tf.newaxis]

  def overdetermined():
    gram = linearization.gram()
    if scaling is None:
      gram += lam * tf.eye(gram.shape[-1], dtype=gram.dtype)
    else:
      gram += lam * tf.linalg.diag(scaling)
    factor = _cholesky(gram)
    return lambda residual, gradient: direct_outcome(
        -tf.linalg.cholesky_solve(factor, gradient[..., tf.newaxis])[..., 0])

  def underdetermined():
    gram = tf.matmul(jacobian_matrix, jacobian_matrix, adjoint_b=True)
    gram += lam * tf.eye(tf.shape(gram)[-1], dtype=gram.dtype)
    factor = _cholesky(gram)

    def solve(residual, gradient):
      del gradient
      multiplier = tf.linalg.cholesky_solve(factor, residual[..., tf.newaxis])
      return direct_outcome(
          -tf.matmul(jacobian_matrix, multiplier, adjoint_a=True)[..., 0])
    return solve

  if jacobian_matrix is None:
    return overdetermined()
  m, n = jacobian_matrix.shape[-2], jacobian_matrix.shape[-1]
  if scaling is not None or (m is not None and m >= n):
    return overdetermined()
  if m is not None:
    return underdetermined()
  wide = tf.shape(jacobian_matrix)[-2] < n  # m unknown while tracing.
  return lambda residual, gradient: direct_outcome(tf.cond(
      wide, lambda: underdetermined()(residual, gradient).solution,
      lambda: overdetermined()(residual, gradient).solution))


def _cholesky(matrix):
  """Cholesky factor; NaN where it fails (older eager kernels raise) and
  where the matrix is not finite: the kernel factors a float32 J^T J that
  overflowed to Inf into a factor whose solves give zero steps, which step
  tests would take for convergence."""
  nan = lambda: _batch.full_like(matrix, np.nan)
  if not tf.executing_eagerly():
    factor = tf.linalg.cholesky(matrix)
  else:
    try:
      factor = tf.linalg.cholesky(matrix)
    except tf.errors.InvalidArgumentError:
      return nan()
  return _batch.select(_batch.all_finite(matrix, matrix.shape.rank - 2),
                       factor, nan())


def trust_region_solver(linearization, gradient, scale, radius,
                        newton_iterations, method="eigh",
                        previous_lambda=None):
  """The trust-region step: returns (`solve`, radius, lambda).

  s(lambda) = -(J^T J + lambda D)^-1 g with lambda >= 0 the smallest value
  for which ||D^1/2 s|| <= radius. `method='cholesky'` finds lambda to
  MINPACK's tolerance by Cholesky factorizations
  (`cholesky_trust_region_solver`, which uses `previous_lambda`, [B...], as
  its first guess); `method='eigh'` (below) to rounding, from one
  eigendecomposition. With the eigendecomposition
  D^-1/2 J^T J D^-1/2 = V diag(sigma) V^T and c = V^T D^-1/2 g,
  ||D^1/2 s(lambda)|| = ||c / (sigma + lambda)||, and lambda is found by
  Newton's method on psi(lambda) = 1/radius - 1/||D^1/2 s(lambda)||
  (concave, so the iterates rise monotonically to the root; Moré 1978).
  Eigenvalues below eps times the largest are rounding: a singular J^T J
  gives a long, finite Gauss-Newton step, not an infinite one. A negative
  radius is relative: -radius times the Gauss-Newton step's scaled length
  (the first radius). `eigh` raises on NaN or Inf in every mode, so such
  problems decompose the identity instead and get a NaN step (a rejection)
  and their radius back unchanged.

  Args:
    linearization: J (`_linearization.Dense`; a `MatrixFree` one is solved
      by `steihaug_solver`).
    gradient: g = J^T F, [B..., n].
    scale: D's diagonal, [B..., n], positive.
    radius: [B...].
    newton_iterations: a Python int, the most Newton steps on lambda.
    method: 'cholesky' or 'eigh'.
    previous_lambda: lambda of the previous iteration, [B...], or None
      (for 'cholesky' only).
  """
  if not linearization.dense:
    return steihaug_solver(linearization, gradient, scale, radius,
                           tolerance=step_tolerance(linearization, gradient))
  if method == "cholesky":
    return cholesky_trust_region_solver(linearization, gradient, scale,
                                        radius, newton_iterations,
                                        previous_lambda)
  if method != "eigh":
    raise ValueError(f"method must be 'cholesky' or 'eigh', not {method!r}")
  dtype = gradient.dtype
  inverse_root = tf.math.rsqrt(scale)
  gram = linearization.gram()
  scaled_gram = (gram * tf.expand_dims(inverse_root, -1) *
                 tf.expand_dims(inverse_root, -2))
  finite = _batch.all_finite(scaled_gram, scaled_gram.shape.rank - 2)
  n = scaled_gram.shape[-1]
  # (`select` broadcasts the identity over the batch; one constant where n
  # is known while tracing.)
  identity = (tf.constant(np.eye(n), dtype) if n is not None else
              tf.eye(tf.shape(scaled_gram)[-1], dtype=dtype))
  sigma, vectors = tf.linalg.eigh(
      _batch.select(finite, scaled_gram, identity))
  sigma = tf.maximum(sigma, tf.zeros_like(sigma))
  coefficients = tf.linalg.matvec(vectors, inverse_root * gradient,
                                  adjoint_a=True)
  finfo = np.finfo(dtype.as_numpy_dtype)
  tiny = tf.constant(finfo.tiny, dtype)
  floor = finfo.eps * tf.reduce_max(sigma, axis=-1, keepdims=True) + tiny

  def shifted(lam):  # sigma + lambda, [B..., n]
    return tf.maximum(sigma + tf.expand_dims(lam, -1), floor)

  lam = tf.zeros_like(radius)
  gauss_newton_length = tf.norm(coefficients / shifted(lam), axis=-1)
  old_radius = radius
  radius = tf.where(radius < 0, -radius * gauss_newton_length, radius)
  def newton_step(lam):
    shift = shifted(lam)
    current = tf.norm(coefficients / shift, axis=-1)
    slope = tf.reduce_sum(tf.square(coefficients) / shift ** 3, -1)
    # psi(lambda) = 1/radius - 1/length, psi' = -slope / length^3.
    update = ((current / radius - 1.0) * tf.square(current) /
              tf.maximum(slope, tiny))
    # Overflow (float32: coefficients / tiny shifts) must not make lambda
    # NaN: keep the last finite value, and let the gain ratio judge.
    raised = lam + update
    return tf.where((current > radius) & tf.math.is_finite(raised), raised,
                    lam)

  # A loop in every mode, ended once no lambda moves (Newton's iterates rise
  # monotonically to the root, so they settle within a few iterations; the
  # iterations after that would repeat the same value): the same numbers
  # as `newton_iterations` unrolled steps, in a graph that many times
  # smaller to trace, optimize and compile, and fewer steps to run.
  def newton_body(i, lam, moved):
    del moved
    raised = newton_step(lam)
    return i + 1, raised, _batch.any_entry(tf.not_equal(raised, lam))

  _, lam, _ = tf.while_loop(
      lambda i, lam, moved: moved, newton_body,
      (tf.constant(0), lam, tf.constant(True)),
      maximum_iterations=newton_iterations)
  final_shift = shifted(lam)

  def solve(residual, rhs_gradient):
    del residual
    c = tf.linalg.matvec(vectors, inverse_root * rhs_gradient, adjoint_a=True)
    step = -inverse_root * tf.linalg.matvec(vectors, c / final_shift)
    return direct_outcome(_batch.select(
        finite, step, _batch.full_like(step, np.nan)))

  radius = tf.where(finite & tf.math.is_finite(radius), radius, old_radius)
  return solve, radius, lam


# MINPACK's choices (More 1978, `lmpar`): the step is accepted once its
# scaled length is within this fraction of the radius, after at most this
# many factorizations.
SECULAR_TOLERANCE = 0.1
SECULAR_MAX_FACTORIZATIONS = 10


def cholesky_trust_region_solver(
    linearization, gradient, scale, radius,
    max_factorizations=SECULAR_MAX_FACTORIZATIONS, previous_lambda=None):
  """The trust-region step by Cholesky factorizations (More 1978, the
  semantics of MINPACK's `lmpar`): returns (`solve`, radius, lambda) like
  `trust_region_solver`.

  With A(lambda) = J^T J + lambda D = L L^T, s(lambda) = -A^-1 g and
  phi(lambda) = ||D^1/2 s(lambda)|| - Delta:
  1. The Gauss-Newton step s(0) first. If Cholesky fails there (J^T J
     singular to working precision), the step at the shift
     lambda_0 = n eps max_j (J^T J)_jj / D_j + tiny stands in for it (the
     eigendecomposition path's eigenvalue floor, at the cost of one more
     factorization for that problem). A negative radius is
     relative to this step's length. If phi(lambda_0) <= 0.1 Delta the step
     is taken with lambda = lambda_0 (0 unless singular).
  2. Otherwise lambda is bracketed by l = lambda_0 - phi/phi' (a Newton
     step from lambda_0 on the concave psi = 1/Delta - 1/||D^1/2 s||, below
     the root) and u = ||D^-1/2 g|| / Delta, and starts at
     `previous_lambda` clamped to [l, u].
  3. Each iteration factors A(lambda), stops if |phi| <= 0.1 Delta, else
     narrows [l, u] by phi's sign and takes the safeguarded Newton step on
     psi, lambda <- max(l, lambda + (phi / Delta) / ||L^-1 q||^2) with
     q = D s / ||D^1/2 s|| (one triangular solve). At most
     `max_factorizations` in all; the last one is used.
  All of it is one `tf.while_loop` with one factorization per iteration
  (each problem in its own phase: Gauss-Newton, then secular), so the graph
  holds a single factorization. Each problem of a batch has its own lambda,
  bounds and iteration count; a problem that has stopped keeps its values. `solve` reuses the
  last factorization for another right-hand side. A non-finite J^T J,
  gradient or scaling gives a NaN step (a rejection) and the radius back
  unchanged, as the eigendecomposition path does; a factorization that
  fails (float32, or J^T J far from positive definite: also at the shift)
  counts as a step too long: lambda rises tenfold (at least to 1e-3 u).

  Args:
    linearization: J (`_linearization.Dense`).
    gradient: g = J^T F, [B..., n].
    scale: D's diagonal, [B..., n], positive.
    radius: Delta, [B...]; negative: relative, as above.
    max_factorizations: a Python int.
    previous_lambda: [B...], the first guess, or None (the lower bound).
  """
  dtype = gradient.dtype
  step_gradient = gradient  # `solve` of this right-hand side: the step.
  finfo = np.finfo(dtype.as_numpy_dtype)
  tiny = tf.constant(finfo.tiny, dtype)
  tolerance = tf.constant(SECULAR_TOLERANCE, dtype)
  gram = linearization.gram()
  batch_rank = gram.shape.rank - 2
  valid = (_batch.all_finite(gram, batch_rank) &
           _batch.all_finite(gradient, batch_rank) &
           _batch.all_finite(scale, batch_rank))
  identity = tf.eye(tf.shape(gram)[-1], dtype=dtype)
  gram = _batch.select(valid, gram, tf.broadcast_to(identity, tf.shape(gram)))
  ones = tf.ones_like(gradient)
  scale = tf.where(valid[..., tf.newaxis], scale, ones)
  gradient = tf.where(valid[..., tf.newaxis], gradient, ones)
  gram_diagonal = tf.linalg.diag_part(gram)
  root_scale = tf.sqrt(scale)

  def factor(lam):  # (L, s(lambda), ||D^1/2 s(lambda)||)
    chol = _cholesky(tf.linalg.set_diag(
        gram, gram_diagonal + lam[..., tf.newaxis] * scale))
    step = -tf.linalg.cholesky_solve(chol, gradient[..., tf.newaxis])[..., 0]
    return chol, step, tf.norm(root_scale * step, axis=-1)

  def newton_correction(chol, step, length, radius):
    # -psi/psi' = (phi / Delta) / ||L^-1 D s / ||D^1/2 s||||^2.
    safe_length = tf.where(length > 0, length, tf.ones_like(length))
    q = scale * step / safe_length[..., tf.newaxis]
    y = tf.linalg.triangular_solve(chol, q[..., tf.newaxis], lower=True)
    return ((length - radius) / radius) / tf.maximum(
        tf.reduce_sum(tf.square(y[..., 0]), axis=-1), tiny)

  zeros = tf.zeros_like(radius)
  n = tf.cast(tf.shape(gram)[-1], dtype)
  shift = n * finfo.eps * tf.reduce_max(gram_diagonal / scale, axis=-1) + tiny
  gradient_length = tf.norm(gradient / root_scale, axis=-1)
  first_guess = zeros if previous_lambda is None else previous_lambda
  # The phase of each problem (compared by tf.equal: `==` on tensors is
  # Python's identity in a TF1 graph).
  gauss_newton, secular, done = 0, 1, 2

  # One loop, one factorization per iteration and problem (a single
  # factorization in the graph): each problem starts in the Gauss-Newton
  # phase (lambda = 0, or the shift once Cholesky failed at 0), then
  # iterates on lambda until its own stop.
  def body(i, guess, lower, upper, radius, phase, lam, chol, step, length):
    new_chol, new_step, new_length = factor(guess)
    active = tf.not_equal(phase, done)
    lam = tf.where(active, guess, lam)
    chol = tf.where(active[..., tf.newaxis, tf.newaxis], new_chol, chol)
    step = tf.where(active[..., tf.newaxis], new_step, step)
    length = tf.where(active, new_length, length)
    failed = tf.logical_not(tf.math.is_finite(new_length))
    at_gauss_newton = tf.equal(phase, gauss_newton)
    retry = at_gauss_newton & failed & tf.equal(guess, 0.0)
    first = at_gauss_newton & tf.logical_not(retry)
    # A negative radius is relative to the Gauss-Newton step's length.
    radius = tf.where(first & (radius < 0), -radius * new_length, radius)
    phi = new_length - radius
    band = tolerance * radius
    correction = newton_correction(new_chol, new_step, new_length, radius)
    # The Gauss-Newton phase: done if inside (to MINPACK's tolerance), at a
    # radius of 0 (collapsed; as the eigendecomposition path, which keeps
    # lambda) or without a finite radius; a step still not finite at the
    # shift counts as too long. Otherwise bracket lambda and start at the
    # previous lambda.
    first_done = first & (_batch.not_positive(radius) | (
        tf.logical_not(failed) & (phi <= band)))
    first_lower = guess + correction
    first_lower = tf.where(tf.math.is_finite(first_lower), first_lower,
                           guess)
    # (g = 0 gives a zero step, inside; radius <= 0 ends: no other bound.)
    first_upper = gradient_length / radius
    # The secular phase: narrow [lower, upper] by phi's sign, Newton's step.
    iterating = tf.equal(phase, secular)
    lower = tf.where(first, first_lower, tf.where(
        iterating & ((phi > 0) | failed), tf.maximum(lower, guess), lower))
    upper = tf.where(first, first_upper, tf.where(
        iterating & (phi < 0), tf.minimum(upper, guess), upper))
    newton = tf.where(failed, tf.maximum(10.0 * guess, 1e-3 * upper),
                      tf.maximum(lower, guess + correction))
    next_guess = tf.where(
        retry, shift, tf.where(
            first, tf.minimum(tf.maximum(first_guess, lower), upper), newton))
    stop = tf.where(first, first_done, iterating & (
        tf.logical_not(tf.math.is_finite(next_guess)) | (
            tf.logical_not(failed) & (tf.abs(phi) <= band))))
    phase = tf.where(retry, phase, tf.where(
        active & tf.logical_not(stop), secular, done))
    return (i + 1, tf.where(tf.not_equal(phase, done), next_guess, guess),
            lower, upper, radius, phase, lam, chol, step, length)

  phase = tf.where(valid, tf.fill(tf.shape(radius), gauss_newton),
                   tf.fill(tf.shape(radius), done))
  loop = tf.while_loop(
      lambda i, guess, lower, upper, radius, phase, *_: tf.reduce_any(
          tf.not_equal(phase, done)), body,
      (tf.constant(0), zeros, zeros, zeros, radius, phase, zeros,
       tf.zeros_like(gram), tf.zeros_like(gradient), zeros),
      maximum_iterations=max_factorizations + 2)
  old_radius = radius
  radius, lam, chol, step = loop[4], loop[6], loop[7], loop[8]
  step = _batch.select(valid, step, _batch.full_like(step, np.nan))

  def solve(residual, rhs_gradient):
    del residual
    if rhs_gradient is step_gradient:
      return direct_outcome(step)
    other = -tf.linalg.cholesky_solve(chol, rhs_gradient[..., tf.newaxis])
    return direct_outcome(_batch.select(valid, other[..., 0],
                                        _batch.full_like(rhs_gradient,
                                                         np.nan)))

  radius = tf.where(valid & tf.math.is_finite(radius), radius, old_radius)
  return solve, radius, tf.where(tf.math.is_finite(lam), lam, zeros)


# Conjugate gradients stop when the preconditioned residual has fallen by
# this factor, or after this many iterations. An inexact step is still a
# descent step that the gain ratio judges with its own model decrease.
CG_TOLERANCE = 1e-6
CG_MAX_ITERATIONS = 200
# The loosest forcing term of an inexact step (`forcing_tolerance`).
CG_FORCING_MAX = 0.5
# Eisenstat and Walker's choice 2 (`forcing_tolerance`): eta_k = gamma
# (||g_k|| / ||g_k-1||)^alpha, kept at or above gamma eta_k-1^alpha while
# that is above the threshold.
CG_FORCING_GAMMA = 0.9
CG_FORCING_ALPHA = 2.0
CG_FORCING_SAFEGUARD = 0.1
# The forcing rule of `step_tolerance`: 'sqrt' (min(0.5, sqrt(||g||)),
# the default) or 'eisenstat_walker' (scale invariant, but it stalls at
# eta = 0.5 where the outer iterations converge slowly: 100 iterations
# against 66 at n = 10^6 with the probe diagonal, docs/large_scale.md;
# benchmarks/matrix_free.py --variants compares them).
FORCING_RULE = "sqrt"


def forcing_tolerance(gradient, history=None):
  """The inexact-Newton forcing term eta_k, [B...].

  Conjugate gradients on (J^T J + lambda D) s = -g stopped at
  ||r||_M^-1 <= eta ||g||_M^-1 (Dembo, Eisenstat & Steihaug 1982;
  Steihaug 1983; Nocedal & Wright, Algorithm 7.1 and 7.2): far from a
  solution a few iterations give a descent step that the gain ratio judges
  with its own model decrease, and eta -> 0 as g -> 0 keeps the local
  convergence superlinear.

  With a `history` (||g_k-1||, eta_k-1), each [B...], of the point the loop
  came from, Eisenstat and Walker's choice 2 (1996) with its safeguard:

      eta_k = gamma (||g_k|| / ||g_k-1||)^alpha,     gamma = 0.9, alpha = 2,
      eta_k = max(eta_k, gamma eta_k-1^alpha)  where gamma eta_k-1^alpha > 0.1,

  capped at 0.5: a ratio of gradient norms, so the same at every scale of
  the residuals (sqrt(||g||) is not: multiplied by c, F gives c^2 g), loose
  while the gradient falls slowly and tight where it falls fast, and the
  safeguard keeps eta from dropping at once after one lucky step (and
  from dropping at all while the gradient falls by less than a factor
  0.745 an iteration: where inexact steps themselves slow the outer
  iterations down, it stays at 0.5). At the start (a history of NaN) eta
  = 0.5. Without a history (`FORCING_RULE = 'sqrt'`, the default), eta =
  min(0.5, sqrt(||g||)) (not scale invariant). Never tighter than
  `CG_TOLERANCE` (1e-6, the fixed tolerance); `CG_TOLERANCE` where g is
  not finite.
  """
  norm = tf.norm(gradient, axis=-1)
  cap = tf.constant(CG_FORCING_MAX, norm.dtype)
  if history is None:
    eta = tf.minimum(tf.sqrt(norm), cap)
  else:
    previous_norm, previous_eta = history
    ratio = norm / tf.where(previous_norm > 0, previous_norm,
                            tf.ones_like(previous_norm))
    eta = CG_FORCING_GAMMA * tf.pow(ratio, CG_FORCING_ALPHA)
    safeguard = CG_FORCING_GAMMA * tf.pow(previous_eta, CG_FORCING_ALPHA)
    eta = tf.where(safeguard > CG_FORCING_SAFEGUARD,
                   tf.maximum(eta, safeguard), eta)
    started = tf.math.is_finite(previous_norm) & (previous_norm > 0)
    eta = tf.minimum(tf.where(started, eta, tf.fill(tf.shape(eta), cap)),
                     cap)
  floor = tf.constant(CG_TOLERANCE, norm.dtype)
  return tf.where(tf.math.is_finite(eta) & tf.math.is_finite(norm),
                  tf.maximum(eta, floor), tf.fill(tf.shape(eta), floor))


def step_tolerance(linearization, gradient):
  """The conjugate-gradient tolerance of this iteration's solves: the
  forcing term (`FORCING_RULE`) of `gradient` for a linearization whose
  `inexact_steps` is True (the matrix-free one of `linear_solver='cg'`; its
  `forcing_history`, the previous point's gradient norm and forcing term,
  gives Eisenstat and Walker's term), else (or without a gradient) the
  fixed `CG_TOLERANCE`."""
  if gradient is None or not getattr(linearization, "inexact_steps", False):
    return CG_TOLERANCE
  history = None
  if FORCING_RULE == "eisenstat_walker":
    history = linearization.forcing_history
  elif FORCING_RULE != "sqrt":
    raise ValueError(f"unknown forcing rule {FORCING_RULE!r}")
  return forcing_tolerance(gradient, history)


def _dot(a, b):
  return tf.reduce_sum(a * b, axis=-1)


def _cg_loop(operator, rhs, precondition, max_iterations, tolerance,
             radius=None, metric=None):
  """Preconditioned conjugate gradients on operator(x) = rhs, [B..., n].

  Every problem of a batch has its own scalars and stops on its own, when
  ||r_k||_M^-1 <= tolerance ||rhs||_M^-1 (`tolerance`: a number, or one
  per problem, [B...]). With a `radius` [B...] (Steihaug
  and Toint), an iterate that would leave the ball ||x||_M <= radius, or a
  direction of non-positive curvature, ends at the boundary along the
  current direction. The ball's metric M must be the preconditioner's
  inverse (the norm in which the iterates grow monotonically): `metric`,
  v -> M v, or None for the identity (then `precondition` must be the
  identity too). Returns a `SolveOutcome`: x, each problem's iterations
  (those it was active in), whether it ended at its tolerance (or, with a
  radius, on the boundary) rather than at `max_iterations` or by a
  breakdown (without a radius: a curvature p^T A p <= 0; always: a
  non-finite x).
  """
  x = tf.zeros_like(rhs)
  r = rhs
  z = precondition(r)
  p = z
  rz = _dot(r, z)
  target = tf.square(tf.convert_to_tensor(tolerance, rhs.dtype)) * rz
  active = rz > target
  if metric is None:
    inner = _dot
  else:
    inner = lambda a, b: _dot(a, metric(b))

  def boundary(x, p):  # tau >= 0 with ||x + tau p|| = radius.
    pp, xp, xx = inner(p, p), inner(x, p), inner(x, x)
    safe_pp = tf.where(pp > 0, pp, tf.ones_like(pp))
    root = tf.sqrt(tf.maximum(xp * xp + pp * (radius * radius - xx), 0.0))
    return (-xp + root) / safe_pp

  def body(k, x, r, p, rz, active, iterations, broke):
    iterations += tf.cast(active, tf.int32)
    q = operator(p)
    curvature = _dot(p, q)
    positive = curvature > 0
    alpha = tf.where(active & positive,
                     rz / tf.where(positive, curvature,
                                   tf.ones_like(curvature)),
                     tf.zeros_like(rz))
    next_x = x + alpha[..., tf.newaxis] * p
    if radius is not None:
      leaves = active & (tf.logical_not(positive) |
                         (inner(next_x, next_x) >= radius * radius))
      # (An unbounded solve stops where the curvature vanishes.)
      tau = tf.where(tf.math.is_finite(radius), boundary(x, p),
                     tf.zeros_like(radius))
      next_x = tf.where(leaves[..., tf.newaxis],
                        x + tau[..., tf.newaxis] * p, next_x)
      active &= tf.logical_not(leaves)
    else:
      broke |= active & tf.logical_not(positive)
      active &= positive
    r = r - alpha[..., tf.newaxis] * q
    z = precondition(r)
    next_rz = _dot(r, z)
    beta = tf.where(active, next_rz / tf.where(rz > 0, rz, tf.ones_like(rz)),
                    tf.zeros_like(rz))
    p = tf.where(active[..., tf.newaxis], z + beta[..., tf.newaxis] * p, p)
    active &= next_rz > target
    return (k + 1, next_x, r, p, tf.where(active, next_rz, rz), active,
            iterations, broke)

  zeros = tf.zeros_like(active)
  _, x, _, _, rz, active, iterations, broke = tf.while_loop(
      lambda k, x, r, p, rz, active, *_: tf.reduce_any(active), body,
      (tf.constant(0), x, r, p, rz, active, tf.zeros_like(zeros, tf.int32),
       zeros),
      maximum_iterations=max_iterations)
  # A non-finite right-hand side or preconditioner (a failed factorization)
  # leaves the loop at once with x = 0: a NaN step (a rejection) instead,
  # never a zero step that step tests could take for convergence.
  x = _batch.select(tf.math.is_finite(rz), x, tf.fill(
      tf.shape(x), tf.constant(np.nan, x.dtype)))
  broke |= tf.logical_not(_batch.all_finite(x, x.shape.rank - 1))
  return SolveOutcome(x, iterations,
                      tf.logical_not(active | broke), broke)


def _preconditioner(linearization, damping_diagonal):
  """M ~ J^T J + diag(damping_diagonal): the linearization's own
  (`preconditioner(damping_diagonal)`, a (solve, multiply) pair), else
  Jacobi, diag(J^T J) + damping_diagonal (1 where that is 0)."""
  own = getattr(linearization, "preconditioner", None)
  if own is not None:
    return own(damping_diagonal)
  diagonal = linearization.column_norms() + damping_diagonal
  tiny = tf.constant(np.finfo(diagonal.dtype.as_numpy_dtype).tiny,
                     diagonal.dtype)
  diagonal = tf.where(diagonal > tiny, diagonal, tf.ones_like(diagonal))
  return _Preconditioner(lambda r: r / diagonal, lambda v: diagonal * v)


_Preconditioner = collections.namedtuple("_Preconditioner",
                                         ["solve", "multiply"])


def conjugate_gradient_solver(linearization, regularization, scaling=None,
                              max_iterations=CG_MAX_ITERATIONS,
                              tolerance=CG_TOLERANCE):
  """Returns `solve` for (J^T J + lambda D) s = -rhs by conjugate gradients.

  Each iteration costs one J v and one J^T u; J^T J is never formed. The
  Jacobi preconditioner M = diag(J^T J) + lambda D uses the
  linearization's column norms. A non-finite right-hand side gives a NaN
  step (a rejection). `tolerance`: a number, or one per problem [B...]
  (`step_tolerance`), for every right-hand side this `solve` is given (the
  step and geodesic acceleration's).
  """
  lam = regularization[..., tf.newaxis]
  damping_diagonal = lam if scaling is None else lam * scaling
  precondition = _preconditioner(linearization, damping_diagonal).solve

  def operator(v):
    return linearization.rmatvec(linearization.matvec(v)) + (
        damping_diagonal * v)

  def solve(residual, gradient):
    del residual
    outcome = _cg_loop(operator, -gradient, precondition, max_iterations,
                       tolerance)
    step = outcome.solution
    finite = _batch.all_finite(gradient, gradient.shape.rank - 1)
    return outcome._replace(
        solution=_batch.select(finite, step, tf.fill(
            tf.shape(step), tf.constant(np.nan, step.dtype))),
        converged=outcome.converged & finite,
        breakdown=outcome.breakdown | tf.logical_not(finite))
  return solve


def steihaug_solver(linearization, gradient, scale, radius,
                    max_iterations=CG_MAX_ITERATIONS,
                    tolerance=CG_TOLERANCE):
  """The trust-region step by truncated conjugate gradients (Steihaug 1983,
  Toint 1981): returns (`solve`, radius, lambda) like `trust_region_solver`.

  In the scaled variables u = D^1/2 s the model is
  g^T D^-1/2 u + 1/2 u^T D^-1/2 J^T J D^-1/2 u and the region the ball
  ||u|| <= Delta, so conjugate gradients on the scaled system (D is
  Marquardt's diag(J^T J), a Jacobi preconditioner) stop at the first
  iterate that would leave the ball, on its boundary. A negative radius is
  relative to the (conjugate-gradient) Gauss-Newton step, as there. The
  lambda returned is the multiplier that the step would have in the exact
  solution, (-g^T s - ||J s||^2) / s^T D s on the boundary (0 inside), which
  is what the damping tests and the reports need; `solve` for another
  right-hand side (geodesic acceleration) uses it in
  `conjugate_gradient_solver`, with the same `tolerance` (a number, or one
  per problem [B...]: `step_tolerance`).
  """
  inverse_root = tf.math.rsqrt(scale)

  def operator(u):
    return inverse_root * linearization.rmatvec(
        linearization.matvec(inverse_root * u))

  precondition, metric = lambda r: r, None
  if getattr(linearization, "preconditioner", None) is not None:
    # Its blocks B in the scaled variables u = D^1/2 s: M = D^-1/2 B D^-1/2,
    # and the region ||u||_M = ||s||_B <= Delta (B's diagonal is diag(J^T J),
    # Marquardt's D where it has not grown).
    blocks = linearization.preconditioner(tf.zeros_like(scale))
    precondition = lambda r: blocks.solve(r / inverse_root) / inverse_root
    metric = lambda u: inverse_root * blocks.multiply(inverse_root * u)
  relative = radius < 0
  infinite = tf.constant(np.inf, gradient.dtype)
  outcome = _cg_loop(operator, -inverse_root * gradient, precondition,
                     max_iterations, tolerance,
                     radius=tf.where(relative, infinite, radius),
                     metric=metric)
  scaled_step = outcome.solution
  if metric is None:
    length = tf.norm(scaled_step, axis=-1)
  else:
    length = tf.sqrt(_dot(scaled_step, metric(scaled_step)))
  old_radius = radius
  radius = tf.where(relative, -radius * length, radius)
  step = inverse_root * scaled_step
  curvature = tf.reduce_sum(tf.square(linearization.matvec(step)), axis=-1)
  on_boundary = length >= (1.0 - 1e-6) * radius
  safe_length = tf.where(length > 0, length, tf.ones_like(length))
  scaled_square = (tf.square(safe_length) if metric is None else  # s^T D s
                   tf.maximum(_dot(scaled_step, scaled_step),
                              tf.constant(np.finfo(
                                  length.dtype.as_numpy_dtype).tiny,
                                          length.dtype)))
  lam = tf.where(on_boundary & (length > 0), tf.maximum(
      (-_dot(gradient, step) - curvature) / scaled_square, 0.0),
                 tf.zeros_like(length))
  finite = _batch.all_finite(step, step.shape.rank - 1)
  step = _batch.select(finite, step, _batch.full_like(step, np.nan))
  step_outcome = SolveOutcome(step, outcome.iterations,
                              outcome.converged & finite,
                              outcome.breakdown | tf.logical_not(finite))
  cg_solve = conjugate_gradient_solver(linearization, lam, scale,
                                       max_iterations, tolerance)

  def solve(residual, rhs_gradient):
    if rhs_gradient is gradient:  # The step itself.
      return step_outcome
    return cg_solve(residual, rhs_gradient)

  radius = tf.where(finite & tf.math.is_finite(radius), radius, old_radius)
  return solve, radius, lam
