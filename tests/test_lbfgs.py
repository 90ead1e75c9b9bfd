"""Tests of tfg_optim.lbfgs (L-BFGS and BFGS) in every execution mode."""

from absl.testing import parameterized
import numpy as np
from scipy import optimize
import tensorflow as tf

import tfg_optim
from tfg_optim import lbfgs
from tests import modes
from tests import problems

StopReason = tfg_optim.StopReason

DTYPES = ("float32", "float64")
# Every mode once with one dtype each. ModeAgreementTest runs all four modes
# side by side (BFGS in float32, L-BFGS in float64) and asserts the same
# numbers; the other tests run each behaviour in the modes where it could
# differ (XLA drops check_numerics and compiles the loop; eager calls count
# Python calls), since the traced solver is the same graph code in every mode.
ROTATED = (("eager", "float32"), ("function", "float64"),
           ("xla", "float32"), ("session", "float64"))
METHODS = {"lbfgs": lbfgs.minimize_lbfgs, "bfgs": lbfgs.minimize_bfgs}
C1, C2 = 1e-4, 0.9

# Loose gradient tolerance reachable in each dtype, and position accuracy.
GRAD_TOL = {"float32": 1e-4, "float64": 1e-9}
ATOL = {"float32": 2e-3, "float64": 1e-6}

QUAD_DIAG = np.linspace(1.0, 10.0, 10)
QUAD_TARGET = np.linspace(-2.0, 3.0, 10)


def quadratic(x):
  diag = tf.constant(QUAD_DIAG, x.dtype)
  target = tf.constant(QUAD_TARGET, x.dtype)
  return 0.5 * tf.reduce_sum(diag * (x - target) ** 2, axis=-1)


def quadratic_1d(x):
  return tf.reduce_sum(3.0 * (x - 1.5) ** 2, axis=-1)


def unbounded_cubic(x):
  return tf.reduce_sum(x ** 3 / 3.0 - x ** 2 / 2.0 - 2.0 * x, axis=-1)


def quartic(x):
  return tf.reduce_sum(3.0 * x ** 4 + 0.4 * x ** 3 - 5.64 * x ** 2 +
                       2.112 * x, axis=-1)


rosenbrock = problems.rosenbrock


def rosenbrock_once(x):
  """Rosenbrock with ops whose value and tape gradient Grappler does not
  rewrite: tf.square, not ** (Pow eagerly, Square in graphs), and x[:-1]
  sliced once (three gradient contributions to x form a sum that Grappler
  may reassociate)."""
  lo, hi = x[..., :-1], x[..., 1:]
  return tf.reduce_sum(100.0 * tf.square(hi - tf.square(lo)) +
                       tf.square(1.0 - lo), axis=-1)


def solve(method, function, x, **kwargs):
  """Results namedtuple of one solve, with dtype from x."""
  return METHODS[method](function, x, dtype=x.dtype, return_results=True,
                         **kwargs)


class ExactMinimaTest(tf.test.TestCase, parameterized.TestCase):
  """Problems with a known answer; one traced build per mode and dtype (a
  TF1 Session runs in StopReasonTest, NonFiniteTest and the others)."""

  @parameterized.parameters(("function", "float64"), ("xla", "float32"))
  def test_known_minima(self, mode, dtype):
    tol = GRAD_TOL[dtype]
    rng = np.random.default_rng(0)
    a = rng.uniform(0.5, 1.5)

    # Under XLA (slow to compile) not the two 1-D minima, which no mode
    # can change.
    every_case = mode != "xla"

    def build(x10, x1, x_cubic, x_quartic, x_rosen, x_nan):
      out = {}
      for method in METHODS:
        out[method + "_quad10"] = solve(method, quadratic, x10,
                                        tolerance_grad=tol, max_iters=60,
                                        history_size=20) if method == "lbfgs" \
            else solve(method, quadratic, x10, tolerance_grad=tol,
                       max_iters=60)
      if every_case:
        out["quad1"] = solve("lbfgs", quadratic_1d, x1, tolerance_grad=tol,
                             history_size=3)
        out["quartic"] = solve("lbfgs", quartic, x_quartic, history_size=3,
                               tolerance_grad=tol)
      out["cubic"] = solve("lbfgs", unbounded_cubic, x_cubic, history_size=3,
                           max_iters=50)
      out["rosen"] = solve("lbfgs", lambda x: rosenbrock(x, a=a), x_rosen,
                           history_size=5, max_iters=100, tolerance_grad=tol,
                           scale_initial_hessian=True)
      out["nan"] = solve("lbfgs", quadratic, x_nan, history_size=3)
      return {k: v._asdict() for k, v in out.items()}

    x_nan = np.zeros(10)
    x_nan[3] = np.nan
    inputs = [np.zeros(10), np.array([-4.0]), np.array([-1.7]),
              np.array([0.82]), np.array([-1.2, 1.0]), x_nan]
    out = modes.run(build, [v.astype(dtype) for v in inputs], mode)

    for key in ("lbfgs_quad10", "bfgs_quad10"):
      self.assertTrue(out[key]["is_converge"], key)
      self.assertAllClose(out[key]["position"], QUAD_TARGET, atol=ATOL[dtype])
      self.assertEqual(out[key]["position"].dtype, np.dtype(dtype))
    if every_case:
      self.assertTrue(out["quad1"]["is_converge"])
      self.assertAllClose(out["quad1"]["position"], [1.5], atol=ATOL[dtype])
      self.assertEqual(out["quad1"]["stop_reason"], StopReason.GRADIENT_NORM)
      self.assertTrue(out["quartic"]["is_converge"])
      self.assertAllClose(out["quartic"]["position"], [0.8],
                          atol=ATOL[dtype])
    # Unbounded below: the line search never brackets, not converged.
    self.assertFalse(out["cubic"]["is_converge"])
    self.assertTrue(out["cubic"]["failed"])
    self.assertTrue(out["rosen"]["is_converge"])
    self.assertAllClose(out["rosen"]["position"], [a, a * a],
                        atol=10 * ATOL[dtype])
    # A NaN start stops at once, returning the start.
    self.assertFalse(out["nan"]["is_converge"])
    self.assertEqual(out["nan"]["num_func_calls"], 1)
    self.assertAllEqual(np.isnan(out["nan"]["position"]), np.isnan(x_nan))
    self.assertEqual(out["nan"]["num_iterations"], 0)
    self.assertEqual(out["nan"]["stop_reason"], StopReason.INVALID_INPUT)
    self.assertEqual(out["cubic"]["stop_reason"], StopReason.STALLED)


def sqrt_objective(x):
  """sum(sqrt(x)): NaN for x < 0; decreasing towards the boundary x = 0."""
  return tf.reduce_sum(tf.sqrt(x), axis=-1)


def poisoned_rosenbrock(x):
  """Rosenbrock per member, NaN (value and gradient) where x_0 > 1000."""
  return rosenbrock(x) + 0.0 * tf.sqrt(1000.0 - x[..., 0])


class NonFiniteTest(tf.test.TestCase, parameterized.TestCase):
  """A NaN or Inf never converges, ends failed at once, and stays local."""

  # In a TF1 Session (float32: Inf arrives sooner) and under XLA (which
  # drops the start's check_numerics); eager calls and tf.function run the
  # same traced loop (ModeAgreementTest).
  @parameterized.parameters(("session", "float32"), ("xla", "float64"))
  def test_non_finite_values_fail_promptly(self, mode, dtype):
    # sqrt: a NaN start, and a finite start whose trial steps reach x < 0.
    sqrt_starts = np.array([[-1.0, 2.0], [1.0, 2.0]], dtype)
    # Rosenbrock: healthy, NaN objective, Inf in the start, converged start.
    starts = np.array([[-1.2, 1.0], [2000.0, 1.0], [np.inf, 1.0],
                       [1.0, 1.0]], dtype)

    def build(sqrt_starts, starts):
      out = {"sqrt": solve("lbfgs", sqrt_objective, sqrt_starts,
                           batch_dims=1, max_iters=1000),
             "batch": solve("lbfgs", poisoned_rosenbrock, starts,
                            batch_dims=1, history_size=5, max_iters=100),
             "alone": solve("lbfgs", poisoned_rosenbrock, starts[0],
                            history_size=5, max_iters=100)}
      return {k: v._asdict() for k, v in out.items()}

    out = modes.run(build, [sqrt_starts, starts], mode)
    r = out["sqrt"]
    self.assertAllEqual(r["is_converge"], [False, False])
    self.assertAllEqual(r["failed"], [True, True])
    self.assertAllEqual(r["stop_reason"], [StopReason.NOT_FINITE] * 2)
    # NaN objective at the start: no iteration.
    self.assertEqual(r["num_iterations"][0], 0)
    self.assertEqual(r["num_func_calls"][0], 1)
    # Finite start: the first NaN trial ends the run (within a few
    # iterations, not after max_iters) at the last accepted iterate, whose
    # reported value is the objective there.
    self.assertLess(r["num_iterations"][1], 10)
    self.assertTrue(np.all(r["position"][1] > 0))
    self.assertAllClose(r["objective_value"][1],
                        np.sum(np.sqrt(r["position"][1])))
    self.assertLessEqual(r["objective_value"][1],
                         np.float32(np.sqrt(2.0) + 1))
    # Each member stops for its own reason; the healthy one reaches the
    # minimum (1, 1) and equals its solo solve. (XLA may round a batched
    # reduction differently from an unbatched one in float32.)
    b = out["batch"]
    self.assertAllEqual(b["is_converge"], [True, False, False, True])
    self.assertAllEqual(b["failed"], [False, True, True, False])
    self.assertAllEqual(b["stop_reason"], [
        StopReason.GRADIENT_NORM, StopReason.NOT_FINITE,
        StopReason.INVALID_INPUT, StopReason.GRADIENT_NORM])
    self.assertAllEqual(b["num_iterations"][1:], [0, 0, 0])
    self.assertAllEqual(b["position"][1:], starts[1:])
    self.assertAllClose(b["position"][0], [1.0, 1.0], atol=10 * ATOL[dtype])
    for key in ("is_converge", "stop_reason", "position", "objective_value"):
      if mode == "xla" and dtype == "float32":
        self.assertAllClose(b[key][0], out["alone"][key], atol=1e-4)
      else:
        self.assertAllEqual(b[key][0], out["alone"][key], msg=key)


class UnconnectedObjectiveTest(tf.test.TestCase, parameterized.TestCase):
  """An objective without a tape gradient is an error, not convergence."""

  @parameterized.parameters(
      ("constant", lambda x: tf.constant(3.0)),
      ("stop_gradient", lambda x: tf.stop_gradient(quadratic(x))),
      ("round", lambda x: tf.reduce_sum(tf.round(x))),
      ("int cast", lambda x: tf.cast(tf.reduce_sum(tf.cast(x, tf.int32)),
                                     tf.float32)),
      ("numpy", lambda x: np.sum(np.asarray(x) ** 2)))
  def test_raises_eagerly_and_while_tracing(self, _, function):
    x0 = tf.constant(np.linspace(-1.0, 1.0, 10), tf.float32)
    traced = tf.function(lambda x: lbfgs.minimize_lbfgs(function, x))
    for call in (lambda: lbfgs.minimize_bfgs(function, x0),
                 lambda: traced(x0)):
      # NumPy cannot read a symbolic tensor: its own error while tracing.
      with self.assertRaisesRegex((ValueError, NotImplementedError,
                                   TypeError), "objective_func|NumPy|numpy"):
        call()
    with self.assertRaisesRegex(ValueError, "objective_func.*depend"):
      lbfgs.minimize_lbfgs(function, x0)

  def test_value_and_gradient_skips_the_check(self):
    def value_and_gradient(x):
      value = tf.stop_gradient(quadratic_1d(x))
      return value, 6.0 * (x - 1.5)

    r = lbfgs.minimize_lbfgs(value_and_gradient, tf.constant([0.0]),
                             value_and_gradient=True, return_results=True)
    self.assertTrue(r.is_converge)
    self.assertAllClose(r.position, [1.5], atol=1e-5)


class ModeAgreementTest(tf.test.TestCase, parameterized.TestCase):
  """Eager, tf.function and Session agree bit for bit; XLA, to tolerance.

  Before the fix, n = 4 float32 BFGS with scaling failed after 107
  evaluations eagerly and converged after 58 in graphs (Grappler reordered
  the rank-one update's products; 1/x became Reciprocal).
  """

  # BFGS with scaling in float32 is the case that differed; L-BFGS (history
  # 10, no scaling) runs the two-loop recursion, here in float64 (both
  # methods run in both dtypes in ExactMinimaTest and BatchTest).
  @parameterized.parameters(
      (("bfgs", {"scale_initial_hessian": True}), "float32"),
      (("lbfgs", {"history_size": 10}), "float64"))
  def test_rosenbrock_paddle_defaults(self, method_options, dtype):
    method, options = method_options

    def build(x0):
      return solve(method, rosenbrock_once, x0, **options)._asdict()

    x0 = np.array([-1.2, 1.0, -1.2, 1.0], dtype)
    out = {mode: modes.run(build, [x0], mode) for mode in modes.MODES}
    for mode in ("function", "session"):
      for key, value in out["eager"].items():
        self.assertAllEqual(value, out[mode][key], msg=f"{mode} {key}")
    for mode in modes.MODES:
      self.assertTrue(out[mode]["is_converge"], mode)
      self.assertAllClose(out[mode]["position"], np.ones(4), atol=ATOL[dtype],
                          msg=mode)


class StopReasonTest(tf.test.TestCase, parameterized.TestCase):
  """The reasons not covered above: iteration limit and step size."""

  # Eagerly and in a Session (the cheap modes); under XLA the iteration
  # limit ends ExactMinimaTest's cubic.
  @parameterized.parameters("eager", "session")
  def test_max_iterations_and_step_size(self, mode):
    def build(x10, x1):
      return (solve("bfgs", quadratic, x10, max_iters=2)._asdict(),
              solve("lbfgs", quadratic_1d, x1, history_size=1,
                    tolerance_grad=0.0, tolerance_change=10.0)._asdict())

    limited, step = modes.run(build, [np.zeros(10), np.array([-4.0])], mode)
    self.assertEqual(limited["stop_reason"], StopReason.MAX_ITERATIONS)
    self.assertFalse(limited["is_converge"])
    self.assertFalse(limited["failed"])
    self.assertEqual(limited["num_iterations"], 2)
    # From -4 the first step, |s| = 5.5 < 10, reaches the minimum 1.5 (the
    # cubic interpolation is exact on a quadratic) and stops on its size.
    self.assertEqual(step["stop_reason"], StopReason.STEP_SIZE)
    self.assertTrue(step["is_converge"])
    self.assertEqual(step["num_iterations"], 1)
    self.assertAllClose(step["position"], [1.5])


class HistoryTest(tf.test.TestCase, parameterized.TestCase):
  """Tiny histories wrap many times: no hang, same minimum."""

  # In one mode: the ring buffer is the same ops in every mode, and it
  # wraps in ExactMinimaTest (history 5, Rosenbrock; tf.function and XLA)
  # and BatchTest (history 4; eagerly and under XLA).
  @parameterized.parameters(("function", "float64"))
  def test_small_history_many_iterations(self, mode, dtype):
    tol = {"float32": 1e-3, "float64": 1e-8}[dtype]

    def build(x0):
      return [solve("lbfgs", rosenbrock, x0, history_size=m, max_iters=200,
                    tolerance_grad=tol, tolerance_change=0.0)._asdict()
              for m in (1, 2, 3)]

    x0 = np.tile([-1.2, 1.0], 2).astype(dtype)
    for m, out in zip((1, 2, 3), modes.run(build, [x0], mode)):
      self.assertTrue(out["is_converge"], f"history_size={m}")
      self.assertGreater(out["num_iterations"], 3 * m)
      self.assertAllClose(out["position"], np.ones(4), atol=10 * ATOL[dtype])


class BatchTest(tf.test.TestCase, parameterized.TestCase):
  """A batch equals its members solved one by one; members freeze."""

  # Eagerly in float32, XLA in float64 (the batched loop is the same graph
  # code in every mode; a Session runs it in NonFiniteTest's batch).
  @parameterized.parameters(("eager", "float32"), ("xla", "float64"))
  def test_batch_equals_one_by_one(self, mode, dtype):
    tol = GRAD_TOL[dtype]
    starts = np.array([[-1.2, 1.0], [1.0, 1.0]]).astype(dtype)
    kwargs = dict(max_iters=100, tolerance_grad=tol)

    def build(x):
      together = {m: solve(m, rosenbrock, x, batch_dims=1,
                           **({"history_size": 4} if m == "lbfgs" else {}),
                           **kwargs)._asdict() for m in METHODS}
      alone = {m: [solve(m, rosenbrock, x[i],
                         **({"history_size": 4} if m == "lbfgs" else {}),
                         **kwargs)._asdict() for i in range(len(starts))]
               for m in METHODS}
      return together, alone

    together, alone = modes.run(build, [starts], mode)
    # In float32, XLA may round a batched reduction differently from an
    # unbatched one, which can change a line search by one evaluation: there
    # the answers, not the paths, must agree.
    keys = (alone["lbfgs"][0].keys() if dtype == "float64" else
            ("is_converge", "position", "objective_value"))
    for method in METHODS:
      for i in range(len(starts)):
        for key in keys:
          self.assertAllClose(together[method][key][i], alone[method][i][key],
                              atol=1e-6 if dtype == "float64" else 1e-4,
                              rtol=1e-6, msg=f"{method} {key} {i}")
      # The start at the minimum converges at once and stays frozen.
      self.assertEqual(together[method]["num_iterations"][1], 0)
      self.assertEqual(together[method]["num_func_calls"][1], 1)
      self.assertTrue(np.all(together[method]["is_converge"]))


class EvaluationCountTest(tf.test.TestCase, parameterized.TestCase):
  """num_func_calls equals the number of objective calls."""

  # Not in a TF1 Session: there the counter variable's final read is not
  # reliably ordered after the last assign_add inside the nested loops (under
  # load it came out one short of the 71 evaluations, alone it matched), so the
  # check would test TF1 scheduling, not the count. The count is the same
  # graph code in every mode.
  @parameterized.parameters(("eager", "float64"), ("function", "float32"),
                            ("xla", "float64"))
  def test_counts_every_evaluation(self, mode, dtype):
    outside = None if mode == "session" else tf.Variable(0)

    def build(x0):
      counter = outside if outside is not None else tf.Variable(0)
      counter.assign(0)

      def counted(x):
        with tf.control_dependencies([counter.assign_add(1)]):
          return rosenbrock(x)

      with tf.control_dependencies([counter.assign(0)]):
        x0 = tf.identity(x0)
      # gradients="none": the implicit default evaluates the objective once
      # more at the solution in graphs, outside the solve and its count (the
      # input of its backward pass; docs/differentiation.md).
      # eager_compile=False: under 'auto' an eager first call past 10
      # iterations is solved again compiled, and the counter also counts the
      # dropped op-by-op iterations' evaluations (docs/least_squares.md).
      result = lbfgs.minimize_lbfgs(counted, x0, history_size=3,
                                    max_iters=30, dtype=dtype,
                                    gradients="none", eager_compile=False)
      with tf.control_dependencies(tf.nest.flatten(result)):
        return result[1], counter.read_value()

    calls, counted = modes.run(build, [np.array([-1.2, 1.0], dtype)], mode)
    self.assertGreater(calls, 30)
    self.assertEqual(calls, counted)

  def test_counts_python_calls_eagerly(self):
    calls = []

    def counted(x):
      calls.append(1)
      return quartic(x)

    result = lbfgs.minimize_bfgs(counted, tf.constant([-1.0], tf.float64),
                                 dtype="float64")
    self.assertEqual(int(result[1]), len(calls))


class StrongWolfeTest(tf.test.TestCase, parameterized.TestCase):
  """Every accepted step satisfies the strong Wolfe conditions."""

  @parameterized.parameters(("lbfgs", False), ("lbfgs", True),
                            ("bfgs", False))
  def test_accepted_steps(self, method, scale):
    # x_k is the last point evaluated by a run of k iterations (recorded);
    # the conditions are invariant to how the step splits into a * d.
    x0 = tf.constant([-1.2, 1.0, 0.5], tf.float64)
    iterates = []
    for k in range(1, 11):
      record = []

      def recording(x):
        with tf.GradientTape() as tape:
          tape.watch(x)
          value = rosenbrock(x)
        gradient = tape.gradient(value, x)
        record.append((x.numpy(), value.numpy(), gradient.numpy()))
        return value, gradient

      r = solve(method, recording, x0, max_iters=k, value_and_gradient=True,
                scale_initial_hessian=scale)
      if k == 1:
        iterates.append(record[0])
      self.assertEqual(int(r.num_func_calls), len(record))
      self.assertAllEqual(record[-1][0], r.position.numpy())
      iterates.append(record[-1])
    for (x, f, g), (x_new, f_new, g_new) in zip(iterates, iterates[1:]):
      step = x_new - x
      self.assertLess(g @ step, 0)
      self.assertLessEqual(f_new, f + C1 * (g @ step))
      self.assertLessEqual(abs(g_new @ step), C2 * abs(g @ step))


class ScipyAgreementTest(tf.test.TestCase, parameterized.TestCase):
  """Same minima as scipy's L-BFGS-B on standard functions."""

  PROBLEMS = {
      "rosen5": (rosenbrock, [-1.2, 1.0, -1.2, 1.0, 0.3]),
      "himmelblau": (lambda x: ((x[0] ** 2 + x[1] - 11) ** 2 +
                                (x[0] + x[1] ** 2 - 7) ** 2),
                     [0.5, 0.5]),
  }

  # Agreement with scipy is about the algorithm, not the mode (the modes
  # agree bit for bit, ModeAgreementTest): one graph mode.
  @parameterized.parameters(("function",))
  def test_minima_match_scipy(self, mode):
    names = sorted(self.PROBLEMS)

    def build(*starts):
      return [solve(method, self.PROBLEMS[name][0], x, max_iters=300,
                    tolerance_grad=1e-9, scale_initial_hessian=True
                    ).position
              for name, x in zip(names, starts) for method in METHODS]

    starts = [np.array(self.PROBLEMS[name][1]) for name in names]
    positions = modes.run(build, starts, mode)
    for i, name in enumerate(names):
      function = self.PROBLEMS[name][0]
      numpy_function = lambda x, f=function: float(f(tf.constant(x)))
      expected = optimize.minimize(numpy_function, starts[i],
                                   method="L-BFGS-B",
                                   options=dict(gtol=1e-10, ftol=0)).x
      for j in range(len(METHODS)):
        self.assertAllClose(positions[len(METHODS) * i + j], expected,
                            atol=1e-4, msg=name)


class InitialInverseHessianTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(*ROTATED)
  def test_exact_inverse_hessian_solves_quadratic_in_one_step(self, mode,
                                                              dtype):
    h0 = np.diag(1.0 / QUAD_DIAG).astype(dtype)

    def build(x0, h0):
      return [solve(m, quadratic, x0, initial_inverse_hessian_estimate=h0,
                    tolerance_grad=GRAD_TOL[dtype],
                    **({"history_size": 3} if m == "lbfgs" else {})
                    )._asdict() for m in METHODS]

    for out in modes.run(build, [np.zeros(10, dtype), h0], mode):
      self.assertTrue(out["is_converge"])
      self.assertEqual(out["num_iterations"], 1)
      self.assertEqual(out["num_func_calls"], 2)
      self.assertAllClose(out["position"], QUAD_TARGET, atol=ATOL[dtype])

  @parameterized.parameters(
      ("non-symmetric", [[1.0, 0.5], [0.0, 1.0]], "not symmetric"),
      ("indefinite", [[1.0, 0.0], [0.0, -1.0]], "not positive definite"))
  def test_bad_estimate_raises(self, _, h0, message):
    for method in METHODS.values():
      with self.assertRaisesRegex(ValueError,
                                  "initial_inverse_hessian_estimate.*" +
                                  message):
        method(rosenbrock, tf.zeros(2), initial_inverse_hessian_estimate=h0)
      # A constant estimate is checked while tracing too.
      traced = tf.function(lambda x, method=method: method(
          rosenbrock, x, initial_inverse_hessian_estimate=tf.constant(h0)))
      with self.assertRaisesRegex(ValueError, message):
        traced(tf.zeros(2))


class ArgumentTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(
      (dict(initial_position=[1, 2]), ValueError, "initial_position"),
      (dict(dtype="int32"), ValueError, "dtype"),
      (dict(dtype="float64"), ValueError, "initial_position.*dtype"),
      (dict(line_search_fn="hager_zhang"), NotImplementedError,
       "line_search_fn"),
      (dict(objective_func=3.0), TypeError, "objective_func"),
      (dict(max_iters=0), ValueError, "max_iters"),
      (dict(history_size=0), ValueError, "history_size"),
      (dict(max_line_search_iters=0), ValueError, "max_line_search_iters"),
      (dict(tolerance_grad=-1.0), ValueError, "tolerance_grad"),
      (dict(initial_step_length=0.0), ValueError, "initial_step_length"),
      (dict(initial_inverse_hessian_estimate=np.eye(3, dtype=np.float32)),
       ValueError, "initial_inverse_hessian_estimate"),
      (dict(initial_position=np.zeros((2, 2), np.float32)), ValueError,
       "initial_position"),
      (dict(initial_position=np.zeros(0, np.float32)), ValueError,
       "initial_position.*n >= 1"),
      (dict(max_iters=2**31), ValueError, "max_iters.*2147483647"),
      (dict(history_size=2**31), ValueError, "history_size"),
      (dict(max_line_search_iters=2**31), ValueError,
       "max_line_search_iters"),
      (dict(max_iters=np.int64(2**40)), ValueError, "max_iters"),
      (dict(objective_func=lambda x: x ** 2), ValueError,
       r"objective_func.*shape \[\].*got shape \(2,\)"),
      (dict(objective_func=lambda x: tf.reduce_sum(x ** 2, keepdims=True)[0]
            * tf.ones([3])), ValueError, "objective_func"),
  )
  def test_invalid_arguments(self, overrides, error, message):
    kwargs = dict(objective_func=rosenbrock,
                  initial_position=np.zeros(2, np.float32))
    kwargs.update(overrides)
    with self.assertRaisesRegex(error, message):
      lbfgs.minimize_lbfgs(**kwargs)

  def test_objective_shape_checked_in_graphs(self):
    vector = lambda x: x ** 2
    for method in METHODS.values():
      traced = tf.function(lambda x, method=method: method(vector, x))
      with self.assertRaisesRegex(ValueError, "objective_func.*shape"):
        traced(tf.zeros(2))
    # Batched: values must have shape batch_shape, not batch_shape + [n].
    with self.assertRaisesRegex(ValueError, r"objective_func.*\[3\]"):
      lbfgs.minimize_lbfgs(lambda x: x ** 2, tf.zeros([3, 2]), batch_dims=1)
    # A shape unknown while tracing is checked when the graph runs.
    def numpy_value_and_gradient(x):
      value = tf.numpy_function(lambda x: x ** 2, [x], tf.float32)
      return value, 2.0 * x

    traced = tf.function(lambda x: lbfgs.minimize_lbfgs(
        numpy_value_and_gradient, x, value_and_gradient=True))
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                "objective_func.*shape"):
      traced(tf.zeros(2))

  def test_paddle_tuple_and_defaults(self):
    result = lbfgs.minimize_lbfgs(quadratic_1d, tf.constant([0.0]))
    self.assertLen(result, 5)
    converged, calls, position, value, gradient = result
    self.assertEqual(converged.dtype, tf.bool)
    self.assertEqual(calls.dtype, tf.int32)
    for tensor in (position, value, gradient):
      self.assertEqual(tensor.dtype, tf.float32)
    self.assertEqual(value.shape, ())
    self.assertAllClose(position, [1.5], atol=1e-5)

  def test_gradient_already_small_converges_without_iterating(self):
    r = solve("lbfgs", quadratic_1d, tf.constant([1.5], tf.float64))
    self.assertTrue(r.is_converge)
    self.assertEqual(int(r.num_iterations), 0)
    self.assertEqual(int(r.num_func_calls), 1)
    self.assertEqual(int(r.stop_reason), StopReason.GRADIENT_NORM)


if __name__ == "__main__":
  tf.test.main()


class UnrolledGradientTest(tf.test.TestCase, parameterized.TestCase):
  """gradients='unrolled' through minimize_lbfgs in a graph equals the
  eager one and, at the solution, the closed form (review24b: NaN in
  tf.function and XLA for every max_iters >= 2, main too: a discarded NaN
  in the line search's cubic step made the tf.where's gradient NaN)."""

  @parameterized.parameters("function", "xla")
  def test_unrolled_gradient_is_finite_and_right(self, mode):
    theta = tf.Variable(3.0, dtype=tf.float64)

    def gradient(max_iters):
      with tf.GradientTape() as tape:
        result = lbfgs.minimize_lbfgs(
            lambda x: tf.reduce_sum((x - theta) ** 2) +
            0.1 * tf.reduce_sum(x ** 4), tf.constant([0.0], tf.float64),
            dtype="float64", gradients="unrolled", return_results=True,
            eager_compile=False, max_iters=max_iters)
        loss = tf.reduce_sum(result.position)
      return result.position, tape.gradient(loss, theta)

    graph = tf.function(gradient, jit_compile=mode == "xla")
    _, eager_two = gradient(2)
    _, graph_two = graph(2)
    self.assertAllClose(graph_two, eager_two, rtol=1e-10)
    position, derivative = graph(50)
    # x* solves 2 (x - theta) + 0.4 x^3 = 0: dx*/dtheta = 2 / (2 + 1.2 x*^2).
    x = float(position[0])
    self.assertAllClose(derivative, 2.0 / (2.0 + 1.2 * x * x), rtol=1e-6)
