"""Tests of tfg_optim.manifolds: on-manifold retractions, orthonormal bases,
exact derivatives at 0 (forward, reverse, finite differences), independent
references (scipy's rotation exp map, numpy's QR and SVD), in every mode."""

import math

import numpy as np
import pytest
import tensorflow as tf
from scipy.spatial.transform import Rotation

from tests import modes
from tfg_optim import manifolds

M = manifolds
DTYPES = (np.float32, np.float64)
# Distance to the manifold allowed after every retraction.
ON_MANIFOLD = {np.float32: 1e-5, np.float64: 1e-12}
CLOSE = {np.float32: 2e-5, np.float64: 1e-12}

ALL = {
    "euclidean": lambda: M.Euclidean(2, 3),
    "sphere": lambda: M.Sphere(4),
    "so3_exp": lambda: M.SpecialOrthogonal(3),
    "so3_qr": lambda: M.SpecialOrthogonal(3, retraction="qr"),
    "so3_polar": lambda: M.SpecialOrthogonal(3, retraction="polar"),
    "so2": lambda: M.SpecialOrthogonal(2),
    "so4_qr": lambda: M.SpecialOrthogonal(4),
    "so4_polar": lambda: M.SpecialOrthogonal(4, retraction="polar"),
    "stiefel_qr": lambda: M.Stiefel(5, 2),
    "stiefel_polar": lambda: M.Stiefel(4, 3, retraction="polar"),
    "stiefel_column": lambda: M.Stiefel(3, 1),
    "pose": lambda: M.Product(M.SpecialOrthogonal(3), M.Euclidean(3)),
    "power": lambda: M.Power(M.Sphere(3), 3),
    "power_of_product": lambda: M.Power(
        M.Product(M.Sphere(3), M.Euclidean()), 2),
}
# Run in all four modes (float64; float32 in "function" and "xla"); the
# others run in "function" mode.
KEY = ("sphere", "so3_exp", "stiefel_qr", "pose")


def mode_cases(key_names=KEY, others_dtypes=DTYPES,
               key_modes=(modes.MODES, ("function", "xla"))):
  """(name, mode, dtype): the key manifolds in `key_modes` (float64 modes,
  float32 modes), the others in "function" for `others_dtypes`."""
  cases = []
  for name in ALL:
    for dtype in DTYPES:
      if name not in key_names:
        if dtype in others_dtypes:
          cases.append((name, "function", dtype))
      else:
        cases.extend((name, mode, dtype) for mode in
                     key_modes[0 if dtype == np.float64 else 1])
  return cases


# For the math of a manifold (the same ops in every mode): a TF1 Session
# builds what tf.function builds, and XLA runs in float32, where it rounds
# differently.
LIGHT_MODES = (("eager", "function"), ("xla",))


def as_numpy(structure):
  return tf.nest.map_structure(lambda t: np.asarray(t), structure)


def point_and_coordinates(manifold, batch_shape, dtype, seed=0, scale=1.0):
  point = as_numpy(manifold.random_point(batch_shape, tf.as_dtype(dtype),
                                         seed=seed))
  rng = np.random.default_rng(seed)
  coords = (scale * rng.standard_normal(tuple(batch_shape) + (manifold.dim,))
            ).astype(dtype)
  return point, coords


def max_difference(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - y)))
             for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b)))


def run_on_point(build, point, extra, mode):
  """modes.run for build(point, *extra) with a (possibly tuple) point."""
  flat = tf.nest.flatten(point)

  def flat_build(*tensors):
    return build(tf.nest.pack_sequence_as(point, list(tensors[:len(flat)])),
                 *tensors[len(flat):])
  return modes.run(flat_build, flat + list(extra), mode)


# -- on the manifold ----------------------------------------------------------


@pytest.mark.parametrize("name,mode,dtype",
                         mode_cases(key_modes=LIGHT_MODES))
def test_stays_on_manifold_after_300_retractions(name, mode, dtype):
  manifold = ALL[name]()
  batch_shape = (2, 3)
  point, _ = point_and_coordinates(manifold, batch_shape, dtype)
  steps = (0.7 * np.random.default_rng(1).standard_normal(
      (300,) + batch_shape + (manifold.dim,))).astype(dtype)

  def build(p, all_steps):
    def body(i, q, worst):
      q = manifold.retract(q, all_steps[i])
      worst = tf.maximum(worst, manifold.distance_to_manifold(q))
      return i + 1, q, worst
    worst = tf.zeros(batch_shape, dtype)
    _, q, worst = tf.while_loop(lambda i, *_: i < 300, body,
                                (tf.constant(0), p, worst))
    return q, worst

  final, worst = run_on_point(build, point, [steps], mode)
  assert np.all(np.isfinite(worst))
  assert np.max(worst) <= ON_MANIFOLD[dtype], (name, np.max(worst))
  # The walk really moved.
  assert max_difference(final, point) > 0.1


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_shape", [(), (2, 3)])
def test_random_point_is_on_manifold_and_retract_zero_is_identity(
    name, dtype, batch_shape):
  manifold = ALL[name]()
  point, coords = point_and_coordinates(manifold, batch_shape, dtype, seed=3)
  shapes = [manifold.point_shape]
  while isinstance(shapes[0], tuple) and shapes[0] and isinstance(
      shapes[0][0], tuple):
    shapes = [s for shape in shapes for s in shape]
  for flat, shape in zip(tf.nest.flatten(point), shapes):
    assert flat.shape == tuple(batch_shape) + tuple(shape)
    assert flat.dtype == dtype
  distance = np.asarray(manifold.distance_to_manifold(point))
  assert distance.shape == tuple(batch_shape)
  assert np.max(distance) <= ON_MANIFOLD[dtype]
  manifold.check_point(point)
  same = manifold.retract(point, np.zeros_like(coords))
  assert max_difference(same, point) <= CLOSE[dtype]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_shape", [(), (2, 3)])
def test_basis_is_orthonormal_tangent_and_inverted_by_coordinates(
    name, dtype, batch_shape):
  manifold = ALL[name]()
  point, coords = point_and_coordinates(manifold, batch_shape, dtype, seed=5)
  n = manifold.dim
  eye = np.broadcast_to(np.eye(n, dtype=dtype), tuple(batch_shape) + (n, n))
  basis = [manifold.tangent_vector(point, eye[..., i, :]) for i in range(n)]
  gram = np.stack([np.stack([np.asarray(manifold.inner(point, u, v))
                             for v in basis], -1) for u in basis], -2)
  tol = 10 * CLOSE[dtype]
  np.testing.assert_allclose(gram, eye, atol=tol)
  for vector in basis:
    assert max_difference(manifold.project(point, vector), vector) <= tol
  vector = manifold.tangent_vector(point, coords)
  np.testing.assert_allclose(manifold.coordinates(point, vector), coords,
                             atol=tol)
  np.testing.assert_allclose(
      manifold.norm(point, vector), np.linalg.norm(coords, axis=-1),
      rtol=tol)
  # coordinates() of an ambient vector = coordinates of its projection, and
  # the projection is idempotent and orthogonal.
  rng = np.random.default_rng(6)
  ambient = tf.nest.map_structure(
      lambda t: rng.standard_normal(t.shape).astype(dtype), point)
  projected = manifold.project(point, ambient)
  assert max_difference(manifold.project(point, projected), projected) <= tol
  np.testing.assert_allclose(manifold.coordinates(point, ambient),
                             manifold.coordinates(point, projected), atol=tol)
  normal = tf.nest.map_structure(lambda a, b: a - b, ambient, projected)
  np.testing.assert_allclose(manifold.inner(point, normal, vector), 0,
                             atol=100 * tol)


# -- derivatives at 0 ----------------------------------------------------------


@pytest.mark.parametrize("name,mode,dtype",
                         mode_cases(others_dtypes=(np.float64,),
                                    key_modes=LIGHT_MODES))
def test_derivative_of_retraction_at_zero(name, mode, dtype):
  """d/dt R_p(t c) at t = 0 == tangent_vector(p, c), forward and reverse."""
  manifold = ALL[name]()
  batch_shape = (2, 3)
  point, coords = point_and_coordinates(manifold, batch_shape, dtype, seed=7)
  weights = tf.nest.map_structure(
      lambda t: np.random.default_rng(8).standard_normal(t.shape).astype(dtype),
      point)
  flat_weights = tf.nest.flatten(weights)

  def build(p, c, *w):
    zero = tf.zeros_like(c)
    with tf.autodiff.ForwardAccumulator(zero, c) as accumulator:
      moved = manifold.retract(p, zero)
    forward = accumulator.jvp(moved)
    with tf.GradientTape() as tape:
      tape.watch(zero)
      moved = manifold.retract(p, zero)
      scalar = tf.add_n([tf.reduce_sum(a * b) for a, b in
                         zip(tf.nest.flatten(moved), w)])
    reverse = tape.gradient(scalar, zero)
    return (forward, reverse, manifold.tangent_vector(p, c),
            manifold.coordinates(p, manifold.project(p, tuple(w) if
                                                     len(w) > 1 else w[0])))

  forward, reverse, expected, weight_coords = run_on_point(
      build, point, [coords] + flat_weights, mode)
  tol = 10 * CLOSE[dtype]
  assert max_difference(forward, expected) <= tol
  # d/ds <W, R_p(s)> at 0 = [<W, b_i(p)>]_i = coordinates of proj(W).
  np.testing.assert_allclose(reverse, weight_coords, atol=tol)
  assert np.all(np.isfinite(reverse))


@pytest.mark.parametrize("name", ["pose"])
def test_forward_derivative_vectorizes_under_xla(name):
  """Forward mode inside tf.vectorized_map (no while-loop fallback), as the
  engine linearizes, compiled with XLA."""
  manifold = ALL[name]()
  point, coords = point_and_coordinates(manifold, (2,), np.float64, seed=10)

  def build(p, c):
    zero = tf.zeros_like(c)

    def directional(direction):
      with tf.autodiff.ForwardAccumulator(zero, direction) as accumulator:
        moved = manifold.retract(p, zero)
      return tf.nest.flatten(accumulator.jvp(moved))
    columns = tf.vectorized_map(directional, tf.stack([c, 2 * c]),
                                fallback_to_while_loop=False)
    return columns, tf.nest.flatten(manifold.tangent_vector(p, c))

  columns, expected = run_on_point(build, point, [coords], "xla")
  for column, want in zip(columns, expected):
    np.testing.assert_allclose(column[0], want, atol=1e-12)
    np.testing.assert_allclose(column[1], 2 * want, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_derivative_matches_finite_differences(name):
  manifold = ALL[name]()
  point, coords = point_and_coordinates(manifold, (2,), np.float64, seed=9)
  h = 1e-6
  plus = manifold.retract(point, h * coords)
  minus = manifold.retract(point, -h * coords)
  difference = tf.nest.map_structure(lambda a, b: (a - b) / (2 * h),
                                     plus, minus)
  assert max_difference(difference,
                        manifold.tangent_vector(point, coords)) < 1e-8


# -- independent references ----------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("angle", [0.0, 1e-9, 1e-5, 1e-2, 0.5, math.pi / 2,
                                   math.pi - 1e-6, math.pi, 4.0])
def test_so3_exp_retraction_matches_scipy(angle, dtype):
  rng = np.random.default_rng(11)
  axes = rng.standard_normal((4, 3))
  axes /= np.linalg.norm(axes, axis=-1, keepdims=True)
  rotation_vectors = angle * axes
  start = Rotation.random(4, random_state=12)
  point = start.as_matrix().astype(dtype)
  manifold = M.SpecialOrthogonal(3)
  # coordinates = sqrt(2) * body-frame rotation vector (Frobenius basis).
  moved = manifold.retract(point, (math.sqrt(2) * rotation_vectors
                                   ).astype(dtype))
  expected = (start * Rotation.from_rotvec(rotation_vectors)).as_matrix()
  np.testing.assert_allclose(moved, expected, atol=10 * CLOSE[dtype])
  assert np.max(manifold.distance_to_manifold(moved)) <= ON_MANIFOLD[dtype]
  identity = manifold.retract(np.eye(3, dtype=dtype),
                              (math.sqrt(2) * rotation_vectors).astype(dtype))
  np.testing.assert_allclose(
      identity, Rotation.from_rotvec(rotation_vectors).as_matrix(),
      atol=10 * CLOSE[dtype])
  np.testing.assert_allclose(
      manifolds.rodrigues(rotation_vectors.astype(dtype)),
      Rotation.from_rotvec(rotation_vectors).as_matrix(),
      atol=10 * CLOSE[dtype])


def test_so3_basis_is_scaled_hat_basis():
  basis = manifolds.skew_basis(3)
  for i in range(3):
    np.testing.assert_allclose(
        basis[i], manifolds.hat(np.eye(3)[i]).numpy() / math.sqrt(2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_stiefel_qr_retraction_matches_numpy_qr(dtype):
  manifold = M.Stiefel(6, 3)
  point, coords = point_and_coordinates(manifold, (4,), dtype, seed=13)
  moved = np.asarray(manifold.retract(point, coords))
  target = np.asarray(point, np.float64) + np.asarray(
      manifold.tangent_vector(point, coords), np.float64)
  for index in range(4):
    q, r = np.linalg.qr(target[index])
    q = q * np.where(np.diag(r) < 0, -1.0, 1.0)
    np.testing.assert_allclose(moved[index], q, atol=100 * CLOSE[dtype])


@pytest.mark.parametrize("manifold", [M.Stiefel(5, 2, retraction="polar"),
                                      M.SpecialOrthogonal(4, "polar")],
                         ids=repr)
def test_polar_retraction_matches_numpy_svd(manifold):
  point, coords = point_and_coordinates(manifold, (4,), np.float64, seed=14,
                                        scale=3.0)
  moved = np.asarray(manifold.retract(point, coords))
  target = point + np.asarray(manifold.tangent_vector(point, coords))
  u, _, vt = np.linalg.svd(target, full_matrices=False)
  np.testing.assert_allclose(moved, u @ vt, atol=1e-12)


def test_power_coordinates_are_copy_major():
  sphere = M.Sphere(3)
  power = M.Power(sphere, 3)
  point, coords = point_and_coordinates(power, (), np.float64, seed=15)
  moved = np.asarray(power.retract(point, coords))
  for copy in range(3):
    np.testing.assert_allclose(
        moved[copy], sphere.retract(point[copy],
                                    coords[2 * copy:2 * copy + 2]),
        atol=1e-15)


def test_product_concatenates_in_factor_order():
  pose = M.Product(M.SpecialOrthogonal(3), M.Euclidean(3))
  assert pose.dim == 6 and pose.point_shape == ((3, 3), (3,))
  rotation, translation = pose.random_point(seed=16)
  coords = np.arange(6, dtype=np.float64) / 10
  new_rotation, new_translation = pose.retract((rotation, translation),
                                               coords)
  np.testing.assert_allclose(new_translation, translation + coords[3:])
  np.testing.assert_allclose(
      new_rotation, M.SpecialOrthogonal(3).retract(rotation, coords[:3]))


def test_random_rotations_are_proper_and_seeded():
  so3 = M.SpecialOrthogonal(3)
  rotations = np.asarray(so3.random_point(1000, seed=17))
  np.testing.assert_allclose(np.linalg.det(rotations), 1.0, atol=1e-12)
  # Haar: E[R] = 0.
  assert np.max(np.abs(rotations.mean(axis=0))) < 0.1
  np.testing.assert_array_equal(rotations, so3.random_point(1000, seed=17))


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_determinant_beyond_cofactors_matches_numpy(mode):
  """n > 6: Gaussian elimination with partial pivoting (tf.linalg.det has no
  XLA kernel on CPU), against numpy.linalg.det; a zero column gives 0, and
  SO(7)'s contains compiles under XLA and rejects a reflection."""
  from tfg_optim.manifolds import stiefel  # pylint: disable=g-import-not-at-top
  matrices = np.random.default_rng(0).standard_normal((2, 3, 7, 7))
  matrices[0, 1, :, 2] = 0.0
  so7 = M.SpecialOrthogonal(7)
  rotations = np.array(as_numpy(so7.random_point((2,), tf.float64, seed=1)))
  rotations[1, :, 0] *= -1.0  # a reflection: det -1

  def build(a, r):
    return stiefel.determinant(a), so7.contains(r)

  det, inside = (build(tf.constant(matrices), tf.constant(rotations))
                 if mode == "eager" else
                 tf.function(build, jit_compile=True)(matrices, rotations))
  np.testing.assert_allclose(det, np.linalg.det(matrices), rtol=1e-12,
                             atol=1e-12)
  assert det[0, 1] == 0.0
  np.testing.assert_array_equal(inside, [True, False])


# -- check_point ---------------------------------------------------------------


@pytest.mark.parametrize("manifold,bad,message", [
    (M.Sphere(3), np.array([1.0, 1.0, 0.0]), "off the manifold"),
    (M.SpecialOrthogonal(3), np.diag([1.0, 1.0, -1.0]), "reflection"),
    (M.Stiefel(3, 2), np.ones((3, 2)), "off the manifold"),
    (M.Sphere(3), np.array([1.0, 0.0]), "shape"),
    (M.SpecialOrthogonal(3), np.eye(3)[:, :2], "shape"),
    (M.Sphere(3), np.array([np.nan, 0.0, 0.0]), "not finite"),
    (M.Product(M.Sphere(3), M.Euclidean(2)),
     (np.array([0.0, 0.0, 2.0]), np.zeros(2)), "factor 0"),
], ids=str)
def test_check_point_raises_for_bad_points(manifold, bad, message):
  with pytest.raises(ValueError, match=message):
    manifold.check_point(bad)


def test_check_point_accepts_good_points_and_returns_them():
  sphere = M.Sphere(3)
  point = np.array([0.0, 0.6, 0.8])
  np.testing.assert_array_equal(sphere.check_point(point), point)
  sphere.check_point(point * (1 + 1e-6), atol=1e-5)
  with pytest.raises(ValueError):
    sphere.check_point(point * (1 + 1e-6))


def test_constructor_errors():
  with pytest.raises(ValueError, match="exp"):
    M.SpecialOrthogonal(4, retraction="exp")
  with pytest.raises(ValueError, match="retraction"):
    M.Stiefel(4, 2, retraction="cayley")
  with pytest.raises(ValueError):
    M.Stiefel(2, 3)
  with pytest.raises(ValueError):
    M.Sphere(1)
  assert repr(M.SpecialOrthogonal(3)) == "SpecialOrthogonal(3)"
  assert M.SpecialOrthogonal(5).dim == 10
  assert M.Stiefel(5, 2).dim == 7


# -- contains, check_shape, list points ----------------------------------------


@pytest.mark.parametrize("name,mode,dtype", mode_cases())
def test_contains_is_check_points_test_in_every_mode(name, mode, dtype):
  manifold = ALL[name]()
  point = as_numpy(manifold.random_point((4,), tf.as_dtype(dtype), seed=3))
  tolerance = 1e-4 if dtype == np.float32 else 1e-9
  # Row 0 on M; row 1 scaled by 1.01 (off M unless M is flat); row 2 NaN;
  # row 3 scaled by 1 + tolerance / 20, within the tolerance.
  scale = np.array([1.0, 1.01, np.nan, 1.0 + tolerance / 20])
  perturbed = tf.nest.map_structure(
      lambda a: (a * scale.reshape((4,) + (1,) * (a.ndim - 1))).astype(dtype),
      point)
  got = run_on_point(lambda p: manifold.contains(p), perturbed, [], mode)
  np.testing.assert_array_equal(got, [True, name == "euclidean", False, True])
  if mode == "eager":  # check_point raises exactly where contains is False
    for row, inside in enumerate(got):
      entry = tf.nest.map_structure(lambda a, row=row: a[row], perturbed)
      if inside:
        manifold.check_point(entry)
      else:
        with pytest.raises(ValueError):
          manifold.check_point(entry)


def test_check_shape_with_batch_dims():
  so3 = M.SpecialOrthogonal(3)
  so3.check_shape(np.zeros((2, 3, 3)))  # any number of batch axes
  so3.check_shape(np.zeros((2, 3, 3)), batch_dims=1)
  with pytest.raises(ValueError, match=r"\[3, 3\], got \(2, 3, 3\)"):
    so3.check_shape(np.zeros((2, 3, 3)), batch_dims=0)
  with pytest.raises(ValueError, match=r"\[B1, B2, 3, 3\]"):
    so3.check_shape(np.zeros((2, 3, 3)), batch_dims=2)
  power = M.Power(M.Product(M.Sphere(3), M.Euclidean()), 2)
  power.check_shape((np.zeros((5, 2, 3)), np.zeros((5, 2))), batch_dims=1)
  with pytest.raises(ValueError, match="2 copies"):
    power.check_shape((np.zeros((5, 4, 3)), np.zeros((5, 4))), batch_dims=1)
  with pytest.raises(ValueError, match="factor 1"):
    power.check_shape((np.zeros((5, 2, 3)), np.zeros((5, 2, 1))),
                      batch_dims=1)


@pytest.mark.parametrize("name", ["pose", "power_of_product"])
def test_product_keeps_the_container_type_of_its_point(name):
  manifold = ALL[name]()
  point, coords = point_and_coordinates(manifold, (2,), np.float64, seed=4)
  as_list = list(point)
  vector = manifold.tangent_vector(point, coords)
  for method, args in [("as_point", ()), ("check_point", ()),
                       ("retract", (coords,)), ("tangent_vector", (coords,)),
                       ("project", (list(vector),))]:
    want = getattr(manifold, method)(point, *args)
    got = getattr(manifold, method)(as_list, *args)
    assert isinstance(want, tuple) and isinstance(got, list), method
    assert max_difference(got, as_numpy(want)) == 0.0, method
  np.testing.assert_array_equal(
      manifold.coordinates(as_list, list(vector)),
      manifold.coordinates(point, vector))
  np.testing.assert_array_equal(manifold.contains(as_list), [True, True])
