"""Every front-end, option and mode together: the pairwise table of
`tests/conformance.py`, each cell checked against its closed-form answer."""

import numpy as np
import pytest
import tensorflow as tf

import tfg_optim
from tests import conformance
from tests import modes
from tfg_optim import manifolds
from tfg_optim import riemannian
from tfg_optim import stopping

CELLS = conformance.cells()

_MANIFOLDS = {
    "rosenbrock": lambda: manifolds.Euclidean(2),
    "sphere": lambda: manifolds.Sphere(3),
    "rotation": lambda: manifolds.SpecialOrthogonal(3),
    "pose": lambda: manifolds.Product(manifolds.SpecialOrthogonal(3),
                                      manifolds.Euclidean(3)),
}


def _residual(problem, data):
  """The residual of a point (a tensor, or (R, t) for a pose)."""
  if problem == "rosenbrock":
    scale = data[0]
    return lambda x: tf.stack([scale[0] - x[..., 0],
                               scale[1] * (x[..., 1] - x[..., 0] ** 2)], -1)
  if problem == "sphere":
    b, target = data
    return lambda p: tf.matmul(p[..., tf.newaxis, :], b,
                               transpose_b=True)[..., 0, :] - target
  points, observed = data
  if problem == "rotation":
    return lambda r: tf.matmul(points, r, transpose_b=True) - observed
  return lambda r, t: (tf.matmul(points, r, transpose_b=True) +
                       t[..., tf.newaxis, :] - observed)


def _solve(cell, start, data):
  problem, batch_dims = cell["problem"], cell["batch_dims"]
  residual = _residual(problem, data)
  dtype = tf.nest.flatten(start)[0].dtype
  if cell["front_end"] == "riemannian":
    tolerance = 1e-10 if dtype == tf.float64 else 1e-5
    criterion = (stopping.StopAfterIteration(300) |
                 stopping.StopWhenGradientNormLess(tolerance) |
                 stopping.StopWhenStepsizeLess(tolerance))
    f = (lambda p: residual(*p)) if problem == "pose" else residual
    return riemannian.levenberg_marquardt(
        _MANIFOLDS[problem](), f, start, stopping_criterion=criterion,
        batch_dims=batch_dims, return_state=True)
  kwargs = dict(loss=cell["loss"], damping=cell["damping"],
                batch_dims=batch_dims,
                linear_solver=cell["linear_solver"].replace("_inexact", ""),
                inexact_steps=cell["linear_solver"] == "cg_inexact",
                geodesic_acceleration=2.0 if cell["acceleration"] == "on"
                else None)
  if cell["bounds"] != "none":
    upper = 0.5 if cell["bounds"] == "active" else 5.0
    kwargs["bounds"] = ([-5.0, -5.0], [upper, 5.0])
  if problem == "rosenbrock":
    return tfg_optim.least_squares(residual, start, **kwargs)
  return tfg_optim.least_squares(residual, start,
                                 manifold=_MANIFOLDS[problem](), **kwargs)


@pytest.mark.parametrize("cell", CELLS, ids=conformance.cell_id)
def test_cell_reaches_the_closed_form_answer(cell):
  problem, batch_dims = cell["problem"], cell["batch_dims"]
  dtype = np.dtype(cell["dtype"])
  start = tf.nest.map_structure(lambda a: a.astype(dtype),
                                conformance.starts(problem, batch_dims))
  data = [a.astype(dtype) for a in conformance.data(problem)]
  flat_start = tf.nest.flatten(start)
  signature = None
  if cell["shapes"] == "dynamic":  # unknown batch and residual counts
    signature = ([(None,) * batch_dims + a.shape[batch_dims:]
                  for a in flat_start] +
                 [(None,) + a.shape[1:] for a in data])

  def build(*inputs):
    point = tf.nest.pack_sequence_as(start, inputs[:len(flat_start)])
    result = _solve(cell, point, list(inputs[len(flat_start):]))
    return (tf.nest.flatten(result.position), result.converged,
            result.stop_reason, result.cost, result.initial_cost)

  position, converged, reason, cost, initial_cost = modes.run(
      build, flat_start + data, cell["mode"], signature=signature)
  reasons = [tfg_optim.StopReason(int(r)).name
             for r in np.ravel(reason)]
  if cell["damping"] == "tfg":
    # TensorFlow Graphics' rule never lowers lambda: after early rejections
    # (an inadmissible acceleration, say) it crawls to the answer and may
    # honestly end at the iteration limit (docs/least_squares.md).
    converged = converged | (reason == int(tfg_optim.StopReason.MAX_ITERATIONS))
  assert np.all(converged), reasons
  assert np.all(cost <= initial_cost)
  tolerance = 1e-6 if dtype == np.float64 else 3e-3
  expected = tf.nest.flatten(conformance.truth(problem, cell["bounds"]))
  for got, want in zip(position, expected):
    want = np.broadcast_to(want, got.shape)
    np.testing.assert_allclose(got, want, atol=tolerance, err_msg=reasons)
