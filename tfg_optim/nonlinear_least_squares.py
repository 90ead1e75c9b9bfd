"""A robust least-squares solver: `tfg_optim.least_squares`.

Minimizes

    cost(x) = 1/2 sum_i C^2 rho((r_i(x) / C)^2)

over variables x in R^n (or a point of a manifold), where r is the
concatenation of the flattened residuals, rho a loss (rho(z) = z for plain
least squares) and C the loss scale. It runs the shared Levenberg-Marquardt
engine with, by default, a trust region in Marquardt's scaled norm
(`TrustRegionDamping`: D = running max of diag(J^T J), gain-ratio
acceptance), geodesic acceleration (Transtrum & Sethna 2012) and a refusal
of steps that make a Jacobian column vanish, and stops, in the graph, on the
first of:

- relative decrease of an accepted step <= function_tolerance,
- max_j |(J^T F)_j| / (||F|| ||J_j||) <= gradient_tolerance,
- ||s|| <= parameter_tolerance (||x|| + parameter_tolerance), once a finite
  step has been computed,
- cost <= cost_tolerance,
- max_iterations iterations.

Robust losses are solved exactly by Gauss-Newton on the transformed residual
r~ = r sqrt(w(z)), w(z) = rho(z) / z, z = (r / C)^2, whose squared norm is
the robust cost; w is smooth at 0 (w(0) = 1), so no derivative is singular.

    Loss       rho(z)
    linear     z
    huber      z if z <= 1 else 2 sqrt(z) - 1
    soft_l1    2 (sqrt(1 + z) - 1)
    cauchy     log(1 + z)
    arctan     arctan(z)
"""

import numpy as np
import tensorflow as tf

from tfg_optim import _engine
from tfg_optim import _implicit
from tfg_optim import damping as damping_lib
from tfg_optim import _validation
from tfg_optim import _vector_space
from tfg_optim import results as results_lib
from tfg_optim import stopping as stopping_lib

LOSSES = ("linear", "huber", "soft_l1", "cauchy", "arctan")

# Tolerances by dtype: (function, gradient, parameter).
# float64's function tolerance is 1e-16 (about one rounding unit of the cost):
# with 1e-14, large-residual problems that converge linearly (NIST ENSO: the
# gain ratio stays near 1/2) stopped with only 6 correct digits in a weakly
# determined parameter; the relative step test (1e-12) now ends most solves.
_DEFAULT_TOLERANCES = {tf.float64: (1e-16, 1e-14, 1e-12),
                       tf.float32: (1e-7, 1e-6, 1e-6)}


def _taylor_or(z, small, taylor, exact):
  """exact(z), with the Taylor expansion where z < small (safe gradients)."""
  is_small = z < small
  safe_z = tf.where(is_small, tf.ones_like(z), z)
  return tf.where(is_small, taylor(z), exact(safe_z))


def loss_weight(loss, z):
  """w(z) = rho(z) / z for the named loss, smooth at z = 0."""
  if loss == "linear":
    return tf.ones_like(z)
  if loss == "huber":
    safe_z = tf.where(z <= 1.0, tf.ones_like(z), z)
    return tf.where(z <= 1.0, tf.ones_like(z),
                    (2.0 * tf.sqrt(safe_z) - 1.0) / safe_z)
  if loss == "soft_l1":
    return 2.0 / (tf.sqrt(1.0 + z) + 1.0)
  if loss == "cauchy":
    return _taylor_or(z, 1e-4, lambda z: 1.0 - z / 2.0 + z * z / 3.0,
                      lambda z: tf.math.log1p(z) / z)
  if loss == "arctan":
    return _taylor_or(z, 1e-4, lambda z: 1.0 - z * z / 3.0,
                      lambda z: tf.atan(z) / z)
  raise ValueError(f"'loss' must be one of {LOSSES}, got {loss!r}.")


def damping_policy(damping):
  """A `DampingPolicy` from a name ('trust_region', 'nielsen', 'tfg',
  'manopt') or itself."""
  if isinstance(damping, damping_lib.DampingPolicy):
    return damping
  if damping == "trust_region":
    return damping_lib.TrustRegionDamping()
  if damping == "nielsen":
    return damping_lib.NielsenDamping()
  if damping == "tfg":
    return damping_lib.MultiplicativeDamping(1e-20, 10.0)
  if damping == "manopt":
    return damping_lib.GainRatioDamping(0.2, 0.1, 5.0, False)
  raise ValueError("'damping' must be 'trust_region', 'nielsen', 'tfg', "
                   f"'manopt' or a DampingPolicy, got {damping!r}.")


# Not converted by AutoGraph inside a caller's tf.function: the solver is
# explicit graph code (a tf.while_loop), and converting it only costs tracing.
@tf.autograph.experimental.do_not_convert
def least_squares(residuals, variables, *, manifold=None, batch_dims=0,
                  damping="trust_region", max_iterations=1000,
                  function_tolerance=None, gradient_tolerance=None,
                  parameter_tolerance=None, cost_tolerance=0.0,
                  stopping_criterion=None, loss="linear", loss_scale=1.0,
                  jacobian=None, bounds=None, geodesic_acceleration=2.0,
                  vanishing_column_tolerance=None, callback=None,
                  record=False, gradients="implicit",
                  implicit_hessian="gauss_newton", name="least_squares"):
  """Solves a nonlinear least-squares problem; returns its results.

  Args:
    residuals: a callable or a list/tuple of callables, each called as
      `residual(*variables)` (for a `Product` manifold point, with its
      factors); outputs are flattened and concatenated.
    variables: the start: a tensor, or a list/tuple of tensors (NumPy values
      and `tf.Variable`s are read); float32 or float64.
    manifold: None for Euclidean variables, or a `tfg_optim.manifolds`
      manifold of which `variables` is a point (a tuple for a `Product`).
    batch_dims: leading dimensions that index independent problems, each with
      its own damping, acceptance, counters and stop.
    damping: 'trust_region' (default; `TrustRegionDamping`, MINPACK's kind
      of method), 'nielsen' (`NielsenDamping`), 'tfg' (TensorFlow Graphics'
      rule), 'manopt' (Manopt's rule), or a `DampingPolicy`.
    max_iterations: the most iterations, an int >= 1.
    function_tolerance, gradient_tolerance, parameter_tolerance: relative
      tolerances (see the module docstring); None picks defaults for the
      dtype (float64: 1e-16, 1e-14, 1e-12; float32: 1e-7, 1e-6, 1e-6).
    cost_tolerance: stop when the cost is at most this (default 0).
    stopping_criterion: a `tfg_optim.stopping` criterion replacing all of the
      above but max_iterations.
    loss: 'linear', 'huber', 'soft_l1', 'cauchy' or 'arctan'.
    loss_scale: C > 0, the residual size where the loss turns robust.
    bounds: optional (lower, upper), each a number or an array broadcastable
      to the [B..., n] concatenated flattened variables (-inf / inf for no
      bound); lower < upper, and the start must lie within. Euclidean only.
      Each step is projected onto the box, and a coordinate at a bound whose
      gradient points out of the box is held fixed for that iteration (so
      the gradient tests see the projected gradient).
    vanishing_column_tolerance: tau >= 0, or None for sqrt(eps) of the dtype
      (0 turns it off). With a scaled policy ('trust_region', 'nielsen'), a
      step after which a Jacobian column that was nonzero has a norm below
      tau times its largest norm so far is refused: the step made a variable
      lose all influence (e.g. exp(-b x) underflowing for all data), and the
      stationary points there are degenerate plateaus.
    geodesic_acceleration: alpha > 0 (default 2), or None to turn it off.
      Each step v gets Transtrum's second-order correction a / 2, with
      (J^T J + lambda D) a = -J^T F''[v, v], and is taken only if
      2 ||a||_D / ||v||_D <= alpha; else it is rejected and lambda grows.
      This keeps steps where the model's curvature is small (it is what
      solves NIST BoxBOD from start 1). F''[v, v] costs one nested
      forward-mode product per iteration (with `jacobian`, one more residual
      evaluation: a finite difference).
    jacobian: optional callable `jacobian(*variables)` returning the
      [B..., m, n] Jacobian of the concatenated residuals w.r.t. the
      concatenated flattened variables (Euclidean only; with a robust loss it
      is chained with the loss automatically).
    callback: optional `callback(iteration, cost, variables)`; ops it returns
      run every iteration.
    record: False, True or an int: keep per-iteration histories (see
      `LeastSquaresResults.records`).
    gradients: how `position`, `cost` and `residual` are differentiated
      with respect to the tensors and variables the residuals capture:
      'implicit' (default; the implicit function theorem at the solution,
      one linear solve, the loop is not taped), 'unrolled' (the tape sees
      every iteration) or 'none' (no gradients). See docs/differentiation.md.
    implicit_hessian: 'gauss_newton' (default; H = J^T J, exact at
      zero-residual solutions) or 'exact' (second derivatives by nested
      tapes), the Hessian of the implicit gradients.
    name: name scope of the ops.

  Returns:
    `tfg_optim.results.LeastSquaresResults`; `position` has the structure of
    `variables`; `cost` and `residual` are of the robust (transformed)
    residual, so cost is 1/2 sum C^2 rho(z).

  Raises:
    ValueError / TypeError: for invalid arguments, naming the argument.
  """
  max_iterations = _validation.positive_int(max_iterations, "max_iterations")
  batch_dims = _validation.positive_int(batch_dims, "batch_dims", minimum=0)
  gradients = _implicit.check_gradients(gradients)
  implicit_hessian = _implicit.check_hessian(implicit_hessian)
  residuals = _validation.as_callable_list(residuals, "residuals")
  policy = damping_policy(damping)
  if loss not in LOSSES:
    raise ValueError(f"'loss' must be one of {LOSSES}, got {loss!r}.")
  loss_scale = _validation.real_number(loss_scale, "loss_scale", lower=0.0,
                                       lower_inclusive=False)
  cost_tolerance = _validation.real_number(cost_tolerance, "cost_tolerance",
                                           lower=0.0)
  if vanishing_column_tolerance is not None:
    vanishing_column_tolerance = _validation.real_number(
        vanishing_column_tolerance, "vanishing_column_tolerance", lower=0.0)
  if geodesic_acceleration is not None:
    geodesic_acceleration = _validation.real_number(
        geodesic_acceleration, "geodesic_acceleration", lower=0.0,
        lower_inclusive=False)
  for value, arg in ((jacobian, "jacobian"), (callback, "callback")):
    if value is not None and not callable(value):
      raise TypeError(f"'{arg}' must be callable, got {type(value).__name__}.")
  if jacobian is not None and manifold is not None:
    raise ValueError("'jacobian' is for Euclidean variables; with a manifold "
                     "use tfg_optim.riemannian.levenberg_marquardt.")
  if bounds is not None and manifold is not None:
    raise ValueError("'bounds' are for Euclidean variables, not a manifold.")
  single = not isinstance(variables, (list, tuple))
  if manifold is None and not single and not variables:
    raise ValueError("'variables' must not be empty.")

  with tf.name_scope(name):
    if manifold is None:
      tensors = _validation.float_tensors(
          [variables] if single else list(variables), "variables",
          batch_dims=batch_dims)
      point = tensors
    else:
      point = tf.nest.map_structure(tf.convert_to_tensor, variables)
      tensors = _validation.float_tensors(tf.nest.flatten(point), "variables",
                                          batch_dims=batch_dims)
      if tf.executing_eagerly():
        manifold.check_point(point)
    _validation.check_batch_shapes(tensors, batch_dims, "variables")
    tensors = _validation.check_finite(tensors, "variables")
    point = tf.nest.pack_sequence_as(point, tensors)
    dtype = tensors[0].dtype
    vanishing_tolerance = (
        float(np.sqrt(np.finfo(dtype.as_numpy_dtype).eps))
        if vanishing_column_tolerance is None else vanishing_column_tolerance)
    criterion = _criterion(dtype, max_iterations, function_tolerance,
                           gradient_tolerance, parameter_tolerance,
                           cost_tolerance, stopping_criterion)

    stack = _vector_space.ResidualStack(residuals, dtype, batch_dims)
    evaluate = lambda p: stack(tf.nest.flatten(p))
    scale = tf.constant(loss_scale, dtype)

    def robust(residual):
      if loss == "linear":
        return residual
      z = tf.square(residual / scale)
      return residual * tf.sqrt(loss_weight(loss, z))

    jacobian_fn = None
    if jacobian is not None:
      def jacobian_fn(p):
        value = tf.convert_to_tensor(jacobian(*tf.nest.flatten(p)), dtype)
        if loss == "linear":
          return value
        residual = evaluate(p)
        with tf.GradientTape() as tape:
          tape.watch(residual)
          transformed = robust(residual)
        derivative = tape.gradient(transformed, residual)  # elementwise
        return derivative[..., tf.newaxis] * value

    fixed_fn = None
    if manifold is None:
      shapes = _vector_space.event_shapes(tensors, batch_dims)
      retract = lambda p, s: _vector_space.retract(p, s, batch_dims)
      tangent_dim = sum(_vector_space.sizes(shapes))
      if bounds is not None:
        point, retract, fixed_fn = _box(bounds, point, batch_dims, shapes)
    else:
      retract, tangent_dim = manifold.retract, manifold.dim
    if tangent_dim == 0:
      raise ValueError("'variables' must have at least one entry per "
                       "problem.")
    initial_residual = None
    if jacobian is None:  # Residuals must depend on the variables.
      initial_residual = robust(tf.concat(_validation.connected_outputs(
          lambda: stack.pieces(tf.nest.flatten(point)), point, stack.names()),
                                          axis=-1))
    problem = _engine.Problem(
        residual_fn=lambda p: robust(evaluate(p)), retract=retract,
        tangent_dim=tangent_dim, cost_fn=None, jacobian_fn=jacobian_fn,
        fixed_fn=fixed_fn)
    num_records = 0
    if record:
      num_records = max_iterations if isinstance(record, bool) else int(record)
    engine_callback = None
    if callback is not None:
      engine_callback = (lambda it, cost, p:
                         callback(it, cost, tf.nest.flatten(p)))
    state = _implicit.solve_untaped(lambda: _engine.minimize(
        problem, point, policy, max_iterations, stopping=criterion,
        callback=engine_callback, num_records=num_records,
        initial_residual=initial_residual, initial_residual_evaluations=1,
        geodesic_acceleration=geodesic_acceleration,
        vanishing_column_tolerance=vanishing_tolerance), gradients)
    result = results_lib.from_state(state, num_records, criterion)
    if gradients == "implicit":  # coordinates: x + c, unclipped by bounds
      result = _implicit.attach_least_squares(
          result, state.jacobian, problem.residual_fn,
          (manifold.retract if manifold is not None else
           lambda p, s: _vector_space.retract(p, s, batch_dims)),
          (manifold.coordinates if manifold is not None else
           lambda p, v: tf.concat([_vector_space.flatten_batched(
               t, batch_dims) for t in v], axis=-1)),
          (manifold.tangent_vector if manifold is not None else
           lambda p, c: _vector_space.split_step(c, shapes)),
          implicit_hessian)
    position = result.position
    if manifold is None:
      position = position[0] if single else type(variables)(position)
    return result._replace(position=position)


def _box(bounds, point, batch_dims, shapes):
  """(point, retract, fixed_fn) for box bounds on the flattened variables;
  the point is the start, checked against the bounds.

  retract(x, s) = clip(x + s, lower, upper); fixed_fn marks coordinates at
  a bound whose gradient g = J^T r points out of the box (x_j <= lower_j and
  g_j > 0, or x_j >= upper_j and g_j < 0): the descent direction -g would
  leave the box there.
  """
  if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
    raise ValueError("'bounds' must be a pair (lower, upper), got "
                     f"{bounds!r}.")
  dtype = point[0].dtype
  flatten = lambda p: tf.concat(
      [_vector_space.flatten_batched(t, batch_dims) for t in p], axis=-1)
  start = flatten(point)
  try:
    lower, upper = (tf.broadcast_to(tf.cast(b, dtype), tf.shape(start))
                    for b in bounds)
  except (TypeError, ValueError, tf.errors.InvalidArgumentError) as error:
    raise ValueError("'bounds' must be broadcastable to the [B..., n] "
                     f"flattened variables: {error}") from None
  if tf.executing_eagerly():
    if np.any(np.isnan(lower.numpy())) or np.any(np.isnan(upper.numpy())):
      raise ValueError("'bounds' must not contain NaN.")
    if not np.all(lower.numpy() < upper.numpy()):
      raise ValueError("'bounds' must have lower < upper everywhere.")
    if not np.all((lower.numpy() <= start.numpy()) &
                  (start.numpy() <= upper.numpy())):
      raise ValueError("'variables' must lie within 'bounds'.")
  else:  # Checked when the graph runs (XLA drops the checks).
    checks = [
        tf.debugging.assert_less(
            lower, upper, message="'bounds' must have lower < upper"),
        tf.debugging.assert_less_equal(
            lower, start, message="'variables' must lie within 'bounds'"),
        tf.debugging.assert_less_equal(
            start, upper, message="'variables' must lie within 'bounds'")]
    with tf.control_dependencies(checks):
      point = [tf.identity(t) for t in point]

  def retract(p, step):
    moved = tf.clip_by_value(flatten(p) + step, lower, upper)
    return _vector_space.split_step(moved, shapes)

  def fixed_fn(p, gradient):
    x = flatten(p)
    return (((x <= lower) & (gradient > 0)) |
            ((x >= upper) & (gradient < 0)))

  return point, retract, fixed_fn


def _criterion(dtype, max_iterations, function_tolerance, gradient_tolerance,
               parameter_tolerance, cost_tolerance, stopping_criterion):
  """The stopping criterion: the caller's, or the tolerances' (by dtype)."""
  limit = stopping_lib.StopAfterIteration(max_iterations)
  if stopping_criterion is not None:
    if not isinstance(stopping_criterion, stopping_lib.StoppingCriterion):
      raise TypeError("'stopping_criterion' must be a tfg_optim.stopping "
                      f"criterion, got {type(stopping_criterion).__name__}.")
    return limit | stopping_criterion
  defaults = _DEFAULT_TOLERANCES[dtype]
  tolerances = [
      defaults[i] if value is None else _validation.real_number(
          value, arg, lower=0.0)
      for i, (value, arg) in enumerate(
          ((function_tolerance, "function_tolerance"),
           (gradient_tolerance, "gradient_tolerance"),
           (parameter_tolerance, "parameter_tolerance")))]
  criterion = (limit |
               stopping_lib.StopWhenRelativeCostChangeLess(tolerances[0]) |
               stopping_lib.StopWhenGradientCosineLess(tolerances[1]) |
               stopping_lib.StopWhenRelativeStepLess(tolerances[2]))
  if cost_tolerance > 0:
    criterion = criterion | stopping_lib.StopWhenCostLess(cost_tolerance)
  return criterion

