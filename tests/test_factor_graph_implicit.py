"""Implicit gradients of `factor_graph.least_squares` (gradients='implicit').

Truth: central finite differences of re-solves (tight tolerances) on an
SE(2) pose loop with two loop closures and a held first pose: the solution's
derivatives with respect to the measurements, a tensor captured by the term
function (a scale of the measured translations) and the held pose, on
noise-free measurements (a zero-residual solution, where the Gauss-Newton
derivative is the exact one); the final cost's on noisy ones (the envelope
theorem: exact at any residual). A linear factor graph against the closed
form (A_F^T A_F)^-1 A_F^T of its free coordinates, for the dense Cholesky,
the Schur complement and conjugate gradients.

Modes: tf.function (the pose loop, 'cholesky'), XLA ('cg' on the pose loop,
against the 'cholesky' gradient), a TF1 Session (tf.gradients, the linear
graph, 'cholesky') and eager (the linear graph, 'schur', and 'none').
"""

import numpy as np
import pytest
import tensorflow as tf

from tests import test_factor_graph
from tfg_optim import factor_graph
from tfg_optim.manifolds import lie_groups

# -- the SE(2) pose loop ---------------------------------------------------------

_TRUTH, _START, _EDGES, _EXACT = test_factor_graph._loop(count=6, seed=3)  # pylint: disable=protected-access
_NOISY = test_factor_graph._loop(count=6, noise=0.05, seed=3)[3]  # pylint: disable=protected-access
_TIGHT = dict(function_tolerance=0.0, gradient_tolerance=1e-15,
              parameter_tolerance=1e-15, max_iterations=50)
_SOLVES = {}  # (linear_solver, output) -> a traced function, shared by cells


def _loop_solve(measurements, scale, anchor, linear_solver, gradients):
  """The loop's solution [6, 3] and final cost; pose 0 held at `anchor`, the
  measured translations multiplied by the captured `scale`."""
  poses = factor_graph.Variables(
      tf.concat([anchor[tf.newaxis], _START[1:]], 0),
      manifold=lie_groups.SE2(), fixed=[0], name="poses")

  def error(first, second, measurement):
    scaled = tf.concat([measurement[:, :2] * scale, measurement[:, 2:]], -1)
    return test_factor_graph._between_error(first, second, scaled)  # pylint: disable=protected-access

  term = factor_graph.Term(error, [(poses, _EDGES[:, 0]),
                                   (poses, _EDGES[:, 1])], data=[measurements])
  results = factor_graph.least_squares(
      [poses], [term], linear_solver=linear_solver, gradients=gradients,
      **_TIGHT)
  return results.position[0], results.cost


def _outputs(position, cost):
  """[19]: the solution's entries and the final cost."""
  return tf.concat([tf.reshape(position, [-1]), cost[tf.newaxis]], 0)


def _parameters():
  return [tf.TensorSpec([len(_EDGES), 3], tf.float64),
          tf.TensorSpec([], tf.float64), tf.TensorSpec([3], tf.float64)]


def _jacobian_function():
  """(m, scale, anchor) -> (outputs [19], their Jacobians w.r.t. each), by
  'cholesky' in tf.function; reused for the re-solves (outputs only)."""
  if "jacobian" not in _SOLVES:
    @tf.function(autograph=False, input_signature=_parameters())
    def solve(measurements, scale, anchor):
      parameters = [measurements, scale, anchor]
      with tf.GradientTape() as tape:
        tape.watch(parameters)
        outputs = _outputs(*_loop_solve(measurements, scale, anchor,
                                        "cholesky", "implicit"))
      return outputs, tape.jacobian(outputs, parameters,
                                    experimental_use_pfor=False)
    _SOLVES["jacobian"] = solve
  return _SOLVES["jacobian"]


def _flat(parameters):
  return np.concatenate([np.reshape(p, [-1]) for p in parameters])


def _split(vector):
  m = len(_EDGES) * 3
  return [vector[:m].reshape(-1, 3), vector[m], vector[m + 1:]]


def _directional_differences(solve, point, directions, step=1e-6):
  """Central differences of solve's outputs along each direction."""
  columns = []
  for direction in directions:
    plus = solve(*[tf.constant(p) for p in _split(point + step * direction)])
    minus = solve(*[tf.constant(p) for p in _split(point - step * direction)])
    columns.append((plus[0].numpy() - minus[0].numpy()) / (2 * step))
  return np.stack(columns, -1)


def _jacobian_matrix(jacobians):
  return np.concatenate([np.reshape(j.numpy(), [19, -1]) for j in jacobians],
                        axis=-1)


def test_loop_solution_derivatives_match_re_solves():
  """Noise-free: d(solution)/d(measurements, captured scale, held pose)
  along random directions of all parameters at once, and along the held
  pose's and the scale's own axes; the held pose's output is the anchor."""
  solve = _jacobian_function()
  point = _flat([_EXACT, 1.0, _START[0]])
  outputs, jacobians = solve(tf.constant(_EXACT), tf.constant(1.0, tf.float64),
                             tf.constant(_START[0]))
  np.testing.assert_allclose(outputs[:18].numpy().reshape(6, 3), _TRUTH,
                             atol=1e-12)
  jacobian = _jacobian_matrix(jacobians)
  rng = np.random.default_rng(0)
  directions = list(rng.normal(size=(2, point.size)))
  directions += list(np.eye(point.size)[-4:])  # the scale, the anchor
  differences = _directional_differences(solve, point, directions)
  implicit = jacobian @ np.stack(directions, -1)
  assert np.max(np.abs(implicit[:18])) > 1.0  # the solution moves
  np.testing.assert_allclose(implicit[:18], differences[:18], atol=2e-7)
  # The held pose is the anchor: identity, and nothing from the data.
  np.testing.assert_array_equal(jacobians[2].numpy()[:3], np.eye(3))
  np.testing.assert_array_equal(jacobians[0].numpy()[:3], 0.0)


def test_final_cost_gradient_matches_re_solves():
  """Noisy: d(final cost)/d(measurements, scale, held pose)."""
  solve = _jacobian_function()
  point = _flat([_NOISY, 1.0, _START[0]])
  outputs, jacobians = solve(tf.constant(_NOISY), tf.constant(1.0, tf.float64),
                             tf.constant(_START[0]))
  assert outputs[-1] > 1e-4
  gradient = _jacobian_matrix(jacobians)[-1]
  rng = np.random.default_rng(1)
  directions = list(rng.normal(size=(2, point.size)))
  directions += list(np.eye(point.size)[-4:])
  differences = _directional_differences(solve, point, directions)[-1]
  np.testing.assert_allclose(gradient @ np.stack(directions, -1),
                             differences, rtol=1e-6, atol=1e-10)


def test_conjugate_gradients_under_xla_agree_with_cholesky():
  """'cg' (block-Jacobi PCG forward and backward) under XLA: the gradient
  of a weighted sum of the noisy solution and its cost equals the
  'cholesky' one."""
  weights = np.random.default_rng(2).normal(size=19)
  if "xla" not in _SOLVES:
    @tf.function(autograph=False, jit_compile=True,
                 input_signature=_parameters())
    def solve(measurements, scale, anchor):
      parameters = [measurements, scale, anchor]
      with tf.GradientTape() as tape:
        tape.watch(parameters)
        loss = tf.reduce_sum(weights * _outputs(*_loop_solve(
            measurements, scale, anchor, "cg", "implicit")))
      return tape.gradient(loss, parameters)
    _SOLVES["xla"] = solve
  arguments = [tf.constant(_NOISY), tf.constant(1.0, tf.float64),
               tf.constant(_START[0])]
  _, jacobians = _jacobian_function()(*arguments)
  reference = weights @ _jacobian_matrix(jacobians)
  gradient = _flat([g.numpy() for g in _SOLVES["xla"](*arguments)])
  np.testing.assert_allclose(gradient, reference, rtol=1e-7,
                             atol=1e-9 * np.max(np.abs(reference)))


# -- a linear factor graph -------------------------------------------------------

# Tables a [3, 2] (row 0 held) and b [4, 2]; one term over pairs (a_i, b_j):
# f_k = L (a_i - b_j) - y_k, L captured. x_F = argmin ||A_F x_F + A_H a_0 -
# y||^2, so dx_F/dy = (A_F^T A_F)^-1 A_F^T, dx_F/da_0 = -that A_H.
_PAIRS = np.array([(0, 0), (0, 1), (1, 1), (1, 2), (2, 2), (2, 3), (0, 3),
                   (1, 0)])
_L = np.array([[2.0, 0.5], [-0.3, 1.0]])
_Y = np.random.default_rng(3).normal(size=(len(_PAIRS), 2))
_A0 = np.array([0.5, -1.0])


def _linear_closed_form():
  """(dx_F/dy [12, 16], dx_F/da_0 [12, 2]) with x_F = (a_1, a_2, b)."""
  design = np.zeros([2 * len(_PAIRS), 2 * 7])
  for k, (i, j) in enumerate(_PAIRS):
    design[2 * k:2 * k + 2, 2 * i:2 * i + 2] = _L
    design[2 * k:2 * k + 2, 6 + 2 * j:6 + 2 * j + 2] = -_L
  free, held = design[:, 2:], design[:, :2]
  solution = np.linalg.solve(free.T @ free, free.T)
  return solution, -solution @ held


def _linear_solve(y, anchor, linear_solver, gradients="implicit"):
  a = factor_graph.Variables(
      tf.concat([anchor[tf.newaxis], tf.zeros([2, 2], tf.float64)], 0),
      fixed=[0], name="a")
  b = factor_graph.Variables(tf.zeros([4, 2], tf.float64), name="b")
  matrix = tf.constant(_L)
  term = factor_graph.Term(
      lambda x, z, data: tf.linalg.matvec(matrix, x - z) - data,
      [(a, _PAIRS[:, 0]), (b, _PAIRS[:, 1])], data=[y])
  results = factor_graph.least_squares([a, b], [term],
                                       linear_solver=linear_solver,
                                       gradients=gradients)
  return results.position


def _check_linear(jacobian_y, jacobian_a0, atol):
  expected_y, expected_a0 = _linear_closed_form()
  np.testing.assert_allclose(jacobian_y[2:], expected_y, atol=atol)
  np.testing.assert_allclose(jacobian_a0[2:], expected_a0, atol=atol)
  np.testing.assert_array_equal(jacobian_y[:2], 0.0)  # the held row
  np.testing.assert_array_equal(jacobian_a0[:2], np.eye(2))


def test_linear_graph_closed_form_in_a_session():
  """'cholesky', TF1 graph, tf.gradients per output coordinate."""
  graph = tf.Graph()
  with graph.as_default():
    y = tf.compat.v1.placeholder(tf.float64, [len(_PAIRS), 2])
    anchor = tf.compat.v1.placeholder(tf.float64, [2])
    a, b = _linear_solve(y, anchor, "cholesky")
    flat = tf.concat([tf.reshape(a, [-1]), tf.reshape(b, [-1])], 0)
    rows = [tf.gradients(flat[i], [y, anchor]) for i in range(14)]
    with tf.compat.v1.Session(graph=graph) as session:
      values = session.run(rows, {y: _Y, anchor: _A0})
  _check_linear(np.stack([v[0].reshape(-1) for v in values]),
                np.stack([v[1] for v in values]), atol=1e-12)


def test_linear_graph_schur_eagerly_and_none():
  """'schur' eagerly (the Schur complement's backward solve), and
  gradients='none': no gradient at all."""
  y, anchor = tf.constant(_Y), tf.constant(_A0)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch([y, anchor])
    a, b = _linear_solve(y, anchor, "schur")
    flat = tf.concat([tf.reshape(a, [-1]), tf.reshape(b, [-1])], 0)
    stopped = _linear_solve(y, anchor, "schur", gradients="none")
  jacobian_y, jacobian_a0 = tape.jacobian(flat, [y, anchor],
                                          experimental_use_pfor=False)
  _check_linear(jacobian_y.numpy().reshape(14, -1), jacobian_a0.numpy(),
                atol=1e-12)
  np.testing.assert_array_equal(stopped[1], b)
  assert tape.gradient(stopped, [y, anchor]) == [None, None]
