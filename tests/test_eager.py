"""Eager calls of least_squares reuse a compiled solve, never a stale one.

`tfg_optim._eager`: the first eager call with a problem runs op by op, the
second traces a `tf.function`, later ones call it. These tests count the
Python executions of the residual to see which path ran, and change what
the residual captures in every way the fingerprint must notice.
"""

import numpy as np
import pytest
import tensorflow as tf

import tfg_optim
from tfg_optim import _eager

_T = np.linspace(0.0, 1.0, 20)


class _Counter:
  """Counts Python executions of a residual. Its slots are invisible to the
  fingerprint (no `vars`), so counting does not make a new problem, as an
  attribute in `__dict__` would."""
  __slots__ = ("calls",)

  def __init__(self):
    self.calls = 0


def _start():
  return [tf.constant(1.0, tf.float64), tf.constant(0.0, tf.float64)]


@pytest.fixture(autouse=True)
def _empty_cache():
  _eager.clear()
  yield
  _eager.clear()


def test_third_call_runs_compiled_and_gives_the_same_answer():
  counter = _Counter()
  y = 2.0 * np.exp(-1.3 * _T)

  def residual(a, b):
    counter.calls += 1
    return a * tf.exp(b * _T) - y

  op_by_op = tfg_optim.least_squares(residual, _start(), eager_compile=False)
  first = tfg_optim.least_squares(residual, _start())
  assert counter.calls > 2 * int(first.num_iterations)  # op by op
  second = tfg_optim.least_squares(residual, _start())  # traces
  calls = counter.calls
  third = tfg_optim.least_squares(residual, _start())
  assert counter.calls == calls  # no Python: the compiled function ran
  for result in (first, second, third):
    np.testing.assert_array_equal(np.array(result.position),
                                  np.array(op_by_op.position))
    assert int(result.num_iterations) == int(op_by_op.num_iterations)
  assert isinstance(third.position, list)
  # A new start of the same shape reuses the trace.
  moved = tfg_optim.least_squares(residual, [tf.constant(3.0, tf.float64),
                                             tf.constant(0.5, tf.float64)])
  assert counter.calls == calls
  np.testing.assert_allclose(np.array(moved.position), [2.0, -1.3],
                             rtol=1e-9)
  assert len(_eager._CACHE) == 1
  with pytest.raises(ValueError, match="NaN or Inf"):  # checked eagerly
    tfg_optim.least_squares(residual, [tf.constant(np.nan, tf.float64),
                                       tf.constant(0.0, tf.float64)])


def test_changed_captures_are_new_problems():
  y = 2.0 * np.exp(-1.3 * _T)
  amplitude = tf.Variable(1.0, dtype=tf.float64)

  def residual(a, b):
    return a * tf.exp(b * _T) - amplitude * y

  def solve():
    return np.array(tfg_optim.least_squares(residual, _start()).position)

  for _ in range(3):  # op by op, traced, compiled
    np.testing.assert_allclose(solve(), [2.0, -1.3], rtol=1e-9)
  amplitude.assign(1.5)  # read when the compiled solve runs
  np.testing.assert_allclose(solve(), [3.0, -1.3], rtol=1e-9)
  assert len(_eager._CACHE) == 1
  y *= 2.0  # in place: a NumPy array is compared by value
  np.testing.assert_allclose(solve(), [6.0, -1.3], rtol=1e-9)
  y = 3.0 * np.exp(-1.3 * _T)  # the closure's variable rebound
  np.testing.assert_allclose(solve(), [4.5, -1.3], rtol=1e-9)


class _Fit:
  """A residual as a method reading its data from attributes."""

  def __init__(self, y):
    self.y = y
    self.settings = {"amplitude": 1.0}

  def residual(self, a, b):
    return a * tf.exp(b * _T) - self.settings["amplitude"] * self.y


def test_changed_attributes_of_a_captured_object_are_new_problems():
  fit = _Fit(tf.constant(2.0 * np.exp(-1.3 * _T)))

  def solve():
    return np.array(tfg_optim.least_squares(fit.residual, _start()).position)

  np.testing.assert_allclose(solve(), [2.0, -1.3], rtol=1e-9)  # op by op
  np.testing.assert_allclose(solve(), [2.0, -1.3], rtol=1e-9)  # compiled
  assert len(_eager._CACHE) == 1
  # Were these the same problem, the compiled solve would return (2, -1.3).
  fit.y = tf.constant(3.0 * np.exp(-1.3 * _T))  # a new tensor
  np.testing.assert_allclose(solve(), [3.0, -1.3], rtol=1e-9)
  fit.settings["amplitude"] = 2.0  # data inside a dict attribute
  np.testing.assert_allclose(solve(), [6.0, -1.3], rtol=1e-9)
  assert len(_eager._CACHE) == 1


def test_data_and_no_data_are_different_problems():
  """A residual that reads data when given, else its own: a single data
  tensor once shared the cache key of data=None, and the compiled solve of
  the latter ran without the data (a wrong answer, reported converged)."""
  own, given = tf.constant([1.0, 1.0], tf.float64), tf.constant(
      [5.0, 7.0], tf.float64)

  def residual(a, *data):
    return a - (data[0] if data else own)

  start = [tf.constant([0.0], tf.float64)]
  for data, mean in ((None, 1.0), (given, 6.0)):
    for _ in range(2):  # op by op, then compiled
      result = tfg_optim.least_squares(residual, start, data=data)
      np.testing.assert_allclose(result.position[0], [mean], rtol=1e-12)


def test_eager_compile_true_and_false():
  counter = _Counter()

  def residual(x):
    counter.calls += 1
    return tf.stack([10.0 * (x[1] - x[0] ** 2), 1.0 - x[0]])

  start = tf.constant([-1.2, 1.0], tf.float64)
  for _ in range(3):
    tfg_optim.least_squares(residual, start, eager_compile=False)
  assert not _eager._CACHE
  compiled = tfg_optim.least_squares(residual, start, eager_compile=True)
  calls = counter.calls
  again = tfg_optim.least_squares(residual, start, eager_compile=True)
  assert counter.calls == calls
  np.testing.assert_array_equal(compiled.position, again.position)
  np.testing.assert_allclose(again.position, [1.0, 1.0], rtol=1e-10)
  with pytest.raises(ValueError, match="eager_compile"):
    tfg_optim.least_squares(residual, start, eager_compile="yes")


def test_a_callback_keeps_auto_op_by_op():
  seen = []
  residual = lambda x: x - 1.0
  for _ in range(3):
    tfg_optim.least_squares(residual, tf.zeros([2], tf.float64),
                            callback=lambda i, cost, x: seen.append(
                                float(cost.numpy())))
  assert not _eager._CACHE and len(seen) >= 3


def test_riemannian_front_end_reuses_its_compiled_solve():
  counter = _Counter()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((6, 3))
  rotation = np.linalg.qr(rng.standard_normal((3, 3)))[0]
  rotation *= np.linalg.det(rotation)  # proper
  y = x @ rotation.T
  sphere = tfg_optim.manifolds.SpecialOrthogonal(3)

  def residual(r):
    counter.calls += 1
    return tf.matmul(x, r, transpose_b=True) - y

  start = tf.eye(3, dtype=tf.float64)
  op_by_op = tfg_optim.riemannian.levenberg_marquardt(sphere, residual, start,
                                                     eager_compile=False)
  for _ in range(2):  # op by op, then traced
    tfg_optim.riemannian.levenberg_marquardt(sphere, residual, start)
  calls = counter.calls
  compiled = tfg_optim.riemannian.levenberg_marquardt(sphere, residual, start)
  assert counter.calls == calls
  # tf.function's graph rewrites may round a product differently from the
  # eager kernels (here: the last bit of some entries).
  np.testing.assert_allclose(compiled, op_by_op, rtol=0, atol=1e-15)
  np.testing.assert_allclose(compiled, rotation, atol=1e-9)
  with pytest.raises(ValueError):  # off the manifold: still checked eagerly
    tfg_optim.riemannian.levenberg_marquardt(sphere, residual, 2.0 * start)


def test_quasi_newton_front_ends_reuse_their_compiled_solve():
  minimize = tfg_optim.lbfgs.minimize_lbfgs
  counter = _Counter()
  center = tf.Variable([1.0, -2.0], dtype=tf.float64)

  def objective(x):  # Minimum at `center`, value 0.5.
    counter.calls += 1
    return tf.reduce_sum(tf.square(x - center) * [1.0, 3.0]) + 0.5

  start = np.array([0.0, 0.0])
  kwargs = dict(dtype="float64", return_results=True)
  op_by_op = minimize(objective, start, eager_compile=False, **kwargs)
  minimize(objective, start, **kwargs)  # first call: op by op
  with tf.GradientTape() as tape:
    traced = minimize(objective, start, **kwargs)  # traces
  calls = counter.calls
  compiled = minimize(objective, start, **kwargs)
  assert counter.calls == calls  # the compiled function ran
  for result in (traced, compiled):
    np.testing.assert_array_equal(result.position, op_by_op.position)
    assert int(result.num_func_calls) == int(op_by_op.num_func_calls)
  # Implicit gradients through the compiled solve: dx*/dcenter = I.
  np.testing.assert_allclose(
      tape.gradient(traced.position, center), [1.0, 1.0], rtol=1e-6)
  center.assign([3.0, 1.0])  # a variable is read when the solve runs
  np.testing.assert_allclose(minimize(objective, start, **kwargs).position,
                             [3.0, 1.0], rtol=1e-6)
  assert counter.calls == calls and len(_eager._CACHE) == 1
  with pytest.raises(ValueError, match="eager_compile"):
    minimize(objective, start, eager_compile="yes", **kwargs)
  # BFGS shares the mechanism: True compiles at the first call.
  bfgs = tfg_optim.lbfgs.minimize_bfgs(objective, start, eager_compile=True,
                                       **kwargs)
  calls = counter.calls
  again = tfg_optim.lbfgs.minimize_bfgs(objective, start, eager_compile=True,
                                        **kwargs)
  assert counter.calls == calls and len(_eager._CACHE) == 2
  np.testing.assert_allclose(again.position, [3.0, 1.0], rtol=1e-6)
  np.testing.assert_array_equal(again.position, bfgs.position)


@pytest.mark.parametrize("front_end", ["least_squares", "lbfgs"])
def test_a_long_first_call_is_compiled_after_the_trial(front_end):
  """An 'auto' first call still running after `_eager.TRIAL_ITERATIONS`
  op-by-op iterations is compiled and solved from the start (Powell's
  singular function: 200 iterations op by op took 7 to 9 s, compiled
  under 1 s): its answer is the compiled solve's (`eager_compile=True`),
  bit for bit, and the next call reuses that trace."""
  counter = _Counter()
  start = tf.constant([3.0, -1.0, 0.0, 1.0], tf.float64)

  def powell(x):
    counter.calls += 1
    return tf.stack([x[0] + 10.0 * x[1], np.sqrt(5.0) * (x[2] - x[3]),
                     (x[1] - 2.0 * x[2]) ** 2,
                     np.sqrt(10.0) * (x[0] - x[3]) ** 2])

  if front_end == "least_squares":
    solve = lambda **options: tfg_optim.least_squares(
        powell, start, max_iterations=40, **options)
    answer = lambda result: (np.array(result.position),
                             int(result.num_iterations))
  else:
    solve = lambda **options: tfg_optim.lbfgs.minimize_lbfgs(
        lambda x: 0.5 * tf.reduce_sum(powell(x) ** 2), start,
        max_iters=40, dtype="float64", **options)
    answer = lambda result: (np.array(result[2]), int(result[1]))
  compiled = answer(solve(eager_compile=True))
  _eager.clear()
  first = answer(solve())
  assert first[1] > _eager.TRIAL_ITERATIONS
  assert len(_eager._CACHE) == 1  # compiled at the first call
  np.testing.assert_array_equal(first[0], compiled[0])
  assert first[1] == compiled[1]
  calls = counter.calls
  second = answer(solve())
  assert counter.calls == calls  # the trace is reused
  np.testing.assert_array_equal(second[0], compiled[0])


def test_only_the_first_front_end_in_a_trial_is_capped():
  """The trial's cap goes to the front-end that claims it first (the
  first call's own solve, before its residuals run): a solve nested in the
  residuals is not capped. (It was: an eager_compile=False solve inside a
  tf.py_function residual raised TrialExceeded through TensorFlow as an
  UnknownError.) The cap is gone after the trial, even if it was never
  claimed."""
  with _eager.trial():
    assert _eager.claim_trial() == _eager.TRIAL_ITERATIONS
    assert _eager.claim_trial() is None
  with _eager.trial():
    pass
  assert _eager.claim_trial() is None
  assert _eager.loop_bound(40, None) == (40, False)
  assert _eager.loop_bound(5, _eager.TRIAL_ITERATIONS) == (5, False)
  assert _eager.loop_bound(40, 10) == (10, True)
