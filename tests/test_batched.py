"""Batched problems: B independent least-squares fits in one call (issue 6).

Oracle: the same problems solved one at a time. A batch must reproduce each
problem's own iterates (per-iteration records), final values, counters and
stop reasons, whatever the other problems of the batch do (converge at once,
need hundreds of iterations, sit at a saddle, have every step rejected or
produce NaN). Rotation fits are also checked against Kabsch's closed form.
The graph tests check that the Jacobian of a batch is [B, m, n], computed with
n forward-mode products (not B * n), and that nothing of size B * m or B * n
is ever built.
"""

import functools

import numpy as np
import pytest
import tensorflow as tf

import tfg_optim
from tests import modes
from tests import problems
from tfg_optim import levenberg_marquardt
from tfg_optim import manifolds
from tfg_optim import riemannian
from tfg_optim import stopping

MODES = modes.MODES
DTYPES = ("float64", "float32")
COUNTERS = ("num_iterations", "num_accepted", "num_rejected",
            "num_residual_evaluations", "num_jacobian_evaluations",
            "stop_reason", "converged")


def _single_mode(mode):
  """Where to solve one problem alone to compare with a batch solved in
  `mode`: under XLA too for XLA (its kernels round differently)."""
  return "xla" if mode == "xla" else "function"


def _solve_each(build, problems, mode):
  """[build(*inputs) for inputs in problems] as NumPy values, with `build`
  traced once in `mode` ("function" or "xla") and called on each problem's
  inputs (all of one shape): the data are inputs of the trace, not constants,
  so the problems share one trace instead of one each."""
  function = tf.function(build, autograph=False,
                         jit_compile=(mode == "xla"))
  return [tf.nest.map_structure(
      lambda value: value.numpy() if hasattr(value, "numpy") else value,
      function(*[tf.constant(np.asarray(v)) for v in inputs]))
          for inputs in problems]


# -- a family of 2-parameter problems of very different difficulty -------------


def family(x, c):
  """Residuals [..., 4] of x [..., 2] for coefficients c [..., 6].

  c[5] > 0 adds a term that is NaN everywhere but x0 = 0 and has no
  derivative: every step from x0 = 0 is rejected.
  """
  x0, x1 = x[..., 0], x[..., 1]
  nan_term = tf.where(c[..., 5] > 0,
                      tf.stop_gradient(0.0 * tf.sqrt(-tf.square(x0))),
                      tf.zeros_like(x0))
  return tf.stack([c[..., 0] * (x0 - c[..., 1]) + nan_term,
                   c[..., 2] * (x1 - tf.square(x0)),
                   c[..., 3] * (tf.square(x0) + tf.square(x1) - 1.0),
                   c[..., 4] * (x0 + x1 - 1.5)], axis=-1)


# name: (coefficients, start)
PROBLEMS = {
    "linear": ([1, 2, 0, 0, 1, 0], [5, 5]),  # converges in a few iterations
    "rosenbrock": ([1, 1, 10, 0, 0, 0], [-1.2, 1]),
    "stiff_rosenbrock": ([1, 1, 300, 0, 0, 0], [-3, -4]),  # ~100 iterations
    "saddle": ([0, 0, 0, 1, 0, 0], [0, 0]),  # zero gradient at the start
    "all_rejected": ([1, -1, 0, 0, 0, 1], [0, 5]),  # every step non-finite
    "rosenbrock_100": ([1, 1, 100, 0, 0, 0], [-1.2, 1]),
}
NAMES = tuple(PROBLEMS)
COEFFICIENTS = np.array([PROBLEMS[k][0] for k in NAMES], np.float64)
STARTS = np.array([PROBLEMS[k][1] for k in NAMES], np.float64)
MAX_ITERATIONS = 400
# float32 iterates of these drift apart by rounding (~1% after 40 steps);
# only their stop reason and solution are compared.
CHAOTIC_FLOAT32 = ("stiff_rosenbrock", "rosenbrock_100")


def _least_squares(coefficients, start, **kwargs):
  # With Nielsen's damping (a Cholesky factorization) and no geodesic
  # acceleration, a batch reproduces each problem's iterates to rounding;
  # batched eigendecompositions and second derivatives round differently
  # (see test_default_options_batch_reaches_each_solution).
  kwargs.setdefault("damping", "nielsen")
  kwargs.setdefault("geodesic_acceleration", None)
  coefficients = tf.cast(coefficients, start.dtype)
  batch_dims = coefficients.shape.rank - 1
  return tfg_optim.least_squares(lambda x: family(x, coefficients), start,
                                 batch_dims=batch_dims,
                                 max_iterations=MAX_ITERATIONS, record=True,
                                 **kwargs)


@functools.lru_cache(maxsize=None)
def _single_solutions(dtype):
  """Each problem of PROBLEMS alone (tf.function), as NumPy results."""
  return _solve_each(
      lambda x, c: _least_squares(c, x)._asdict(),
      [[STARTS[index].astype(dtype), COEFFICIENTS[index].astype(dtype)]
       for index in range(len(NAMES))], "function")


def _tolerance(dtype):
  return dict(rtol=1e-10, atol=1e-300) if dtype == "float64" else dict(
      rtol=2e-3, atol=1e-6)


def _assert_problem_equal(batched, index, single, dtype, names=NAMES):
  """Problem `index` (a tuple index into the batch shape) of `batched`
  equals `single`; float32 compares iterates loosely (other kernels)."""
  name = names[index if isinstance(index, int) else -1]
  tolerance = _tolerance(dtype)
  pick = lambda value: np.asarray(value)[index]
  for field in COUNTERS:
    if dtype == "float32" and name in CHAOTIC_FLOAT32 and field not in (
        "stop_reason", "converged"):
      continue  # 100 float32 iterations on a stiff valley: rounding-chaotic.
    np.testing.assert_array_equal(pick(batched[field]), single[field],
                                  err_msg=f"{name}: {field}")
  if dtype == "float32" and name in CHAOTIC_FLOAT32:
    np.testing.assert_allclose(pick(batched["position"]), single["position"],
                               atol=1e-3, err_msg=name)
    return
  def close(got, want, message):
    # Eager Jacobians (a Python loop) and batched kernels round differently
    # from a traced single solve: allow rounding relative to the values' scale.
    want = np.asarray(want)
    scale = np.nanmax(np.abs(want)) if np.isfinite(want).any() else 0.0
    tolerance["atol"] = (max(1e-6, 1e-4 * scale) if dtype == "float32" else
                         max(1e-15, 1e-11 * scale))
    np.testing.assert_allclose(got, want, equal_nan=True, err_msg=message,
                               **tolerance)
  for field in ("position", "cost", "initial_cost", "gradient_norm",
                "damping", "step_size", "residual"):
    close(pick(batched[field]), single[field], f"{name}: {field}")
  for record, values in single["records"].items():
    column = np.asarray(batched["records"][record])[(slice(None),) + (
        index if isinstance(index, tuple) else (index,))]
    close(column, values, f"{name}: record {record}")


# Not eagerly (slow): test_batch_dims_0_1_2[eager] solves the same six
# problems as an eager [2, 3] batch and makes the same float64 comparisons.
# Each graph mode once, both dtypes between them.
@pytest.mark.parametrize("mode,dtype", [("function", "float64"),
                                        ("xla", "float32"),
                                        ("session", "float64")])
def test_batch_equals_each_problem_alone(mode, dtype):
  singles = _single_solutions(dtype)
  iterations = [int(s["num_iterations"]) for s in singles]
  # The batch really mixes difficulties.
  assert iterations[NAMES.index("saddle")] == 0
  assert iterations[NAMES.index("linear")] <= 5
  assert 60 <= iterations[NAMES.index("stiff_rosenbrock")] <= 250
  coefficients = COEFFICIENTS.astype(dtype)
  batched = modes.run(lambda x: _least_squares(coefficients, x)._asdict(),
                      [STARTS.astype(dtype)], mode)
  for index, single in enumerate(singles):
    _assert_problem_equal(batched, index, single, dtype)
  assert np.asarray(batched["cost"]).shape == (len(NAMES),)
  assert np.asarray(batched["records"]["cost"]).shape == (MAX_ITERATIONS,
                                                         len(NAMES))


# Eager batches: the conformance table's eager cells with batch_dims=1 and
# tests/test_honest_endings.py's poisoned batch; XLA batches: the table's
# XLA cells with batch_dims=1 and the tests below.
@pytest.mark.parametrize("mode", ["function", "session"])
def test_batch_dims_0_1_2(mode):
  """batch_dims=0 is a single problem; [2, 3] equals the flat [6] batch."""
  singles = _single_solutions("float64")
  coefficients = COEFFICIENTS.reshape(2, 3, 6)
  batched = modes.run(lambda x: _least_squares(coefficients, x)._asdict(),
                      [STARTS.reshape(2, 3, 2)], mode)
  assert np.asarray(batched["cost"]).shape == (2, 3)
  assert np.asarray(batched["position"]).shape == (2, 3, 2)
  assert np.asarray(batched["residual"]).shape == (2, 3, 4)
  for flat in range(len(NAMES)):
    index = np.unravel_index(flat, (2, 3))
    _assert_problem_equal(batched, tuple(int(i) for i in index),
                          singles[flat], "float64",
                          names=NAMES[:flat + 1])
  index = NAMES.index("rosenbrock")
  alone = modes.run(
      lambda x: _least_squares(COEFFICIENTS[index], x)._asdict(),
      [STARTS[index]], mode)
  assert np.asarray(alone["cost"]).shape == ()
  _assert_problem_equal(alone, (), singles[index], "float64",
                        names=NAMES[:index + 1])


def test_frozen_problems_do_not_change_or_count():
  """Eagerly, a callback sees every iteration: after a problem stops its
  point and cost never change, and its counters match its own solve."""
  names = ("linear", "rosenbrock", "saddle")
  rows = [NAMES.index(k) for k in names]
  seen = []
  def callback(iteration, cost, variables):
    seen.append((int(iteration), cost.numpy(), variables[0].numpy()))
  result = tfg_optim.least_squares(
      lambda x: family(x, tf.constant(COEFFICIENTS[rows])),
      tf.constant(STARTS[rows]), batch_dims=1, max_iterations=MAX_ITERATIONS,
      callback=callback, damping="nielsen", geodesic_acceleration=None)
  iterations = result.num_iterations.numpy()
  assert len(seen) == iterations.max()
  singles = _single_solutions("float64")
  for column, row in enumerate(rows):
    stop = iterations[column]
    assert stop == singles[row]["num_iterations"]
    final_cost = result.cost.numpy()[column]
    final_point = result.position.numpy()[column]
    for iteration, cost, point in seen[max(stop - 1, 0):]:
      assert cost[column] == final_cost, (names[column], iteration)
      np.testing.assert_array_equal(point[column], final_point)
    # Counters are those of the problem's own iterations only.
    assert (result.num_accepted.numpy()[column] +
            result.num_rejected.numpy()[column]) == stop
    assert result.num_residual_evaluations.numpy()[column] == 1 + stop
    assert (result.num_jacobian_evaluations.numpy()[column] ==
            1 + result.num_accepted.numpy()[column])
  assert iterations[names.index("saddle")] == 0
  assert iterations[names.index("linear")] < iterations[
      names.index("rosenbrock")]


# Regression: the engine used to start step_norm at 0 and keep it for a
# non-finite step, so step tests reported such a problem converged (fixed in
# 60ba1ec: the step norm starts at +inf).
@pytest.mark.parametrize("front_end", ("least_squares", "riemannian"))
def test_rejected_problem_is_not_converged(front_end):
  coefficients = tf.constant(COEFFICIENTS[[NAMES.index("all_rejected")] * 2])
  start = tf.constant([[0.0, 5.0], [0.0, 5.0]], tf.float64)
  if front_end == "least_squares":
    result = tfg_optim.least_squares(lambda x: family(x, coefficients), start,
                                     batch_dims=1, max_iterations=30)
  else:
    result = riemannian.levenberg_marquardt(
        manifolds.Euclidean(2), lambda x: family(x, coefficients), start,
        batch_dims=1, return_state=True,
        stopping_criterion=(stopping.StopAfterIteration(30) |
                            stopping.StopWhenStepsizeLess(1e-12)))
  assert result.num_accepted.numpy().tolist() == [0, 0]
  assert not result.converged.numpy().any(), (
      result.stop_reason.numpy(), result.step_size.numpy())


# -- a singular / NaN-producing problem next to regular ones -------------------


def _poison_family(x, c):
  """c[0] = 1: NaN Jacobian at the start (sqrt at 0); c[1] = 1: the second
  variable never appears (rank-deficient J); else a regular curve."""
  x0, x1 = x[..., 0], x[..., 1]
  singular = c[..., 0:1] * tf.stack([tf.sqrt(tf.abs(x0)) - 1.0,
                                     tf.sqrt(tf.abs(x0)) + 1.0], -1)
  deficient = c[..., 1:2] * tf.stack([x0 - 1.0, x0 - 2.0], -1)
  regular = c[..., 2:3] * tf.stack([x0 - 3.0, x1 * x0 - 1.0], -1)
  return singular + deficient + regular


POISON_C = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, 1]], np.float64)
POISON_X = np.array([[0, 0], [1, 2], [1, 1], [-2, 0.5]], np.float64)


def _poison_solve(front_end, c, x):
  residual = lambda v: _poison_family(v, tf.convert_to_tensor(c))
  batch_dims = len(c.shape) - 1
  if front_end == "least_squares":
    r = tfg_optim.least_squares(residual, x, batch_dims=batch_dims,
                                max_iterations=50)
    return r.cost, r.position, r.num_iterations, r.stop_reason
  if front_end == "tfg":  # lambda = 1e-20: J^T J + lambda I is singular.
    cost, (position,) = levenberg_marquardt.minimize(
        residual, [x], 30, batch_dims=batch_dims)
    return cost, position
  r = riemannian.levenberg_marquardt(
      manifolds.Euclidean(2), residual, x, batch_dims=batch_dims,
      return_state=True)
  return r.cost, r.position, r.num_iterations, r.stop_reason


@functools.lru_cache(maxsize=None)
def _poison_alone(front_end, single_mode):
  """Problems 1.. of POISON_C alone, one trace for all (shared by modes)."""
  return _solve_each(lambda c, x: _poison_solve(front_end, c, x),
                     [[POISON_C[row], POISON_X[row]]
                      for row in range(1, len(POISON_C))], single_mode)


# least_squares and the TensorFlow Graphics front-end in two modes each, the
# Riemannian one under XLA (least_squares under XLA in
# test_batch_equals_each_problem_alone and
# test_default_options_batch_reaches_each_solution).
@pytest.mark.parametrize("mode,front_end", [
    ("eager", "least_squares"), ("function", "least_squares"),
    ("function", "tfg"), ("session", "tfg"),
    ("xla", "riemannian")])
def test_singular_problem_does_not_poison_the_batch(mode, front_end):
  batched = modes.run(lambda x: _poison_solve(front_end, POISON_C, x),
                      [POISON_X], mode)
  for row, alone in enumerate(_poison_alone(front_end, _single_mode(mode)),
                              start=1):
    for got, want in zip(batched, alone):
      np.testing.assert_allclose(np.asarray(got)[row], want, rtol=1e-12,
                                 atol=1e-300, err_msg=f"problem {row}")
    assert np.all(np.isfinite(np.asarray(batched[1])[row]))
  # The regular problems really are solved.
  np.testing.assert_allclose(np.asarray(batched[1])[[1, 3]],
                             [[3.0, 1.0 / 3.0]] * 2, atol=1e-2)
  # The NaN-Jacobian problem never moves.
  np.testing.assert_array_equal(np.asarray(batched[1])[0], POISON_X[0])


# -- levenberg_marquardt.minimize (TensorFlow Graphics contract) ---------------


# Every mode once, each dtype in two of them.
# (Under XLA: test_levenberg_marquardt's test_batch_dims_equal_independent_solves.)
@pytest.mark.parametrize("mode,dtype", [("eager", "float64"),
                                        ("function", "float32"),
                                        ("session", "float64")])
def test_tfg_minimize_batched(mode, dtype):
  rows = [NAMES.index(k) for k in ("linear", "rosenbrock", "saddle",
                                   "rosenbrock_100")]
  coefficients = COEFFICIENTS[rows].astype(dtype)
  starts = STARTS[rows].astype(dtype)
  # Two variables and two residuals per problem, batch [2, 2].
  def solve(c, x, y, batch_dims):
    def residuals():
      point = lambda a, b: tf.stack([a, b], -1)
      return (lambda a, b: family(point(a, b), c)[..., :2],
              lambda a, b: family(point(a, b), c)[..., 2:])
    cost, variables = levenberg_marquardt.minimize(
        list(residuals()), [x, y], 20, batch_dims=batch_dims)
    return cost, variables[0], variables[1]

  c = coefficients.reshape(2, 2, 6)
  batched = modes.run(lambda x, y: solve(c, x, y, 2),
                      [starts[:, 0].reshape(2, 2), starts[:, 1].reshape(2, 2)],
                      mode)
  tolerance = _tolerance(dtype)
  each_alone = _solve_each(  # one trace; the coefficients are inputs
      lambda c, x, y: solve(c, x, y, 0),
      [[coefficients[flat], starts[flat, 0], starts[flat, 1]]
       for flat in range(len(rows))], "function")
  for flat, alone in enumerate(each_alone):
    index = np.unravel_index(flat, (2, 2))
    for got, want in zip(batched, alone):
      np.testing.assert_allclose(np.asarray(got)[index], want,
                                 err_msg=f"problem {flat}", **tolerance)


# -- riemannian.levenberg_marquardt: rotation fits on SO(3) vs Kabsch ----------


def _rotation_fits(batch, points, dtype, seed=3):
  rng = np.random.default_rng(seed)
  source = rng.standard_normal((batch, points, 3))
  rotations = np.asarray(manifolds.SpecialOrthogonal(3).random_point(
      (batch,), tf.float64, seed=seed))
  target = np.einsum("bij,bpj->bpi", rotations, source)
  target += 0.01 * rng.standard_normal(target.shape)
  kabsch = problems.kabsch(source, target)  # argmin_R sum ||R p - q||^2
  return source.astype(dtype), target.astype(dtype), kabsch


# A Session batch against each problem alone and Kabsch. Other modes and
# float32: the conformance table's rotation batches against the closed
# form, test_singular_problem_does_not_poison_the_batch (Riemannian batch
# against each problem alone under XLA) and test_riemannian's many-rotation
# fits (eager and tf.function batches).
@pytest.mark.parametrize("mode,dtype", [("session", "float64")])
def test_riemannian_rotation_batch_vs_kabsch(mode, dtype):
  source, target, kabsch = _rotation_fits(5, 8, dtype)
  starts = np.broadcast_to(np.eye(3, dtype=dtype), (5, 3, 3)).copy()
  starts[1] = np.asarray(manifolds.SpecialOrthogonal(3).random_point(
      (), tf.float64, seed=9)).astype(dtype)
  starts[2] = kabsch[2].astype(dtype)  # already optimal
  # Tolerances above the rounding level: the batched and single kernels round
  # differently, so a stop decided by noise could come an iteration apart.
  tiny = 1e-6 if dtype == "float64" else 1e-4
  def solve(s, t, p):
    residual = lambda r: tf.linalg.matmul(s, r, transpose_b=True) - t
    result = riemannian.levenberg_marquardt(
        manifolds.SpecialOrthogonal(3), residual, p,
        batch_dims=p.shape.rank - 2, return_state=True, record=60,
        stopping_criterion=(stopping.StopAfterIteration(60) |
                            stopping.StopWhenGradientNormLess(tiny) |
                            stopping.StopWhenStepsizeLess(tiny)))
    return result._asdict()

  batched = modes.run(solve, [source, target, starts], mode)
  np.testing.assert_allclose(batched["position"], kabsch,
                             atol=1e-9 if dtype == "float64" else 2e-5)
  each_alone = _solve_each(solve, [[source[index], target[index],
                                    starts[index]] for index in range(5)],
                           _single_mode(mode))
  for index, alone in enumerate(each_alone):
    for field in COUNTERS:
      np.testing.assert_array_equal(batched[field][index], alone[field],
                                    err_msg=f"{index}: {field}")
    tolerance = _tolerance(dtype)
    np.testing.assert_allclose(batched["position"][index], alone["position"],
                               **tolerance)
    for record, values in alone["records"].items():
      # Rounding of batched vs single kernels, relative to the record's scale.
      scale = np.nanmax(np.abs(values))
      np.testing.assert_allclose(
          batched["records"][record][:, index], values, equal_nan=True,
          rtol=tolerance["rtol"],
          atol=(1e-11 if dtype == "float64" else 1e-4) * scale)
  assert batched["num_iterations"][2] <= 1  # started at the optimum


# -- batch summaries -----------------------------------------------------------


@pytest.mark.parametrize("mode", ("eager", "session"))
def test_summary_of_a_batch(mode):
  coefficients = COEFFICIENTS.reshape(2, 3, 6)
  def build(x):
    return _least_squares(coefficients, x)
  if mode == "eager":
    # Results holding eager tensors, as an eager call returns them; the
    # solve itself is traced (eagerly this batch takes many seconds).
    result = tf.function(build, autograph=False)(
        tf.constant(STARTS.reshape(2, 3, 2)))
    assert isinstance(result, tfg_optim.LeastSquaresResults)
    assert all(isinstance(v, tf.Tensor) and hasattr(v, "numpy")
               for v in tf.nest.flatten(result))
  else:
    values = modes.run(lambda x: build(x)._asdict(),
                       [STARTS.reshape(2, 3, 2)], "session")
    result = tfg_optim.LeastSquaresResults(**values)
  text = result.summary()
  assert text == str(result)
  assert "6 problems" in text
  reasons = np.asarray(result.stop_reason).reshape(-1)
  for reason in set(reasons.tolist()):
    name = tfg_optim.StopReason(reason).name.lower()
    assert f"{name} {int((reasons == reason).sum())}" in text
  converged = int(np.asarray(result.converged).sum())
  assert f"{converged} converged" in text
  assert f"max {int(np.asarray(result.num_iterations).max())}" in text


# -- the graph: [B, m, n] Jacobians from n forward products, no [B*m, B*n] ------


def _graph_shapes(concrete):
  """Static output shapes of every op of a traced function, its while-loop
  bodies, conds and vectorized maps included."""
  shapes, types, seen = set(), set(), set()
  def visit(graph):
    for op in graph.get_operations():
      types.add(op.type)
      for output in op.outputs:
        if output.shape.rank is not None:
          shapes.add(tuple(output.shape.as_list()))
    for name, function in getattr(graph, "_functions", {}).items():
      if name not in seen and getattr(function, "graph", None) is not None:
        seen.add(name)
        visit(function.graph)
  visit(concrete.graph)
  return shapes, types, len(seen)


@pytest.mark.parametrize("m,n", ((5, 3), (2, 5)))
def test_graph_has_no_block_diagonal_jacobian(m, n):
  batch = 7  # B * m and B * n are distinct from every other size here.
  a = np.random.default_rng(0).standard_normal((batch, m, n))
  def solve(x):
    residual = lambda v: tf.square(tf.linalg.matvec(tf.constant(a), v)) - 1.0
    return tfg_optim.least_squares(residual, x, batch_dims=1,
                                   max_iterations=5).cost
  concrete = tf.function(solve, autograph=False).get_concrete_function(
      tf.TensorSpec([batch, n], tf.float64))
  shapes, types, num_functions = _graph_shapes(concrete)
  assert num_functions >= 3  # the loop body and its conds were visited
  flat_sizes = {batch * m, batch * n, batch * m * n}
  offending = [s for s in shapes if flat_sizes & {d for d in s if d}]
  assert not offending, offending
  assert (batch, m, n) in shapes  # the batched Jacobian
  assert "SelfAdjointEigV2" in types  # the default trust region's solve
  # Per-problem factorization; the default (Marquardt-scaled) policy always
  # decomposes the [B, n, n] scaled normal equations.
  assert (batch, n, n) in shapes
  if m >= n:  # forward mode: n products, each over the whole batch
    assert (n, batch, m) in shapes
    assert not any(t.endswith("Grad") for t in types)
  else:  # reverse mode: batch_jacobian, one product per residual
    assert (m, batch, n) in shapes or (None, batch, n) in shapes


# tf.function: the point is the default options with a batch, not the mode;
# tests/test_conformance.py runs the trust region and acceleration with
# batches in every mode (under XLA too).
@pytest.mark.parametrize("mode", ("function",))
def test_default_options_batch_reaches_each_solution(mode):
  """With least_squares' defaults (trust region, geodesic acceleration)
  every problem of the batch still stops for its own reason at its own
  solution."""
  defaults = dict(damping="trust_region", geodesic_acceleration=2.0)
  build = lambda x, c: _least_squares(c, x, **defaults)._asdict()
  batched = modes.run(build, [STARTS, COEFFICIENTS], mode)
  each_alone = _solve_each(build, [[STARTS[index], COEFFICIENTS[index]]
                                   for index in range(len(NAMES))],
                           _single_mode(mode))
  for (index, name), single in zip(enumerate(NAMES), each_alone):
    for field in ("stop_reason", "converged"):
      assert batched[field][index] == single[field], (name, field)
    np.testing.assert_allclose(batched["position"][index], single["position"],
                               atol=1e-7, err_msg=name)

