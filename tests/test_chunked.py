"""least_squares over chunked data (`data=`, `data_chunk_size=`).

The chunked solve sums J^T J, J^T F and the cost chunk by chunk
(`tfg_optim._chunked`); these tests hold it to `numpy.linalg.lstsq`, to the
unchunked solve iterate by iterate, to the finiteness rules, and run it in
every execution mode.
"""

import functools
import os

import numpy as np
import pytest
import tensorflow as tf

import tfg_optim
from tfg_optim import _engine
from tests import modes

_RNG = np.random.default_rng(5)
_T = np.linspace(-1.0, 1.0, 1000)
_Y = 0.5 - 1.5 * _T + 2.0 * _T ** 2 + 0.1 * _RNG.standard_normal(1000)
_Y_EXP = 2.0 * np.exp(-1.3 * _T) + 0.05 * _RNG.standard_normal(1000)


def _quadratic(a, b, c, t, y):
  return a + b * t + c * t * t - y


def _exponential(a, b, t, y):
  return a * tf.exp(b * t) - y


def _zeros(count):
  return [tf.constant(0.0, tf.float64) for _ in range(count)]


@functools.lru_cache(maxsize=None)
def _chunked_quadratic():
  """The quadratic fit in chunks of 300 rows (3 x 300 + 100), eagerly; its
  results are shared by two tests."""
  return tfg_optim.least_squares(_quadratic, _zeros(3), data=(_T, _Y),
                                 data_chunk_size=300)


def test_linear_fit_equals_lstsq_and_the_unchunked_solves():
  design = np.stack([np.ones_like(_T), _T, _T * _T], axis=1)
  expected = np.linalg.lstsq(design, _Y, rcond=None)[0]
  chunked = _chunked_quadratic()
  # (With geodesic acceleration, on by default without chunks, the dense
  # solve stops on the relative step test 1e-9 away from lstsq.)
  unchunked = tfg_optim.least_squares(_quadratic, _zeros(3), data=(_T, _Y),
                                      geodesic_acceleration=None)
  closure = tfg_optim.least_squares(
      lambda a, b, c: _quadratic(a, b, c, _T, _Y), _zeros(3),
      geodesic_acceleration=None)
  for result in (chunked, unchunked, closure):
    assert bool(result.converged)
    np.testing.assert_allclose(np.array(result.position), expected,
                               rtol=0, atol=1e-10)
  np.testing.assert_allclose(float(chunked.cost), float(closure.cost),
                             rtol=1e-12)
  assert int(chunked.num_residuals) == 1000
  np.testing.assert_allclose(chunked.residual.numpy(),
                             [np.sqrt(2.0 * float(closure.cost))], rtol=1e-12)
  # data= alone is the closure's solve.
  np.testing.assert_array_equal(np.array(unchunked.position),
                                np.array(closure.position))


def test_nonlinear_fit_takes_the_unchunked_iterates():
  options = dict(geodesic_acceleration=None, record=True)
  start = lambda: [tf.constant(1.0, tf.float64), tf.constant(0.0, tf.float64)]
  t, y = _T[::2], _Y_EXP[::2]
  chunked = tfg_optim.least_squares(_exponential, start(), data=(t, y),
                                    data_chunk_size=192, **options)
  dense = tfg_optim.least_squares(_exponential, start(), data=(t, y),
                                  **options)
  # Both converge at the same iteration; which test fires first may differ,
  # since sums over chunks round differently from one sum (here the gradient
  # test and the relative step test fire on the same iteration).
  assert bool(chunked.converged) and bool(dense.converged)
  assert int(chunked.num_iterations) == int(dense.num_iterations) > 3
  # The same iterates until the last iteration, where the cost changes in
  # its last bit: one may accept a step the other rejects.
  last = int(dense.num_iterations) - 1
  assert abs(int(chunked.num_accepted) - int(dense.num_accepted)) <= 1
  for name in ("cost", "gradient_norm", "step_size"):
    np.testing.assert_allclose(chunked.records[name].numpy()[:last],
                               dense.records[name].numpy()[:last], rtol=1e-9,
                               atol=1e-12)
  np.testing.assert_allclose(np.array(chunked.position),
                             np.array(dense.position), rtol=1e-12)


def test_bounds_a_robust_loss_and_nielsen_match_the_unchunked_solve():
  t, y = _T[::4], _Y_EXP[::4].copy()
  y[::25] += 5.0  # Outliers.
  options = dict(geodesic_acceleration=None, damping="nielsen", loss="cauchy",
                 loss_scale=0.1, bounds=(-3.0, 3.0), max_iterations=200)
  start = lambda: [tf.constant(1.0, tf.float64), tf.constant(0.0, tf.float64)]

  @tf.function(autograph=False)  # 34 chunked iterations: 4x faster traced.
  def solve(chunk_size):
    return tfg_optim.least_squares(_exponential, start(), data=(t, y),
                                   data_chunk_size=chunk_size, **options)

  chunked, dense = solve(100), solve(None)
  assert int(chunked.stop_reason) == int(dense.stop_reason)
  np.testing.assert_allclose(np.array(chunked.position),
                             np.array(dense.position), rtol=1e-8)
  np.testing.assert_allclose(np.array(chunked.position), [2.0, -1.3],
                             atol=0.05)


def test_a_nan_data_row_ends_not_finite():
  y = _Y_EXP.copy()
  y[123] = np.nan
  result = tfg_optim.least_squares(
      _exponential, [tf.constant(1.0, tf.float64),
                     tf.constant(0.0, tf.float64)],
      data=(_T, y), data_chunk_size=400)
  assert int(result.stop_reason) == int(_engine.StopReason.NOT_FINITE)
  assert not bool(result.converged)


@pytest.mark.parametrize("mode", modes.MODES)
def test_every_mode(mode):
  t = _T[::5]
  y = 2.0 * np.exp(-1.3 * t) + 0.05 * _RNG.standard_normal(200)

  def build(t, y):
    result = tfg_optim.least_squares(
        _exponential, [tf.constant(1.0, tf.float64),
                       tf.constant(0.0, tf.float64)],
        data=(t, y), data_chunk_size=64)
    return (tf.stack(result.position), result.stop_reason,
            result.num_residuals)

  # N unknown while tracing (not under XLA, which compiles static shapes).
  signature = None if mode == "xla" else [[None], [None]]
  position, reason, count = modes.run(build, [t, y], mode, signature)
  expected = tfg_optim.least_squares(
      lambda a, b: _exponential(a, b, t, y),
      [tf.constant(1.0, tf.float64), tf.constant(0.0, tf.float64)])
  np.testing.assert_allclose(position, np.array(expected.position),
                             rtol=1e-9)
  assert _engine.StopReason(int(reason)).converged
  assert int(count) == 200


def test_float32_data_and_multi_column_data():
  t = _T.astype(np.float32)
  points = np.stack([t, t * t], axis=1)  # [N, 2] data.
  y = (1.0 + 2.0 * t - 3.0 * t * t).astype(np.float32)
  result = tfg_optim.least_squares(
      lambda a, b, c, p, y: a + b * p[:, 0] + c * p[:, 1] - y,
      [tf.constant(0.0), tf.constant(0.0), tf.constant(0.0)],
      data=[points, y], data_chunk_size=333)
  np.testing.assert_allclose(np.array(result.position), [1.0, 2.0, -3.0],
                             atol=1e-4)


@pytest.mark.parametrize("kwargs, argument", [
    (dict(data_chunk_size=0), "data_chunk_size"),
    (dict(data_chunk_size=2.5), "data_chunk_size"),
    (dict(data=None, data_chunk_size=4), "data_chunk_size"),
    (dict(data=(_T, _Y[:10])), "data"),
    (dict(data=[]), "data"),
    (dict(data=(1.0,)), "data"),
    (dict(geodesic_acceleration=2.0, data_chunk_size=4),
     "geodesic_acceleration"),
    (dict(linear_solver="cg", data_chunk_size=4), "linear_solver"),
    (dict(jacobian=lambda a, b, c, t, y: None, data_chunk_size=4),
     "jacobian"),
])
def test_invalid_arguments_name_themselves(kwargs, argument):
  options = dict(data=(_T, _Y))
  options.update(kwargs)
  with pytest.raises((ValueError, TypeError), match=argument):
    tfg_optim.least_squares(_quadratic, _zeros(3), **options)


def test_batch_dims_is_refused_with_chunks():
  with pytest.raises(ValueError, match="batch_dims"):
    tfg_optim.least_squares(
        lambda x, t, y: x[..., 0] + x[..., 1] * t - y,
        tf.zeros([2, 2], tf.float64), batch_dims=1, data=(_T, _Y),
        data_chunk_size=8)


# --- data as a tf.data.Dataset of batches ------------------------------------


def _batches(size, t=_T, y=_Y):
  return tf.data.Dataset.from_tensor_slices((t, y)).batch(size)


def _lstsq():
  design = np.stack([np.ones_like(_T), _T, _T * _T], axis=1)
  return np.linalg.lstsq(design, _Y, rcond=None)[0]


def _dataset_fit(dataset, **options):
  result = tfg_optim.least_squares(_quadratic, _zeros(3), data=dataset,
                                   **options)
  return (tf.stack(result.position), result.cost, result.num_residuals,
          result.stop_reason, result.num_iterations,
          result.num_residual_evaluations)


# One trace, shared by the tf.function cells below (a dataset argument of
# the same element spec reuses it).
_DATASET_FIT = tf.function(_dataset_fit, autograph=False)


def test_a_dataset_of_batches_equals_lstsq_and_the_tensor_chunks():
  # 1000 rows in batches of 300: 3 x 300 + 100, the chunks of
  # data_chunk_size=300 in their order. In a tf.function; eagerly (op by
  # op, the passes Python loops): the guide's snippet below; XLA: refused,
  # below; a TF1 Session: below.
  outputs = [value.numpy() for value in _DATASET_FIT(_batches(300))]
  position, cost, count, reason, iterations, evaluations = outputs
  solution = _lstsq()
  np.testing.assert_allclose(position, solution, rtol=0, atol=1e-10)
  residual = _quadratic(*solution, _T, _Y)
  np.testing.assert_allclose(cost, 0.5 * np.sum(residual ** 2), rtol=1e-12)
  assert int(count) == 1000
  assert _engine.StopReason(int(reason)).converged
  chunks = _chunked_quadratic()  # The same sums in the same order.
  assert int(iterations) == int(chunks.num_iterations)
  assert int(evaluations) == int(chunks.num_residual_evaluations)
  assert int(reason) == int(chunks.stop_reason)
  np.testing.assert_allclose(position, np.array(chunks.position), rtol=1e-13)
  np.testing.assert_allclose(cost, float(chunks.cost), rtol=1e-13)


def test_a_dataset_fit_in_a_tf1_session():
  # The dataset is made in the Session's graph; its batches have an unknown
  # leading dimension (300, 300, 300, 100). A dataset solve is never
  # differentiated, so implicit_hessian='exact' (which needs a dense J)
  # must not refuse it.
  position = modes.run(
      lambda: _dataset_fit(_batches(300), implicit_hessian="exact")[0], [],
      "session")
  np.testing.assert_allclose(position, _lstsq(), rtol=0, atol=1e-10)


def test_an_infinite_or_empty_dataset_fails_naming_data_in_a_graph():
  # Eagerly their cardinality is known (ValueError, below); in a graph
  # each pass checks it, and counts the rows it saw.
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"data\W+ is an infinite dataset"):
    _DATASET_FIT(_batches(300).repeat())
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"data\W+: the dataset gave no rows"):
    _DATASET_FIT(_batches(300).filter(lambda t, y: False))


@pytest.mark.parametrize("kwargs, argument", [
    (dict(data=_batches(300).repeat()), "'data' is an infinite dataset"),
    (dict(data=_batches(300).take(0)), "'data' is an empty dataset"),
    (dict(data=_batches(300), data_chunk_size=300), "data_chunk_size"),
    (dict(data=_batches(300), gradients="unrolled"), "gradients"),
    (dict(data=_batches(300), linear_solver="cg"), "linear_solver"),
    (dict(data=_batches(300), geodesic_acceleration=2.0),
     "geodesic_acceleration"),
    (dict(data=tf.data.Dataset.from_tensor_slices(
        {"t": _T, "y": _Y}).batch(4)), "data"),
    (dict(data=tf.data.Dataset.from_tensor_slices((_T, _Y))), "data"),
])
def test_invalid_datasets_name_the_argument(kwargs, argument):
  with pytest.raises((ValueError, TypeError), match=argument):
    tfg_optim.least_squares(_quadratic, _zeros(3), **kwargs)


def test_a_dataset_is_refused_under_xla_and_with_batch_dims():
  under_xla = tf.function(jit_compile=True, autograph=False)(
      lambda: _dataset_fit(_batches(300))[1])
  with pytest.raises(ValueError, match="'data'.*XLA"):
    under_xla()
  with pytest.raises(ValueError, match="batch_dims"):
    tfg_optim.least_squares(
        lambda x, t, y: x[..., 0] + x[..., 1] * t - y,
        tf.zeros([2, 2], tf.float64), batch_dims=1, data=_batches(300))


def test_the_dataset_snippet_of_the_guide_runs():
  # docs/distributed.md, Data as a `tf.data.Dataset`: its Python block as is.
  path = os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "docs", "distributed.md")
  with open(path) as guide:
    text = guide.read()
  section = text[text.index("## Data as a `tf.data.Dataset`"):]
  code = section[section.index("```python\n") + 10:section.index("```\n")]
  namespace = {}
  exec(compile(code, path, "exec"), namespace)  # pylint: disable=exec-used
  result = namespace["result"]
  np.testing.assert_allclose(np.array(result.position), [2.0, 1.3],
                             atol=0.01)  # The data's generating values.
  assert int(result.num_residuals) == 1000
