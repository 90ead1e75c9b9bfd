"""Levenberg-Marquardt with the contract of TensorFlow Graphics.

A drop-in replacement for `tfg.math.optimizer.levenberg_marquardt.minimize`:
same signature, defaults, callback and return values, and the same iterates.
For residuals r_k(x_1, ..., x_V), flattened and concatenated into
r in R^m, and the variables flattened into x in R^n, it minimizes

    objective(x) = sum_k tf.nn.l2_loss(r_k) = 1/2 ||r(x)||^2.

Each of exactly `max_iterations` iterations solves the damped normal equations

    (J^T J + lambda I) d = J^T r              (m >= n)
    d = J^T (J J^T + lambda I)^-1 r           (m <  n)

by Cholesky factorization, as `tf.linalg.lstsq(J, r, l2_regularizer=lambda)`
does, and accepts x - d if and only if it lowers the objective strictly.
A rejected step (including a failed factorization or a non-finite candidate)
keeps x and multiplies lambda by `regularizer_multiplier`; lambda never
decreases and there is no early stop.

What differs from TensorFlow Graphics (all compatible with code written for
it):
- A failed factorization is a rejected step in every mode: eagerly, inside
  `tf.function`, in a TF1 `Session` and under XLA (whose Cholesky rounds
  differently: on an exactly singular J^T J it may fail at another lambda).
  (The reference catches the error only eagerly.)
- J comes from forward-mode differentiation when m >= n and is recomputed
  only after an accepted step; the reference builds an m x m intermediate
  and relinearizes every iteration.
- Arguments are checked up front (see `minimize`).
- Keyword-only `batch_dims` solves many independent problems in one call.
"""

import tensorflow as tf

from tfg_optim import _engine
from tfg_optim import damping as damping_lib
from tfg_optim import _validation
from tfg_optim import _vector_space


def _as_the_caller_converts(function):
  """`function` as AutoGraph treats the code calling `minimize`: converted
  where the caller's AutoGraph is on (`tf.function`'s default), as it
  converts TensorFlow Graphics' `minimize` and the callables it calls, so
  Python control flow on tensors in a residual or callback works as there;
  as is otherwise (eagerly too: converted code runs slower eagerly)."""
  return tf.__internal__.autograph.tf_convert(
      function, tf.__internal__.autograph.control_status_ctx(),
      convert_by_default=False)


def minimize(residuals,
             variables,
             max_iterations,
             regularizer=1e-20,
             regularizer_multiplier=10.0,
             callback=None,
             name="levenberg_marquardt_minimize",
             *,
             batch_dims=0):
  r"""Minimizes a set of residuals in the least-squares sense.

  Args:
    residuals: A residual or a list/tuple of residuals. A residual is a Python
      callable, called as `residual(*variables)`; its output (any shape) is
      flattened. With `batch_dims=k` its first k dimensions are the batch.
    variables: A variable or a list or tuple of variables defining the
      starting point: tensors, `tf.Variable`s (read, never assigned), NumPy
      arrays or lists, all float32 or all float64, with static shapes.
    max_iterations: The number of iterations, a Python int >= 1.
    regularizer: The initial damping lambda >= 0. The bigger it is the smaller
      the steps. Its dtype follows `variables[0]`.
    regularizer_multiplier: Factor >= 1 applied to lambda after an iteration
      that does not decrease the objective.
    callback: Optional `callback(iteration, objective_value, variables)`,
      called after every iteration (accepted or not) with the 1-based int32
      iteration, the objective and the list of variables. Ops it returns (an
      op or a list of ops) run every iteration in graph mode; any other
      return value is ignored.
    name: A name for this op.
    batch_dims: Keyword-only. The number of leading dimensions shared by every
      variable and residual output that index independent problems. Each
      problem has its own lambda and acceptance; the objective returned has
      the batch shape.

  Returns:
    A tuple `(objective_value, variables)`: the objective at the final
    iterate and the list of final variables, each shaped like its input.

  Raises:
    ValueError: If `max_iterations` is not at least 1, `regularizer` is
      negative, `regularizer_multiplier` < 1, `variables` is empty or has an
      unknown shape, or (eagerly) the starting point has NaN or Inf.
    TypeError: If a residual or the callback is not callable, `max_iterations`
      is not an integer, variables are not float32/float64 or mix dtypes, or a
      residual returns another dtype.
    InvalidArgumentError: In graph mode, when the graph runs, if the
      starting point has NaN or Inf (XLA cannot check this: there the start is
      returned unchanged with a NaN objective).
  """
  residuals = [_as_the_caller_converts(residual) for residual in
               _validation.as_callable_list(residuals, "residuals")]
  if callback is not None and callable(callback):
    callback = _as_the_caller_converts(callback)
  return _minimize(residuals, variables, max_iterations, regularizer,
                   regularizer_multiplier, callback, name, batch_dims)


# The package's own code is plain TensorFlow: AutoGraph converting it (which
# `tf.function` does recursively by default, once per process) cost ~4 s of
# the first trace of a 3-parameter fit, against ~0.2 s unconverted.
@tf.autograph.experimental.do_not_convert
def _minimize(residuals, variables, max_iterations, regularizer,
              regularizer_multiplier, callback, name, batch_dims):
  """`minimize` with `residuals` (a list) and `callback` already as
  AutoGraph should call them."""
  max_iterations = _validation.positive_int(max_iterations, "max_iterations")
  regularizer = _validation.real_number(regularizer, "regularizer", lower=0.0)
  regularizer_multiplier = _validation.real_number(
      regularizer_multiplier, "regularizer_multiplier", lower=1.0)
  batch_dims = _validation.positive_int(batch_dims, "batch_dims", minimum=0)
  if callback is not None and not callable(callback):
    raise TypeError(f"'callback' must be callable, got "
                    f"{type(callback).__name__}.")
  if not isinstance(variables, (list, tuple)):
    variables = [variables]
  if not variables:
    raise ValueError("'variables' must not be empty.")

  with tf.name_scope(name or "levenberg_marquardt_minimize"):
    variables = _validation.float_tensors(list(variables), "variables")
    _validation.check_batch_shapes(variables, batch_dims, "variables")
    variables = _validation.check_finite(variables, "variables")
    dtype = variables[0].dtype
    shapes = _vector_space.event_shapes(variables, batch_dims)
    evaluate = _vector_space.ResidualStack(residuals, dtype, batch_dims)

    def objective(residual):
      pieces = tf.split(residual, evaluate.sizes, axis=-1)
      if batch_dims == 0:  # TensorFlow Graphics' exact arithmetic.
        return tf.reduce_sum([tf.nn.l2_loss(piece) for piece in pieces])
      return tf.add_n([0.5 * tf.reduce_sum(tf.square(piece), axis=-1)
                       for piece in pieces])

    problem = _engine.Problem(
        residual_fn=evaluate,
        retract=lambda point, step: _vector_space.retract(point, step,
                                                          batch_dims),
        tangent_dim=sum(_vector_space.sizes(shapes)),
        cost_fn=objective,
        jacobian_fn=None)
    policy = damping_lib.MultiplicativeDamping(regularizer, regularizer_multiplier)
    engine_callback = None
    if callback is not None:
      engine_callback = lambda it, cost, point: callback(it, cost,
                                                         list(point))
    # TensorFlow Graphics' contract: every iteration runs, no other stop.
    state = _engine.minimize(problem, variables, policy, max_iterations,
                             callback=engine_callback, safeguards=False)
    return state.cost, list(state.point)
