"""Tests of the TensorFlow Graphics compatible Levenberg-Marquardt.

Independent truth: TensorFlow Graphics itself (installed as a test oracle),
closed-form least-squares solutions, and iterates computed by hand in NumPy.
Every behaviour runs in eager, tf.function, XLA and TF1 Session modes.
"""

import functools
import logging

import numpy as np
import pytest
import tensorflow as tf

from tests import modes
from tfg_optim import levenberg_marquardt

reference = pytest.importorskip(
    "tensorflow_graphics.math.optimizer.levenberg_marquardt")

MODES = modes.MODES


# -- randomized problems for the differential test ------------------------------


def _linear(rng, dtype):
  m, n = rng.integers(5, 30), rng.integers(1, 5)
  a, b = rng.standard_normal((m, n)), rng.standard_normal(m)
  return ([lambda x: tf.linalg.matvec(tf.constant(a, dtype), x) - b.astype(
      dtype)], [rng.standard_normal(n).astype(dtype)], 5)


def _curve(rng, dtype):
  t = np.linspace(0.0, 3.0, int(rng.integers(20, 200))).astype(dtype)
  p = rng.uniform(0.5, 2.0, 3)
  y = (p[0] * np.exp(-p[1] * t) + p[2] + 0.01 * rng.standard_normal(t.size))
  y = y.astype(dtype)
  start = (p * rng.uniform(0.7, 1.3, 3)).astype(dtype)
  return [lambda q: q[0] * tf.exp(-q[1] * t) + q[2] - y], [start], 15


def _rosenbrock(rng, dtype):
  a = float(rng.uniform(0.5, 1.5))
  def residual(x, y):
    return tf.stack([a - x, 10.0 * (y - x * x)])
  start = [np.asarray(v, dtype) for v in rng.uniform(-1.5, 1.5, 2)]
  return [residual], start, 30


def _multi(rng, dtype):
  target1 = rng.standard_normal((3, 2)).astype(dtype)
  target2 = rng.standard_normal((3, 2)).astype(dtype)
  residuals = (lambda x, y: x + y - target1, lambda x, y: x * y - target2)
  start = [rng.standard_normal((1, 2)).astype(dtype),
           rng.standard_normal((3, 1)).astype(dtype)]
  return list(residuals), start, 10


def _underdetermined(rng, dtype):
  a = rng.standard_normal((2, 5))
  b = rng.standard_normal(2)
  def residual(x):
    return tf.linalg.matvec(tf.constant(a, dtype), x) + 0.1 * x[0] * x[1] - b
  return [residual], [rng.standard_normal(5).astype(dtype)], 8


@tf.custom_gradient
def _exp_with_surrogate_gradient(z):
  """exp(z) whose backward pass says 0.8 exp(z) (a surrogate gradient):
  TensorFlow Graphics' J (reverse mode) is the surrogate's, so ours must
  be too, in every mode (graphs took forward mode's exp(z) before)."""
  value = tf.exp(z)
  return value, lambda upstream: 0.8 * value * upstream


def _surrogate(rng, dtype):
  t = np.linspace(0.0, 2.0, int(rng.integers(20, 60))).astype(dtype)
  y = (1.5 * np.exp(-0.7 * t) + 0.01 * rng.standard_normal(t.size))
  y = y.astype(dtype)
  start = np.asarray([1.0, 1.0], dtype)
  return [lambda q: q[0] * _exp_with_surrogate_gradient(-q[1] * t) - y], [
      start], 6


GENERATORS = {"linear": _linear, "curve": _curve, "rosenbrock": _rosenbrock,
              "multi": _multi, "underdetermined": _underdetermined,
              "surrogate_gradient": _surrogate}
# 20 problems, each in one mode: every generator's four problems (2 seeds x
# 2 dtypes) take the four modes, rotated per generator, so every pair of
# generator, seed, dtype and mode levels is covered (not all 80 triples;
# every mode runs other differential and hand-computed tests below).
# Every problem in both dtypes, the modes rotating so that each mode meets
# several problems and both dtypes (one random instance per problem: the
# arithmetic, not the instance, is what must match).
CASES = [(name, seed, dtype,
          MODES[(2 * (seed - 1) + d + g) % len(MODES)])
         for g, name in enumerate(GENERATORS) for seed in (1,)
         for d, dtype in enumerate(("float64", "float32"))]


def _reference_solution(residuals, start, iterations):
  objective, variables = tf.function(
      lambda *v: reference.minimize(residuals, list(v), iterations),
      autograph=False)(*[tf.constant(v) for v in start])
  return objective.numpy(), [v.numpy() for v in variables]


def _ours(residuals, iterations, **kwargs):
  def build(*variables):
    return levenberg_marquardt.minimize(residuals, list(variables),
                                        iterations, **kwargs)
  return build


def _assert_same(ours, expected, dtype):
  rtol, atol = (1e-8, 1e-10) if dtype == "float64" else (2e-4, 2e-5)
  np.testing.assert_allclose(ours[0], expected[0], rtol=rtol, atol=atol)
  for got, want in zip(ours[1], expected[1]):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * 10)


@functools.lru_cache(maxsize=None)
def _case(name, seed, dtype):
  """The problem and the reference's solution, computed once per case."""
  residuals, start, iterations = GENERATORS[name](np.random.default_rng(seed),
                                                  np.dtype(dtype))
  return (residuals, start, iterations,
          _reference_solution(residuals, start, iterations))


@pytest.mark.parametrize("name,seed,dtype,mode", CASES)
def test_same_numbers_as_tensorflow_graphics(name, seed, dtype, mode):
  residuals, start, iterations, expected = _case(name, seed, dtype)
  ours = modes.run(_ours(residuals, iterations), start, mode)
  _assert_same(ours, expected, dtype)
  for got, initial in zip(ours[1], start):
    assert got.shape == initial.shape and got.dtype == initial.dtype


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_eager_is_bit_identical_to_reference_eager(dtype):
  residuals, start, iterations = _curve(np.random.default_rng(7),
                                        np.dtype(dtype))
  want = reference.minimize(residuals, [tf.constant(v) for v in start],
                            iterations)
  got = levenberg_marquardt.minimize(residuals,
                                     [tf.constant(v) for v in start],
                                     iterations)
  np.testing.assert_array_equal(got[0].numpy(), want[0].numpy())
  np.testing.assert_array_equal(got[1][0].numpy(), want[1][0].numpy())


# -- presets of the reference documentation ------------------------------------


@pytest.mark.parametrize("mode,dtype", [(mode, "float64") for mode in MODES
                                        if mode != "xla"] +
                         [("xla", "float32")])
def test_identity_residual_is_solved_in_one_iteration(mode, dtype):
  start = np.random.default_rng(0).standard_normal((4, 3)).astype(dtype)
  objective, (x,) = modes.run(_ours([lambda x: x], 1), [start], mode)
  assert objective == pytest.approx(0.0, abs=1e-12)
  np.testing.assert_allclose(x, np.zeros_like(start), atol=1e-6)


_ILL_CONDITIONED = [lambda x, y: x * y * 1e4, lambda x, y: x * y * 1e-4]
_ILL_CONDITIONED_START = [np.array([2.0, 1.0]), np.array([1.0, 3.0])]


@functools.lru_cache(maxsize=None)
def _ill_conditioned_reference():
  """TensorFlow Graphics' answer, eagerly, once for every mode's test."""
  return reference.minimize(
      _ILL_CONDITIONED, [tf.constant(v) for v in _ILL_CONDITIONED_START], 30)


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_ill_conditioned_problem_does_not_raise(mode):
  residuals, start = _ILL_CONDITIONED, _ILL_CONDITIONED_START
  got = modes.run(_ours(residuals, 30), start, mode)
  want = _ill_conditioned_reference()
  # J^T J is singular (rank 2 of 4, entries ~1e8): factorizations fail until
  # lambda ~ 1e-8, then the objective falls from its start of 6.5e8.
  assert np.isfinite(got[0]) and got[0] < 1e-3
  np.testing.assert_allclose(got[0], want[0].numpy(), rtol=1e-6, atol=1e-12)


def test_reference_doc_example_in_a_session():
  graph = tf.Graph()
  printed = []
  with graph.as_default():
    x = tf.compat.v1.get_variable(
        "x", initializer=np.random.random_sample((1, 2)).astype(np.float32))
    y = tf.constant(np.random.random_sample((3, 1)), dtype=tf.float32)

    def callback(iteration, objective_value, variables):
      def record(iteration, objective_value, *variables):
        printed.append((int(iteration), float(objective_value)))
      return tf.py_function(record, [iteration, objective_value] + variables,
                            [])

    minimize_op = levenberg_marquardt.minimize(
        residuals=(lambda x, y: x + y, lambda x, y: x * y),
        variables=(x, y), max_iterations=10, callback=callback)
    with tf.compat.v1.Session() as session:
      session.run(tf.compat.v1.global_variables_initializer())
      start = session.run(x)
      objective, variables = session.run(minimize_op)
      np.testing.assert_array_equal(session.run(x), start)  # not assigned
  assert [it for it, _ in printed] == list(range(1, 11))
  assert printed[-1][1] == pytest.approx(objective)
  assert len(variables) == 2 and objective < printed[0][1] + 1e-12


# -- the damping rule, computed by hand ----------------------------------------


def _numpy_levenberg_marquardt(residual, jacobian, x, iterations, lam, mult):
  objective = 0.5 * residual(x) @ residual(x)
  for _ in range(iterations):
    j, r = jacobian(x), residual(x)
    try:
      d = np.linalg.solve(j.T @ j + lam * np.eye(x.size), j.T @ r)
      candidate = x - d
      new_objective = 0.5 * residual(candidate) @ residual(candidate)
    except np.linalg.LinAlgError:
      new_objective = np.nan
    if new_objective < objective:
      x, objective = candidate, new_objective
    else:
      lam *= mult
  return objective, x


# (Under XLA: test_same_numbers_as_tensorflow_graphics' XLA cells.)
@pytest.mark.parametrize("mode", ["eager", "function", "session"])
def test_iterates_match_hand_computation(mode):
  # Rosenbrock from (-1.2, 1): rejections happen, so the rule is exercised.
  residual = lambda v: np.array([1.0 - v[0], 10.0 * (v[1] - v[0] ** 2)])
  jacobian = lambda v: np.array([[-1.0, 0.0], [-20.0 * v[0], 10.0]])
  start = np.array([-1.2, 1.0])
  for iterations in (1, 2, 3, 6):
    want = _numpy_levenberg_marquardt(residual, jacobian, start, iterations,
                                      0.5, 10.0)
    got = modes.run(
        _ours([lambda v: tf.stack([1.0 - v[0], 10.0 * (v[1] - v[0] ** 2)])],
              iterations, regularizer=0.5), [start], mode)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    np.testing.assert_allclose(got[1][0], want[1], rtol=1e-12)


_SINGULAR = [lambda x, y: tf.stack([x + y - 1.0, 2.0 * x + 2.0 * y - 3.0])]
_SINGULAR_START = [np.array(0.3), np.array(-0.2)]


@functools.lru_cache(maxsize=None)
def _singular_reference():
  """TensorFlow Graphics' answer, eagerly, once for every mode's test."""
  return reference.minimize(
      _SINGULAR, [tf.constant(v) for v in _SINGULAR_START], 20)


@pytest.mark.parametrize("mode", MODES)
def test_failed_factorization_rejects_and_matches_reference_eager(mode):
  # J = [[1, 1], [2, 2]]: J^T J + 1e-20 I is not numerically positive definite,
  # so the first factorizations fail and lambda grows until one succeeds.
  residuals, start = _SINGULAR, _SINGULAR_START
  want = _singular_reference()
  got = modes.run(_ours(residuals, 20), start, mode)
  assert np.all(np.isfinite(got[1])) and got[0] == pytest.approx(0.1, rel=1e-9)
  # Every least-squares solution of the rank-deficient problem has x + y = 1.4.
  assert got[1][0] + got[1][1] == pytest.approx(1.4, abs=1e-8)
  if mode != "xla":
    # The same Cholesky kernel: the same rejections and the same point.
    np.testing.assert_allclose(got[1], [v.numpy() for v in want[1]],
                               rtol=1e-8)
  # XLA's Cholesky rounds differently; where J^T J is exactly singular the
  # point reached along its null space is rounding noise (also in the
  # reference), so under XLA only the least-squares property is asserted.


# -- callback contract ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["eager", "function", "session"])
def test_py_function_callback_runs_every_iteration(mode):
  seen = []

  def callback(iteration, objective_value, variables):
    assert isinstance(variables, list) and iteration.dtype == tf.int32
    def record(iteration, objective_value, *variables):
      seen.append((int(iteration), float(objective_value)))
    return tf.py_function(record, [iteration, objective_value] + variables, [])

  residuals, start, _ = _curve(np.random.default_rng(3), np.dtype("float64"))
  objective, _ = modes.run(_ours(residuals, 7, callback=callback), start, mode)
  assert [it for it, _ in seen] == list(range(1, 8))
  assert all(b <= a for (_, a), (_, b) in zip(seen, seen[1:]))
  assert seen[-1][1] == pytest.approx(objective)


@pytest.mark.parametrize("mode", MODES)
def test_callback_ops_run_in_graph_and_other_returns_are_ignored(mode):
  counter = []

  def build(x):
    total = tf.Variable(0, dtype=tf.int32) if mode != "session" else (
        tf.compat.v1.get_variable("total", initializer=0))
    counter.append(total)
    def callback(iteration, objective_value, variables):
      return [total.assign_add(iteration)]
    objective, _ = levenberg_marquardt.minimize(
        lambda x: x * x - 2.0, x, 5, callback=callback)
    with tf.control_dependencies([objective]):
      return objective, total.read_value()
  if mode in ("function", "xla"):
    total = tf.Variable(0, dtype=tf.int32)
    def build(x):  # pylint: disable=function-redefined
      objective, _ = levenberg_marquardt.minimize(
          lambda x: x * x - 2.0, x, 5,
          callback=lambda i, o, v: total.assign_add(i))
      with tf.control_dependencies([objective]):
        return objective, total.read_value()
  _, total_value = modes.run(build, [np.array([1.0, 3.0])], mode)
  assert total_value == 1 + 2 + 3 + 4 + 5
  # A callback returning something that is not an op is ignored.
  objective, _ = levenberg_marquardt.minimize(
      lambda x: x * x - 2.0, np.array([1.0]), 5, callback=lambda *a: 42)
  assert objective.numpy() < 1e-6


# -- inputs --------------------------------------------------------------------


def test_variables_are_never_assigned_and_outputs_keep_shapes():
  v = tf.Variable([[1.0, 2.0, 3.0]], dtype=tf.float64)
  objective, variables = levenberg_marquardt.minimize(lambda x: x - 5.0, v, 3)
  assert isinstance(variables, list) and variables[0].shape == (1, 3)
  np.testing.assert_array_equal(v.numpy(), [[1.0, 2.0, 3.0]])
  np.testing.assert_allclose(variables[0].numpy(), 5.0)
  # Python lists and NumPy arrays are accepted too.
  _, (w,) = levenberg_marquardt.minimize(lambda x: x - 1.0, [[2.0, 3.0]], 2)
  assert w.dtype == tf.float32
  np.testing.assert_allclose(w.numpy(), [1.0, 1.0])


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(max_iterations=0), ValueError, "'max_iterations' needs to be at "
     "least 1."),
    (dict(max_iterations=-3), ValueError, "'max_iterations'"),
    (dict(max_iterations=2.5), TypeError, "'max_iterations'"),
    (dict(max_iterations=True), TypeError, "'max_iterations'"),
    (dict(regularizer=-1.0), ValueError, "'regularizer'"),
    (dict(regularizer_multiplier=0.5), ValueError, "'regularizer_multiplier'"),
    (dict(residuals=3.0), TypeError, "'residuals' must be callable"),
    (dict(residuals=[lambda x: x, None]), TypeError, r"'residuals\[1\]'"),
    (dict(residuals=[]), ValueError, "'residuals' must not be empty"),
    (dict(variables=[]), ValueError, "'variables' must not be empty"),
    (dict(variables=[np.array([1, 2])]), TypeError, "float32 or float64"),
    (dict(variables=[np.zeros(2, np.float32), np.zeros(2)]), TypeError,
     "share one dtype"),
    (dict(residuals=lambda *v: tf.constant([1, 2])), TypeError,
     "returned a int32 tensor"),
    (dict(residuals=lambda *v: tf.constant([1.0], tf.float32)), TypeError,
     "returned a float32 tensor"),
    (dict(callback=5), TypeError, "'callback' must be callable"),
    (dict(variables=[np.array([1.0, np.nan])]), ValueError,
     "'variables' contains NaN"),
])
def test_bad_input_raises_naming_the_argument(kwargs, error, match):
  arguments = dict(residuals=lambda *v: v[0] - 1.0,
                   variables=[np.array([0.0, 2.0])], max_iterations=3)
  arguments.update(kwargs)
  with pytest.raises(error, match=match):
    levenberg_marquardt.minimize(**arguments)


def test_max_iterations_is_checked_before_anything_is_built():
  def residual(x):
    raise AssertionError("residual must not be called")
  with pytest.raises(ValueError, match="needs to be at least 1"):
    levenberg_marquardt.minimize(residual, [1.0], 0)


@pytest.mark.parametrize("mode", ["function", "session"])
def test_nan_start_raises_when_the_graph_runs(mode):
  with pytest.raises(tf.errors.InvalidArgumentError, match="'variables'"):
    modes.run(_ours([lambda x: x - 1.0], 3), [np.array([np.nan, 1.0])], mode)


def test_nan_start_under_xla_returns_start_with_nan_objective():
  objective, (x,) = modes.run(_ours([lambda x: x - 1.0], 3),
                              [np.array([np.nan, 1.0])], "xla")
  assert np.isnan(objective)
  np.testing.assert_array_equal(np.isnan(x), [True, False])
  assert x[1] == 1.0


def test_autograph_converts_the_residuals_and_callback_as_tfg():
  """Under tf.function's default AutoGraph (which converts TensorFlow
  Graphics' minimize and what it calls), Python control flow on tensors in
  a residual and a callback works (also under XLA), with the eager call's
  numbers; the
  package's own code is not converted (the first trace's cost)."""
  t = np.linspace(0.0, 1.0, 20)
  y = 2.0 * np.exp(-1.3 * t)
  never, always = tf.Variable(0), tf.Variable(0)

  def residual(x):
    if tf.reduce_sum(x) > 100.0:  # never: a tensor condition, converted
      return x[0] * tf.ones_like(y)  # (same length: a tf.cond's branches)
    return x[0] * tf.exp(-x[1] * t) - y

  def callback(iteration, objective, variables):
    del iteration, variables
    if objective > 1e9:  # never
      never.assign_add(1)
    if objective >= 0.0:  # always: once per iteration
      always.assign_add(1)

  start = tf.constant([1.0, 1.0], tf.float64)
  solve = lambda x: levenberg_marquardt.minimize(residual, x, 20,
                                                 callback=callback)
  eager = solve(start)
  traced = tf.function(solve)(start)
  compiled = tf.function(solve, jit_compile=True)(start)
  np.testing.assert_array_equal(traced[1][0], eager[1][0])
  np.testing.assert_allclose(compiled[1][0], eager[1][0], rtol=1e-12)
  np.testing.assert_allclose(eager[1][0], [2.0, 1.3], rtol=1e-6)
  assert int(never.numpy()) == 0 and int(always.numpy()) == 3 * 20


def test_no_retracing_warnings_eagerly(caplog):
  residuals, start, _ = _curve(np.random.default_rng(0), np.dtype("float64"))
  underdetermined, ustart, _ = _underdetermined(np.random.default_rng(0),
                                                np.dtype("float64"))
  with caplog.at_level(logging.WARNING):
    for _ in range(7):
      levenberg_marquardt.minimize(residuals, start, 3)
      levenberg_marquardt.minimize(underdetermined, ustart, 3)
  assert "retracing" not in caplog.text


# -- batches -------------------------------------------------------------------


# (Batches in every mode: tests/test_batched.py's test_tfg_minimize_batched.)
@pytest.mark.parametrize("mode", ["function", "xla"])
def test_batch_dims_equal_independent_solves(mode):
  rng = np.random.default_rng(5)
  t = np.linspace(0.0, 2.0, 30)
  p = rng.uniform(0.5, 2.0, (4, 2))
  y = p[:, :1] * np.exp(-p[:, 1:] * t)
  start = np.ones((4, 2))
  def residual(q):
    return q[:, :1] * tf.exp(-q[:, 1:] * t) - y
  batched = modes.run(_ours([residual], 12, batch_dims=1), [start], mode)
  assert batched[0].shape == (4,)
  for i in range(4):
    single = levenberg_marquardt.minimize(
        lambda q: q[0] * tf.exp(-q[1] * t) - y[i], start[i], 12)
    np.testing.assert_allclose(batched[0][i], single[0].numpy(), rtol=1e-9,
                               atol=1e-20)
    np.testing.assert_allclose(batched[1][0][i], single[1][0].numpy(),
                               rtol=1e-9)
