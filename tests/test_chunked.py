"""least_squares over chunked data (`data=`, `data_chunk_size=`).

The chunked solve sums J^T J, J^T F and the cost chunk by chunk
(`tfg_optim._chunked`); these tests hold it to `numpy.linalg.lstsq`, to the
unchunked solve iterate by iterate, to the finiteness rules, and run it in
every execution mode.
"""

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


def test_linear_fit_equals_lstsq_and_the_unchunked_solves():
  design = np.stack([np.ones_like(_T), _T, _T * _T], axis=1)
  expected = np.linalg.lstsq(design, _Y, rcond=None)[0]
  chunked = tfg_optim.least_squares(_quadratic, _zeros(3), data=(_T, _Y),
                                    data_chunk_size=300)  # 3 x 300 + 100.
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
  chunked = tfg_optim.least_squares(_exponential, start(), data=(t, y),
                                    data_chunk_size=100, **options)
  dense = tfg_optim.least_squares(_exponential, start(), data=(t, y),
                                  **options)
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
