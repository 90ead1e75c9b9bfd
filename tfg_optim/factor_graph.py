"""Structured least squares: variable tables and residual terms over edges.

A factor graph here is

- variable tables (`Variables`): N rows of one manifold each (Euclidean by
  default; SE(2)/SE(3) poses, ...), some rows optionally held fixed (the
  gauge: the first pose of a pose graph);
- residual terms (`Term`): one vectorized function over K edges,
  f(*rows, *data) -> [K, r], whose argument slots read rows of tables
  through [K] index tensors, with per-edge data tensors [K, ...] and an
  optional robust loss per edge.

The cost is

    cost(X) = 1/2 sum_terms sum_k C^2 rho(||f_k(X)||^2 / C^2)

(rho(z) = z for a linear loss: 1/2 sum ||f_k||^2; a robust loss acts on each
edge's squared norm, as Ceres' and GTSAM's robust factors do), minimized by
the package's Levenberg-Marquardt engine on the block-sparse linearization
of `tfg_optim._block_sparse`: per (term, slot) Jacobian blocks [K, r, d] by
forward mode, no m x n or n x n matrix unless the dense Cholesky path asks
for J^T J. See docs/sparse.md.

The returned tables and cost are differentiable (gradients='implicit', the
default): dX*/dtheta = -H^-1 d^2 cost / (dX dtheta) at the solution, in
each table's tangent coordinates, for every tensor the terms' functions
capture, their data, and the held rows' values (`_implicit_gradients`), by
one backward solve with the forward solve's kind of linear solver; H is
the Gauss-Newton J^T J (implicit_hessian='gauss_newton', the default) or
the exact Hessian of the cost ('exact': per-edge second-derivative blocks,
`_block_sparse.Layout.hessian_blocks`). See docs/differentiation.md,
"Factor graphs".

    poses = factor_graph.Variables(start, manifold=SE3(), fixed=[0])
    between = factor_graph.Term(
        error, [(poses, edges[:, 0]), (poses, edges[:, 1])],
        data=[measurements, square_root_information])
    results = factor_graph.least_squares([poses], [between])
    optimized_poses = results.position[0]
"""

import numpy as np
import tensorflow as tf

from tfg_optim import _block_sparse
from tfg_optim import _engine
from tfg_optim import _implicit
from tfg_optim import _linearization
from tfg_optim import _schur
from tfg_optim import _sparse_cholesky
from tfg_optim import _validation
from tfg_optim import damping as damping_lib
from tfg_optim import nonlinear_least_squares
from tfg_optim import results as results_lib
from tfg_optim import stopping as stopping_lib
from tfg_optim.manifolds import euclidean

LINEAR_SOLVERS = ("auto", "cholesky", "cg", "schur", "iterative_schur",
                  "sparse_cholesky")  # _schur.py, _sparse_cholesky.py

# linear_solver="auto": the dense Cholesky of the assembled J^T J up to this
# many tangent coordinates, block-Jacobi conjugate gradients beyond
# (docs/sparse.md: TensorFlow's sparse Cholesky has no triangular solve).
# 10000: J^T J is then at most 0.8 GB (parking-garage, n = 9,966: about
# 9 s per iteration on 2 shared cores); it reaches GTSAM's cost on CSAIL,
# MIT, intel and parking-garage, where block-Jacobi CG stalls above it
# (docs/sparse.md).
AUTO_CHOLESKY_LIMIT = 10000

# linear_solver="auto" above this many tangent coordinates, where every
# term's index tensors are known while tracing: the block sparse Cholesky,
# 36x to 101x faster than the dense Cholesky to the same cost on MIT, CSAIL,
# intel and parking-garage (n = 2,421 to 9,960; docs/sparse.md); the dense
# one stays faster on tinyGrid3D (n = 48).
AUTO_SPARSE_MIN = 1000

# damping=None: Nielsen's lambda with D the current diag(J^T J) clamped to
# [1e-6, 1e32] (GTSAM's diagonal damping) and a first lambda of 1e-10
# (GTSAM starts at 1e-5 with D = I and divides it by 10 after every
# accepted step). The damping must be small against the smallest
# eigenvalues of D^-1/2 J^T J D^-1/2, not against 1: those of a long chain
# of poses are tiny, and Nielsen's update divides lambda by at most 3 per
# step (by little when the gain ratio is middling, as on MIT), so from 1e-6
# the soft modes stayed damped for many iterations: 10 (parking-garage),
# 13 (CSAIL) and 59 (MIT) to GTSAM-default's cost, against GTSAM's 6, 4
# and 17; from 1e-10, 4, 4 and 17 (docs/sparse.md,
# benchmarks/pose_graph_convergence.py).
DEFAULT_INITIAL_LAMBDA = 1e-10

# function_tolerance=None: the relative decrease, accepted or promised by
# the Gauss-Newton model (`stopping.StopWhenModelDecreaseLess`), at which a
# factor graph's solve has converged, by dtype. 1e-12 in float64: the
# converged pose graphs then stop within 1e-12 of GTSAM-tight's cost
# (MIT, whose Gauss-Newton iterates converge linearly, included) instead of
# taking rounding-level steps or rejecting them until the relative step
# test fires (docs/sparse.md). float32: `tfg_optim.least_squares`' 1e-7.
DEFAULT_FUNCTION_TOLERANCES = {tf.float64: 1e-12, tf.float32: 1e-7}


def default_damping():
  """The factor graph's default policy (damping=None)."""
  return damping_lib.NielsenDamping(initial=DEFAULT_INITIAL_LAMBDA,
                                    scaling="current")


def default_criterion(dtype, max_iterations, function_tolerance=None,
                      gradient_tolerance=None, parameter_tolerance=None,
                      cost_tolerance=0.0, stopping_criterion=None):
  """The stopping criterion of `least_squares`: `tfg_optim.least_squares`'
  (`stopping_criterion`, or its tests: relative cost change, gradient
  cosine, relative step, cost), with the function tolerance (default
  `DEFAULT_FUNCTION_TOLERANCES`) also bounding the decrease the
  Gauss-Newton model promised the last step tried
  (`stopping.StopWhenModelDecreaseLess`)."""
  if function_tolerance is None and stopping_criterion is None:
    function_tolerance = DEFAULT_FUNCTION_TOLERANCES[dtype]
  criterion = nonlinear_least_squares._criterion(  # pylint: disable=protected-access
      dtype, max_iterations, function_tolerance, gradient_tolerance,
      parameter_tolerance, cost_tolerance, stopping_criterion)
  if stopping_criterion is not None:
    return criterion
  return criterion | stopping_lib.StopWhenModelDecreaseLess(
      function_tolerance)


class Variables:
  """A table of N variables (rows) of one manifold.

  Args:
    values: [N, ...] float tensor (NumPy arrays are converted), N known
      while tracing; each row a point of `manifold`.
    manifold: the manifold of one row (a `tfg_optim.manifolds` manifold),
      or None for Euclidean rows of shape values.shape[1:].
    fixed: optional rows held at their values: a list / array of row
      indices, or a bool mask [N]. Static (NumPy or Python values).
    name: for error messages.
  """

  def __init__(self, values, manifold=None, fixed=None, name="variables"):
    self.name = name
    (tensor,) = _validation.float_tensors([values], name, batch_dims=1)
    if tensor.shape.rank < 1 or tensor.shape[0] is None:
      raise ValueError(f"'{name}' must have a leading dimension N (rows) "
                       f"known while tracing, got shape {tensor.shape}.")
    self.values = tensor
    self.size = int(tensor.shape[0])
    row_shape = tuple(tensor.shape[1:].as_list())
    if manifold is None:
      if not row_shape:
        raise ValueError(f"'{name}' must have rows of at least one entry: "
                         f"shape [N, ...], got {tensor.shape}.")
      manifold = euclidean.Euclidean(*row_shape)
    elif tuple(manifold.point_shape) != row_shape:
      raise ValueError(f"'{name}' has rows of shape {list(row_shape)}; its "
                       f"manifold {manifold.name} has points of shape "
                       f"{list(manifold.point_shape)}.")
    self.manifold = manifold
    self.free = _free_mask(fixed, self.size, name)


def _free_mask(fixed, size, name):
  """float [N] mask, 0 for held rows; None when every row is free."""
  if fixed is None:
    return None
  fixed = np.asarray(fixed)
  mask = np.ones([size])
  if fixed.dtype == bool:
    if fixed.shape != (size,):
      raise ValueError(f"'{name}': a bool 'fixed' mask must have shape "
                       f"[{size}], got {list(fixed.shape)}.")
    mask[fixed] = 0.0
  else:
    if fixed.size and not np.issubdtype(fixed.dtype, np.integer):
      raise TypeError(f"'{name}': 'fixed' must be row indices or a bool "
                      f"mask, got dtype {fixed.dtype}.")
    fixed = fixed.reshape(-1).astype(np.int64)
    if fixed.size and (fixed.min() < -size or fixed.max() >= size):
      raise ValueError(f"'{name}': 'fixed' row index out of range [0, "
                       f"{size}): {fixed.tolist()}.")
    mask[fixed] = 0.0
  return mask


class Term:
  """A residual term over K edges.

  Args:
    function: f(*rows, *data) -> [K, r] residuals, vectorized over the
      edges: rows[s] is [K, ...], the rows of slot s's table that the edges
      read; data are the per-edge data tensors. r must be known while
      tracing.
    arguments: per slot, a pair (table, index): a `Variables` and an int
      [K] tensor of row indices (checked against N where known while
      tracing). All slots share K.
    data: optional per-edge tensors [K, ...] (float data are cast to the
      variables' dtype).
    loss: a robust loss on each edge's squared norm, as in
      `tfg_optim.least_squares` ('linear', 'huber', 'soft_l1', 'cauchy',
      'arctan'), with scale `loss_scale`.
    name: for error messages.
    jacobian: optional jacobian(*rows, *data) -> per slot s the [K, r, d_s]
      derivatives of `function` with respect to the coordinates of slot s's
      rows (those of its manifold's retraction, at 0), in closed form: the
      linearization uses them in place of forward mode over the edges
      tiled by the slots' tangent directions (docs/sparse.md). With a
      robust loss the blocks of the reweighted residual follow from them by
      the chain rule (`_robust_jacobian`).
  """

  def __init__(self, function, arguments, data=(), loss="linear",
               loss_scale=1.0, name="term", jacobian=None):
    self.name = name
    if not callable(function):
      raise TypeError(f"'{name}': 'function' must be callable, got "
                      f"{type(function).__name__}.")
    self.function = function
    if jacobian is not None and not callable(jacobian):
      raise TypeError(f"'{name}': 'jacobian' must be callable or None, got "
                      f"{type(jacobian).__name__}.")
    self.jacobian = jacobian
    if not isinstance(arguments, (list, tuple)) or not arguments:
      raise ValueError(f"'{name}': 'arguments' must be a non-empty list of "
                       "(Variables, index) pairs.")
    self.tables, self.indices = [], []
    size = None
    for slot, argument in enumerate(arguments):
      where = f"'{name}' argument {slot}"
      if (not isinstance(argument, (list, tuple)) or len(argument) != 2 or
          not isinstance(argument[0], Variables)):
        raise TypeError(f"{where} must be a pair (Variables, index), got "
                        f"{argument!r}.")
      table, index = argument
      index = tf.convert_to_tensor(index)
      if not index.dtype.is_integer:
        raise TypeError(f"{where}: the index must be integers, got "
                        f"{index.dtype.name}.")
      if index.shape.rank != 1:
        raise ValueError(f"{where}: the index must have shape [K], got "
                         f"{index.shape}.")
      index = tf.cast(index, tf.int32)
      static = tf.get_static_value(index)
      if static is not None and static.size and (
          static.min() < 0 or static.max() >= table.size):
        bad = static[(static < 0) | (static >= table.size)][0]
        raise ValueError(f"{where}: index {bad} out of range for "
                         f"'{table.name}' with {table.size} rows.")
      if size is None:
        size = index.shape[0]
      elif (index.shape[0] is not None and size is not None and
            index.shape[0] != size):
        raise ValueError(f"{where}: {index.shape[0]} edges, but argument 0 "
                         f"has {size}; all slots share K.")
      self.tables.append(table)
      self.indices.append(index)
    self.size = size
    self.data = []
    for number, value in enumerate(
        data if isinstance(data, (list, tuple)) else [data]):
      tensor = tf.convert_to_tensor(value)
      if tensor.shape.rank is None or tensor.shape.rank < 1:
        raise ValueError(f"'{name}' data[{number}] must have shape [K, ...], "
                         f"got {tensor.shape}.")
      if (size is not None and tensor.shape[0] is not None and
          tensor.shape[0] != size):
        raise ValueError(f"'{name}' data[{number}] has {tensor.shape[0]} rows "
                         f"for {size} edges.")
      self.data.append(tensor)
    if loss not in nonlinear_least_squares.LOSSES:
      raise ValueError(f"'{name}': 'loss' must be one of "
                       f"{nonlinear_least_squares.LOSSES}, got {loss!r}.")
    self.loss = loss
    self.loss_scale = _validation.real_number(
        loss_scale, f"{name}: loss_scale", lower=0.0, lower_inclusive=False)


def _robust(term, dtype):
  """(*rows, *data) -> [K, r]: the term's function with its loss applied per
  edge: f_k sqrt(w(z_k)), z_k = ||f_k||^2 / C^2 (so 1/2 ||.||^2 of it is
  1/2 C^2 rho(z_k))."""
  data_count = len(term.data)
  slots = len(term.tables)

  def function(*arguments):
    rows, data = arguments[:slots], arguments[slots:slots + data_count]
    value = tf.convert_to_tensor(term.function(*rows, *data))
    value = _validation.check_output_dtype(value, dtype, term.name)
    if value.shape.rank != 2 or value.shape[-1] is None:
      raise ValueError(f"'{term.name}' must return [K, r] residuals with r "
                       f"known while tracing, got shape {value.shape}.")
    if term.loss == "linear":
      return value
    scale = tf.constant(term.loss_scale, dtype)
    z = tf.reduce_sum(tf.square(value / scale), axis=-1, keepdims=True)
    return value * tf.sqrt(nonlinear_least_squares.loss_weight(term.loss, z))
  return function


def _robust_jacobian(term, dtype):
  """The closed-form blocks of `_robust`'s function from the term's own
  `jacobian` J_s = df/dx_s: with s(z) = sqrt(w(z)), z = ||f||^2 / C^2,

      d(f s(z))/dx_s = s(z) J_s + (2 s'(z) / C^2) f (f^T J_s),

  the derivative that forward mode takes of it (s' as a directional
  derivative (`_linearization.directional_derivatives`) of
  the loss weight, so the loss's formulas stay `loss_weight`'s). The
  term's jacobian itself for the linear loss (or None)."""
  if term.jacobian is None or term.loss == "linear":
    return term.jacobian

  def jacobian(*arguments):
    value = tf.convert_to_tensor(term.function(*arguments))
    scale = tf.constant(term.loss_scale, dtype)
    z = tf.reduce_sum(tf.square(value / scale), axis=-1, keepdims=True)
    weight, (slope,) = _linearization.directional_derivatives(
        lambda z: tf.sqrt(nonlinear_least_squares.loss_weight(term.loss, z)),
        z, [tf.ones_like(z)])
    if slope is None:  # (a loss weight that does not depend on z)
      slope = tf.zeros_like(weight)
    coefficient = 2.0 * slope / tf.square(scale)  # [K, 1]
    blocks = []
    for block in term.jacobian(*arguments):
      block = tf.convert_to_tensor(block)
      along = tf.einsum("kr,krd->kd", value, block)  # f^T J_s
      blocks.append(weight[:, :, tf.newaxis] * block +
                    value[:, :, tf.newaxis] *
                    (coefficient * along)[:, tf.newaxis, :])
    return blocks
  return jacobian


def _layout(variables, terms):
  """The `_block_sparse.Layout` of the problem (checks the tables' dtype and
  that every term's tables are among `variables`)."""
  if isinstance(variables, Variables):
    variables = [variables]
  if not isinstance(variables, (list, tuple)) or not variables or not all(
      isinstance(v, Variables) for v in variables):
    raise TypeError("'variables' must be a non-empty list of "
                    "factor_graph.Variables.")
  if isinstance(terms, Term):
    terms = [terms]
  if not isinstance(terms, (list, tuple)) or not terms or not all(
      isinstance(t, Term) for t in terms):
    raise TypeError("'terms' must be a non-empty list of factor_graph.Term.")
  dtypes = {v.values.dtype for v in variables}
  if len(dtypes) > 1:
    raise TypeError("All 'variables' tables must share one dtype, got "
                    f"{sorted(d.name for d in dtypes)}.")
  dtype = variables[0].values.dtype
  positions = {id(v): i for i, v in enumerate(variables)}
  tables, offset = [], 0
  for table in variables:
    tables.append(_block_sparse.Table(table.size, table.manifold.dim,
                                      table.manifold, offset, table.free))
    offset += table.size * table.manifold.dim
  layout_terms = []
  for term in terms:
    for table in term.tables:
      if id(table) not in positions:
        raise ValueError(f"'{term.name}' reads table '{table.name}', which "
                         "is not in 'variables'.")
    data = []
    for number, tensor in enumerate(term.data):
      if tensor.dtype.is_floating and tensor.dtype != dtype:
        if isinstance(tensor, tf.Tensor) and tf.get_static_value(
            tensor) is None:
          raise TypeError(f"'{term.name}' data[{number}] is "
                          f"{tensor.dtype.name}; the variables are "
                          f"{dtype.name}.")
        tensor = tf.cast(tensor, dtype)
      data.append(tensor)
    size = term.size
    if size is None:
      size = tf.shape(term.indices[0])[0]
    view = _TermView(term, data)
    function = _robust(view, dtype)
    width = _width(function, term, data)
    layout_terms.append(_block_sparse.Term(
        function, [positions[id(t)] for t in term.tables], term.indices,
        data, size, width, _robust_jacobian(view, dtype)))
  return _block_sparse.Layout(tables, layout_terms), dtype


class _TermView:
  """A term with its data converted (what `_robust` and
  `_robust_jacobian` read)."""

  def __init__(self, term, data):
    self.function, self.tables, self.data = term.function, term.tables, data
    self.jacobian = term.jacobian
    self.loss, self.loss_scale, self.name = (term.loss, term.loss_scale,
                                             term.name)


def _width(function, term, data):
  """r: the residuals per edge, from the function's output on the first edge
  (its static shape in graphs; one edge's evaluation eagerly)."""
  rows = [tf.gather(table.values, index[:1])
          for table, index in zip(term.tables, term.indices)]
  output = function(*rows, *[x[:1] for x in data])
  return int(output.shape[-1])


def picked_solver(linear_solver, tangent_dim, static_indices=True):
  """What `linear_solver` resolves to for n = tangent_dim coordinates (the
  'auto' rule): 'cholesky' for n <= `AUTO_SPARSE_MIN`; beyond,
  'sparse_cholesky' when every index tensor is known while tracing
  (`static_indices`), else 'cholesky' up to `AUTO_CHOLESKY_LIMIT` and 'cg'
  beyond."""
  if linear_solver != "auto":
    return linear_solver
  if tangent_dim <= AUTO_SPARSE_MIN:
    return "cholesky"
  if static_indices:
    return "sparse_cholesky"
  return "cholesky" if tangent_dim <= AUTO_CHOLESKY_LIMIT else "cg"


def _static_indices(terms):
  """Whether every term's index tensors are known while tracing."""
  return all(tf.get_static_value(index) is not None
             for term in terms for index in term.indices)


@tf.autograph.experimental.do_not_convert
def least_squares(variables, terms, *, damping=None,
                  max_iterations=100, function_tolerance=None,
                  gradient_tolerance=None, parameter_tolerance=None,
                  cost_tolerance=0.0, stopping_criterion=None,
                  linear_solver="auto", geodesic_acceleration=None,
                  vanishing_column_tolerance=None, callback=None,
                  record=False, gradients="implicit",
                  implicit_hessian="gauss_newton",
                  name="factor_graph_least_squares"):
  """Minimizes a factor graph's cost (module docstring); returns results.

  Args:
    variables: a `Variables` table or a list of them (the order of the
      returned tables and of the tangent coordinates).
    terms: a `Term` or a list of them.
    damping: as in `tfg_optim.least_squares`, or None (default):
      `default_damping()`, Nielsen's lambda damping (the kind of GTSAM's and
      Ceres' Levenberg-Marquardt) with D the current diag(J^T J) clamped to
      [1e-6, 1e32] and a first lambda of 1e-10 ('nielsen' is the package's
      Nielsen policy: Marquardt's running maximum, lambda from 1e-3;
      'trust_region' needs an eigendecomposition of the dense J^T J, or
      Steihaug's truncated CG with 'cg').
    function_tolerance: the relative decrease at which the solve has
      converged (default `DEFAULT_FUNCTION_TOLERANCES`: 1e-12 in float64,
      1e-7 in float32): an accepted step's actual decrease, as in
      `tfg_optim.least_squares`, and also the decrease the Gauss-Newton
      model promised the last step tried, accepted or rejected
      (`default_criterion`; stop reason MODEL_DECREASE).
    max_iterations, gradient_tolerance, parameter_tolerance,
      cost_tolerance, stopping_criterion, geodesic_acceleration,
      vanishing_column_tolerance, callback, record: as in
      `tfg_optim.least_squares` (geodesic acceleration is off by default
      here; the callback sees the list of tables).
    linear_solver: 'cholesky' (J^T J assembled densely by scatter from the
      blocks and factored: n up to a few thousand), 'cg' (conjugate
      gradients with the block-Jacobi preconditioner, Steihaug's truncated
      version in the block-Jacobi norm for the trust region; O(edges)
      memory, runs under XLA), or 'auto' (default, `picked_solver`):
      'cholesky' for n <= 1000 tangent coordinates (`AUTO_SPARSE_MIN`, held
      rows included); beyond, 'sparse_cholesky' where every index tensor
      is known while tracing, else 'cholesky' up to n = 10000
      (`AUTO_CHOLESKY_LIMIT`) and 'cg' beyond.
      'schur': two tables, every term reading one row of each (bundle
      adjustment): the larger table eliminated, the reduced system by
      dense Cholesky (`_schur`, docs/bundle_adjustment.md).
      'iterative_schur': as 'schur', the reduced system by conjugate
      gradients on the implicit S with the SCHUR_JACOBI preconditioner
      (Ceres' ITERATIVE_SCHUR: no N_c^2 matrix); not with the
      'trust_region' damping.
      'sparse_cholesky': block sparse Cholesky of J^T J + lambda D
      (nested-dissection ordering, factored by supernodes, level by level
      of their tree; `_sparse_cholesky`, docs/sparse.md); index tensors
      must be known while tracing; it is also the implicit gradients'
      backward solve (lambda = 0). With damping='trust_region' the step is
      Steihaug's truncated CG, as for 'cg'.
    gradients: how `position` and `cost` (and `residual`) are
      differentiated: 'implicit' (default; `_implicit_gradients`: the
      implicit derivative at the solution, one linear solve in the
      backward pass by the solver the forward solve used, no tape of the
      loop), 'unrolled' (through the `tf.while_loop`: memory grows with
      the iterations, no XLA) or 'none' (no gradients). See
      docs/differentiation.md.
    implicit_hessian: the H of the implicit derivative, as in
      `tfg_optim.least_squares`: 'gauss_newton' (default; H = J^T J, exact
      where the residual vanishes at the solution, and possibly far off,
      even in sign, where it does not) or 'exact': H = the Hessian of
      c -> cost(R_X*(c)) at c = 0 in the tables' tangent coordinates,
      J^T J + sum_i F_i d^2 F_i / dc^2 with each row's retraction inside
      (at a stationary point, the Riemannian Hessian), robust losses
      included; its per-edge [D, D] blocks (D: the coordinates of an
      edge's rows) by reverse-over-reverse differentiation in the backward
      pass, and g = J^T F by one more reverse pass in the forward pass.
      The backward solve: the dense Cholesky of H for 'cholesky', the
      block sparse Cholesky of H for 'sparse_cholesky', the Schur
      complement of H (points eliminated from H's blocks, which are block
      diagonal among points as J^T J's: an edge reads one point) for
      'schur' and 'iterative_schur', conjugate gradients on H v
      (block-Jacobi of J^T J) for 'cg'. Every judgement of the backward
      solve is made in Jacobi-scaled coordinates (`_implicit.
      _factored_solve`, `_implicit._conjugate_gradient_solve`): a
      nonsingular H keeps its direct solve however ill-conditioned; a
      singular one (a gauge) gets the pseudo-inverse's answer; an
      indefinite one, or one the solver cannot resolve, a NaN derivative
      through the solve (a gradient of the cost alone needs no solve and
      stays the envelope one); docs/differentiation.md. Forward mode
      is refused, as for 'gauss_newton'.
    name: name scope of the ops.

  Returns:
    `tfg_optim.results.LeastSquaresResults` with `position` the list of
    optimized tables (held rows unchanged; `num_parameters` counts their
    coordinates too: n = sum_t N_t d_t).

  Raises:
    ValueError / TypeError: for invalid arguments, naming the argument.
  """
  gradients = _implicit.check_gradients(gradients)
  implicit_hessian = _implicit.check_hessian(implicit_hessian)
  if linear_solver not in LINEAR_SOLVERS:
    raise ValueError(f"'linear_solver' must be one of {LINEAR_SOLVERS}, got "
                     f"{linear_solver!r}.")
  max_iterations = _validation.positive_int(max_iterations, "max_iterations")
  policy = (default_damping() if damping is None else
            nonlinear_least_squares.damping_policy(damping))
  if (linear_solver == "iterative_schur" and
      isinstance(policy, damping_lib.TrustRegionDamping)):
    raise ValueError(
        "linear_solver='iterative_schur' solves the lambda-damped system; "
        "the 'trust_region' damping needs a step bounded by its radius: use "
        "linear_solver='cg' (Steihaug's truncated CG) or a lambda damping.")
  if vanishing_column_tolerance is not None:
    vanishing_column_tolerance = _validation.real_number(
        vanishing_column_tolerance, "vanishing_column_tolerance", lower=0.0)
  if geodesic_acceleration is not None:
    geodesic_acceleration = _validation.real_number(
        geodesic_acceleration, "geodesic_acceleration", lower=0.0,
        lower_inclusive=False)
  if callback is not None and not callable(callback):
    raise TypeError(f"'callback' must be callable, got "
                    f"{type(callback).__name__}.")
  with tf.name_scope(name):
    layout, dtype = _layout(variables, terms)
    tables = [variables] if isinstance(variables, Variables) else variables
    point = tuple(_validation.check_finite([t.values for t in tables],
                                           "variables"))
    if tf.executing_eagerly():
      for table, values in zip(tables, point):
        table.manifold.check_point(values)
    criterion = default_criterion(
        dtype, max_iterations, function_tolerance, gradient_tolerance,
        parameter_tolerance, cost_tolerance, stopping_criterion)
    vanishing_tolerance = (
        float(np.sqrt(np.finfo(dtype.as_numpy_dtype).eps))
        if vanishing_column_tolerance is None else vanishing_column_tolerance)
    picked = picked_solver(linear_solver, layout.tangent_dim,
                           _static_indices(layout.terms))
    kind = _block_sparse.BlockSparseKind(layout, dense=picked == "cholesky")
    if picked in ("schur", "iterative_schur"):  # bundle adjustment
      kind = _schur.SchurKind(layout, iterative=picked == "iterative_schur")
    if picked == "sparse_cholesky":
      kind = _sparse_cholesky.SparseCholeskyKind(layout)
    problem = _engine.Problem(
        residual_fn=layout.residual, retract=layout.retract,
        tangent_dim=layout.tangent_dim, cost_fn=None, jacobian_fn=None)
    num_records = 0
    if record:
      num_records = max_iterations if isinstance(record, bool) else int(record)
    engine_callback = None
    if callback is not None:
      engine_callback = lambda it, cost, p: callback(it, cost, list(p))
    state = _implicit.solve_untaped(lambda: _engine.minimize(
        problem, point, policy, max_iterations, stopping=criterion,
        callback=engine_callback, num_records=num_records,
        geodesic_acceleration=geodesic_acceleration,
        vanishing_column_tolerance=vanishing_tolerance, kind=kind),
                                    gradients)
    result = results_lib.from_state(state, num_records, criterion)
    if gradients == "implicit":
      if linear_solver == "iterative_schur":
        # The backward solve at lambda = 0 (J^T J singular under a gauge)
        # by the dense Schur complement, whose failed factorization gets
        # `_implicit`'s regularized retry; CG to the forward's tolerance
        # would not (docs/bundle_adjustment.md).
        kind = _schur.SchurKind(layout)
      result = _implicit_gradients(result, state.linearization, kind, layout,
                                   tables, implicit_hessian)
    return result._replace(position=list(result.position))


def _implicit_gradients(result, linearization_tensors, kind, layout, tables,
                        hessian):
  r"""`result` whose position, cost and residual have the implicit
  derivative (`_implicit.attach_linearization`, with the exact Hessian's
  blocks for hessian='exact').

  At the solution X* (a tuple of tables) the gradient g of the cost in the
  tangent coordinates of the free rows vanishes, so for every tensor theta
  the terms read (captured by their functions, or their `data`)

      dX*/dtheta = -H^-1 dg/dtheta,
      'gauss_newton': H = J^T J, dg/dtheta ~ J^T dF/dtheta,
      'exact':        H = d^2/dc^2 1/2 ||F(R_X*(c))||^2 at c = 0,

  in the tangent coordinates of each table's manifold, J those of the
  final linearization (held rows: zero columns, so zero derivative, and
  the identity's rows and columns in H). Gauss-Newton: the backward pass
  solves H w = P^T X_bar + J^T F_bar with the forward solve's linear
  solver (`_implicit.backward_solve`: the Cholesky of the scattered J^T J
  for 'cholesky', block-Jacobi conjugate gradients for 'cg', the Schur
  complement for 'schur'), and theta_bar = (dF/dtheta)^T (F_bar +
  c_bar F - J w). Exact: the same right-hand side, H from its per-edge
  blocks (`_implicit.exact_backward_solve`), and theta_bar =
  (dF/dtheta)^T (F_bar + c_bar F) - (dg/dtheta)^T w. The final cost has
  dc/dtheta = (dF/dtheta)^T F (the envelope theorem: no solve).

  Initial values: the free rows' starting values have derivative zero (the
  solution does not depend on where the solve started: implicit function
  theorem); the held rows' values are parameters of the problem, so they
  get their derivative: the returned held rows are theirs (identity), and
  the residual evaluated for the backward pass reads them live, so that
  dX*_free/dX_held = -H^-1 dg/dX_held reaches them.
  """
  def held(table):  # bool [N, 1, ...]: True on held rows.
    mask = tf.constant(table.free == 0)
    return tf.reshape(mask, [-1] + [1] * (table.values.shape.rank - 1))

  def with_held_rows(point):
    return tuple(
        values if table.free is None else
        tf.where(held(table), table.values, values)
        for table, values in zip(tables, point))

  def residual(point):
    return layout.residual(with_held_rows(point))

  hessian_at = None
  if hessian == "exact":
    hessian_at = lambda point: _block_sparse.EdgeHessian(
        layout, layout.hessian_blocks(point))
  result = _implicit.attach_linearization(
      result, linearization_tensors, kind, residual, layout.coordinates,
      hessian_at, layout.retract)
  return result._replace(position=tuple(
      values if table.free is None else values + tf.where(
          held(table), table.values - tf.stop_gradient(table.values),
          tf.zeros_like(values))
      for table, values in zip(tables, result.position)))
