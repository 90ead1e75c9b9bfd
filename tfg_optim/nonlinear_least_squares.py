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
- cost < cost_tolerance,
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

from tfg_optim import _chunked
from tfg_optim import _distributed
from tfg_optim import _eager
from tfg_optim import _engine
from tfg_optim import _implicit
from tfg_optim import _linear_solvers
from tfg_optim import _linearization
from tfg_optim import damping as damping_lib
from tfg_optim import _validation
from tfg_optim import _vector_space
from tfg_optim import results as results_lib
from tfg_optim import stopping as stopping_lib

LOSSES = ("linear", "huber", "soft_l1", "cauchy", "arctan")
LINEAR_SOLVERS = ("auto", "dense", "cg")

# linear_solver="auto" picks the dense solvers up to this many parameters per
# problem and matrix-free conjugate gradients beyond: a dense n x n J^T J
# costs 8 n^2 bytes (32 MB at n = 2048) and n^3 / 3 flops per factorization,
# while conjugate gradients cost two residual-sized products per iteration.
AUTO_DENSE_LIMIT = 2048

# Tolerances by dtype: (function, gradient, parameter).
# float64's function tolerance is 1e-16 (about one rounding unit of the cost):
# with 1e-14, large-residual problems that converge linearly (NIST ENSO: the
# gain ratio stays near 1/2) stopped with only 6 correct digits in a weakly
# determined parameter; the relative step test (1e-12) now ends most solves.
_DEFAULT_TOLERANCES = {tf.float64: (1e-16, 1e-14, 1e-12),
                       tf.float32: (1e-7, 1e-6, 1e-6)}


class _DefaultAcceleration(float):
  """The default alpha = 2 of `geodesic_acceleration`, told apart from a
  value the caller passed: with `data_chunk_size` the default turns
  geodesic acceleration off, an explicit value is an error."""


_DEFAULT_ACCELERATION = _DefaultAcceleration(2.0)


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


def damping_policy(damping, matrix_free=False):
  """A `DampingPolicy` from a name ('trust_region', 'nielsen', 'tfg',
  'manopt') or itself. `matrix_free`: for the matrix-free solver's steps
  (Steihaug's for the trust region), where 'trust_region' grows its radius
  only above the gain ratio `damping.MATRIX_FREE_EXPAND_THRESHOLD` (see
  `TrustRegionDamping`)."""
  if isinstance(damping, damping_lib.DampingPolicy):
    return damping
  if damping == "trust_region":
    if matrix_free:
      return damping_lib.TrustRegionDamping(
          expand_threshold=damping_lib.MATRIX_FREE_EXPAND_THRESHOLD)
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
                  jacobian=None, bounds=None,
                  geodesic_acceleration=_DEFAULT_ACCELERATION,
                  vanishing_column_tolerance=None, linear_solver="auto",
                  inexact_steps=False, column_groups=None, data=None,
                  data_chunk_size=None,
                  strategy=None, jit_compile_replicas=False, callback=None,
                  record=False,
                  gradients="implicit", implicit_hessian="gauss_newton",
                  eager_compile="auto", name="least_squares"):
  """Solves a nonlinear least-squares problem; returns its results.

  Args:
    residuals: a callable or a list/tuple of callables, each called as
      `residual(*variables)` (for a `Product` manifold point, with its
      factors; with `data`, `residual(*variables, *data)`); outputs are
      flattened and concatenated.
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
    cost_tolerance: stop when the cost is below this (default 0: off).
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
      evaluation: a finite difference). Off by default with
      `data_chunk_size` (an explicit value is then an error) and with the
      matrix-free solver ('cg', or 'auto' choosing it; an explicit value
      applies it there: a second conjugate-gradient solve per iteration,
      which about doubled the CG iterations for the same iterations on the
      smooth-TV denoising of docs/large_scale.md).
    linear_solver: 'dense' (the Jacobian as a [B..., m, n] tensor; Cholesky
      of the damped normal equations or of their dual form, or the trust
      region's eigendecomposition), 'cg' (matrix-free: J is never formed;
      J v and J^T u are one forward- and one reverse-mode product each, and
      the step is solved by Jacobi-preconditioned conjugate gradients,
      Steihaug's truncated version for the trust region; memory O(m + n)),
      or 'auto' (default): 'dense' for n <= 2048 parameters per problem or
      with a `jacobian`, else 'cg'. With 'cg', Marquardt's scaling and the
      preconditioner use diag(J^T J) estimated from 8 products J^T z
      (fixed Rademacher probes), and the vanishing-column refusal is off;
      damping='trust_region' there grows the radius only above a gain ratio
      of 0.9 instead of 3/4 (`TrustRegionDamping(expand_threshold=0.9)`;
      pass `TrustRegionDamping()` for 3/4).
    inexact_steps: with the matrix-free solver ('cg', or 'auto' choosing
      it) only: False (default) solves each step's system by conjugate
      gradients to the fixed relative tolerance 1e-6; True stops them at
      the inexact-Newton forcing term eta = min(0.5, sqrt(||J^T F||))
      (Nocedal & Wright, Algorithm 7.1/7.2; never tighter than 1e-6):
      fewer CG iterations per iteration, at the price of more iterations
      where the problem is nearly linear (docs/large_scale.md has both).
    column_groups: with the matrix-free solver only: None (default:
      diag(J^T J) estimated from 8 probes), or n integers (a list or
      NumPy array, n the parameters per problem in the variables' order,
      flattened), the group 0..G-1 of each Jacobian column, where no
      residual depends on two columns of one group (a coloring of the
      columns, e.g. scipy's `group_columns` of a sparsity pattern; 3 groups
      for a 2-D total-variation stencil): diag(J^T J), Marquardt's scaling
      and the Jacobi preconditioner, is then exact, from G products J v
      and G products J^T u per iteration (docs/large_scale.md). A grouping
      that is not structurally orthogonal is not detected as such: column
      j's entry is then J_j^T (the sum of its group's columns), wrong by
      the other columns' products. Where that is 0 or less, the 8-probe
      estimate replaces it (8 more products J^T u at that point); a wrong
      positive entry stays and misscales Marquardt's D and the
      preconditioner (other iterates, the same minimum) and the default
      gradient-cosine stopping test, which divides by sqrt(||J_j||^2)
      (it fires early where the entry is too large). Implicit gradients
      take the held coordinates from the bounds and exact zero-column
      tests, never from these entries.
    data: optional tensor or list/tuple of tensors (the data of a fit) with
      a shared leading dimension N, passed to every residual after the
      variables. Without `data_chunk_size`, the residuals are called once
      with all of them (the same solve as closing over them). Or a finite
      `tf.data.Dataset` of batches (elements: a tensor or a tuple of
      tensors with a leading batch dimension; with `strategy`, also a
      `tf.distribute.DistributedDataset` it made): each batch is a chunk,
      summed as with `data_chunk_size` (which must then be None: the
      batching is the chunking), each pass iterating the dataset once. An
      infinite or empty dataset raises naming 'data' (eagerly; in graphs
      when a pass runs); not under XLA, not with `batch_dims`, no
      gradients (differentiating the results raises unless
      gradients='none'; see docs/distributed.md, Data as a
      `tf.data.Dataset`).
    data_chunk_size: optional int K >= 1 (needs `data`): the residuals are
      called on chunks of K rows of the data (the last chunk has N mod K
      rows) and must return the residuals of those rows. J is built one
      chunk at a time and J^T J, J^T F and the cost are summed over chunks,
      so memory is O(K n + n^2) whatever N is: a candidate costs one pass of
      residual evaluations over the chunks, a relinearization one pass of
      residuals and Jacobians. Dense solvers only; not with `batch_dims`,
      `jacobian`, linear_solver='cg' or `geodesic_acceleration` (off by
      default here). N may be unknown while tracing, not under XLA. The
      results' `residual` is then the [1] vector ||F|| = sqrt(2 cost), and
      `num_residuals` the number of residuals over all chunks.
    strategy: optional `tf.distribute.MirroredStrategy` or
      `MultiWorkerMirroredStrategy` (needs `data`): the data rows are split
      into one contiguous shard per replica, each replica sums its shard's
      J^T [J | F] and cost (over chunks of `data_chunk_size` rows, if given)
      and the sums are all-reduced, so every replica and worker takes the
      same steps (see docs/distributed.md). The same limits and `residual`
      as with `data_chunk_size`; implicit gradients as with
      `data_chunk_size`, their backward pass over the replicas with one
      all-reduce over workers (docs/differentiation.md;
      gradients='unrolled' is an error); an eager call runs compiled.
      Every worker calls with the same arguments. With `batch_dims` > 0,
      the independent problems are split over the replicas instead (the
      leading batch dimension of `variables` and of every `data` tensor),
      solved with no communication, and gathered (no gradients:
      differentiating the results raises unless gradients='none'). An
      eager tape over a MultiWorkerMirroredStrategy solve whose residuals
      capture tensors or variables raises (take the gradient in a
      `tf.function`).
    jit_compile_replicas: False (default) or True (needs `strategy`; not
      with `batch_dims`): each replica's passes over its shard (the sum
      of J^T [J | F] and the cost over its chunks, and the cost-only sum;
      with a dataset, each batch's terms) run as one XLA computation
      (`tf.function(jit_compile=True)` inside `strategy.run`); the
      all-reduces and the loop stay outside XLA. The residual must be
      XLA-compilable, and the `tf.Variable`s it captures made under
      `strategy.scope()`. Results equal the plain distributed solve up to
      rounding (XLA's own exp, sin, ... and fused sums). Slower on the
      CPUs measured (docs/distributed.md).
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
      tapes), the Hessian of the implicit gradients. With
      linear_solver='cg' (J^T J w = rhs solved by conjugate gradients) or
      `data_chunk_size` (the summed J^T J, and one more pass over the
      chunks; theta: the data, and the tensors and variables the residuals
      capture) only 'gauss_newton', reverse mode only.
    eager_compile: what an eager call does (no effect inside `tf.function`
      or a graph). 'auto' (default): the first call with a given problem
      runs op by op (if it is still running after
      `_eager.TRIAL_ITERATIONS` = 10 iterations, it is compiled and solved
      again from the start), and later calls with the same problem (the
      same residual functions with the same captured values, the same
      options; see `tfg_optim._eager`) run a `tf.function` traced once, in
      milliseconds; the start and `data` may change between calls. True:
      compile from the first call. False: always op by op, for
      step-by-step debugging. With a `callback`, 'auto' runs op by op (the
      callback sees eager tensors).
    name: name scope of the ops.

  Returns:
    `tfg_optim.results.LeastSquaresResults`; `position` has the structure of
    `variables`; `cost` and `residual` are of the robust (transformed)
    residual, so cost is 1/2 sum C^2 rho(z).

  Raises:
    ValueError / TypeError: for invalid arguments, naming the argument.
  """
  if isinstance(data, _chunked.DATASETS):
    gradients = _check_dataset(data, data_chunk_size, strategy, batch_dims,
                               gradients)
  jit_compile_replicas = _distributed.check_jit_compile_replicas(
      jit_compile_replicas, strategy, batch_dims)
  if strategy is not None:  # Validated first: it decides how to run.
    arguments = dict(locals())
    gradients = _distributed.check_strategy(strategy, gradients,
                                            eager_compile)
    if batch_dims:  # Independent problems: split over the replicas
      # (no gradients through the split: its outputs are stopped).
      result = _distributed.split_batch(strategy, lambda part, part_data: (
          least_squares(**dict(arguments, variables=part, data=part_data,
                               strategy=None, gradients="none",
                               eager_compile=False))), variables, data)
      if gradients == "none":
        return result
      flat_data = [] if data is None else tf.nest.flatten(data)
      return _refuse_gradients(
          result, _validation.as_callable_list(residuals, "residuals"),
          [tf.convert_to_tensor(t) for t in tf.nest.flatten(variables)],
          [tf.convert_to_tensor(t) for t in flat_data],
          "'strategy' with 'batch_dims' > 0 (a batch split over the "
          "replicas)")
  if _eager.wanted(eager_compile, callback) or (strategy is not None and
                                                tf.executing_eagerly()):
    options = dict(
        manifold=manifold, batch_dims=batch_dims, damping=damping,
        max_iterations=max_iterations, function_tolerance=function_tolerance,
        gradient_tolerance=gradient_tolerance,
        parameter_tolerance=parameter_tolerance,
        cost_tolerance=cost_tolerance, stopping_criterion=stopping_criterion,
        loss=loss, loss_scale=loss_scale, jacobian=jacobian, bounds=bounds,
        geodesic_acceleration=geodesic_acceleration,
        vanishing_column_tolerance=vanishing_column_tolerance,
        linear_solver=linear_solver, inexact_steps=inexact_steps,
        column_groups=column_groups, data_chunk_size=data_chunk_size, strategy=strategy,
        jit_compile_replicas=jit_compile_replicas, callback=callback,
        record=record,
        gradients=gradients, implicit_hessian=implicit_hessian, name=name)
    if strategy is not None and isinstance(data, tf.data.Dataset):
      # Distributed here, eagerly (where TF knows its options and
      # cardinality), and passed to the compiled solve as an argument.
      data, _ = _distributed.distribute_dataset(strategy, data)
    solve = _compiled_solve(residuals, variables, data, options,
                            eager_compile is True or strategy is not None)
    if strategy is not None:
      return _distributed.naming_workers(strategy, solve)
    if isinstance(solve, _eager.FirstCall):
      return _eager.run_first_call(solve, lambda: least_squares(
          residuals, variables, data=data, eager_compile=False, **options))
    if solve is not None:
      return solve()
  trial_cap = _eager.claim_trial()  # (before any residual runs)
  max_iterations = _validation.positive_int(max_iterations, "max_iterations")
  batch_dims = _validation.positive_int(batch_dims, "batch_dims", minimum=0)
  gradients = _implicit.check_gradients(gradients)
  implicit_hessian = _implicit.check_hessian(implicit_hessian)
  residuals = _validation.as_callable_list(residuals, "residuals")
  dataset = data if isinstance(data, _chunked.DATASETS) else None
  data = [] if dataset is not None else _data(data, data_chunk_size,
                                              strategy)
  chunked = (data_chunk_size is not None or strategy is not None or
             dataset is not None)
  if chunked:
    if data_chunk_size is not None:
      data_chunk_size = _validation.positive_int(data_chunk_size,
                                                 "data_chunk_size")
    by = ("'data' as a dataset" if dataset is not None else
          "'strategy'" if data_chunk_size is None else "'data_chunk_size'")
    for value, default, arg in ((batch_dims, 0, "batch_dims"),
                                (jacobian, None, "jacobian"),
                                (linear_solver == "cg", False,
                                 "linear_solver='cg'")):
      if value != default:
        raise ValueError(f"{by} does not support '{arg}': the "
                         "Jacobian is summed chunk by chunk into J^T J "
                         "(dense solvers, one problem).")
    if geodesic_acceleration is not None:
      if not isinstance(geodesic_acceleration, _DefaultAcceleration):
        raise ValueError(f"{by} does not support "
                         "'geodesic_acceleration' (F''[v, v] over all "
                         "chunks); pass geodesic_acceleration=None.")
      geodesic_acceleration = None
  if data:
    residuals = [_bind_data(residual, data) for residual in residuals]
    if jacobian is not None:
      jacobian = _bind_data(jacobian, data)
  policy = damping_policy(damping)
  if loss not in LOSSES:
    raise ValueError(f"'loss' must be one of {LOSSES}, got {loss!r}.")
  if linear_solver not in LINEAR_SOLVERS:
    raise ValueError(f"'linear_solver' must be one of {LINEAR_SOLVERS}, got "
                     f"{linear_solver!r}.")
  if linear_solver == "cg" and jacobian is not None:
    raise ValueError("'jacobian' gives a dense Jacobian; linear_solver='cg' "
                     "is matrix-free. Use linear_solver='dense' or drop "
                     "'jacobian'.")
  if not isinstance(inexact_steps, bool):
    raise TypeError("'inexact_steps' must be True or False, got "
                    f"{inexact_steps!r}.")
  loss_scale = _validation.real_number(loss_scale, "loss_scale", lower=0.0,
                                       lower_inclusive=False)
  cost_tolerance = _validation.real_number(cost_tolerance, "cost_tolerance",
                                           lower=0.0)
  if vanishing_column_tolerance is not None:
    vanishing_column_tolerance = _validation.real_number(
        vanishing_column_tolerance, "vanishing_column_tolerance", lower=0.0)
  default_acceleration = isinstance(geodesic_acceleration,
                                    _DefaultAcceleration)
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

    if chunked:
      # Called with a chunk: the residuals take it as trailing arguments.
      chunk_residuals = ([residual.unbound for residual in residuals]
                         if dataset is None else residuals)
      if dataset is None:  # The first row, for the checks.
        residuals = [_bind_data(residual, [tf.gather(t, [0]) for t in data])
                     for residual in chunk_residuals]
      else:  # Checked on a traced (never run) batch of the dataset's spec.
        _check_dataset_residuals(chunk_residuals, point, dataset, dtype)
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
    matrix_free = uses_matrix_free(linear_solver, jacobian is not None,
                                   tangent_dim)
    if matrix_free and default_acceleration:
      # Its second conjugate-gradient solve per iteration doubled the CG
      # iterations for the same iterations (docs/large_scale.md).
      geodesic_acceleration = None
    if column_groups is not None:
      column_groups = np.asarray(column_groups)
      if (not (matrix_free and not chunked) or
          column_groups.shape != (tangent_dim,) or
          not np.issubdtype(column_groups.dtype, np.integer) or
          np.min(column_groups) < 0):
        raise ValueError(
            "'column_groups' needs the matrix-free solver (linear_solver="
            f"'cg', without chunked data) and {tangent_dim} non-negative "
            f"integers, one per parameter; got {column_groups!r}.")
    policy = damping_policy(damping, matrix_free and not chunked)
    if inexact_steps and not (matrix_free and not chunked):
      raise ValueError("'inexact_steps' is a rule of the matrix-free "
                       "conjugate-gradient solves: it needs linear_solver="
                       "'cg' (or 'auto' above "
                       f"{AUTO_DENSE_LIMIT} parameters per problem), "
                       "without 'jacobian' or chunked data.")
    # (A dataset solve is never differentiated: its gradient refuses, below.)
    if (gradients == "implicit" and implicit_hessian == "exact" and
        (matrix_free or chunked) and dataset is None):
      raise ValueError("implicit_hessian='exact' needs the dense Jacobian: "
                       "not with linear_solver='cg' or 'data_chunk_size' "
                       "(use 'gauss_newton', or gradients='unrolled').")
    initial_residual = None
    # Residuals must depend on the variables (a derivative that exists). In
    # graphs the check rides on the one trace of F and its Jacobian-vector
    # product that the Jacobian needs anyway (below).
    check_in_forward_trace = (jacobian is None and not chunked and
                              not tf.executing_eagerly())
    if (jacobian is None and not check_in_forward_trace and
        dataset is None):  # (A dataset's residuals: checked above.)
      initial_residual = robust(tf.concat(_validation.connected_outputs(
          lambda: stack.pieces(tf.nest.flatten(point)), point, stack.names()),
                                          axis=-1))
    elif check_in_forward_trace:
      initial_residual = robust(evaluate(point))
    residual_fn = lambda p: robust(evaluate(p))
    kind = None
    if chunked:  # The first row checked the residuals; now the passes.
      def chunk_residual(p, chunk):
        chunk_stack = _vector_space.ResidualStack(
            [_bind_data(residual, chunk) for residual in chunk_residuals],
            dtype, 0)
        return robust(chunk_stack(tf.nest.flatten(p)))
      pass_data, captures = data, None
      if gradients != "unrolled" and dataset is None:
        if gradients == "implicit":  # Forward mode refused before any pass.
          captures = _implicit.chunked_captures(chunk_residual, point, data,
                                                data_chunk_size)
        # The passes see the data stopped: no tape or accumulator of the
        # caller watches what the loop's tf.conds capture (a persistent tape
        # would differentiate each of them while tracing).
        pass_data = [_implicit.stop(t) for t in data]
      if strategy is None:
        kind = _chunked.ChunkedKind(
            chunk_residual, retract, tangent_dim,
            pass_data if dataset is None else _chunked.DatasetChunks(dataset),
            data_chunk_size, dtype)
      else:
        kind = _distributed.DistributedKind(
            chunk_residual, retract, tangent_dim,
            pass_data if dataset is None else dataset, data_chunk_size, dtype,
            strategy, jit_compile_replicas)
      initial_residual = kind.residual_norm(point)
      residual_fn = kind.residual_norm
    problem = _engine.Problem(
        residual_fn=residual_fn, retract=retract,
        tangent_dim=tangent_dim, cost_fn=None, jacobian_fn=jacobian_fn,
        fixed_fn=fixed_fn)
    if check_in_forward_trace:
      problem = problem._replace(
          forward_product=_linearization.traced_forward_product(
              problem, check=lambda depends, _: _validation.require_connected(
                  [depends(piece) for piece in stack.last_pieces],
                  stack.names())))
      # Traces F and its derivative now (the check raises here); the
      # Jacobian's products reuse this trace, and nothing reads this call.
      zero = tf.zeros(tf.concat([tf.shape(initial_residual)[:-1],
                                 [tangent_dim]], 0), dtype)
      problem.forward_product(point, zero, tf.ones_like(zero))
    if inexact_steps or column_groups is not None:
      kind = _linearization.MatrixFreeKind(problem,
                                           inexact_steps=inexact_steps,
                                           column_groups=column_groups)
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
        vanishing_column_tolerance=vanishing_tolerance,
        matrix_free=matrix_free, kind=kind, trial_cap=trial_cap), gradients)
    result = results_lib.from_state(state, num_records, criterion)
    if chunked:
      # Static where the chunks' shapes are: no evaluation then.
      result = result._replace(num_residuals=kind.count(point))
    flat_coordinates = lambda p, v: tf.concat(
        [_vector_space.flatten_batched(t, batch_dims) for t in v], axis=-1)
    if gradients == "implicit" and dataset is not None:
      result = _refuse_gradients(
          result, chunk_residuals, tf.nest.flatten(point),
          _chunked.row_specs(dataset.element_spec),
          "'data' as a tf.data.Dataset")
    elif gradients == "implicit" and chunked:
      result = _implicit.attach_chunked(
          result, state.linearization[0], chunk_residual, retract,
          manifold.coordinates if manifold is not None else flat_coordinates,
          data, data_chunk_size, fold=None if strategy is None else kind.fold,
          captures=captures)
    elif gradients == "implicit" and matrix_free:
      result = _implicit.attach_matrix_free(
          result, state.linearization, problem,
          manifold.coordinates if manifold is not None else flat_coordinates)
    elif gradients == "implicit":  # coordinates: x + c, unclipped by bounds
      result = _implicit.attach_least_squares(
          result, state.linearization[0], problem.residual_fn,
          (manifold.retract if manifold is not None else
           lambda p, s: _vector_space.retract(p, s, batch_dims)),
          (manifold.coordinates if manifold is not None else
           flat_coordinates),
          (manifold.tangent_vector if manifold is not None else
           lambda p, c: _vector_space.split_step(c, shapes)),
          implicit_hessian)
    position = result.position
    if manifold is None:
      position = position[0] if single else type(variables)(position)
    return result._replace(position=position)


def _data(data, data_chunk_size, strategy=None):
  """The list of data tensors (empty for None), checked: a shared leading
  dimension N (where known while tracing, else when the graph runs)."""
  if data is None:
    for value, arg in ((data_chunk_size, "data_chunk_size"),
                       (strategy, "strategy")):
      if value is not None:
        raise ValueError(f"'{arg}' needs 'data' (the tensors to split "
                         "into chunks or shards).")
    return []
  tensors = list(data) if isinstance(data, (list, tuple)) else [data]
  if not tensors:
    raise ValueError("'data' must not be empty.")
  try:
    tensors = [tf.convert_to_tensor(t) for t in tensors]
  except (TypeError, ValueError) as error:
    raise TypeError(f"'data' must be tensors: {error}") from None
  for index, tensor in enumerate(tensors):
    if tensor.shape.rank == 0:
      raise ValueError(f"'data[{index}]' must have a leading dimension N "
                       "(rows), got a scalar.")
  lengths = [t.shape[0] if t.shape.rank is not None else None
             for t in tensors]
  known = [n for n in lengths if n is not None]
  if len(set(known)) > 1:
    raise ValueError("'data' tensors must share their leading dimension N, "
                     f"got {lengths}.")
  if ((data_chunk_size is not None or strategy is not None) and
      any(t.shape.rank is None for t in tensors)):
    raise ValueError("'data' tensors need a known rank with "
                     "'data_chunk_size' or 'strategy'.")
  if len(tensors) > 1 and len(known) < len(tensors):
    checks = [tf.debugging.assert_equal(
        tf.shape(t)[0], tf.shape(tensors[0])[0],
        message="'data' tensors must share their leading dimension N")
              for t in tensors[1:]]
    with tf.control_dependencies(checks):
      tensors = [tf.identity(t) for t in tensors]
  return tensors


def _check_dataset(dataset, data_chunk_size, strategy, batch_dims,
                   gradients):
  """The `gradients` mode of a solve whose `data` is a dataset, after the
  checks: 'none', or 'implicit', which is not offered (the outputs are
  stopped) and raises when differentiated (`_refuse_gradients`).

  Raises:
    TypeError / ValueError naming the argument: `data_chunk_size` given (the
    dataset's batches are the chunks), `batch_dims`, a distributed dataset
    without `strategy`, XLA, gradients='unrolled', elements that are not
    a tensor or a tuple of tensors with a leading dimension, and (where known
    now) an infinite or empty dataset.
  """
  if data_chunk_size is not None:
    raise ValueError("'data_chunk_size' must be None when 'data' is a "
                     "tf.data.Dataset: its batches are the chunks (re-batch "
                     "it, e.g. dataset.rebatch(K) or unbatch().batch(K), for "
                     "another chunk size).")
  if batch_dims:
    raise ValueError("'data' as a tf.data.Dataset does not support "
                     "'batch_dims' (one problem over all batches).")
  if (isinstance(dataset, tf.distribute.DistributedDataset) and
      strategy is None):
    raise ValueError("'data' is a distributed dataset: pass the 'strategy' "
                     "that made it.")
  if _linear_solvers.in_xla():
    raise ValueError("'data' as a tf.data.Dataset cannot be iterated under "
                     "XLA (jit_compile=True): call the solve in a plain "
                     "tf.function, or pass the data as tensors with "
                     "'data_chunk_size'.")
  gradients = _implicit.check_gradients(gradients)
  if gradients == "unrolled":
    raise ValueError("'data' as a tf.data.Dataset does not support "
                     "gradients='unrolled'; pass gradients='none' (no "
                     "gradients flow through a dataset solve).")
  _chunked.check_dataset(dataset)
  return gradients


def _refuse_gradients(results, residuals, variables, data, solve):
  """`results` whose position, cost and residual raise NotImplementedError
  naming `solve` (a solve that offers no gradients) when differentiated
  with respect to the floating `data` tensors or the tensors and
  `tf.Variable`s the `residuals` capture: a custom gradient that raises, so
  a tape or `tf.gradients` fails where it would silently get None, and a
  `tf.function` that takes no gradient runs. (Eagerly, a tape recording
  the compiled solve of an eager call builds its backward pass at the
  call: the error comes then.)

  Args:
    variables: the flat variables (tensors) the residuals take first.
    data: the flat data tensors they take after them, or their
      `tf.TensorSpec`s (a dataset's rows: no gradient to refuse).
  """
  if not _implicit._needed():  # pylint: disable=protected-access
    return results

  def traced(*args):
    return [residual(*args) for residual in residuals]

  specs = [t if isinstance(t, tf.TensorSpec) else
           tf.TensorSpec(t.shape, t.dtype) for t in variables + data]
  graph = tf.function(traced, autograph=False).get_concrete_function(
      *specs).graph
  live = ([t for t in data if tf.is_tensor(t) and t.dtype.is_floating] +
          [t for t in graph.external_captures if t.dtype.is_floating] +
          [tf.convert_to_tensor(v) for v in graph.variables])
  if not live:
    return results
  flat_position = tf.nest.flatten(results.position)
  count = len(flat_position)

  def backward(upstream):
    del upstream
    raise NotImplementedError(
        f"least_squares with {solve} has no gradients (its outputs are "
        "constants), yet one was asked of a tensor or tf.Variable that its "
        "data or residuals depend on. Pass gradients='none' to say that "
        "none is wanted (then the tape gets None), or differentiate a "
        "solve without it.")

  identity = _implicit._identity_with_gradient  # pylint: disable=W0212
  outputs = identity(flat_position + [results.residual, results.cost], live,
                     backward)
  return results._replace(
      position=tf.nest.pack_sequence_as(results.position, outputs[:count]),
      residual=outputs[count], cost=outputs[count + 1])


def _check_dataset_residuals(residuals, point, dataset, dtype):
  """The residuals' checks (dtype, shapes, dependence on the variables, as
  for a first row of data tensors) on a batch of the dataset's element spec,
  in a scratch trace that never runs: no element is read (an empty dataset
  fails later, in the pass that finds it empty)."""
  flat = tf.nest.flatten(point)
  specs = ([tf.TensorSpec(t.shape, t.dtype) for t in flat] +
           _chunked.row_specs(dataset.element_spec))

  def check(*args):
    variables = tf.nest.pack_sequence_as(point, list(args[:len(flat)]))
    stack = _vector_space.ResidualStack(
        [_bind_data(residual, args[len(flat):]) for residual in residuals],
        dtype, 0)
    return _validation.connected_outputs(
        lambda: stack.pieces(tf.nest.flatten(variables)), variables,
        stack.names())

  tf.function(check, autograph=False).get_concrete_function(*specs)


def _bind_data(function, data):
  """function(*variables) -> function(*variables, *data)."""
  def bound(*variables):
    return function(*variables, *data)
  bound.unbound = function
  return bound


def uses_matrix_free(linear_solver, user_jacobian, num_parameters):
  """Whether `linear_solver` means the matrix-free linearization for a
  problem with `num_parameters` per problem (the 'auto' rule)."""
  return linear_solver == "cg" or (
      linear_solver == "auto" and not user_jacobian and
      num_parameters > AUTO_DENSE_LIMIT)


def _compiled_solve(residuals, variables, data, options, compile_now):
  """() -> results of the cached compiled solve of this problem (see
  `tfg_optim._eager`), after the eager checks of the start; or None to run
  op by op (the problem's first call, or values that cannot be compiled
  as arguments)."""
  leaves = tf.nest.flatten(variables)
  data_leaves = [] if data is None else tf.nest.flatten(data)
  strategy = options.get("strategy")
  if not all(isinstance(leaf, (tf.Tensor, tf.Variable, np.ndarray) +
                        _chunked.DATASETS)
             for leaf in leaves + data_leaves):
    if strategy is None:
      return None
    leaves = [tf.convert_to_tensor(leaf) for leaf in leaves]
    data_leaves = [_argument(leaf) for leaf in data_leaves]
  # The structures with their leaves marked ("data" and not None: a single
  # data tensor must not share the key of data=None, whose compiled solve
  # would call the residual without it).
  key, kept = _eager.fingerprint((
      "least_squares", residuals, options, tf.nest.map_structure(
          lambda _: "variable", variables),
      None if data is None else tf.nest.map_structure(lambda _: "data",
                                                      data)))
  flat_variables, flat_data = len(leaves), data_leaves

  def build():
    def solve(*flat):
      point = tf.nest.pack_sequence_as(variables, flat[:flat_variables])
      given = (None if data is None else
               tf.nest.pack_sequence_as(data, flat[flat_variables:]))
      return least_squares(residuals, point, data=given, eager_compile=False,
                           **options)
    return solve

  function = _eager.compiled(key, kept, build, compile_now)
  if isinstance(function, _eager.FirstCall):
    return _eager.FirstCall(lambda: _compiled_solve(residuals, variables,
                                                    data, options, True))
  if function is None and strategy is not None:  # Uncacheable: compile anyway.
    function = tf.function(build(), autograph=False)
  if function is None:
    return None
  tensors = [_argument(leaf) for leaf in leaves + flat_data]
  _check_start(tensors[:flat_variables], variables, options)
  return lambda: function(*tensors)


def _argument(value):
  """An argument of a compiled solve: a dataset as itself (its spec is
  part of the trace's signature), anything else as a tensor."""
  if isinstance(value, _chunked.DATASETS):
    return value
  return tf.convert_to_tensor(value)


def _check_start(tensors, variables, options):
  """The start's eager checks (a compiled solve cannot raise on values)."""
  batch_dims = options["batch_dims"]
  tensors = _validation.float_tensors(tensors, "variables",
                                      batch_dims=batch_dims)
  _validation.check_batch_shapes(tensors, batch_dims, "variables")
  _validation.check_finite(tensors, "variables")
  if options["manifold"] is not None:
    options["manifold"].check_point(
        tf.nest.pack_sequence_as(variables, tensors))
  if options["bounds"] is not None:
    _box(options["bounds"], tensors, batch_dims,
         _vector_space.event_shapes(tensors, batch_dims))


def _bound_tensor(bound, dtype):
  """A bound as a tensor of the variables' dtype. Numbers, lists and arrays
  are rounded once, to `dtype` (tf.cast of a Python float would round it
  to float32 first: 1.8 became 1.7999999523 in a float64 problem);
  tensors are cast."""
  if any(tf.is_tensor(part) or isinstance(part, tf.Variable)
         for part in tf.nest.flatten(bound)):  # (a list may hold tensors)
    return tf.cast(bound, dtype)
  try:
    return tf.constant(np.asarray(bound, dtype.as_numpy_dtype))
  except (TypeError, ValueError):
    return tf.cast(bound, dtype)  # (tf.cast's own error names the value)


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
    lower, upper = (tf.broadcast_to(_bound_tensor(b, dtype), tf.shape(start))
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

