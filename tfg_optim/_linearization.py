"""Linearizations: the Jacobian at a point, as the loop asks for it.

The loop never reads a Jacobian matrix. It asks a linearization of the
residual map s -> F(R_p(s)) at s = 0 (J, m x n, per problem of a batch) for

    matvec(v)        J v,            [B..., n] -> [B..., m]
    rmatvec(u)       J^T u,          [B..., m] -> [B..., n]
    column_norms()   diag(J^T J),    [B..., n] (Marquardt's scaling,
                                     the Jacobi preconditioner, the
                                     gradient cosine test; the
                                     vanishing-column refusal where
                                     `exact_column_norms`)
    gram()           J^T J,          [B..., n, n] (dense solvers only)
    gradient(F)      J^T F,          [B..., n] (the gradient at the point,
                                     where F is the residual there)
    curvature(v)     ||J v||^2,      [B...] (the model's curvature along v)
    hold_fixed(free) J diag(free):   coordinates held at a bound

and says whether its column norms are exact (`exact_column_norms`, a
class attribute: True where they are sums of squares of J's exact entries
or blocks, False for an estimate); the engine's vanishing-column refusal
compares column norms between points, and runs only where they are exact.

`matvec` and `rmatvec` are optional: a linearization that keeps only J^T J
and J^T F (`tfg_optim._chunked.Gram`, for data summed chunk by chunk) has
neither, and the loop then asks only for `gradient`, `curvature`,
`column_norms` and `gram`.

and a linearization kind says how to build one at a point (`at`), which
tensors the loop state carries between iterations (`tensors`), and how to
rebuild the view from them (`restore`). Two kinds here (and
`tfg_optim._chunked.ChunkedKind`):

- `DenseKind`: J as a [B..., m, n] tensor (forward-mode columns when m >= n,
  reverse-mode rows when m < n; never an m x m intermediate). Every product
  is a matrix product; the dense solvers factor `gram()` (or J J^T).
- `MatrixFreeKind`: J is never formed. J v is one forward-mode product and
  J^T u one reverse-mode product of F at the point; diag(J^T J) is
  estimated from `num_probes` products J^T z with fixed Rademacher probes z
  (random signs: E[(J^T z)_j^2] = ||J_j||^2, with variance
  2 (||J_j||^4 - sum_i J_ij^4), exact for a column with one nonzero and
  below the 2 ||J_j||^4 of Gaussian probes for every column; deterministic,
  so every execution mode gives the same numbers). Memory is O(m + n) per problem: this is what solves
  problems with millions of parameters with the conjugate-gradient solver.
  Where the caller knows a grouping of J's columns into G structurally
  orthogonal groups (no residual depends on two columns of one group, as
  scipy's `group_columns` finds from a sparsity pattern: 3 for a 2-D
  total-variation stencil), diag(J^T J) is exact instead, from G products
  J e_g and G products J^T (J e_g), e_g the indicator of group g:
  (J^T J e_g)_j = sum_k in g (J^T J)_jk = (J^T J)_jj for j in g. A
  grouping that is not structurally orthogonal adds the other columns'
  J_j^T J_k there; where that makes an entry 0 or negative (a zero
  column too), the probes' estimate replaces it (`num_probes` more
  products J^T z, only at a point where some entry is). The estimates
  scale steps and precondition them, and no derivative is zeroed by them
  (`tfg_optim._implicit._free_coordinates`).
"""

import numpy as np
import tensorflow as tf

from tfg_optim import _batch
from tfg_optim import _linear_solvers


# Up to this many tangent directions, the Jacobian-vector products are traced
# one by one: as fast to run as `tf.vectorized_map` and several times faster to
# trace. Beyond it, one vectorized product keeps the graph small.
_UNROLLED_JVPS = 16


class Dense:
  """J as a [B..., m, n] tensor."""

  dense = True
  exact_column_norms = True

  def __init__(self, matrix):
    self.matrix = matrix

  @property
  def tensors(self):
    return (self.matrix,)

  def matvec(self, vector):
    return tf.linalg.matvec(self.matrix, vector)

  def rmatvec(self, vector):
    return tf.linalg.matvec(self.matrix, vector, adjoint_a=True)

  def gradient(self, residual):
    return self.rmatvec(residual)

  def curvature(self, vector):
    return tf.reduce_sum(tf.square(self.matvec(vector)), axis=-1)

  def column_norms(self):
    return tf.reduce_sum(tf.square(self.matrix), axis=-2)

  def gram(self):
    return tf.matmul(self.matrix, self.matrix, adjoint_a=True)

  def is_zero(self):
    return tf.reduce_all(tf.equal(self.matrix, 0), axis=[-2, -1])

  def hold_fixed(self, free):
    return Dense(self.matrix * free[..., tf.newaxis, :])


class MatrixFree:
  """J at a point through its products; see the module docstring. Its
  column norms are an estimate (`exact_column_norms` False): the
  vanishing-column refusal is off for it. Its kind's `inexact_steps`
  (`least_squares(..., inexact_steps=True)`) asks for inexact Newton steps:
  conjugate gradients that stop at the forcing term
  `_linear_solvers.forcing_tolerance` of the gradient, not at the fixed
  1e-6; the term depends on the point the loop came from, whose gradient
  norm and forcing term the linearization carries (`forcing_history`,
  [B...] each, NaN at the start; set by `succeed`)."""

  dense = False
  exact_column_norms = False

  def __init__(self, kind, point, free, column_norms, previous_gradient_norm,
               previous_forcing):
    self.kind = kind
    self.point = point
    self.free = free
    self._column_norms = column_norms
    self.forcing_history = (previous_gradient_norm, previous_forcing)

  @property
  def tensors(self):
    return (self.free, self._column_norms) + self.forcing_history

  @property
  def inexact_steps(self):
    return self.kind.inexact_steps

  def matvec(self, vector):
    return self.kind.forward(self.point, self.free * vector)

  def rmatvec(self, vector):
    return self.free * self.kind.reverse(self.point, vector)

  def gradient(self, residual):
    return self.rmatvec(residual)

  def curvature(self, vector):
    return tf.reduce_sum(tf.square(self.matvec(vector)), axis=-1)

  def column_norms(self):
    return self._column_norms

  def gram(self):
    raise ValueError("a matrix-free linearization has no J^T J; use "
                     "linear_solver='cg'.")

  def is_zero(self):
    return tf.reduce_all(tf.equal(self._column_norms, 0), axis=-1)

  def hold_fixed(self, free):
    return MatrixFree(self.kind, self.point, self.free * free,
                      self._column_norms * free, *self.forcing_history)


class DenseKind:
  """Builds `Dense` linearizations of a problem (see `jacobian`)."""

  dense = True

  def __init__(self, problem, num_residuals):
    self.problem = problem
    self.num_residuals = num_residuals

  def at(self, point, residual):
    """The linearization at `point`, where F is `residual`."""
    return Dense(jacobian(self.problem, point,
                          _batch.leading_shape(residual,
                                               residual.shape.rank - 1),
                          self.num_residuals))

  def restore(self, tensors, point):
    del point
    return Dense(*tensors)


class MatrixFreeKind:
  """Builds `MatrixFree` linearizations of a problem.

  `forward(point, v)` = J v and `reverse(point, u)` = J^T u are traced once
  each (as `tf.function`s in graphs) however often the loop calls them.
  """

  dense = False

  def __init__(self, problem, num_probes=8, inexact_steps=False,
               column_groups=None):
    """`column_groups`: None (estimate diag(J^T J) from `num_probes`
    probes), or a NumPy int array of n entries, the group in 0..G-1 of
    each tangent coordinate, whose groups are structurally orthogonal
    (see the module docstring): diag(J^T J) exact, from 2 G products
    (entries <= 0 of a wrong grouping: the probes' estimate)."""
    self.problem = problem
    self.num_probes = num_probes
    self.inexact_steps = inexact_steps
    self.column_groups = column_groups
    n = problem.tangent_dim

    def forward(point, vector):
      zero = tf.zeros_like(vector)
      if problem.tangent_product is not None:
        return problem.tangent_product(point, vector)
      if problem.forward_product is not None:
        return problem.forward_product(point, zero, vector)
      residual, (product,) = directional_derivatives(
          lambda s: problem.residual_fn(problem.retract(point, s)), zero,
          [vector])
      return _zero_if_none(product, residual)

    def reverse(point, vector):
      batch_shape = tf.shape(vector)[:-1]
      zero = tf.zeros(tf.concat([batch_shape, [n]], 0), vector.dtype)
      with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(zero)
        residual = problem.residual_fn(problem.retract(point, zero))
      return tape.gradient(residual, zero, output_gradients=vector,
                           unconnected_gradients=tf.UnconnectedGradients.ZERO)

    if tf.executing_eagerly():
      self.forward, self.reverse = forward, reverse
    else:
      self.forward = trace_once(forward)
      self.reverse = trace_once(reverse)

  def at(self, point, residual):
    """The linearization at `point`, where F is `residual`."""
    residual_shape = tf.shape(residual)
    dtype = residual.dtype
    n = self.problem.tangent_dim
    zeros = tf.zeros(tf.concat([residual_shape[:-1], [n]], 0), dtype)

    def probe_estimate():
      estimate = zeros
      for probe in range(self.num_probes):
        z = _rademacher(residual_shape, probe, dtype)
        estimate += tf.square(self.reverse(point, z))
      return estimate / self.num_probes

    if self.column_groups is not None:
      estimate = zeros
      groups = tf.constant(self.column_groups, tf.int32)
      for group in range(int(np.max(self.column_groups)) + 1):
        indicator = tf.broadcast_to(tf.cast(tf.equal(groups, group), dtype),
                                    tf.shape(estimate))
        estimate += indicator * self.reverse(
            point, self.forward(point, indicator))
      # A grouping that is not structurally orthogonal gives J_j^T J e_g,
      # which can be 0 or negative for a nonzero column: there (and on a
      # zero column, where the probes give 0 too) the probes' estimate.
      unsure = _batch.not_positive(estimate)
      estimate = tf.where(unsure, tf.cond(tf.reduce_any(unsure),
                                          probe_estimate, lambda: zeros),
                          estimate)
    else:
      estimate = probe_estimate()
    no_history = tf.fill(residual_shape[:-1], tf.constant(np.nan, dtype))
    return MatrixFree(self, point, tf.ones_like(estimate), estimate,
                      no_history, no_history)

  def restore(self, tensors, point):
    return MatrixFree(self, point, *tensors)


def _rademacher(shape, probe, dtype):
  """A fixed probe of random signs +-1 (the `probe`-th; stateless, so
  every execution mode draws the same)."""
  bits = tf.random.stateless_uniform(shape, seed=[7, probe], minval=0,
                                     maxval=2, dtype=tf.int32)
  return tf.cast(2 * bits - 1, dtype)


def select(condition, new, old):
  """The linearization `new` where the [B...] `condition` holds, else
  `old` (both of one kind, bound at the same point structure)."""
  tensors = _batch.select_structure(condition, new.tensors, old.tensors)
  if isinstance(new, Dense):
    return Dense(*tensors)
  if isinstance(new, MatrixFree):
    return MatrixFree(new.kind, new.point, *tensors)
  return type(new)(*tensors)  # Built from its tensors alone (`Gram`).


def succeed(old, old_gradient, new):
  """`new`, the linearization at the point the loop moves to from `old`'s
  (where the gradient is `old_gradient`), with what it keeps of the way
  there: for a matrix-free one with inexact steps, the forcing history
  (||g_old||, the forcing term of the step from there) of Eisenstat and
  Walker's forcing term (`_linear_solvers.forcing_tolerance`). Other
  linearizations keep nothing: `new` itself."""
  if not isinstance(new, MatrixFree) or not new.inexact_steps:
    return new
  return MatrixFree(new.kind, new.point, new.free, new.column_norms(),
                    tf.norm(old_gradient, axis=-1),
                    _linear_solvers.step_tolerance(old, old_gradient) +
                    tf.zeros_like(old_gradient[..., 0]))


def directional_derivatives(function, primal, tangents, check=None):
  """(F, [J t for t in tangents]) for F = function(primal) and
  J t = d/ds function(primal + s t) at s = 0 (`primal` and each tangent:
  structures of tensors alike), by reverse mode twice: u -> J^T u is linear
  in the cotangent u, so its own reverse pass along t is (J^T)^T t = J t,
  whatever u is (here fixed numbers in [1, 2]: `_generic_cotangent`). F
  and J^T u are computed once for all tangents.

  J is the derivative TensorFlow's reverse mode defines, in every mode: a
  custom gradient's backward pass, transposed (a straight-through
  estimator's identity, a surrogate gradient), as `tf.GradientTape.jacobian`
  and TensorFlow Graphics see it. Reverse mode twice transposes a backward
  pass only where it is differentiable in its cotangent; where one is not
  (it stops its cotangent, or runs NumPy), the adjoint test
  <J t, u> = <t, J^T u> (`_adjoint_test`, 1e-6 relative) fails and
  TensorFlow's forward mode of the forward computation is taken instead
  (`_forward_mode`), by the same rule eagerly and in graphs:

  - eagerly, the test runs on every call (a custom gradient cannot be seen
    there), and forward mode also where TensorFlow fails (a Python op);
  - in a graph, F's ops, and those of the loop, branch and function bodies
    it calls (`_forward_kind`), decide: a Python op (or a body that cannot
    be read) takes forward mode; a custom gradient (or gradient override)
    runs the adjoint test in the graph and chooses by `tf.cond`; otherwise
    every backward pass is TensorFlow's own, linear and differentiable in
    its cotangent, and reverse mode twice is taken as it is, unless the
    reverse pass adds an op with no registered gradient (e.g.
    `tf.image.resize`'s: `_backward_differentiable`): forward mode then.

  TensorFlow's forward mode (`tf.autodiff.ForwardAccumulator`) computes the
  same products op by op, each op's derivative a call of a `tf.function`
  that it looks up (and, for a new signature, traces) while F is traced or,
  eagerly, run: that was most of the package's trace time and of its eager
  solves' time. Here both reverse passes are plain ops, traced once; in a
  graph the unused J^T u is pruned.

  Each J t is None where F does not depend on `primal` through
  differentiable ops. `check`, if given, is called once as
  check(depends, F), with depends(tensor) -> whether a tensor computed by
  `function` depends on `primal` through differentiable ops (for
  `_validation.require_connected`).
  """
  flat_primal = tf.nest.flatten(primal)
  eager = tf.executing_eagerly()
  if not eager:
    graph = tf.compat.v1.get_default_graph()
    num_ops = len(graph.get_operations())
  with tf.GradientTape(watch_accessed_variables=False,
                       persistent=len(tangents) > 1) as outer:
    with tf.GradientTape(watch_accessed_variables=False,
                         persistent=check is not None) as inner:
      inner.watch(flat_primal)
      value = function(primal)
    if not eager:
      kind = _forward_kind(graph.get_operations()[num_ops:])
      if kind == _PYTHON:
        return _forward_mode(function, primal, tangents, check)
    cotangent = _generic_cotangent(value)
    outer.watch(cotangent)
    if not eager:
      num_ops = len(graph.get_operations())
    try:
      pullbacks = inner.gradient(value, flat_primal,
                                 output_gradients=cotangent)
    except tf.errors.UnknownError:
      if eager:  # (a Python op in F: see _PYTHON_OPS)
        return _forward_mode(function, primal, tangents, check)
      raise
    # A backward op with no gradient: reverse mode twice would see 0 there.
    differentiable = eager or _backward_differentiable(
        graph.get_operations()[num_ops:])
    if not differentiable and kind == _PLAIN:
      return _forward_mode(function, primal, tangents, check)
  try:
    connected = [i for i, g in enumerate(pullbacks) if g is not None]
    products = [] if connected else [None] * len(tangents)
    for tangent in tangents if connected and differentiable else []:
      flat_tangent = tf.nest.flatten(tangent)
      products.append(outer.gradient(
          [pullbacks[i] for i in connected], cotangent,
          output_gradients=[flat_tangent[i] for i in connected],
          unconnected_gradients=tf.UnconnectedGradients.ZERO))
  except tf.errors.UnknownError:
    if not eager:
      raise
    # (Eagerly, a Python op in F fails here: see _PYTHON_OPS.)
    return _forward_mode(function, primal, tangents, check)
  if check is not None:
    _check_connected(check, inner, value, flat_primal)
  transposed = lambda: _checked_forward_mode(  # pylint: disable=g-long-lambda
      function, primal, tangents, value, cotangent, pullbacks, connected)
  if connected and not differentiable:  # (a custom gradient's, in a graph)
    products = transposed()
  elif connected and (eager or kind == _CUSTOM):
    holds = _adjoint_test(products, cotangent, tangents, pullbacks,
                          connected, mask_non_finite=True)
    if eager:
      products = products if bool(holds) else transposed()
    else:
      products = tf.cond(holds, lambda: products, transposed)
  return value, products


def _checked_forward_mode(function, primal, tangents, value, cotangent,
                          pullbacks, connected):
  """J t by TensorFlow's forward mode where reverse mode twice failed the
  adjoint test, itself held to it: a custom gradient that neither reverse
  mode twice nor forward mode can transpose (one that stops its cotangent
  inside a nested `tf.function`: forward mode gives 0 there; eagerly, also
  `tf.image.resize`, whose gradient has no gradient) is a ValueError
  eagerly and NaN products in a graph (the solvers then stop with a
  non-finite gradient), never a wrong J."""
  eager = tf.executing_eagerly()
  try:
    products = [_zero_if_none(p, value)
                for p in _forward_mode(function, primal, tangents, None)[1]]
  except (TypeError, ValueError, NotImplementedError, LookupError):
    if eager:
      raise
    # (TensorFlow's forward mode cannot trace F, e.g. a tf.map_fn: NaN.)
    return [tf.fill(tf.shape(value), tf.constant(np.nan, value.dtype))
            for _ in tangents]
  holds = _adjoint_test(products, cotangent, tangents, pullbacks, connected,
                        mask_non_finite=False)
  if not eager:
    return [tf.where(holds, p, tf.constant(np.nan, p.dtype)) for p in products]
  if not bool(holds):
    raise ValueError(
        "The Jacobian of the residuals cannot be taken: their reverse-mode "
        "derivative is not differentiable in its upstream gradient (a "
        "tf.custom_gradient whose backward pass stops it or runs NumPy, or "
        "an op whose gradient has no gradient, such as tf.image.resize's), "
        "and TensorFlow's forward mode does not agree with it (e.g. a custom "
        "gradient inside a nested tf.function). Make such a backward pass a "
        "differentiable function of its upstream gradient.")
  return products


def _check_connected(check, tape, value, flat_primal):
  check(lambda t: any(g is not None for g in tape.gradient(t, flat_primal)),
        value)


def _generic_cotangent(value):
  """The dummy cotangent u: fixed numbers in [1, 2], not ones: a backward
  pass that special-cases a zero cotangent (the implicit gradients' w = 0
  for rhs = 0, in a solve nested in F) would be differentiated on that
  branch, and ones can cancel (F = [s, -s]: rhs = 0 again)."""
  return tf.random.stateless_uniform(tf.shape(value), [7, 11], 1.0, 2.0,
                                     dtype=value.dtype)


# What a graph's ops say of reverse mode twice (`_forward_kind`): every
# backward pass TensorFlow's own (_PLAIN), a custom gradient among them
# (_CUSTOM: the adjoint test decides in the graph), or a Python op or a body
# that cannot be read (_PYTHON: forward mode).
_PLAIN, _CUSTOM, _PYTHON = 0, 1, 2
# Ops that call function graphs (loop, branch and function bodies), and the
# attributes that name them.
_CALL_OPS = frozenset({"While", "StatelessWhile", "If", "StatelessIf",
                       "Case", "StatelessCase", "PartitionedCall",
                       "StatefulPartitionedCall"})
_BODY_ATTRS = ("cond", "body", "then_branch", "else_branch", "branches", "f")
# Backward ops with float outputs and no gradient that are constants of
# the cotangent (their derivative is 0 indeed), or a body's arguments.
_CONSTANT_OPS = frozenset({"ZerosLike", "OnesLike", "Fill", "Const",
                           "Shape", "ShapeN", "Size", "Rank",
                           "BroadcastGradientArgs", "Placeholder"})


def _traced_kind(function, primal):
  """`_forward_kind` of `function`'s ops, traced at `primal`'s signature in a
  throwaway `tf.function` (in a graph, before choosing to vectorize)."""
  graph = tf.function(function, autograph=False).get_concrete_function(
      tf.nest.map_structure(tf.TensorSpec.from_tensor, primal)).graph
  return _forward_kind(graph.get_operations())


def _bodies(op):
  """The graphs of the functions `op` calls, or None where one cannot be
  read (a function imported without its Python graph)."""
  bodies = []
  for attr in _BODY_ATTRS:
    try:
      value = op.get_attr(attr)
    except ValueError:
      continue
    for function in value if isinstance(value, list) else [value]:
      graph, body = op.graph, None
      while graph is not None and body is None:
        body = getattr(graph._get_function(function.name), "graph", None)  # pylint: disable=protected-access
        graph = getattr(graph, "outer_graph", None)
      if body is None:
        return None
      bodies.append(body)
  return bodies


def _forward_kind(ops):
  """_PLAIN, _CUSTOM or _PYTHON (above) for a graph's forward ops, the
  bodies they call included."""
  kind = _PLAIN
  for op in ops:
    if op.type in _PYTHON_OPS:
      return _PYTHON
    try:
      op.get_attr("_gradient_op_type")
      kind = _CUSTOM  # a tf.custom_gradient (or a gradient override)
    except ValueError:
      pass
    if op.type in _CALL_OPS:
      bodies = _bodies(op)
      if bodies is None:
        return _PYTHON
      for body in bodies:
        kind = max(kind, _forward_kind(body.get_operations()))
        if kind == _PYTHON:
          return kind
  return kind


def _backward_differentiable(ops):
  """Whether every backward op (in the bodies it calls too) has a
  registered gradient (or, with no float output or as a constant, needs
  none): TensorFlow registers none for some gradient ops (e.g.
  ResizeBilinearGrad), whose reverse pass would then be a silent 0."""
  for op in ops:
    if op.type in _CALL_OPS:
      bodies = _bodies(op)
      if bodies is None or not all(
          _backward_differentiable(body.get_operations()) for body in bodies):
        return False
      continue
    if op.type in _CONSTANT_OPS or not any(
        t.dtype.is_floating or t.dtype.is_complex for t in op.outputs):
      continue
    try:
      if _registered_gradient(op) is None:
        return False
    except LookupError:
      return False
  return True


def _adjoint_test(products, cotangent, tangents, pullbacks, connected,
                  mask_non_finite):
  """<J t, u> = <t, J^T u> for every tangent, to 1e-6 relative, as a
  boolean tensor (a product that a backward pass not differentiable in its
  cotangent cut to 0 fails it; rounding does not).

  Non-finite terms (a NaN tangent, a NaN member of a batch) cannot be
  judged. `mask_non_finite` (the test of reverse mode twice, which chooses
  the method for the whole batch): they are left out of both sides, so a
  NaN member neither passes a J that is 0 for the others nor changes the
  method they get (a member that is NaN on one side only can fail the test:
  forward mode is then taken, as before). Otherwise (the test of forward
  mode, op by op and so per member) a non-finite sum passes: the NaN is
  the products' answer."""
  holds = []
  for product, tangent in zip(products, tangents):
    flat_tangent = tf.nest.flatten(tangent)
    terms = [_wide_product(product, cotangent)] + [
        _wide_product(flat_tangent[i], pullbacks[i]) for i in connected]
    if mask_non_finite:
      terms = [tf.where(tf.math.is_finite(t), t, tf.zeros_like(t))
               for t in terms]
    left = tf.reduce_sum(terms[0])
    right = tf.add_n([tf.reduce_sum(t) for t in terms[1:]])
    scale = tf.reduce_sum(tf.abs(terms[0])) + tf.add_n(
        [tf.reduce_sum(tf.abs(t)) for t in terms[1:]])
    agree = tf.abs(left - right) <= 1e-6 * scale
    if not mask_non_finite:  # (explicitly: Grappler rewrites not(a > b)
      # into a <= b, which a NaN fails)
      agree = tf.logical_or(agree, tf.logical_not(
          tf.math.is_finite(left - right) & tf.math.is_finite(scale)))
    holds.append(agree)
  return tf.reduce_all(tf.stack(holds))


def _wide_product(a, b):
  return tf.cast(a, tf.float64) * tf.cast(b, tf.float64)


# Ops that run Python (`tf.py_function`, `tf.numpy_function`): the gradient
# of one replays, once, the tape its function recorded, so a reverse pass of
# that reverse pass fails (TensorFlow: a KeyError for the op's token). With
# one in F (seen among the ops it adds to a graph; eagerly, by that error),
# `directional_derivatives` takes TensorFlow's forward mode instead.
_PYTHON_OPS = frozenset({"EagerPyFunc", "PyFunc", "PyFuncStateless"})


def _forward_mode(function, primal, tangents, check):
  """`directional_derivatives` by `tf.autodiff.ForwardAccumulator`, one
  evaluation of F per tangent (op by op; for F with a Python op)."""
  flat_primal = tf.nest.flatten(primal)
  products = []
  accumulator = None
  for tangent in tangents or [tf.nest.map_structure(tf.zeros_like, primal)]:
    with tf.autodiff.ForwardAccumulator(
        flat_primal, tf.nest.flatten(tangent)) as accumulator:
      value = function(primal)
    products.append(accumulator.jvp(
        value, unconnected_gradients=tf.UnconnectedGradients.NONE))
  products = products[:len(tangents)]
  if check is not None:
    check(lambda t: accumulator.jvp(t) is not None, value)
  return value, products


def _registered_gradient(op):
  """The registered gradient function of a graph op (None where the op is
  registered not differentiable; LookupError where none is registered)."""
  from tensorflow.python.framework import ops  # pylint: disable=g-import-not-at-top
  return ops.get_gradient_function(op)


def _zero_if_none(product, value):
  return tf.zeros_like(value) if product is None else product


def jacobian(problem, point, batch_shape, num_residuals):
  """J = d/ds F(R_p(s)) at s = 0, shape [B..., m, n].

  Columns J e_j (one Jacobian-vector product per tangent coordinate, by
  `directional_derivatives`; vectorized with `tf.vectorized_map` for large
  n in graphs where F has no custom gradient or Python op, `_traced_kind`)
  when m >= n or m is unknown; reverse
  mode (one vector-Jacobian product per residual) when m < n. Neither builds an
  m x m matrix. Eagerly, and for n <= 16 in graphs, the products are a
  Python loop (eagerly F and J^T u are computed once for all of them): eagerly
  nothing is traced (and retraced) per call, and in graphs it traces much
  faster than `tf.vectorized_map` at the same run time.
  """
  if problem.jacobian_fn is not None:
    return problem.jacobian_fn(point)
  n = problem.tangent_dim
  dtype = tf.nest.flatten(point)[0].dtype
  zero_step = tf.zeros(_batch.concat_shapes(batch_shape, [n]), dtype)

  def residual_of_step(step):
    return problem.residual_fn(problem.retract(point, step))

  eager = tf.executing_eagerly()
  if num_residuals is not None and num_residuals < n:
    return _reverse_jacobian(residual_of_step, zero_step, eager)

  def directional_derivative(direction):
    tangent = tf.broadcast_to(direction, tf.shape(zero_step))
    residual, (product,) = directional_derivatives(residual_of_step,
                                                   zero_step, [tangent])
    return _zero_if_none(product, residual)

  basis = tf.eye(n, dtype=dtype)
  product = problem.tangent_product or (
      problem.forward_product and (
          lambda p, tangent: problem.forward_product(p, zero_step, tangent)))
  if not eager and n <= _UNROLLED_JVPS and product:
    columns = tf.stack([
        product(point, tf.broadcast_to(basis[i], tf.shape(zero_step)))
        for i in range(n)])
  elif eager or n <= _UNROLLED_JVPS:
    residual, products = directional_derivatives(
        residual_of_step, zero_step,
        [tf.broadcast_to(basis[i], tf.shape(zero_step)) for i in range(n)])
    columns = tf.stack([_zero_if_none(p, residual) for p in products])
  elif _traced_kind(residual_of_step, zero_step) == _PLAIN:
    columns = tf.vectorized_map(directional_derivative, basis,
                                fallback_to_while_loop=True, warn=False)
  else:  # (A custom gradient's adjoint test and tf.cond, or a Python op's
    # forward mode, are not vectorized by pfor: NaN or failures there.)
    residual, products = directional_derivatives(
        residual_of_step, zero_step,
        [tf.broadcast_to(basis[i], tf.shape(zero_step)) for i in range(n)])
    columns = tf.stack([_zero_if_none(p, residual) for p in products])
  # columns: [n, B..., m] -> [B..., m, n].
  rank = columns.shape.rank
  return tf.transpose(columns, list(range(1, rank)) + [0])


# Set to None to inline the called functions too (benchmarks/first_call.py
# --inline).
NOINLINE = {"_noinline": True}


def trace_once(function, called=True):
  """`function` as one `tf.function` (traced once per input signature).

  `called=True`: graphs call it rather than inline it. A call of a plain
  `tf.function` inside a graph is inlined before the graph runs, so a
  function called at k places is optimized by Grappler k times; for the big
  bodies called at many places (the matrix-free J v and J^T u in every
  conjugate-gradient iteration, the chunked passes, the block-sparse
  blocks) that dominated the first call (a batch of sphere fits by
  conjugate gradients reached 26,000 nodes inlined; called, its first call
  is 1.6x faster). `called=False`: inlined, for the small dense products
  (the Jacobian's columns, the geodesic correction): calling them costs a
  function instantiation each, about a third of a small fit's first run
  (docs/benchmarks.md). Either way XLA compiles the calls, and gradients
  and forward-mode products pass through them.
  """
  return tf.function(function, autograph=False,
                     experimental_attributes=NOINLINE if called else None)


def traced_forward_product(problem, check=None):
  """(point, step, tangent) -> d/dt F(R_p(step + t tangent)) at t = 0, as one
  `tf.function`: F and its forward-mode derivative are traced once (per input
  signature) however often it is called, instead of once per Jacobian column,
  per relinearization and per geodesic correction (each by
  `directional_derivatives`: reverse mode twice). The calls are inlined
  before the graph runs (`trace_once(..., called=False)`); a matrix-free
  linearization calls it inside its own called J v.

  `check`, if given, is `directional_derivatives`' check, called when F is
  traced (once per signature): a front-end's structural checks of the residual's
  derivative (`_validation.require_connected`) then cost no trace of their
  own.
  """
  def forward_product(point, step, tangent):
    residual, (product,) = directional_derivatives(
        lambda s: problem.residual_fn(problem.retract(point, s)), step,
        [tangent], check)
    return _zero_if_none(product, residual)
  return trace_once(forward_product, called=False)


def traced_tangent_product(problem, tangent_vector, check=None):
  """(point, tangent) -> J tangent = d/dt F(R_p(t tangent)) at t = 0, as one
  `tf.function` (traced once per input signature, like
  `traced_forward_product`), by the chain rule: every retraction has
  DR_p(0) = id on the tangent space, so J c = DF(p)[xi] with the ambient
  tangent vector xi = `tangent_vector(p, c)` (the manifold's basis map).
  Only F is differentiated, not the retraction: for SO(3) the function
  graphs are half as large and the first call about twice as fast. For front-ends that need no products at a nonzero step
  (no geodesic acceleration). `check` as in `traced_forward_product`.
  """
  def tangent_product(point, tangent):
    ambient = tangent_vector(point, tangent)
    residual, (product,) = directional_derivatives(
        problem.residual_fn, point, [ambient], check)
    return _zero_if_none(product, residual)
  return trace_once(tangent_product, called=False)


def _reverse_jacobian(residual_of_step, zero_step, eager):
  """Reverse-mode Jacobian for few residuals; batch dimensions stay blocks."""
  batch_rank = zero_step.shape.rank - 1
  if batch_rank == 0:
    with tf.GradientTape(watch_accessed_variables=False,
                         persistent=eager) as tape:
      tape.watch(zero_step)
      residual = residual_of_step(zero_step)
    return tape.jacobian(residual, zero_step,
                         unconnected_gradients=tf.UnconnectedGradients.ZERO,
                         experimental_use_pfor=not eager)
  batch_shape = tf.shape(zero_step)[:-1]
  flat_step = tf.reshape(zero_step, [-1, zero_step.shape[-1]])
  with tf.GradientTape(watch_accessed_variables=False,
                       persistent=eager) as tape:
    tape.watch(flat_step)
    residual = residual_of_step(tf.reshape(flat_step, tf.shape(zero_step)))
    flat_residual = tf.reshape(residual, [tf.shape(flat_step)[0], -1])
  flat_jacobian = tape.batch_jacobian(
      flat_residual, flat_step,
      unconnected_gradients=tf.UnconnectedGradients.ZERO,
      experimental_use_pfor=not eager)
  return tf.reshape(flat_jacobian,
                    tf.concat([batch_shape, tf.shape(flat_jacobian)[1:]], 0))


def hold_fixed(problem, point, linearization, gradient):
  """(J, g) with the columns and entries of `problem.fixed_fn`'s coordinates
  zeroed; unchanged without one."""
  if problem.fixed_fn is None:
    return linearization, gradient
  fixed = problem.fixed_fn(point, gradient)
  free = tf.cast(tf.logical_not(fixed), gradient.dtype)
  return linearization.hold_fixed(free), gradient * free
