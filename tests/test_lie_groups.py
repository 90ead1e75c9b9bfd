"""Tests of tfg_optim.manifolds.lie_groups: SE(2) and SE(3).

References are independent of the closed forms under test: scipy's matrix
exponential and logarithm of the 3 x 3 / 4 x 4 twist matrices, products and
inverses of homogeneous matrices, and finite differences.
"""

import math

import numpy as np
import pytest
import scipy.linalg
import tensorflow as tf

from tests import modes
from tfg_optim import manifolds
from tfg_optim.manifolds import lie_groups

DTYPES = (np.float32, np.float64)
CLOSE = {np.float32: 3e-6, np.float64: 1e-13}
GROUPS = {"SE2": manifolds.SE2, "SE3": manifolds.SE3}
TANGENT = {"SE2": 3, "SE3": 6}
# Rotation angles: 0, near 0 (both sides of the series switches), moderate,
# and up to (not including) pi.
ANGLES = np.array([0.0, 1e-9, 1e-5, 0.3, 0.4999, 0.5001, 1.0, 0.9999, 1.0001,
                   2.0, 3.0, math.pi - 1e-6, math.pi - 1e-9])


def twist_matrix(c):
  """hat(c) as a 3 x 3 (SE(2)) or 4 x 4 (SE(3)) matrix, NumPy."""
  c = np.asarray(c, np.float64)
  if c.shape[-1] == 3:
    vx, vy, w = c
    return np.array([[0.0, -w, vx], [w, 0.0, vy], [0.0, 0.0, 0.0]])
  v, (x, y, z) = c[:3], c[3:]
  matrix = np.zeros((4, 4))
  matrix[:3, :3] = [[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]]
  matrix[:3, 3] = v
  return matrix


def to_matrix(pose):
  pose = tf.convert_to_tensor(pose)
  if pose.shape[-1] == 3:
    return np.asarray(lie_groups.se2_to_matrix(pose), np.float64)
  return np.asarray(lie_groups.se3_to_matrix(pose), np.float64)


def twists(group, angles, seed=0):
  """Random twists whose rotation angles are `angles`."""
  rng = np.random.default_rng(seed)
  c = rng.standard_normal((len(angles), TANGENT[group]))
  if group == "SE2":
    c[:, 2] = angles * np.sign(rng.standard_normal(len(angles)))
  else:
    c[:, 3:] *= (angles / np.linalg.norm(c[:, 3:], axis=-1))[:, None]
  return c


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", GROUPS)
def test_exp_is_the_matrix_exponential_and_log_inverts_it(group, dtype):
  c = twists(group, ANGLES)
  poses = lie_groups.exp(c.astype(dtype))
  expected = np.stack([scipy.linalg.expm(twist_matrix(row)) for row in c])
  np.testing.assert_allclose(to_matrix(poses), expected,
                             atol=10 * CLOSE[dtype])
  if group == "SE3":
    assert np.all(manifolds.SE3().contains(poses))
  back = np.asarray(lie_groups.log(poses), np.float64)
  # Near pi the log is ill-conditioned in float32: the angle is accurate to
  # ~eps, the translation to ~eps / (pi - angle).
  tolerance = 100 * CLOSE[dtype] if dtype == np.float64 else 2e-5
  rows = ANGLES < 3.0 if dtype == np.float32 else ANGLES >= 0
  np.testing.assert_allclose(back[rows], c[rows], atol=tolerance)


@pytest.mark.parametrize("group", GROUPS)
def test_log_is_the_matrix_logarithm_and_exp_inverts_it(group):
  manifold = GROUPS[group]()
  poses = np.asarray(manifold.random_point(20, seed=1))
  c = np.asarray(lie_groups.log(poses))
  expected = np.stack([np.real(scipy.linalg.logm(m)) for m in to_matrix(poses)])
  np.testing.assert_allclose(np.stack([twist_matrix(row) for row in c]),
                             expected, atol=1e-9)
  np.testing.assert_allclose(to_matrix(lie_groups.exp(c)), to_matrix(poses),
                             atol=1e-14)
  if group == "SE3":  # q and -q are one pose: Log sees both the same way
    flipped = np.concatenate([poses[:, :3], -poses[:, 3:]], axis=-1)
    np.testing.assert_allclose(lie_groups.log(flipped), c, atol=1e-15)
  else:  # theta and theta + 2 pi are one pose
    turned = poses + np.array([0.0, 0.0, 2 * math.pi])
    np.testing.assert_allclose(lie_groups.log(turned), c, atol=1e-14)


def test_log_at_a_half_turn():
  """Rotation angle exactly pi (qw = 0) and just below: finite, exact."""
  axis = np.array([1.0, 2.0, 2.0]) / 3.0
  translation = np.array([0.3, -0.2, 0.5])
  for angle in (math.pi, math.pi - 1e-7):
    pose = np.concatenate([translation, math.sin(angle / 2) * axis,
                           [math.cos(angle / 2)]])
    c = np.asarray(lie_groups.se3_log(pose))
    np.testing.assert_allclose(c[3:], angle * axis, atol=1e-15)
    np.testing.assert_allclose(to_matrix(lie_groups.se3_exp(c)),
                               to_matrix(pose), atol=1e-14)
  planar = np.asarray(lie_groups.se2_log(np.array([1.0, 2.0, math.pi])))
  # V^-1 at pi: alpha = (pi/2) cot(pi/2) = 0, beta = pi/2.
  np.testing.assert_allclose(planar, [math.pi, -math.pi / 2, math.pi],
                             atol=1e-15)


def generators(group):
  """d/dc_i of the homogeneous matrix of Exp(c) at 0: hat(e_i)."""
  return np.stack([twist_matrix(row) for row in np.eye(TANGENT[group])],
                  axis=-1)


def reverse_jacobian(function, points):
  """Reverse-mode Jacobians of a batched `function` at each row of `points`
  [P, n]: [P, *output_shape, n], in one pass (the rows are independent, so
  a batch of copies of a point, one per output entry, gives every row)."""
  count = points.shape[0]
  shape = tuple(function(tf.constant(points[:1])).shape[1:])
  size = int(np.prod(shape))
  primal = tf.constant(np.repeat(points, size, axis=0))
  selector = np.tile(np.eye(size), (count, 1)).reshape((count * size,) + shape)
  with tf.GradientTape() as tape:
    tape.watch(primal)
    scalar = tf.reduce_sum(function(primal) * selector)
  return np.reshape(tape.gradient(scalar, primal),
                    (count,) + shape + (points.shape[1],))


def forward_jacobian(function, points):
  """Forward-mode Jacobians, [P, *output_shape, n], in one pass."""
  count, n = points.shape
  primal = tf.constant(np.repeat(points, n, axis=0))
  with tf.autodiff.ForwardAccumulator(
      primal, tf.constant(np.tile(np.eye(n), (count, 1)))) as accumulator:
    output = function(primal)
  shape = tuple(output.shape[1:])
  return np.moveaxis(np.reshape(accumulator.jvp(output), (count, n) + shape),
                     1, -1)


def to_matrix_tf(pose):
  if pose.shape[-1] == 3:
    return lie_groups.se2_to_matrix(pose)
  return lie_groups.se3_to_matrix(pose)


@pytest.mark.parametrize("group", GROUPS)
def test_derivative_of_exp_is_the_generators(group):
  """Forward and reverse mode at c = 0 and at c = (0, w), |w| = 1e-9:
  finite and equal to hat(e_i); exactly so at 0."""
  rotation = twists(group, [1e-9], seed=3)[0]
  rotation[:2 if group == "SE2" else 3] = 0.0  # no translation
  points = np.stack([np.zeros(TANGENT[group]), rotation])
  function = lambda c: to_matrix_tf(lie_groups.exp(c))
  for jacobian in (forward_jacobian(function, points),
                   reverse_jacobian(function, points)):
    assert np.all(np.isfinite(jacobian))
    np.testing.assert_allclose(jacobian, np.stack([generators(group)] * 2),
                               atol=1e-8)
    np.testing.assert_array_equal(jacobian[0], generators(group))


@pytest.mark.parametrize("group", GROUPS)
def test_derivative_of_log_of_exp_is_the_identity(group):
  """d Log(Exp(c))/dc = I at 0, near 0 and on both sides of every series
  switch (reverse mode)."""
  angles = [0.0, 1e-9, 0.49999, 0.50001, 0.99999, 1.00001, 2.0]
  c = twists(group, angles, seed=4)
  c[0] = 0.0
  jacobian = reverse_jacobian(lambda x: lie_groups.log(lie_groups.exp(x)), c)
  np.testing.assert_allclose(
      jacobian, np.broadcast_to(np.eye(c.shape[1]), jacobian.shape),
      atol=1e-12)


@pytest.mark.parametrize("group", GROUPS)
def test_derivative_of_exp_matches_finite_differences(group):
  """Away from 0, just below and above the series switches, near pi
  (reverse mode)."""
  c = twists(group, [0.4999, 0.5001, 0.9999, 1.0001, 2.5, 3.1], seed=5)
  jacobian = reverse_jacobian(lambda x: to_matrix_tf(lie_groups.exp(x)), c)
  h = 1e-6
  steps = h * np.eye(c.shape[1])
  numeric = np.stack([
      (to_matrix(lie_groups.exp(c + step)) -
       to_matrix(lie_groups.exp(c - step))) / (2 * h) for step in steps], -1)
  np.testing.assert_allclose(jacobian, numeric, atol=1e-8)


@pytest.mark.parametrize("group", GROUPS)
def test_compose_inverse_between_transform_are_matrix_operations(group):
  manifold = GROUPS[group]()
  a, b, c = (np.asarray(manifold.random_point(5, seed=s)) for s in (6, 7, 8))
  ma, mb, mc = to_matrix(a), to_matrix(b), to_matrix(c)
  np.testing.assert_allclose(to_matrix(manifolds.compose(a, b)), ma @ mb,
                             atol=1e-14)
  np.testing.assert_allclose(to_matrix(manifolds.inverse(a)),
                             np.linalg.inv(ma), atol=1e-14)
  np.testing.assert_allclose(to_matrix(manifolds.between(a, b)),
                             np.linalg.inv(ma) @ mb, atol=1e-14)
  np.testing.assert_allclose(
      to_matrix(manifolds.compose(manifolds.compose(a, b), c)),
      to_matrix(manifolds.compose(a, manifolds.compose(b, c))), atol=1e-14)
  identity = np.asarray(manifolds.between(a, a))
  np.testing.assert_allclose(to_matrix(identity), np.eye(ma.shape[-1])[None]
                             .repeat(5, 0), atol=1e-15)
  np.testing.assert_allclose(lie_groups.log(manifolds.compose(
      a, manifolds.inverse(a))), 0.0, atol=1e-14)
  size = 2 if group == "SE2" else 3
  points = np.random.default_rng(9).standard_normal((5, 4, size))
  moved = np.asarray(manifolds.transform(a[:, None, :], points))
  homogeneous = np.concatenate([points, np.ones((5, 4, 1))], axis=-1)
  np.testing.assert_allclose(moved, np.einsum("bij,bnj->bni", ma,
                                              homogeneous)[..., :size],
                             atol=1e-14)


def test_matrix_conversions_round_trip():
  se3 = np.asarray(manifolds.SE3().random_point(50, seed=10))
  matrices = to_matrix(se3)
  back = np.asarray(manifolds.se3_from_matrix(matrices))
  np.testing.assert_allclose(to_matrix(back), matrices, atol=1e-15)
  assert np.all(back[:, 6] >= 0)
  np.testing.assert_allclose(manifolds.se3_from_matrix(matrices[:, :3]), back)
  # Every pivot of the quaternion extraction: rotations by pi about x, y, z.
  for axis in np.eye(3):
    half_turn = np.concatenate([np.zeros(3), axis, [0.0]])
    np.testing.assert_allclose(
        manifolds.se3_from_matrix(to_matrix(half_turn)), half_turn,
        atol=1e-15)
  se2 = np.asarray(manifolds.SE2().random_point(50, seed=11))
  np.testing.assert_allclose(manifolds.se2_from_matrix(to_matrix(se2)), se2,
                             atol=1e-15)


# -- the manifolds -------------------------------------------------------------


def point_and_coordinates(name, batch_shape, dtype, seed):
  manifold = GROUPS[name]()
  point = np.asarray(manifold.random_point(batch_shape, tf.as_dtype(dtype),
                                           seed=seed))
  coords = np.random.default_rng(seed).standard_normal(
      tuple(batch_shape) + (manifold.dim,)).astype(dtype)
  return manifold, point, coords


@pytest.mark.parametrize("name", GROUPS)
def test_retraction_is_right_multiplication_by_exp(name):
  manifold, point, coords = point_and_coordinates(name, (2, 3), np.float64, 12)
  moved = manifold.retract(point, coords)
  np.testing.assert_allclose(
      to_matrix(moved), to_matrix(point) @ to_matrix(lie_groups.exp(coords)),
      atol=1e-13)
  zero = np.zeros_like(coords)
  np.testing.assert_allclose(manifold.retract(point, zero), point, atol=1e-15)
  if name == "SE2":  # bit for bit: theta inside [-pi, pi] is not rewrapped
    np.testing.assert_array_equal(manifold.retract(point, zero), point)


@pytest.mark.parametrize("name", GROUPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_basis_is_orthonormal_and_inverted_by_coordinates(name, dtype):
  manifold, point, coords = point_and_coordinates(name, (4,), dtype, 13)
  n = manifold.dim
  basis = [manifold.tangent_vector(point, np.broadcast_to(
      np.eye(n, dtype=dtype)[i], (4, n))) for i in range(n)]
  gram = np.stack([np.stack([manifold.inner(point, u, v) for v in basis], -1)
                   for u in basis], -2)
  tolerance = 10 * CLOSE[dtype]
  np.testing.assert_allclose(gram, np.broadcast_to(np.eye(n), (4, n, n)),
                             atol=tolerance)
  vector = manifold.tangent_vector(point, coords)
  np.testing.assert_allclose(manifold.coordinates(point, vector), coords,
                             atol=tolerance)
  np.testing.assert_allclose(manifold.norm(point, vector),
                             np.linalg.norm(coords, axis=-1), rtol=tolerance)
  ambient = np.random.default_rng(14).standard_normal(point.shape).astype(
      dtype)
  projected = manifold.project(point, ambient)
  np.testing.assert_allclose(manifold.project(point, projected), projected,
                             atol=tolerance)
  np.testing.assert_allclose(manifold.coordinates(point, ambient),
                             manifold.coordinates(point, projected),
                             atol=tolerance)
  normal = ambient - np.asarray(projected)
  np.testing.assert_allclose(manifold.inner(point, normal, vector), 0.0,
                             atol=100 * tolerance)
  if name == "SE3":  # the normal direction is the quaternion itself
    np.testing.assert_allclose(
        np.abs(np.sum(normal[..., 3:] * point[..., 3:], -1)),
        np.linalg.norm(normal[..., 3:], axis=-1), rtol=1e-4)


@pytest.mark.parametrize("name", GROUPS)
def test_derivative_of_retraction_at_zero(name):
  """d/dt R_p(t c)|0 = tangent_vector(p, c) (forward), and the reverse-mode
  gradient of <W, R_p(s)> is [<W, b_i(p)>] (Euclidean pairing)."""
  manifold, point, coords = point_and_coordinates(name, (3,), np.float64, 15)
  weights = np.random.default_rng(16).standard_normal(point.shape)
  zero = tf.zeros_like(coords)
  with tf.autodiff.ForwardAccumulator(zero, tf.constant(coords)) as acc:
    moved = manifold.retract(point, zero)
  np.testing.assert_allclose(acc.jvp(moved),
                             manifold.tangent_vector(point, coords),
                             atol=1e-14)
  with tf.GradientTape() as tape:
    tape.watch(zero)
    scalar = tf.reduce_sum(weights * manifold.retract(point, zero))
  gradient = tape.gradient(scalar, zero).numpy()
  basis = np.stack([np.asarray(manifold.tangent_vector(
      point, np.broadcast_to(np.eye(manifold.dim)[i], coords.shape)))
                    for i in range(manifold.dim)], -2)
  np.testing.assert_allclose(gradient, np.einsum("bip,bp->bi", basis,
                                                 weights), atol=1e-14)
  h = 1e-6
  numeric = (np.asarray(manifold.retract(point, h * coords)) -
             np.asarray(manifold.retract(point, -h * coords))) / (2 * h)
  np.testing.assert_allclose(numeric, manifold.tangent_vector(point, coords),
                             atol=1e-8)


@pytest.mark.parametrize("name", GROUPS)
def test_stays_on_manifold_after_300_retractions(name):
  manifold, point, _ = point_and_coordinates(name, (8,), np.float32, 17)
  steps = 0.7 * np.random.default_rng(18).standard_normal(
      (300, 8, manifold.dim)).astype(np.float32)

  @tf.function(autograph=False)
  def walk(p, all_steps):
    def body(i, q, worst):
      q = manifold.retract(q, all_steps[i])
      return i + 1, q, tf.maximum(worst, manifold.distance_to_manifold(q))
    return tf.while_loop(lambda i, *_: i < 300, body,
                         (tf.constant(0), p, tf.zeros([8], tf.float32)))[1:]

  final, worst = walk(tf.constant(point), tf.constant(steps))
  assert np.max(worst.numpy()) <= 1e-6
  assert np.max(np.abs(final.numpy() - point)) > 0.1
  if name == "SE2":  # theta stays wrapped
    assert np.all(np.abs(final.numpy()[:, 2]) <= math.pi)


def test_contains_and_check_point():
  se3, se2 = manifolds.SE3(), manifolds.SE2()
  pose = np.asarray(se3.random_point(4, seed=19))
  scaled = pose * np.array([1.0, 1.0 + 1e-3, 1.0, 1.0])[:, None]
  scaled[2, 0] = np.nan
  scaled[3] = pose[3] * (1.0 + 1e-11)  # off by less than the tolerance
  np.testing.assert_array_equal(se3.contains(scaled), [True, False, False,
                                                       True])
  se3.check_point(pose[0])
  with pytest.raises(ValueError, match="quaternion's norm is 1.001, not 1"):
    se3.check_point(scaled[1])
  with pytest.raises(ValueError, match="not finite"):
    se3.check_point(scaled[2])
  with pytest.raises(ValueError, match=r"shape \[\.\.\., 7\]"):
    se3.check_point(np.zeros((4, 4)))
  planar = np.array([[1.0, 2.0, 10.0], [0.0, np.inf, 0.0]])
  np.testing.assert_array_equal(se2.contains(planar), [True, False])
  with pytest.raises(ValueError, match=r"\[B1, 3\]"):
    se2.check_shape(np.zeros(3), batch_dims=1)


def test_argument_errors_name_the_argument():
  with pytest.raises(ValueError, match="compose: `b` must have shape"):
    manifolds.compose(np.zeros(7), np.zeros(3))
  with pytest.raises(ValueError, match=r"between: `a`.*\[\.\.\., 3\] or"):
    manifolds.between(np.zeros(4), np.zeros(4))
  with pytest.raises(ValueError, match="se3_exp: `c`"):
    manifolds.se3_exp(np.zeros(7))
  with pytest.raises(ValueError, match="transform: `points`"):
    manifolds.transform(np.zeros(3), np.zeros(3))
  with pytest.raises(ValueError, match="se3_from_matrix"):
    manifolds.se3_from_matrix(np.eye(3))
  assert manifolds.SE3().dim == 6 and manifolds.SE3().point_shape == (7,)
  assert repr(manifolds.SE2()) == "SE2"


# -- every execution mode ------------------------------------------------------


def _in_every_mode(*tensors):
  """One representative graph per group and dtype: retract, between, log,
  contains; tensors are (point, coords) for SE(2) and SE(3) in float64, then
  in float32."""
  outputs = []
  for index in range(0, len(tensors), 2):
    manifold = manifolds.SE2() if tensors[index].shape[-1] == 3 else (
        manifolds.SE3())
    point, coords = tensors[index:index + 2]
    moved = manifold.retract(point, coords)
    outputs += [lie_groups.log(lie_groups.between(point, moved)),
                manifold.contains(moved)]
  return outputs


@pytest.mark.parametrize("mode", modes.MODES)
def test_runs_in_every_mode(mode):
  inputs = []
  for dtype in (np.float64, np.float32):
    for name in GROUPS:
      _, point, coords = point_and_coordinates(name, (5,), dtype, 20)
      inputs += [point, (0.5 * coords).astype(dtype)]
  outputs = modes.run(_in_every_mode, inputs, mode)
  for index in range(4):
    coords = inputs[2 * index + 1]
    tolerance = 10 * CLOSE[coords.dtype.type]
    log, inside = outputs[2 * index:2 * index + 2]
    assert log.dtype == coords.dtype
    np.testing.assert_allclose(log, coords, atol=tolerance)
    np.testing.assert_array_equal(inside, [True] * 5)
