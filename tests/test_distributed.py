"""least_squares(strategy=...): one problem over the replicas of a strategy.

Logical CPU devices and a cluster must be set up before TensorFlow starts,
so the solves run in two child processes of this file, started at once by
one test and always killed at its end (`python tests/test_distributed.py
INDEX SIGNAL_FILE`, with the worker's `TF_CONFIG` from
`tfg_optim.examples.local_cluster`): the two workers of a
MultiWorkerMirroredStrategy on 127.0.0.1 (free ports; ring all-reduces).
Worker 0 has 4 logical CPU devices and also runs the single-device solve and MirroredStrategy over 2
(each replica's passes compiled by XLA: `jit_compile_replicas`) and over 4
of them, while it waits for worker 1, which has exited, to time
out (two processes, not three: TensorFlow's start is most of the cost).
Each child prints one JSON line; the test holds the solves to the
single-device solve (the summation order is the only difference), to the
non-finite rule, a batch of independent problems split over the workers to
the single-device batch, and a dead worker to a failure naming it within
the all-reduce timeout. Implicit gradients through the solve (over 2 of
worker 0's devices, and over the two workers): the single-device gradient,
central differences of re-solves, zero for a NaN shard.
"""

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

import tfg_optim
from tfg_optim import _engine
from tfg_optim.examples import local_cluster

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CHILD_TIMEOUT = 180.0  # s: a child still running then is killed (a hang;
# worker 0 takes about 40 s on a quiet machine, 90 s at load 5).
# s: the workers' all-reduce completion timeout. The two workers trace and
# run their solves independently between all-reduces; on 2 loaded cores one
# fell 6 s behind the other while tracing the gradient cells (a
# DEADLINE_EXCEEDED at load 6). Worker 0 waits this long for the dead
# worker while it runs the mirrored solves, which take longer.
_WORKER_TIMEOUT = 20.0
_NOT_FINITE = "NOT_FINITE"
_N = 1001  # 4 shards of 250, 250, 250 and 251 rows.
_BEGIN = time.monotonic()  # A child's start, after its imports.
# Dataset solves past the suite's time budget (about 5 s each on 2 loaded
# cores), run when this is set: a per-replica pipeline on 2 devices, and
# datasets over the two workers (docs/distributed.md).
_MORE_DATASETS = os.environ.get("TFG_OPTIM_MORE_DATASET_TESTS") == "1"


def _problem():
  """(t, y): noisy 2 exp(-1.3 t) on [-1, 1]."""
  rng = np.random.default_rng(5)
  t = np.linspace(-1.0, 1.0, _N)
  return t, 2.0 * np.exp(-1.3 * t) + 0.05 * rng.standard_normal(_N)


# --- the children ------------------------------------------------------------


def _solve(strategy=None, data=None, **options):
  """least_squares of a * exp(b t) - y from (1, 0): a dict of results."""
  result = tfg_optim.least_squares(
      lambda a, b, t, y: a * tf.exp(b * t) - y,
      [tf.constant(1.0, tf.float64), tf.constant(0.0, tf.float64)],
      data=_problem() if data is None else data, strategy=strategy,
      geodesic_acceleration=None, record=True, **options)
  costs = result.records["cost"].numpy()
  reason = _engine.StopReason(int(result.stop_reason))
  return dict(position=[float(v) for v in result.position],
              cost=float(result.cost),
              iterations=int(result.num_iterations),
              accepted=int(result.num_accepted),
              evaluations=int(result.num_residual_evaluations),
              stop=reason.name, converged=reason.converged,
              residuals=int(result.num_residuals),
              costs=[float(c) for c in costs[np.isfinite(costs)]])


def _solve_batch(strategy=None):
  """5 independent fits a_i exp(b_i t) - y_i (batch_dims=1, data [5, 40]):
  per-problem results."""
  rng = np.random.default_rng(7)
  t = np.tile(np.linspace(-1.0, 1.0, 40), (5, 1))
  a, b = rng.uniform(1.0, 2.0, 5), rng.uniform(-1.5, -0.5, 5)
  y = a[:, None] * np.exp(b[:, None] * t) + 0.01 * rng.standard_normal(t.shape)
  result = tfg_optim.least_squares(
      lambda x, t, y: x[..., 0:1] * tf.exp(x[..., 1:2] * t) - y,
      tf.constant(np.tile([1.0, 0.0], (5, 1))), batch_dims=1, data=(t, y),
      strategy=strategy, geodesic_acceleration=None)  # (Traces faster.)
  return dict(position=result.position.numpy().tolist(),
              iterations=result.num_iterations.numpy().tolist(),
              stop=result.stop_reason.numpy().tolist(),
              truth=np.stack([a, b], 1).tolist())


_GRADIENTS = {}  # The traced gradient function, shared by the cells.
_WEIGHTS = (1.0, 2.0, 3.0, 0.5)  # L = a* + 2 b* + 3 cost + 0.5 ||F||.


def _gradient_function():
  """(strategy, weights, scale, t, y) -> the loss
  L = w . (a*, b*, cost, ||F||) of the fit of scale a exp(b t) + offset t
  to y (scale captured, offset a captured tf.Variable, both 1 and 0 here:
  the fit of `_solve`) and its implicit gradients with respect to scale,
  offset, t and y, in one tf.function (traced once per strategy)."""
  if not _GRADIENTS:
    offset = tf.Variable(0.0, dtype=tf.float64)

    def gradients(strategy, weights, scale, t, y):
      with tf.GradientTape() as tape:
        tape.watch([scale, t, y])
        result = tfg_optim.least_squares(
            lambda a, b, t, y: scale * a * tf.exp(b * t) + offset * t - y,
            [tf.constant(1.0, tf.float64), tf.constant(0.0, tf.float64)],
            data=(t, y), strategy=strategy, geodesic_acceleration=None)
        loss = tf.reduce_sum(weights * tf.stack(
            list(result.position) + [result.cost, tf.norm(result.residual)]))
      return [loss, tf.stack(result.position)] + tape.gradient(
          loss, [scale, offset, t, y])

    _GRADIENTS["function"] = tf.function(gradients, autograph=False)
  return _GRADIENTS["function"]


def _gradients(strategy=None, data=None, weights=_WEIGHTS, scale=1.0):
  """The loss, the solution (a*, b*) and the gradients of
  `_gradient_function`, as lists."""
  t, y = _problem() if data is None else data
  values = _gradient_function()(
      strategy, *[tf.constant(v, tf.float64) for v in (weights, scale, t, y)])
  return dict(zip(("loss", "position", "scale", "offset", "t", "y"),
                  [v.numpy().tolist() for v in values]))


def _finite_differences(strategy, step=1e-4):
  """Central differences of re-solves against the implicit gradient, on
  the noise-free fit y = 2 exp(-1.3 t) (a zero residual at the solution:
  Gauss-Newton's derivative is exact there), in the direction
  (scale, t, y) += step (1, 0.1 cos(3 t), 0.2 sin(5 t)), for
  L = a* + 2 b* + 3 cost: (the difference, the implicit value)."""
  t = _problem()[0]
  y = 2.0 * np.exp(-1.3 * t)
  dt, dy = 0.1 * np.cos(3.0 * t), 0.2 * np.sin(5.0 * t)
  weights = (1.0, 2.0, 3.0, 0.0)  # (||F|| is not differentiable at 0.)
  at = _gradients(strategy, (t, y), weights)
  losses = [_gradients(strategy, (t + sign * step * dt, y + sign * step * dy),
                       weights, 1.0 + sign * step)["loss"]
            for sign in (1.0, -1.0)]
  return ((losses[0] - losses[1]) / (2.0 * step),
          at["scale"] + np.dot(at["t"], dt) + np.dot(at["y"], dy))


def _batches(size):
  """The rows of `_problem` as a dataset of batches of `size` rows."""
  return tf.data.Dataset.from_tensor_slices(_problem()).batch(size)


def _per_replica_batches(strategy):
  """11 batches of 100 rows (the last 1), sharded over the input pipelines
  (one per worker; a worker's replicas take its batches in turn): 6 and 5
  batches for 2 replicas."""
  return strategy.distribute_datasets_from_function(
      lambda context: _batches(100).shard(context.num_input_pipelines,
                                          context.input_pipeline_id))


def _with_nan(row):
  t, y = _problem()
  y = y.copy()
  y[row] = np.nan
  return t, y


def _xla_modules(signal):
  """The names of the XLA modules compiled so far of the per-replica passes
  (`XLA_FLAGS` dumps them next to `signal`, see `_start_children`)."""
  directory = os.path.join(os.path.dirname(signal), "xla")
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted({name.split(".")[1] for name in names
                 if name.endswith(".before_optimizations.txt")})


def _mirrored_solves(signal):
  """The single-device solve and MirroredStrategy over 2 and 4 of this
  process's logical CPU devices."""
  out = {"single": _solve()}
  # One process's strategies must not use collective ops besides the
  # worker's (their group keys would collide: a TensorFlow limit): these
  # reduce through one device. The workers' solves use ring collectives.
  two, four = (tf.distribute.MirroredStrategy(
      [f"/cpu:{i}" for i in range(count)],
      cross_device_ops=tf.distribute.ReductionToOneDevice())
               for count in (2, 4))
  # Shards of 500 and 501 rows: 5 chunks of 96, then 20 or 21 rows; each
  # replica's passes compiled by XLA (the 4 replicas' below are not; the
  # same fold runs as plain TensorFlow in benchmarks/distributed.py). In
  # place of the plain cell, not besides it: its compilations cost about
  # 2.5 s of CPU, one more solve 2-3 s.
  begin = time.monotonic()
  out["two_xla"] = _solve(two, data_chunk_size=96, jit_compile_replicas=True)
  out["two_xla_seconds"] = time.monotonic() - begin  # (Its cost, reported.)
  out["four"] = _solve(four)
  out["four_nan"] = _solve(four, data=_with_nan(900))  # The last shard.
  out["xla_modules"] = _xla_modules(signal)
  # A dataset: global batches of 200 rows split 100 + 100 over the
  # replicas, the last (1 row) 1 + 0: one replica gets an empty batch.
  out["two_dataset"] = _solve(two, data=_batches(200))
  if _MORE_DATASETS:  # 6 and 5 batches per replica.
    out["two_uneven"] = _solve(two, data=_per_replica_batches(two))
    # Each batch's terms compiled by XLA (per batch shape: 100, 1 and 0).
    out["two_dataset_xla"] = _solve(two, data=_batches(200),
                                    jit_compile_replicas=True)
  # Implicit gradients (one traced function per strategy; the NaN and
  # finite-difference cells rerun the traced one).
  begin = time.process_time()
  # One device: the dense path, without the ||F|| term (whose derivative
  # there has the term g . dx*/dtheta, O(||g||) at the point the solve
  # stops: the distributed (and chunked) ||F|| has the envelope theorem's).
  out["gradient_single"] = _gradients(weights=_WEIGHTS[:3] + (0.0,))
  out["gradient_two"] = _gradients(two)
  out["gradient_two_nan"] = _gradients(two, data=_with_nan(900))
  out["gradient_differences"] = _finite_differences(two)
  out["gradient_cpu_seconds"] = time.process_time() - begin
  out["replicas"] = [two.num_replicas_in_sync, four.num_replicas_in_sync]
  out["batch"] = _solve_batch()
  return out


def _worker_child(index, signal):
  """Worker `index` of two (its `TF_CONFIG` in the environment); worker 0
  also runs `_mirrored_solves` while it waits for the dead worker."""
  if index == 0:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 4)
  strategy = tf.distribute.MultiWorkerMirroredStrategy(
      communication_options=tf.distribute.experimental.CommunicationOptions(
          timeout_seconds=_WORKER_TIMEOUT))
  out = {"workers": strategy.num_replicas_in_sync,
         "multi": _solve(strategy)}
  if _MORE_DATASETS:  # Global batches split over the workers as over
    # replicas above; one pipeline per worker: 6 and 5 batches.
    out["multi_dataset"] = _solve(strategy, data=_batches(200))
    out["multi_uneven"] = _solve(strategy,
                                 data=_per_replica_batches(strategy))
  out.update(multi_nan=_solve(strategy, data=_with_nan(700)),  # worker 1's
             multi_batch=_solve_batch(strategy))
  begin = time.process_time()
  out["multi_gradient"] = _gradients(strategy)
  out["multi_gradient_cpu_seconds"] = time.process_time() - begin
  if index == 1:  # Dies: worker 0's next solve must fail, naming it.
    # Not before worker 0 has the NaN solve's results (its last all-reduce
    # may still read from this worker): it touches `signal`.
    deadline = time.monotonic() + _CHILD_TIMEOUT
    while not os.path.exists(signal) and time.monotonic() < deadline:
      time.sleep(0.05)
    return out
  with open(signal, "w"):
    pass
  dead = {}

  def solve_without_worker_1():
    start = time.monotonic()
    try:
      _solve(strategy)
    except Exception as error:  # pylint: disable=broad-except
      dead.update(type=type(error).__name__, message=str(error),
                  seconds=time.monotonic() - start)

  waiting = threading.Thread(target=solve_without_worker_1, daemon=True)
  waiting.start()
  out.update(_mirrored_solves(signal))  # Meanwhile (the other thread waits).
  waiting.join(_CHILD_TIMEOUT)
  out["dead"] = dead or None
  return out


def _main(argv):
  out = _worker_child(int(argv[0]), argv[1])
  out["seconds"] = time.monotonic() - _BEGIN
  print(json.dumps(out), flush=True)
  os._exit(0)  # pylint: disable=protected-access  # No teardown of servers.


# --- the tests ---------------------------------------------------------------


class _Child:
  """A child process of this file in environment `env`; `result()` its JSON
  line (or the test fails naming it); `kill()` ends it if it still runs."""

  def __init__(self, env, *args):
    self.args = args
    self.process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        cwd=_ROOT)
    self.deadline = time.monotonic() + _CHILD_TIMEOUT
    self._result = None

  def result(self):
    if self._result is None:
      try:
        stdout, stderr = self.process.communicate(
            timeout=max(1.0, self.deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        self.kill()
        pytest.fail(f"child {self.args} ran past {_CHILD_TIMEOUT} s")
      lines = [l for l in stdout.splitlines() if l.startswith("{")]
      assert lines, (f"child {self.args} exited {self.process.returncode} "
                     f"without results:\n{stderr[-3000:]}")
      self._result = json.loads(lines[-1])
    return self._result

  def kill(self):
    if self.process.poll() is None:
      self.process.kill()
    self.process.communicate()


def _start_children(signal):
  environments = local_cluster.worker_environments(
      2, PYTHONPATH=_ROOT, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  # Worker 0 names the XLA modules it compiles of the per-replica passes;
  # it compiles with XLA's default code generation (not conftest's).
  environments[0]["XLA_FLAGS"] = (
      f"--xla_dump_to={os.path.join(os.path.dirname(signal), 'xla')} "
      "--xla_dump_hlo_module_re=_terms_")
  return {f"worker{index}": _Child(env, str(index), signal)
          for index, env in enumerate(environments)}


def _same_solve(result, single):
  """The single-device solve, but for the summation order's rounding."""
  assert result["converged"] and result["stop"] == single["stop"]
  for key in ("iterations", "accepted", "evaluations"):
    assert result[key] == single[key], key
  assert result["residuals"] == _N
  np.testing.assert_allclose(result["position"], single["position"],
                             rtol=1e-12)
  np.testing.assert_allclose(result["cost"], single["cost"], rtol=1e-12)
  np.testing.assert_allclose(result["costs"], single["costs"], rtol=1e-11)


def _check_mirrored(out):
  assert out["replicas"] == [2, 4]
  single = out["single"]
  # Independent of the engine: the generating parameters of the data.
  np.testing.assert_allclose(single["position"], [2.0, -1.3], atol=0.02)
  # XLA per replica: XLA's exp and fused sums round differently from
  # TensorFlow's kernels; the same steps and stop as one device and as the
  # plain solve over 4, positions and costs within 1e-12 (relative).
  _same_solve(out["two_xla"], single)
  _same_solve(out["four"], single)
  np.testing.assert_allclose(out["two_xla"]["position"],
                             out["four"]["position"], rtol=1e-12)
  # XLA compiled each of the 2 replicas' Jacobian and cost passes (one
  # function per replica: shards of 500 and 501 rows), and nothing of the
  # plain solves (the 4 replicas' passes would add 4 of each).
  for name in ("jacobian_terms", "cost_terms"):
    assert sum(name in module for module in out["xla_modules"]) == 2, (
        out["xla_modules"])
  _same_solve(out["two_dataset"], single)
  if _MORE_DATASETS:
    _same_solve(out["two_uneven"], single)
    _same_solve(out["two_dataset_xla"], single)
  # A NaN in the last shard: the summed cost is NaN at the start.
  assert out["four_nan"]["stop"] == _NOT_FINITE
  assert out["four_nan"]["iterations"] == 0


def _norm_gradient(position):
  """d||F|| / d(scale, offset, t, y) at fixed (a, b) (the envelope
  theorem), F = scale a exp(b t) + offset t - y at scale 1, offset 0:
  F . dF/dtheta / ||F||, and ||F||."""
  (a, b), (t, y) = position, _problem()
  exp = a * np.exp(b * t)
  residual = exp - y
  norm = np.linalg.norm(residual)
  return (dict(scale=residual @ exp / norm, offset=residual @ t / norm,
               t=residual * b * exp / norm, y=-residual / norm), norm)


def _same_gradient(result, single, rows=slice(None)):
  """The single-device gradient plus the ||F|| term's closed form, but for
  rounding: theta_bar (scale, offset) whole, data_bar in `rows` (zero in
  the other rows)."""
  norm_bar, norm = _norm_gradient(result["position"])
  weight = _WEIGHTS[3]
  np.testing.assert_allclose(result["position"], single["position"],
                             rtol=1e-12)
  np.testing.assert_allclose(result["loss"], single["loss"] + weight * norm,
                             rtol=1e-12)
  for name in ("scale", "offset", "t", "y"):
    want = np.asarray(single[name]) + weight * norm_bar[name]
    if name in ("t", "y"):
      kept = np.zeros(_N)
      kept[rows] = want[rows]
      want = kept
    np.testing.assert_allclose(result[name], want, rtol=1e-9,
                               atol=1e-9 * np.max(np.abs(want)),
                               err_msg=name)


def _check_gradients(out):
  """MirroredStrategy over 2 devices: the single-device (dense) implicit
  gradient; central differences of re-solves; a NaN: zero gradients."""
  single = out["gradient_single"]
  assert all(abs(single[name]) > 1e-3 for name in ("scale", "offset"))
  _same_gradient(out["gradient_two"], single)
  difference, implicit = out["gradient_differences"]
  np.testing.assert_allclose(difference, implicit, rtol=1e-6)
  nan = out["gradient_two_nan"]  # NOT_FINITE: a zero gradient (the docs).
  assert np.isnan(nan["loss"])
  for name in ("scale", "offset", "t", "y"):
    assert not np.any(nan[name]), name


def _same_batch(result, single):
  np.testing.assert_allclose(single["position"], single["truth"], atol=0.02)
  assert result["stop"] == single["stop"]
  assert result["iterations"] == single["iterations"]
  np.testing.assert_allclose(result["position"], single["position"],
                             rtol=1e-12)


def _check_workers(zero, one, single, batch):
  assert zero["workers"] == one["workers"] == 2
  _same_solve(zero["multi"], single)
  # Every worker ends at the same point, bit for bit, with the same counts.
  assert zero["multi"] == one["multi"]
  for name in ("multi_dataset", "multi_uneven") if _MORE_DATASETS else ():
    _same_solve(zero[name], single)
    assert zero[name] == one[name]
  for out in (zero, one):  # A NaN in worker 1's shard stops both.
    assert out["multi_nan"]["stop"] == _NOT_FINITE
    # A batch split over the workers (2 + 3 problems), solved with no
    # communication and gathered on both: the single-device results.
    _same_batch(out["multi_batch"], batch)
  # Implicit gradients: theta_bar all-reduced (whole on both workers), each
  # worker's data_bar its own rows (500 and 501), zero elsewhere.
  gradient = zero["gradient_single"]
  _same_gradient(zero["multi_gradient"], gradient, slice(0, _N // 2))
  _same_gradient(one["multi_gradient"], gradient, slice(_N // 2, _N))
  for name in ("loss", "scale", "offset"):
    assert zero["multi_gradient"][name] == one["multi_gradient"][name]


def _check_dead_worker(zero):
  dead = zero["dead"]
  assert dead is not None, "the solve went on without worker 1"
  assert "/job:worker/replica:0/task:1" in dead["message"], dead
  assert dead["type"] in ("DeadlineExceededError", "UnavailableError"), dead
  assert dead["seconds"] < _WORKER_TIMEOUT + 15.0, dead


def test_strategies_equal_one_device_stop_on_nan_and_name_a_dead_worker(
    tmp_path):
  """One test, so that its three processes run at once (a test runner
  splitting tests over its own workers would start them twice); every
  check runs and each failing one is reported."""
  children = _start_children(str(tmp_path / "worker0_solved"))
  failures = []

  def check(name, function, *names):
    try:
      function(*[children[n].result() for n in names])
    except (AssertionError, pytest.fail.Exception) as error:
      failures.append(f"{name}: {error}")

  try:
    check("MirroredStrategy over 2 and 4 logical CPUs", _check_mirrored,
          "worker0")
    check("implicit gradients over 2 logical CPUs", _check_gradients,
          "worker0")
    single = children["worker0"].result()["single"]
    batch = children["worker0"].result()["batch"]
    check("two workers", lambda zero, one: _check_workers(zero, one, single,
                                                          batch),
          "worker0", "worker1")
    check("dead worker", _check_dead_worker, "worker0")
  finally:
    for child in children.values():
      child.kill()
  assert not failures, "\n".join(failures)


def test_invalid_strategies_name_the_argument():
  residual = lambda a, t: a * t
  start = [tf.constant(1.0, tf.float64)]
  data = (np.ones(4),)
  with pytest.raises(TypeError, match="strategy"):
    tfg_optim.least_squares(residual, start, data=data, strategy="mirrored")
  strategy = tf.distribute.get_strategy()  # The default: not supported.
  with pytest.raises(TypeError, match="strategy"):
    tfg_optim.least_squares(residual, start, data=data, strategy=strategy)
  strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
  for options in (dict(data=None), dict(gradients="unrolled"),
                  dict(eager_compile=False), dict(linear_solver="cg"),
                  dict(geodesic_acceleration=2.0)):
    with pytest.raises(ValueError, match="strategy"):
      tfg_optim.least_squares(residual, start, **{"data": data, **options},
                              strategy=strategy)
  under_xla = tf.function(jit_compile=True)(
      lambda t: tfg_optim.least_squares(residual, start, data=(t,),
                                        strategy=strategy).cost)
  with pytest.raises(ValueError, match="strategy.*XLA"):
    under_xla(tf.ones([4], tf.float64))
  with pytest.raises(ValueError, match="gradients"):
    tfg_optim.least_squares(residual, start, data=data, strategy=strategy,
                            gradients="backwards")
  # XLA per replica: a bool, with a strategy, one problem.
  with pytest.raises(TypeError, match="'jit_compile_replicas'"):
    tfg_optim.least_squares(residual, start, data=data, strategy=strategy,
                            jit_compile_replicas="yes")
  for options in (dict(), dict(data_chunk_size=2)):  # No strategy.
    with pytest.raises(ValueError, match="'jit_compile_replicas'.*"
                       "without 'strategy'"):
      tfg_optim.least_squares(residual, start, data=data,
                              jit_compile_replicas=True, **options)
  with pytest.raises(ValueError, match="'jit_compile_replicas'.*batch_dims"):
    tfg_optim.least_squares(lambda x, t: x * t, tf.ones([4, 1], tf.float64),
                            batch_dims=1, data=data, strategy=strategy,
                            jit_compile_replicas=True)
  distributed = strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensor_slices(data).batch(2))
  with pytest.raises(ValueError, match="'data' is a distributed dataset"):
    tfg_optim.least_squares(residual, start, data=distributed)
  with pytest.raises(ValueError, match="batch_dims"):  # Before the split.
    tfg_optim.least_squares(lambda x, t: x * t, tf.ones([2, 1], tf.float64),
                            batch_dims=1, data=distributed, strategy=strategy)
  with pytest.raises(ValueError, match="batch dimension"):  # 2 vs 4 rows
    tfg_optim.least_squares(lambda x, t: x * t, tf.ones([2, 1], tf.float64),
                            batch_dims=1, data=data, strategy=strategy)


if __name__ == "__main__":
  _main(sys.argv[1:])
