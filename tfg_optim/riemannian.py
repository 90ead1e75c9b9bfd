"""Riemannian Levenberg-Marquardt with the contract of Manopt's.

Minimizes 1/2 ||F(p)||^2 over a manifold M (Peeters 1993; Adachi, Okuno &
Takeda 2022, Algorithm 1, as in Manopt 0.5). With J the m x d matrix of the
differential of F at p in an orthonormal basis of T_p M, each iteration

1. sets lambda = mu ||F(p)||^2 and solves (J^T J + lambda I) s = -J^T F(p);
2. proposes q = R_p(s) (the manifold's retraction of the step s);
3. computes the gain ratio of actual to predicted decrease

       rho = (||F(p)||^2 - ||F(q)||^2)
             / (-2 <J^T F, s> - ||J s||^2 - lambda ||s||^2);

4. accepts q iff rho >= eta (then, if `expect_zero_residual`,
   mu <- max(mu_min, mu / beta)), else keeps p, sets mu <- beta mu and reuses
   the Jacobian of the unchanged point.

mu starts at `damping_term_min`. A failed factorization or a non-finite F(q)
is a rejection. It is the same engine as `tfg_optim.levenberg_marquardt`
(another damping policy and retraction), a `tf.while_loop` that runs eagerly,
in `tf.function`, in a TF1 `Session` and under XLA, and stops early by the
composable criteria of `tfg_optim.stopping`.
"""

import numbers

import numpy as np
import tensorflow as tf

from tfg_optim import _batch
from tfg_optim import _eager
from tfg_optim import _engine
from tfg_optim import _implicit
from tfg_optim import _linearization
from tfg_optim import damping as damping_lib
from tfg_optim import _validation
from tfg_optim import results as results_lib
from tfg_optim import stopping as stopping_lib


class NonlinearLeastSquaresObjective:
  """F, its optional Jacobian and its length m, as one object (Manopt's
  `NonlinearLeastSquaresObjective`); pass it in place of `f, jacobian_f`."""

  def __init__(self, f, jacobian_f=None, num_components=-1):
    self.f = f
    self.jacobian_f = jacobian_f
    self.num_components = num_components

  def __repr__(self):
    return (f"NonlinearLeastSquaresObjective(f={self.f!r}, jacobian_f="
            f"{self.jacobian_f!r}, num_components={self.num_components})")


# Not converted by AutoGraph inside a caller's tf.function: the solver is
# explicit graph code (a tf.while_loop), and converting it only costs tracing.
@tf.autograph.experimental.do_not_convert
def levenberg_marquardt(manifold, f, p, jacobian_f=None, num_components=-1, *,
                        eta=0.2, damping_term_min=0.1, beta=5.0,
                        expect_zero_residual=False, retraction_method=None,
                        stopping_criterion=None, callback=None,
                        return_state=False, record=False,
                        jacobian_tangent_basis=None,
                        initial_residual_values=None, initial_jacobian_f=None,
                        batch_dims=0, gradients="implicit",
                        implicit_hessian="gauss_newton", eager_compile="auto",
                        name="riemannian_levenberg_marquardt"):
  """Riemannian Levenberg-Marquardt: argmin over p in M of 1/2 ||f(p)||^2.

  Args:
    manifold: a `tfg_optim.manifolds.Manifold` (Euclidean, Sphere,
      SpecialOrthogonal, Stiefel, Product, Power).
    f: callable p -> residuals (any shape; flattened to m values), or a
      `NonlinearLeastSquaresObjective` (then `jacobian_f` must be None).
    p: the starting point on the manifold: a tensor (a tuple or list of
      tensors for a `Product`; f, the callback and the result get the same
      container), NumPy value or `tf.Variable` (read, not assigned; see
      `levenberg_marquardt_in_place`), of shape [B..., *point_shape] with
      exactly `batch_dims` axes B.... A start off the manifold raises eagerly;
      in a graph its problem stops at once with `StopReason.INVALID_INPUT`
      (not converged, the start returned unchanged; the others run).
    jacobian_f: optional callable p -> [m, d] coefficients of the differential
      of f in the manifold's orthonormal tangent basis at p. By default the
      Jacobian is differentiated automatically through the retraction
      (forward mode when m >= d).
    num_components: m, or -1 to read it from the shape of the first
      evaluation of f (Manopt calls f once more for it; no extra call is
      needed here, and none is counted).
    eta: acceptance threshold of the gain ratio, 0 < eta < 1.
    damping_term_min: initial and smallest damping term mu, > 0.
    beta: factor by which mu grows on rejection (and shrinks on acceptance
      when `expect_zero_residual`), > 1.
    expect_zero_residual: whether the residual is expected to vanish at the
      minimum (enables decreasing mu).
    retraction_method: None for the manifold's retraction, or a callable
      `(p, coordinates) -> point`.
    stopping_criterion: a `tfg_optim.stopping` criterion; default
      `StopAfterIteration(200) | StopWhenGradientNormLess(1e-12) |
      StopWhenStepsizeLess(1e-12)`.
    callback: optional `callback(iteration, cost, point)` after every
      iteration (1-based int32 iteration); ops it returns run every iteration.
    return_state: if True, return a `LeastSquaresResults` instead of the point.
    record: False, True (keep per-iteration cost, gradient norm, step size
      and damping for up to the criterion's iteration bound, else 1000), or
      an int number of iterations to keep; see `results.records`.
    jacobian_tangent_basis: None or "orthonormal" (the default basis), or a
      callable p -> [d, d] matrix C whose column j holds the orthonormal
      coordinates of the j-th basis vector `jacobian_f` is expressed in.
    initial_residual_values: f(p), when the caller has it.
    initial_jacobian_f: the Jacobian at p (in the basis of
      `jacobian_tangent_basis`), when the caller has it.
    batch_dims: number of leading dimensions of p (and of f's output) that
      index independent problems, each with its own damping and stop.
    gradients: how the result (point, cost, residual) is differentiated with
      respect to the tensors and variables f captures: 'implicit' (default;
      the implicit function theorem at the solution in the tangent
      coordinates of the retraction, one linear solve, the loop is not
      taped), 'unrolled' (the tape sees every iteration) or 'none'. See
      docs/differentiation.md.
    implicit_hessian: 'gauss_newton' (default; J^T J) or 'exact', the
      Hessian of the implicit gradients.
    eager_compile: what an eager call does, as in
      `tfg_optim.least_squares`: 'auto' (default) runs the first call with
      a problem op by op (compiled and solved again if still running after
      5 iterations) and later calls with the same problem (the same
      manifold, f with the same captured values, the same options) as one
      cached `tf.function`; True compiles from the first call; False never.
      With a `callback`, initial values or an initial Jacobian, 'auto' runs
      op by op.
    name: name scope of the ops.

  Returns:
    The final point (same structure as `p`), or with `return_state=True` a
    `tfg_optim.results.LeastSquaresResults`.

  Raises:
    ValueError: for eta, damping_term_min, beta out of range, num_components
      that does not match f, integers beyond int32, a point of the wrong
      shape for the manifold and batch_dims, an empty point or a manifold of
      dimension 0, a point off the manifold (eagerly), an f whose output does
      not keep p's batch axes or does not depend on p (checked on its first
      evaluation unless jacobian_f or initial_residual_values is given).
    TypeError: for a non-callable f/jacobian_f/callback, a non-manifold, a
      non-float point, or f returning another dtype.
  """
  if (_eager.wanted(eager_compile, callback) and
      initial_residual_values is None and initial_jacobian_f is None):
    options = dict(
        jacobian_f=jacobian_f, num_components=num_components, eta=eta,
        damping_term_min=damping_term_min, beta=beta,
        expect_zero_residual=expect_zero_residual,
        retraction_method=retraction_method,
        stopping_criterion=stopping_criterion, callback=callback,
        return_state=return_state, record=record,
        jacobian_tangent_basis=jacobian_tangent_basis, batch_dims=batch_dims,
        gradients=gradients, implicit_hessian=implicit_hessian, name=name)
    solve = _compiled_solve(manifold, f, p, options, eager_compile is True)
    if isinstance(solve, _eager.FirstCall):
      return _eager.run_first_call(solve, lambda: levenberg_marquardt(
          manifold, f, p, eager_compile=False, **options),
                                   _eager.RIEMANNIAN_TRIAL_ITERATIONS)
    if solve is not None:
      return solve()
  state, _ = _solve(manifold, f, p, jacobian_f, num_components, eta,
                    damping_term_min, beta, expect_zero_residual,
                    retraction_method, stopping_criterion, callback, record,
                    jacobian_tangent_basis, initial_residual_values,
                    initial_jacobian_f, batch_dims, gradients,
                    implicit_hessian, name)
  return state if return_state else state.position


def _compiled_solve(manifold, f, p, options, compile_now):
  """() -> the cached compiled solve's return value (`tfg_optim._eager`),
  after the eager check of the start; or None to run op by op."""
  leaves = tf.nest.flatten(p)
  if not leaves or not all(
      isinstance(leaf, (tf.Tensor, tf.Variable, np.ndarray))
      for leaf in leaves):
    return None
  key, kept = _eager.fingerprint((
      "riemannian", manifold, f, options,
      tf.nest.map_structure(lambda _: None, p)))

  def build():
    def solve(*flat):
      return levenberg_marquardt(
          manifold, f, tf.nest.pack_sequence_as(p, flat),
          eager_compile=False, **options)
    return solve

  function = _eager.compiled(key, kept, build, compile_now)
  if isinstance(function, _eager.FirstCall):
    return _eager.FirstCall(lambda: _compiled_solve(manifold, f, p, options,
                                                    True))
  if function is None:
    return None
  tensors = [tf.convert_to_tensor(leaf) for leaf in leaves]
  if not (hasattr(manifold, "check_point") and hasattr(manifold, "as_point")
          and all(t.dtype.is_floating and np.all(np.isfinite(t.numpy()))
                  for t in tensors)):
    return None  # Op by op: it raises the right error.
  # The op-by-op call's checks, with the same messages naming 'p' (a
  # problem seen before must not change which error a bad start gets).
  _check_start(manifold, tf.nest.pack_sequence_as(p, tensors),
               options["batch_dims"])
  return lambda: function(*tensors)


# Not converted by AutoGraph inside a caller's tf.function: the solver is
# explicit graph code (a tf.while_loop), and converting it only costs tracing.
@tf.autograph.experimental.do_not_convert
def levenberg_marquardt_in_place(manifold, f, p, jacobian_f=None,
                                 num_components=-1, **kwargs):
  """`levenberg_marquardt` that assigns the solution into `p`.

  Manopt's `LevenbergMarquardt!`: `p` is a `tf.Variable` (a tuple of them for
  a `Product`). The assignment runs eagerly, inside `tf.function` and in a
  TF1 `Session` (it is a dependency of the returned tensors). Takes the same
  keyword arguments and returns what `levenberg_marquardt` returns.
  """
  variables = tf.nest.flatten(p)
  if not all(isinstance(v, tf.Variable) for v in variables):
    raise TypeError("'p' must be a tf.Variable (or a tuple of them) for an "
                    "in-place solve.")
  return_state = kwargs.pop("return_state", False)
  solution = levenberg_marquardt(manifold, f, p, jacobian_f, num_components,
                                 return_state=True, **kwargs)
  assigns = [v.assign(value) for v, value in
             zip(variables, tf.nest.flatten(solution.position))]
  with tf.control_dependencies(assigns):
    solution = tf.nest.map_structure(tf.identity, solution)
  return solution if return_state else solution.position


def _solve(manifold, f, p, jacobian_f, num_components, eta, damping_term_min,
           beta, expect_zero_residual, retraction_method, stopping_criterion,
           callback, record, jacobian_tangent_basis, initial_residual_values,
           initial_jacobian_f, batch_dims, gradients, implicit_hessian, name):
  """Validates the arguments, runs the engine, returns (results, state)."""
  trial_cap = _eager.claim_trial()  # (before f runs)
  gradients = _implicit.check_gradients(gradients)
  implicit_hessian = _implicit.check_hessian(implicit_hessian)
  if isinstance(f, NonlinearLeastSquaresObjective):
    if jacobian_f is not None:
      raise ValueError("Pass 'jacobian_f' inside the "
                       "NonlinearLeastSquaresObjective, not both.")
    f, jacobian_f, num_components = f.f, f.jacobian_f, f.num_components
  if not all(hasattr(manifold, attr) for attr in (
      "retract", "dim", "name", "as_point", "check_shape", "check_point",
      "contains")):
    raise TypeError(f"'manifold' must be a tfg_optim.manifolds.Manifold, got "
                    f"{type(manifold).__name__}.")
  _validation.as_callable_list(f, "f")
  for value, arg in ((jacobian_f, "jacobian_f"), (callback, "callback"),
                     (retraction_method, "retraction_method")):
    if value is not None and not callable(value):
      raise TypeError(f"'{arg}' must be callable, got {type(value).__name__}.")
  eta = _validation.real_number(eta, "eta", lower=0.0, lower_inclusive=False,
                                upper=1.0, upper_inclusive=False)
  damping_term_min = _validation.real_number(
      damping_term_min, "damping_term_min", lower=0.0, lower_inclusive=False)
  beta = _validation.real_number(beta, "beta", lower=1.0,
                                 lower_inclusive=False)
  batch_dims = _validation.positive_int(batch_dims, "batch_dims", minimum=0)
  if isinstance(num_components, bool) or not isinstance(
      num_components, numbers.Integral) or (
          num_components < 1 and num_components != -1) or (
              num_components > _validation.INT32_MAX):
    raise ValueError(f"'num_components' must be -1 or a positive int32, "
                     f"got {num_components!r}.")
  if stopping_criterion is None:
    stopping_criterion = stopping_lib.default_criterion()
  if not isinstance(stopping_criterion, stopping_lib.StoppingCriterion):
    raise TypeError("'stopping_criterion' must be a tfg_optim.stopping "
                    f"criterion, got {type(stopping_criterion).__name__}.")
  if jacobian_tangent_basis not in (None, "orthonormal") and not callable(
      jacobian_tangent_basis):
    raise ValueError("'jacobian_tangent_basis' must be None, 'orthonormal' "
                     "or a callable returning a basis matrix.")
  num_records = 0
  if record:
    num_records = (_validation.positive_int(record, "record")
                   if not isinstance(record, bool) else
                   stopping_criterion.max_iterations or 1000)

  with tf.name_scope(name):
    point = _start_point(manifold, p, batch_dims)
    dtype = tf.nest.flatten(point)[0].dtype
    batch_shape = tf.nest.flatten(point)[0].shape[:batch_dims]
    invalid_start = None
    if tf.executing_eagerly():
      _check_start(manifold, point, batch_dims)
    else:
      # A graph cannot raise on values: a problem whose start is off the
      # manifold (or not finite) stops at once with INVALID_INPUT.
      invalid_start = tf.logical_not(manifold.contains(point))

    def residual_fn(q):
      value = _validation.check_output_dtype(f(q), dtype, "f")
      if value.shape.rank is not None and not value.shape[
          :batch_dims].is_compatible_with(batch_shape):
        raise ValueError(f"'f' returned shape {value.shape}; its first "
                         f"batch_dims={batch_dims} axes must be the batch "
                         f"shape {batch_shape} of 'p'.")
      flat = tf.reshape(value, _batch.concat_shapes(
          _batch.leading_shape(value, batch_dims), [-1]))
      if num_components != -1 and flat.shape[-1] is not None and (
          flat.shape[-1] != num_components):
        raise ValueError(f"'num_components' is {num_components} but f "
                         f"returned {flat.shape[-1]} values.")
      return flat

    def to_orthonormal(q, value):
      """A Jacobian in the caller's basis, in the orthonormal one."""
      value = tf.convert_to_tensor(value, dtype)
      if not callable(jacobian_tangent_basis):
        return value
      # J_user a = DF[sum_j a_j c_j], with C a = xi: J = J_user C^-1.
      basis = tf.convert_to_tensor(jacobian_tangent_basis(q), dtype)
      return tf.linalg.matrix_transpose(tf.linalg.solve(
          tf.linalg.matrix_transpose(basis),
          tf.linalg.matrix_transpose(value)))

    user_jacobian = None
    if jacobian_f is not None:
      user_jacobian = lambda q: to_orthonormal(q, jacobian_f(q))
    retract = manifold.retract
    if retraction_method is not None:  # into the container types of q
      retract = lambda q, c: tf.nest.pack_sequence_as(
          q, tf.nest.flatten(retraction_method(q, c)))

    initial_residual = None
    if initial_residual_values is not None:
      initial_residual = _flat_initial(initial_residual_values, dtype,
                                       batch_dims)
    elif jacobian_f is None and tf.executing_eagerly():
      # The engine's first evaluation, made here to check that F depends on
      # p: otherwise J = 0 and the start would pass for converged.
      initial_residual = _validation.connected_outputs(
          lambda: [residual_fn(point)], point, ["f"])[0]

    problem = _engine.Problem(
        residual_fn=residual_fn,
        retract=retract,
        tangent_dim=manifold.dim,
        cost_fn=None,
        jacobian_fn=user_jacobian)
    if (jacobian_f is None and initial_residual_values is None and
        not tf.executing_eagerly()):
      # In graphs the same check rides on the one trace of F and its
      # Jacobian-vector product that the Jacobian needs anyway.
      # (No geodesic acceleration here: every product is at the point, so
      # F's derivative along the ambient tangent vectors, without the
      # retraction differentiated.)
      problem = problem._replace(
          tangent_product=_linearization.traced_tangent_product(
              problem, manifold.tangent_vector,
              check=lambda depends, residual: _validation.require_connected(
                  [depends(residual)], ["f"])))
      initial_residual = residual_fn(point)
      zero = tf.zeros(tf.concat([tf.shape(initial_residual)[:-1],
                                 [manifold.dim]], 0), dtype)
      problem.tangent_product(point, tf.ones_like(zero))  # Checks.
    policy = damping_lib.GainRatioDamping(eta, damping_term_min, beta,
                                      expect_zero_residual)
    state = _implicit.solve_untaped(lambda: _engine.minimize(
        problem, point, policy, stopping_criterion.max_iterations,
        stopping=stopping_criterion, callback=callback,
        num_records=num_records, initial_residual=initial_residual,
        initial_jacobian=(None if initial_jacobian_f is None else
                          to_orthonormal(point, initial_jacobian_f)),
        invalid_start=invalid_start,
        initial_residual_evaluations=int(initial_residual_values is None and
                                         jacobian_f is None),
        trial_cap=trial_cap), gradients)
    results = results_lib.from_state(state, num_records, stopping_criterion)
    if gradients == "implicit":
      results = _implicit.attach_least_squares(
          results, state.linearization[0], residual_fn, retract,
          manifold.coordinates,
          manifold.tangent_vector, implicit_hessian)
    return results, state


def _check_start(manifold, p, batch_dims):
  """Raises ValueError naming 'p' for an eager start of the wrong shape,
  empty, or off the manifold."""
  point = _start_point(manifold, p, batch_dims)
  try:
    manifold.check_point(point)
  except ValueError as error:
    raise ValueError(f"'p': {error}") from None


def _start_point(manifold, p, batch_dims):
  """`p` in the manifold's structure, as float tensors of shape
  [B1..B_batch_dims, *point_shape], the point shape static (a wrong shape
  would broadcast into a wrong answer reported as converged; batch
  dimensions may be unknown while tracing), not empty."""
  try:
    point = manifold.as_point(p)
  except ValueError as error:
    raise ValueError(f"'p': {error}") from None
  flat = _validation.float_tensors(tf.nest.flatten(point), "p",
                                   batch_dims=batch_dims)
  if manifold.dim == 0:
    raise ValueError(f"'p': {manifold.name} has dimension 0; there is "
                     "nothing to optimize.")
  try:
    manifold.check_shape(point, batch_dims)
  except ValueError as error:
    raise ValueError(f"'p': {error} (batch_dims={batch_dims}: a batch of "
                     "problems needs batch_dims = its number of leading "
                     "axes.)") from None
  _validation.check_batch_shapes(flat, batch_dims, "p")
  if any(tensor.shape.num_elements() == 0 for tensor in flat):
    raise ValueError(f"'p' is empty (shapes {[t.shape for t in flat]}); "
                     "there is no problem to solve.")
  return point


def _flat_initial(values, dtype, batch_dims):
  values = tf.convert_to_tensor(values, dtype)
  return tf.reshape(values, tf.concat([tf.shape(values)[:batch_dims], [-1]],
                                      0))
