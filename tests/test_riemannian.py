"""Tests of the Riemannian Levenberg-Marquardt (tfg_optim.riemannian).

Independent truth: closed forms (Kabsch / orthogonal Procrustes by SVD, the
nearest point of a sphere), scipy.optimize.least_squares, and Manopt's
Algorithm 1 re-implemented here in NumPy (using only the manifold's basis and
retraction as data). Behaviours run in eager, tf.function, XLA and TF1
Session modes through tests/modes.py.
"""

import numpy as np
import pytest
import scipy.optimize
import tensorflow as tf

from tests import modes
from tests import problems
from tfg_optim import manifolds
from tfg_optim import riemannian
from tfg_optim import StopReason
from tfg_optim import stopping

MODES = modes.MODES
SO3 = manifolds.SpecialOrthogonal(3)
TOL = {"float64": 1e-9, "float32": 2e-4}

# -- independent references ----------------------------------------------------


def _so3_distance(r):
  r = np.asarray(r, np.float64)
  gram = np.einsum("...ji,...jk->...ik", r, r)
  return (np.linalg.norm(gram - np.eye(r.shape[-1]), axis=(-2, -1)) +
          np.abs(np.linalg.det(r) - 1.0))


def _fields(results, *names):
  return tuple(getattr(results, name) for name in names)


# -- closed forms --------------------------------------------------------------


# Eagerly, and float32 under XLA; the conformance table runs rotations
# pairwise with the other options in every mode and dtype.
@pytest.mark.parametrize("mode,dtype", [("eager", "float64"),
                                        ("xla", "float32")])
def test_rotation_fit_matches_kabsch(mode, dtype):
  x, y = problems.rotation_fits(np.random.default_rng(1))

  def build(start):
    results = riemannian.levenberg_marquardt(
        SO3, problems.rotation_residual(x, y), start, return_state=True)
    return _fields(results, "position", "converged", "num_iterations")

  position, converged, iterations = modes.run(
      build, [np.eye(3, dtype=dtype)], mode)
  assert position.dtype == np.dtype(dtype)
  np.testing.assert_allclose(position, problems.kabsch(x, y), atol=TOL[dtype])
  assert _so3_distance(position) < (1e-12 if dtype == "float64" else 1e-5)
  assert converged and 0 < iterations < 200


# A TF1 Session (eager calls run the same compiled solve as tf.function).
@pytest.mark.parametrize("mode", ["session"])
def test_stiefel_orthogonal_procrustes(mode):
  rng = np.random.default_rng(2)
  # x has orthonormal columns, so ||x w - y||^2 = const - 2 tr(w^T x^T y) and
  # the minimizer over St(5, 3) is u v^T from the SVD x^T y = u s v^T.
  x = np.linalg.qr(rng.standard_normal((12, 5)))[0]
  target = np.linalg.qr(rng.standard_normal((5, 3)))[0]
  y = x @ target + 0.05 * rng.standard_normal((12, 3))
  u, _, vt = np.linalg.svd(x.T @ y, full_matrices=False)
  manifold = manifolds.Stiefel(5, 3)
  start = np.linalg.qr(target + 0.3 * rng.standard_normal((5, 3)))[0]

  def build(w):
    return riemannian.levenberg_marquardt(manifold, lambda w: x @ w - y, w)

  got = modes.run(build, [start], mode)
  np.testing.assert_allclose(got, u @ vt, atol=1e-9)
  np.testing.assert_allclose(got.T @ got, np.eye(3), atol=1e-12)


# (The sphere in float32 under XLA: the conformance table.)
@pytest.mark.parametrize("mode,dtype", [("eager", "float64")])
def test_nearest_point_on_sphere(mode, dtype):
  target = np.array([3.0, -1.0, 2.0, 0.5], dtype)
  start = np.array([0.0, 1.0, 0.0, 0.0], dtype)

  def build(p):
    return riemannian.levenberg_marquardt(manifolds.Sphere(4),
                                          lambda p: p - target, p)

  got = modes.run(build, [start], mode)
  np.testing.assert_allclose(got, target / np.linalg.norm(target),
                             atol=TOL[dtype])
  assert abs(np.linalg.norm(got.astype(np.float64)) - 1.0) < (
      1e-12 if dtype == "float64" else 1e-6)


POSE = manifolds.Product(SO3, manifolds.Euclidean(3))


# One mode: the pose as a tuple runs in every mode in tests/test_conformance.py
# (the 'pose' cells) and as a list, against the same Kabsch answer, in
# test_product_point_as_a_list (eager, tf.function, Session).
@pytest.mark.parametrize("mode", ["function"])
def test_rigid_pose_matches_kabsch_with_centroids(mode):
  x, y, (r_want, t_want) = problems.pose_fit(np.random.default_rng(3))

  def build(r, t):
    return riemannian.levenberg_marquardt(
        POSE, lambda p: tf.matmul(x, p[0], transpose_b=True) + p[1] - y,
        (r, t))

  r, t = modes.run(build, [np.eye(3), np.zeros(3)], mode)
  np.testing.assert_allclose(r, r_want, atol=1e-10)
  np.testing.assert_allclose(t, t_want, atol=1e-10)


# Graph-mode batches of rotations: tests/test_batched.py and the
# conformance table.
@pytest.mark.parametrize("mode,form", [("function", "power"),
                                       ("eager", "batch_dims")])
def test_many_rotation_fits_match_kabsch(mode, form):
  # Eagerly each iteration is a Python loop over the Power manifold's 3k
  # tangent directions (k = 20: minutes); the form, not the mode, is the point
  # here, so the Power form is traced, and the eager case fits 3 rotations
  # and the traced ones 8 (24 tangent directions: more than the 16 that
  # `_linearization.jacobian` unrolls, so its vectorized path).
  count = 3 if mode == "eager" else 8
  x, y = problems.rotation_fits(np.random.default_rng(4), batch=(count,))
  want = np.stack([problems.kabsch(a, b) for a, b in zip(x, y)])
  start = np.tile(np.eye(3), (count, 1, 1))

  def build(r):
    if form == "power":
      results = riemannian.levenberg_marquardt(
          manifolds.Power(SO3, count), problems.rotation_residual(x, y), r,
          return_state=True)
    else:
      results = riemannian.levenberg_marquardt(
          SO3, problems.rotation_residual(x, y), r, batch_dims=1,
          return_state=True)
    return _fields(results, "position", "num_iterations", "converged")

  position, iterations, converged = modes.run(build, [start], mode)
  np.testing.assert_allclose(position, want, atol=1e-8)
  assert np.all(converged)
  if form == "batch_dims":  # one damping and stop per problem
    assert iterations.shape == (count,) and len(set(iterations.tolist())) > 1
  else:
    assert iterations.shape == ()


@pytest.mark.parametrize("mode,seed", [("eager", 5), ("session", 6)])
def test_euclidean_curve_fit_agrees_with_scipy(mode, seed):
  rng = np.random.default_rng(seed)
  t = np.linspace(0.0, 4.0, 40)
  truth = rng.uniform(0.5, 2.0, 4)
  y = (truth[0] * np.exp(-truth[1] * t) + truth[2] * np.sin(truth[3] * t) +
       0.01 * rng.standard_normal(t.size))
  model = lambda q, lib: (q[0] * lib.exp(-q[1] * t) +
                          q[2] * lib.sin(q[3] * t) - y)
  start = truth * rng.uniform(0.8, 1.2, 4)
  want = scipy.optimize.least_squares(lambda q: model(q, np), start,
                                      xtol=1e-15, ftol=1e-15, gtol=1e-15).x

  def build(q):
    return riemannian.levenberg_marquardt(
        manifolds.Euclidean(4), lambda q: model(q, tf.math), q)

  np.testing.assert_allclose(modes.run(build, [start], mode), want,
                             rtol=1e-8, atol=1e-10)


# -- the damping rule, by hand -------------------------------------------------


def _numpy_algorithm1(residual, jacobian, retract, p, iterations, eta=0.2,
                      damping_term_min=0.1, beta=5.0, expect_zero_residual=False):
  """Manopt's Algorithm 1 in NumPy; returns per-iteration (p, mu, acc, rej)."""
  mu_min = damping_term_min
  mu, accepted, rejected, history = mu_min, 0, 0, []
  for _ in range(iterations):
    f, j = residual(p), jacobian(p)
    lam = mu * (f @ f)
    gradient = j.T @ f
    s = -np.linalg.solve(j.T @ j + lam * np.eye(j.shape[1]), gradient)
    q = retract(p, s)
    fq = residual(q)
    predicted = -2.0 * gradient @ s - (j @ s) @ (j @ s) - lam * s @ s
    rho = (f @ f - fq @ fq) / predicted
    if np.isfinite(fq @ fq) and rho >= eta:
      p, accepted = q, accepted + 1
      if expect_zero_residual:
        mu = max(mu_min, mu / beta)
    else:
      mu, rejected = mu * beta, rejected + 1
    history.append((p, mu, accepted, rejected))
  return history


SPHERE_A = np.array([[2.0, -1.0, 0.5], [0.3, 1.5, -2.0], [1.0, 0.2, 0.7],
                     [-0.4, 0.9, 1.1]])
SPHERE_B = np.array([1.0, -2.0, 0.5, 3.0])


def _sphere_residual(p, lib=np):
  return lib.tensordot(SPHERE_A, p, 1) + 2.0 * p[0] * p[2] - SPHERE_B


def _sphere_case():
  sphere = manifolds.Sphere(3)

  def basis(p):
    return np.stack([sphere.tangent_vector(p, e).numpy()
                     for e in np.eye(2)], axis=1)

  def jacobian(p):
    differential = SPHERE_A + 2.0 * np.outer(np.ones(4),
                                             [p[2], 0.0, p[0]])
    return differential @ basis(p)

  retract = lambda p, s: sphere.retract(p, s).numpy()
  start = np.array([0.0, 0.0, -1.0])
  return sphere, _sphere_residual, jacobian, retract, start


def _euclidean_case():
  return (manifolds.Euclidean(2), problems.rosenbrock_residuals,
          problems.rosenbrock_jacobian, lambda p, s: p + s,
          np.array([-1.2, 1.0]))


HAND_CASES = {"euclidean": _euclidean_case, "sphere": _sphere_case}


@pytest.mark.parametrize("mode,case,expect_zero_residual", [
    ("eager", "euclidean", False), ("eager", "euclidean", True),
    ("eager", "sphere", True), ("session", "euclidean", False),
    ("function", "sphere", False)])
def test_iterates_match_hand_computed_algorithm_1(mode, case,
                                                  expect_zero_residual):
  manifold, residual, jacobian, retract, start = HAND_CASES[case]()
  options = dict(eta=0.5, damping_term_min=0.1, beta=5.0,
                 expect_zero_residual=expect_zero_residual)
  iterations = 6
  want = _numpy_algorithm1(residual, jacobian, retract, start, iterations,
                           **options)
  assert want[-1][3] >= 1 and want[-1][2] >= 2  # both branches exercised
  if mode == "eager":
    # One solve checks every iteration: the callback sees each iterate and
    # the records hold each iteration's damping (a rejection multiplies it by
    # beta, an acceptance keeps or divides it, so the damping history and
    # the final counts fix the accepted/rejected history).
    seen = []
    results = riemannian.levenberg_marquardt(
        manifold, lambda q: residual(q, tf), tf.constant(start),
        return_state=True, record=True,
        callback=lambda i, cost, point: seen.append(point.numpy()),
        stopping_criterion=stopping.StopAfterIteration(iterations), **options)
    assert len(seen) == iterations
    for count in range(1, iterations + 1):
      point, mu, _, _ = want[count - 1]
      np.testing.assert_allclose(seen[count - 1], point, rtol=1e-10,
                                 atol=1e-12)
      assert results.records["damping"].numpy()[count - 1] == pytest.approx(
          mu, rel=1e-12)
    _, mu, want_accepted, want_rejected = want[-1]
    assert float(results.damping) == pytest.approx(mu, rel=1e-12)
    assert (int(results.num_accepted), int(results.num_rejected)) == (
        want_accepted, want_rejected)
    return
  counts = [iterations] if mode == "xla" else [2, iterations]
  for count in counts:
    def build(p):
      results = riemannian.levenberg_marquardt(
          manifold, lambda q: residual(q, tf), p, return_state=True,
          stopping_criterion=stopping.StopAfterIteration(count), **options)
      return _fields(results, "position", "damping", "num_accepted",
                     "num_rejected")

    position, damping, accepted, rejected = modes.run(build, [start], mode)
    point, mu, want_accepted, want_rejected = want[count - 1]
    np.testing.assert_allclose(position, point, rtol=1e-10, atol=1e-12)
    assert damping == pytest.approx(mu, rel=1e-12)
    assert (accepted, rejected) == (want_accepted, want_rejected)


# -- the Jacobian and the objective --------------------------------------------


def _so3_jacobian(x):
  """The Jacobian of R -> x R^T - y in SO(3)'s orthonormal basis R E_j."""
  basis = manifolds.skew_basis(3)

  def jacobian(r):
    columns = [tf.reshape(tf.matmul(x, tf.matmul(r, tf.constant(e)),
                                    transpose_b=True), [-1])
               for e in np.asarray(basis)]
    return tf.stack(columns, axis=1)
  return jacobian


# One mode (the Jacobian, not the mode, is the point); eagerly a user
# jacobian_f runs in test_residual_evaluations_really_skipped and
# test_numpy_residual_raises_and_given_jacobian_skips_the_check.
@pytest.mark.parametrize("mode", ["session"])
def test_user_jacobian_gives_autodiff_iterates(mode):
  x, y = problems.rotation_fits(np.random.default_rng(7), num_points=10,
                                noise=0.3)
  fields = ("position", "num_iterations", "num_accepted", "cost")
  coefficients = np.array([[1.0, 0.5, 0.0], [0.0, 2.0, -0.3], [0.2, 0.0, 0.7]])
  jacobian = _so3_jacobian(x)

  def build(r):
    options = dict(return_state=True,
                   stopping_criterion=stopping.StopAfterIteration(8))
    auto = riemannian.levenberg_marquardt(
        SO3, problems.rotation_residual(x, y), r, **options)
    user = riemannian.levenberg_marquardt(
        SO3, problems.rotation_residual(x, y), r, jacobian, **options)
    objective = riemannian.NonlinearLeastSquaresObjective(
        problems.rotation_residual(x, y), jacobian, 30)
    as_object = riemannian.levenberg_marquardt(SO3, objective, r, **options)
    # The same Jacobian in the basis v_j = sum_i C_ij b_i: J_user = J C.
    other_basis = riemannian.levenberg_marquardt(
        SO3, problems.rotation_residual(x, y), r,
        lambda q: tf.matmul(jacobian(q), coefficients),
        jacobian_tangent_basis=lambda q: tf.constant(coefficients),
        **options)
    return [_fields(result, *fields)
            for result in (auto, user, as_object, other_basis)]

  auto, *others = modes.run(build, [problems.random_rotation(
      np.random.default_rng(8))], mode)
  for other in others:
    for got, want in zip(other, auto):
      np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_evaluation_counts_and_initial_values():
  x, y = problems.rotation_fits(np.random.default_rng(9))
  f = problems.rotation_residual(x, y)
  start = tf.constant(np.eye(3))
  criterion = stopping.StopAfterIteration(5)

  def solve(**kwargs):
    results = riemannian.levenberg_marquardt(
        SO3, f, start, return_state=True, stopping_criterion=criterion,
        **kwargs)
    return results

  # Traced: eagerly each of these 5-iteration solves took 2.7 s.
  known = tf.function(lambda: solve(num_components=60), autograph=False)()
  unknown = tf.function(solve, autograph=False)()
  initial = tf.function(lambda: solve(
      initial_residual_values=f(start),
      initial_jacobian_f=_so3_jacobian(x)(start)), autograph=False)()
  # 1 initial + 1 per iteration residual evaluations; 1 initial + 1 per
  # accepted step Jacobian evaluations.
  assert int(known.num_residual_evaluations) == 1 + 5
  assert int(known.num_jacobian_evaluations) == 1 + int(known.num_accepted)
  # m is read from the first evaluation's shape: no extra call, none counted.
  assert int(unknown.num_residual_evaluations) == 1 + 5
  assert int(initial.num_residual_evaluations) == 5
  assert int(initial.num_jacobian_evaluations) == int(initial.num_accepted)
  for results in (unknown, initial):
    np.testing.assert_allclose(results.position, known.position, atol=1e-12)


def test_residual_evaluations_really_skipped():
  x, y = problems.rotation_fits(np.random.default_rng(9))
  calls = []
  f = problems.rotation_residual(x, y)

  def counting(r):
    calls.append(1)
    return f(r)

  start = tf.constant(np.eye(3))
  criterion = stopping.StopAfterIteration(3)
  riemannian.levenberg_marquardt(SO3, counting, start,
                                 jacobian_f=_so3_jacobian(x),
                                 stopping_criterion=criterion,
                                 num_components=60)
  with_initial = len(calls)
  calls.clear()
  riemannian.levenberg_marquardt(SO3, counting, start,
                                 jacobian_f=_so3_jacobian(x),
                                 stopping_criterion=criterion,
                                 num_components=60,
                                 initial_residual_values=f(start))
  assert with_initial - len(calls) == 1


def test_num_components_and_objective_errors():
  x, y = problems.rotation_fits(np.random.default_rng(10))
  f = problems.rotation_residual(x, y)
  with pytest.raises(ValueError, match="num_components"):
    riemannian.levenberg_marquardt(SO3, f, np.eye(3), num_components=59)
  with pytest.raises(ValueError, match="num_components"):
    riemannian.levenberg_marquardt(SO3, f, np.eye(3), num_components=0)
  objective = riemannian.NonlinearLeastSquaresObjective(f, num_components=7)
  with pytest.raises(ValueError, match="num_components"):
    riemannian.levenberg_marquardt(SO3, objective, np.eye(3))
  with pytest.raises(ValueError, match="jacobian_f"):
    riemannian.levenberg_marquardt(SO3, objective, np.eye(3),
                                   _so3_jacobian(x))


# -- in place ------------------------------------------------------------------


# A TF1 Session (variables assigned in the graph); tf.function builds the
# same graph.
@pytest.mark.parametrize("mode", ["session"])
def test_in_place_assigns_variables(mode):
  # Eagerly the assignment is a plain tf.Variable.assign after the solve.
  x, y = problems.rotation_fits(np.random.default_rng(11))
  xp, yp, (r_want, t_want) = problems.pose_fit(np.random.default_rng(12))
  pose_residual = lambda p: tf.matmul(xp, p[0], transpose_b=True) + p[1] - yp

  def solve(rotation, pose):
    first = riemannian.levenberg_marquardt_in_place(
        SO3, problems.rotation_residual(x, y), rotation)
    second = riemannian.levenberg_marquardt_in_place(POSE, pose_residual,
                                                     pose, return_state=True)
    return first, second.position

  if mode == "session":
    with tf.Graph().as_default():
      rotation = tf.compat.v1.Variable(np.eye(3))
      pose = (tf.compat.v1.Variable(np.eye(3)),
              tf.compat.v1.Variable(np.zeros(3)))
      ops = solve(rotation, pose)
      with tf.compat.v1.Session() as session:
        session.run(tf.compat.v1.global_variables_initializer())
        session.run(ops)
        values = session.run([rotation, pose])
  else:
    rotation = tf.Variable(np.eye(3))
    pose = (tf.Variable(np.eye(3)), tf.Variable(np.zeros(3)))
    returned = tf.function(lambda: solve(rotation, pose), autograph=False)()
    np.testing.assert_allclose(returned[0], problems.kabsch(x, y), atol=1e-10)
    values = [rotation.numpy(), (pose[0].numpy(), pose[1].numpy())]
  np.testing.assert_allclose(values[0], problems.kabsch(x, y), atol=1e-10)
  np.testing.assert_allclose(values[1][0], r_want, atol=1e-10)
  np.testing.assert_allclose(values[1][1], t_want, atol=1e-10)


def test_in_place_needs_variables():
  with pytest.raises(TypeError, match="tf.Variable"):
    riemannian.levenberg_marquardt_in_place(SO3, lambda r: r, np.eye(3))


# -- recording -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["eager"])
def test_records(mode):
  x, y = problems.rotation_fits(np.random.default_rng(13), noise=0.2)

  def build(r):
    results = riemannian.levenberg_marquardt(
        SO3, problems.rotation_residual(x, y), r, return_state=True,
        record=True)
    return (results.records, results.num_iterations, results.initial_cost,
            results.cost, results.gradient_norm, results.damping)

  records, iterations, initial_cost, cost, gradient_norm, damping = (
      modes.run(build, [np.eye(3)], mode))
  assert records["cost"].shape == (200,)  # the criterion's iteration bound
  done = slice(0, iterations)
  assert np.all(np.isnan(records["cost"][iterations:]))
  for name in records:
    assert np.all(np.isfinite(records[name][done])), name
  history = np.concatenate([[initial_cost], records["cost"][done]])
  changes = np.diff(history)
  assert np.all(changes <= 0) and np.any(changes < 0)
  # the damping grows by beta exactly where the cost did not change
  growth = np.diff(np.concatenate([[0.1], records["damping"][done]]))
  np.testing.assert_array_equal(growth > 0, changes == 0)
  assert records["cost"][iterations - 1] == cost
  assert records["gradient_norm"][iterations - 1] == gradient_norm
  assert records["damping"][iterations - 1] == damping


def test_records_match_callback_and_batch_nan_after_stop():
  x, y = problems.rotation_fits(np.random.default_rng(14), batch=(3,))
  seen = []

  def callback(iteration, cost, point):
    seen.append((int(iteration), cost.numpy(), point.numpy()))

  results = riemannian.levenberg_marquardt(
      SO3, problems.rotation_residual(x, y), np.tile(np.eye(3), (3, 1, 1)),
      batch_dims=1, return_state=True, record=40, callback=callback)
  costs = results.records["cost"].numpy()
  iterations = results.num_iterations.numpy()
  assert costs.shape == (40, 3) and len(set(iterations.tolist())) > 1
  assert [it for it, _, _ in seen] == list(range(1, max(iterations) + 1))
  for problem in range(3):
    n = iterations[problem]
    np.testing.assert_array_equal(
        costs[:n, problem], [c[problem] for _, c, _ in seen[:n]])
    assert np.all(np.isnan(costs[n:, problem]))
  assert max(_so3_distance(p).max() for _, _, p in seen) < 1e-12


# -- validation and failures ---------------------------------------------------


@pytest.mark.parametrize("argument,value", [
    ("eta", 0.0), ("eta", 1.0), ("eta", -0.5), ("damping_term_min", 0.0),
    ("damping_term_min", -1.0), ("beta", 1.0), ("beta", 0.5)])
def test_parameter_ranges(argument, value):
  with pytest.raises(ValueError, match=argument):
    riemannian.levenberg_marquardt(SO3, lambda r: r, np.eye(3),
                                   **{argument: value})


def test_bad_arguments():
  with pytest.raises(TypeError, match="'f'"):
    riemannian.levenberg_marquardt(SO3, 3.0, np.eye(3))
  with pytest.raises(TypeError, match="manifold"):
    riemannian.levenberg_marquardt("SO3", lambda r: r, np.eye(3))
  with pytest.raises(ValueError, match="'p'.*off the manifold"):
    riemannian.levenberg_marquardt(SO3, lambda r: r, 2.0 * np.eye(3))
  with pytest.raises(ValueError, match="off the manifold"):
    riemannian.levenberg_marquardt(SO3, lambda r: r, np.diag([1.0, 1.0, -1.0]))
  with pytest.raises(ValueError, match="factor 1"):
    riemannian.levenberg_marquardt(
        manifolds.Product(SO3, manifolds.Sphere(3)), lambda p: p[1],
        (np.eye(3), np.ones(3)))


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_non_finite_candidate_is_a_rejection(mode):
  residual = problems.rosenbrock_residuals
  jacobian = problems.rosenbrock_jacobian
  start = np.array([-1.2, 1.0])
  first = _numpy_algorithm1(residual, jacobian, lambda p, s: p + s, start, 1)
  # the first candidate, before it is judged, is start + s: poison a ball
  # around it that contains neither the start nor the minimum (1, 1).
  f, j = residual(start), jacobian(start)
  bad = start - np.linalg.solve(j.T @ j + 0.1 * (f @ f) * np.eye(2), j.T @ f)
  assert np.linalg.norm(bad - start) > 0.1 and first[0][2] == 1

  def poisoned(v, lib=np):
    near = lib.reduce_sum((v - bad) ** 2) < 0.01 if lib is tf else (
        np.sum((v - bad) ** 2) < 0.01)
    nan = (tf.constant(np.nan, v.dtype) if lib is tf else np.nan)
    return problems.rosenbrock_residuals(v, lib) + (
        tf.where(near, nan, 0.0) if lib is tf else (nan if near else 0.0))

  want = _numpy_algorithm1(poisoned, jacobian, lambda p, s: p + s, start, 10)

  def build(v):
    results = riemannian.levenberg_marquardt(
        manifolds.Euclidean(2), lambda q: poisoned(q, tf), v,
        return_state=True, stopping_criterion=stopping.StopAfterIteration(10))
    return _fields(results, "position", "num_rejected", "cost")

  position, rejected, cost = modes.run(build, [start], mode)
  assert np.isfinite(cost) and rejected == want[-1][3] >= 1
  np.testing.assert_allclose(position, want[-1][0], rtol=1e-10)


@pytest.mark.parametrize("mode", ["eager", "session", "xla"])
def test_failed_factorization_is_a_rejection(mode):
  # A rank-1 J at a zero residual: lambda = mu ||F||^2 = 0 and J^T J is
  # singular, so the Cholesky factorization fails every time.
  def build(v):
    results = riemannian.levenberg_marquardt(
        manifolds.Euclidean(2),
        lambda q: tf.stack([q[0] + q[1] - 2.0, 2.0 * (q[0] + q[1]) - 4.0,
                            3.0 * (q[0] + q[1] - 2.0)]), v,
        return_state=True, stopping_criterion=stopping.StopAfterIteration(3))
    return _fields(results, "position", "num_rejected", "cost", "damping",
                   "step_size")

  position, rejected, cost, damping, step_size = modes.run(
      build, [np.array([0.5, 1.5])], mode)
  np.testing.assert_array_equal(position, [0.5, 1.5])
  assert rejected == 3 and cost == 0.0
  assert damping == pytest.approx(0.1 * 5.0 ** 3)
  assert step_size == np.inf  # no finite step was ever computed


@pytest.mark.parametrize("mode", ["eager"])
def test_nan_region_still_converges(mode):
  # log(1 + x) is NaN for x < -1; steps into that region are rejections.
  def build(v):
    results = riemannian.levenberg_marquardt(
        manifolds.Euclidean(1),
        lambda q: tf.math.log1p(q) * 10.0 + 3.0 * q + 40.0, v,
        return_state=True)
    return _fields(results, "position", "num_rejected", "cost", "converged")

  position, rejected, cost, converged = modes.run(build, [np.array([0.0])],
                                                  mode)
  want = scipy.optimize.brentq(lambda q: np.log1p(q) * 10 + 3 * q + 40,
                               -1 + 1e-300, 0.0)
  assert converged and rejected >= 1 and cost < 1e-20
  np.testing.assert_allclose(position, [want], rtol=1e-12)


# -- staying on the manifold ---------------------------------------------------


# float64, where the claim is sharpest (1e-12); float32 retractions run in
# the conformance table and test_manifolds.
@pytest.mark.parametrize("dtype", ["float64"])
def test_points_stay_on_the_manifold(dtype):
  rng = np.random.default_rng(15)
  x, y = problems.rotation_fits(rng, noise=0.5)
  tolerance = 1e-12 if dtype == "float64" else 1e-5
  stiefel = manifolds.Stiefel(6, 2)
  target = rng.standard_normal((6, 2))
  sphere_target = rng.standard_normal(5)
  cases = [
      (SO3, problems.rotation_residual(x, y), problems.random_rotation(rng),
       _so3_distance),
      (stiefel, lambda w: tf.sin(w) - tf.cast(target, w.dtype),
       np.linalg.qr(rng.standard_normal((6, 2)))[0],
       lambda w: np.linalg.norm(w.T.astype(np.float64) @ w - np.eye(2))),
      (manifolds.Sphere(5),
       lambda p: tf.exp(p) - tf.cast(sphere_target, p.dtype),
       np.eye(5)[0], lambda p: abs(np.linalg.norm(p.astype(np.float64)) - 1))]
  # In a tf.function (eagerly the three solves cost 8 s), each iterate
  # handed to NumPy by a py_function in the callback.
  for manifold, residual, start, distance in cases:
    worst = []

    def callback(iteration, cost, point, distance=distance, worst=worst):
      del iteration, cost
      return tf.py_function(
          lambda p: worst.append(distance(p.numpy())) or 0, [point],
          tf.int32)

    solve = tf.function(
        lambda p, manifold=manifold, residual=residual, callback=callback:
        riemannian.levenberg_marquardt(
            manifold, residual, p, return_state=True, callback=callback,
            stopping_criterion=stopping.StopAfterIteration(8)).num_accepted,
        autograph=False)
    num_accepted = solve(tf.constant(start.astype(dtype)))
    assert len(worst) == 8 and int(num_accepted) >= 3
    assert max(worst) <= tolerance, manifold


# -- invalid input in every mode -------------------------------------------------


# A TF1 Session graph is built by the same code as a tf.function's, and
# `contains` itself runs in every mode, XLA included, in
# tests/test_manifolds.py (an XLA solve here cost 8 s of compilation).
@pytest.mark.parametrize("mode", ["function"])
def test_off_manifold_start_fails_only_its_problem(mode):
  # Eagerly such starts raise (test_bad_arguments); a graph cannot raise on
  # values, so each bad start stops at once with INVALID_INPUT, unchanged.
  x, y = problems.rotation_fits(np.random.default_rng(16), batch=(4,))
  starts = np.stack([np.eye(3), 2.0 * np.eye(3), np.diag([1.0, 1.0, -1.0]),
                     np.full((3, 3), np.nan)])

  def build(r):
    batch = riemannian.levenberg_marquardt(
        SO3, problems.rotation_residual(x, y), r, batch_dims=1,
        return_state=True)
    single = riemannian.levenberg_marquardt(  # the unbatched 2 I
        SO3, problems.rotation_residual(x[1], y[1]), r[1], return_state=True)
    return [_fields(results, "position", "converged", "stop_reason",
                    "num_iterations") for results in (batch, single)]

  (position, converged, reason, iterations), single = modes.run(
      build, [starts], mode)
  np.testing.assert_allclose(position[0], problems.kabsch(x[0], y[0]),
                             atol=1e-9)
  assert converged[0] and iterations[0] > 0
  np.testing.assert_array_equal(position[1:], starts[1:])  # NaN == NaN here
  np.testing.assert_array_equal(converged[1:], False)
  np.testing.assert_array_equal(reason[1:], int(StopReason.INVALID_INPUT))
  np.testing.assert_array_equal(iterations[1:], 0)
  np.testing.assert_array_equal(single[0], 2.0 * np.eye(3))
  assert not single[1] and single[2] == StopReason.INVALID_INPUT == 9


_X, _Y = problems.rotation_fits(np.random.default_rng(17))
# (manifold, f, start, options, error message): each raises while tracing,
# before any loop is built, so every mode is cheap.
BAD_INPUTS = {
    # batch_dims=0 with two rotations: one tangent step would be shared.
    "extra_axis": (SO3, problems.rotation_residual(_X, _Y),
                   np.stack([np.eye(3)] * 2), {}, "'p'.*shape \\[3, 3\\]"),
    "sphere_size": (manifolds.Sphere(3), lambda p: p,
                    np.array([1.0, 0.0, 0.0, 0.0]), {},
                    "'p'.*Sphere\\(3\\).*shape"),
    "batch_shape": (SO3, problems.rotation_residual(_X, _Y), np.eye(3)[:, :2],
                    {"batch_dims": 1}, "'p'.*\\[B1, 3, 3\\]"),
    "power_count": (manifolds.Power(manifolds.Sphere(3), 3), lambda p: p,
                    np.eye(4)[:, :3], {}, "'p'.*Power"),
    "f_batch": (SO3, lambda r: tf.reshape(r, [-1]), np.stack([np.eye(3)] * 2),
                {"batch_dims": 1}, "'f' returned shape \\(18,\\)"),
    "empty_batch": (SO3, problems.rotation_residual(_X, _Y),
                    np.zeros((0, 3, 3)), {"batch_dims": 1}, "'p' is empty"),
    "dimension_0": (manifolds.Stiefel(1, 1), lambda p: p - 1.0,
                    np.ones((1, 1)), {}, "'p'.*dimension 0"),
    "constant_f": (manifolds.Sphere(3), lambda p: tf.constant([1.0, 2.0],
                                                              p.dtype),
                   np.array([1.0, 0.0, 0.0]), {}, "'f' does not depend"),
    "stop_gradient_f": (manifolds.Sphere(3),
                        lambda p: tf.stop_gradient(p) - 2.0,
                        np.array([1.0, 0.0, 0.0]), {}, "'f' does not depend"),
    "round_f": (POSE, lambda p: tf.round(p[1]), [np.eye(3), np.zeros(3)], {},
                "'f' does not depend"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_misshapen_empty_and_disconnected_inputs_raise(case, mode):
  manifold, residual, start, options, message = BAD_INPUTS[case]

  def build(*tensors):
    return tf.nest.flatten(riemannian.levenberg_marquardt(
        manifold, residual, tf.nest.pack_sequence_as(start, list(tensors)),
        **options))

  # Eagerly twice: a second call of the same problem takes the compiled
  # path, which must raise the same error (it once raised the manifold's,
  # without the argument's name).
  for _ in range(2 if mode == "eager" else 1):
    with pytest.raises(ValueError, match=message):
      modes.run(build, tf.nest.flatten(start), mode)


def test_numpy_residual_raises_and_given_jacobian_skips_the_check():
  x, y = problems.rotation_fits(np.random.default_rng(18))
  # A residual computed in NumPy is a constant to TensorFlow.
  with pytest.raises(ValueError, match="'f' does not depend"):
    riemannian.levenberg_marquardt(SO3, lambda r: x @ np.asarray(r).T - y,
                                   np.eye(3))
  # With jacobian_f the residual is not differentiated, so it is not checked.
  criterion = stopping.StopAfterIteration(2)
  results = riemannian.levenberg_marquardt(
      SO3, lambda r: tf.constant(x @ np.asarray(r).T - y), np.eye(3),
      jacobian_f=_so3_jacobian(x), stopping_criterion=criterion,
      return_state=True)
  assert int(results.num_iterations) == 2


def test_int32_bounds():
  f = lambda p: p - 2.0
  start = np.array([1.0, 0.0, 0.0])
  sphere = manifolds.Sphere(3)
  with pytest.raises(ValueError, match="max_iterations"):
    stopping.StopAfterIteration(2**31)
  assert stopping.StopAfterIteration(2**31 - 1).max_iterations == 2**31 - 1
  with pytest.raises(ValueError, match="record"):
    riemannian.levenberg_marquardt(sphere, f, start, record=2**31)
  with pytest.raises(ValueError, match="num_components"):
    riemannian.levenberg_marquardt(sphere, f, start, num_components=2**31)
  with pytest.raises(ValueError, match="batch_dims"):
    riemannian.levenberg_marquardt(sphere, f, start, batch_dims=2**31)


@pytest.mark.parametrize("mode", ["function", "session"])
def test_product_point_as_a_list(mode):
  # Manopt users write poses as [R, t]: f, the callback and the result all
  # get a list, as given.
  x, y, (r_want, t_want) = problems.pose_fit(np.random.default_rng(3))
  seen = []

  def residual(p):
    seen.append(type(p))
    return tf.matmul(x, p[0], transpose_b=True) + p[1] - y

  def callback(iteration, cost, point):
    seen.append(type(point))

  def build(r, t):
    results = riemannian.levenberg_marquardt(
        POSE, residual, [r, t], callback=callback, return_state=True)
    return results.position, results.converged

  position, converged = modes.run(build, [np.eye(3), np.zeros(3)], mode)
  assert isinstance(position, list) and converged
  np.testing.assert_allclose(position[0], r_want, atol=1e-10)
  np.testing.assert_allclose(position[1], t_want, atol=1e-10)
  assert seen and set(seen) == {list}


def test_nan_residual_everywhere_stops_not_finite():
  results = riemannian.levenberg_marquardt(
      manifolds.Sphere(3), lambda p: tf.sqrt(p - 2.0), [1.0, 0.0, 0.0],
      stopping_criterion=stopping.StopWhenGradientNormLess(1e-6),
      return_state=True)
  assert not bool(results.converged)
  assert int(results.stop_reason) == StopReason.NOT_FINITE == 7
