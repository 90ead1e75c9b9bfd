"""Bundle adjustment: the Schur complement solvers (`tfg_optim._schur`:
dense and iterative) and the BAL program
(`tfg_optim/examples/bundle_adjustment.py`).

The Schur steps are checked against the damped normal equations assembled
from the dense Jacobian of `io.bal_residuals` (forward mode over the whole
tables, no blocks) and solved by NumPy (the iterative one to the bound its
conjugate-gradient tolerance implies); the solves against the truth of a
noise-free synthetic problem; the program against `io.bal_cost` of the file
it writes.
"""

import io as python_io

import numpy as np
import pytest
import tensorflow as tf

from tests import modes
from tfg_optim import _schur
from tfg_optim import factor_graph
from tfg_optim import io
from tfg_optim.examples import bundle_adjustment


def _tiny(seed=0, noise=1.0):
  """A synthetic BAL problem: 3 cameras, 6 points, 14 observations."""
  return io.synthetic_bal(3, 6, num_observations=14, pixel_noise=noise,
                          seed=seed)


_DENSE = {}


def _dense_system(problem):
  """(J, F): the dense Jacobian of `io.bal_residuals` with respect to
  (cameras, points), by forward mode along all n unit directions at once
  (the tables batched n times), and the residuals (cached)."""
  key = id(problem)
  if key not in _DENSE:
    cameras, points = problem.cameras, problem.points
    size = cameras.size
    n = size + points.size
    directions = np.eye(n)
    batched = [tf.constant(np.broadcast_to(x, (n,) + x.shape))
               for x in (cameras, points)]
    tangents = [tf.constant(directions[:, :size].reshape((n,) +
                                                         cameras.shape)),
                tf.constant(directions[:, size:].reshape((n,) +
                                                         points.shape))]
    with tf.autodiff.ForwardAccumulator(batched, tangents) as accumulator:
      residuals = io.bal_residuals(*batched, problem.camera_index,
                                   problem.point_index, problem.observations)
    jacobian = tf.reshape(accumulator.jvp(residuals), [n, -1]).numpy().T
    _DENSE[key] = (problem, jacobian, residuals[0].numpy().reshape(-1))
  return _DENSE[key][1:]


def _linearization(problem, cameras, points, **kind_options):
  """(the `_schur.SchurComplement` linearization at (cameras, points), its
  gradient)."""
  variables, terms = bundle_adjustment.factor_graph_problem(
      problem, cameras, points)
  layout, _ = factor_graph._layout(variables, terms)  # pylint: disable=protected-access
  kind = _schur.SchurKind(layout, **kind_options)
  point = (cameras, points)
  linearization = kind.at(point, None)
  return linearization, linearization.gradient(layout.residual(point))


def _schur_step(problem, **kind_options):
  """build(cameras, points, lam, scaling) -> the Schur solver's step."""

  def build(cameras, points, lam, scaling):
    linearization, gradient = _linearization(problem, cameras, points,
                                             **kind_options)
    solve = linearization.damped_solver(lam, scaling)
    return solve(None, gradient).solution
  return build


_TINY, _ = io.synthetic_bal(3, 6, num_observations=14, seed=1)


@pytest.mark.parametrize("mode", ["session"])  # eager: the next test
def test_schur_step_equals_the_dense_solve(mode):
  """The eliminated-points step equals the solution of the dense damped
  normal equations (J^T J + lambda D) s = -J^T F, D = diag(J^T J) times
  random factors in [0.5, 2] (Marquardt's scaling, perturbed), to 1e-10
  in norm (J's column norms range from 0.1 to 400 and the damped matrix's
  condition number is 7.8e8: single entries differ by up to 1.3e-10
  relative between the two factorizations)."""
  jacobian, residuals = _dense_system(_TINY)
  gram = jacobian.T @ jacobian
  scaling = np.diag(gram) * np.random.default_rng(1).uniform(
      0.5, 2.0, size=len(gram))
  lam = 1e-2
  expected = -np.linalg.solve(gram + lam * np.diag(scaling),
                              jacobian.T @ residuals)
  step = modes.run(_schur_step(_TINY),
                   [_TINY.cameras, _TINY.points, np.float64(lam), scaling],
                   mode)
  assert np.max(np.abs(expected)) > 1e-3  # a real step
  error = np.linalg.norm(step - expected) / np.linalg.norm(expected)
  assert error <= 1e-10, error


def _seen_twice(seed):
  """A synthetic problem (3 cameras, 10 points: the points are eliminated)
  where camera 0 sees point 0 three times and camera 1 sees point 3 twice
  (observations appended), so that a camera's SCHUR_JACOBI block has pairs
  of distinct edges."""
  problem, _ = io.synthetic_bal(3, 10, num_observations=24, seed=seed)
  extra_camera, extra_point = np.array([0, 0, 1]), np.array([0, 0, 3])
  observed = problem.observations[:3] + np.array([[3.0, -2.0], [-1.0, 4.0],
                                                  [2.0, 2.0]])
  return problem._replace(
      camera_index=np.concatenate([problem.camera_index, extra_camera]),
      point_index=np.concatenate([problem.point_index, extra_point]),
      observations=np.concatenate([problem.observations, observed]))


_TWICE = _seen_twice(2)


def _reference(problem, seed):
  """The dense damped system of `problem` at lambda = 1e-2, D =
  diag(J^T J) times random factors in [0.5, 2] (NumPy): (lambda, D's
  diagonal, the gradient, the step -(J^T J + lambda D)^-1 g, M^1/2 for M
  the block diagonal of the reduced camera matrix S, and kappa, the
  condition number of M^-1/2 S M^-1/2: 73 for `_TWICE`, where the
  iterative camera step's error is 0.1 to 0.2 of its bound kappa eta for
  eta from 1e-1 to 1e-3). The cameras are kept."""
  jacobian, residuals = _dense_system(problem)
  gram = jacobian.T @ jacobian
  scaling = np.diag(gram) * np.random.default_rng(seed).uniform(
      0.5, 2.0, size=len(gram))
  lam = 1e-2
  damped = gram + lam * np.diag(scaling)
  gradient = jacobian.T @ residuals
  c = problem.cameras.size  # cameras first in the tangent vector
  schur = damped[:c, :c] - damped[:c, c:] @ np.linalg.solve(
      damped[c:, c:], damped[c:, :c])
  root = np.zeros_like(schur)  # M^1/2, blockwise
  for block in range(0, c, 9):
    values, vectors = np.linalg.eigh(schur[block:block + 9, block:block + 9])
    root[block:block + 9, block:block + 9] = (vectors * np.sqrt(values)) @ (
        vectors.T)
  inverse_root = np.linalg.inv(root)
  kappa = np.linalg.cond(inverse_root @ schur @ inverse_root)
  return (lam, scaling, gradient, -np.linalg.solve(damped, gradient), root,
          kappa)


def _iterative_step_errors(step, expected, root, kappa, tolerance):
  """Asserts the CG bound on the camera step (see the next test); returns
  (its error in the M norm, the whole step's relative error)."""
  c = _TWICE.cameras.size
  exact = root @ expected[:c]
  error = np.linalg.norm(root @ step[:c] - exact) / np.linalg.norm(exact)
  assert error <= kappa * tolerance, (tolerance, error, kappa)
  return error, np.linalg.norm(step - expected) / np.linalg.norm(expected)


def test_iterative_schur_step_is_within_its_tolerance():
  """'iterative_schur' (eager): the camera step x of the reduced system
  S x = b solved by SCHUR_JACOBI-preconditioned CG to tolerance eta = 1e-2
  (||S x - b||_M^-1 <= eta ||b||_M^-1, M the block diagonal of S) is within
  kappa eta of the exact one in the M norm, kappa the condition number of
  M^-1/2 S M^-1/2: ||x - x*||_M <= kappa eta ||x*||_M, and is inexact
  (the solve stopped early). S, M and the exact step come from the dense
  damped normal equations (NumPy). The next test: eta = 1e-12 under XLA."""
  lam, scaling, _, expected, root, kappa = _reference(_TWICE, 2)
  step = _schur_step(_TWICE, iterative=True, tolerance=1e-2)(
      tf.constant(_TWICE.cameras), tf.constant(_TWICE.points),
      tf.constant(lam, tf.float64), tf.constant(scaling)).numpy()
  error, _ = _iterative_step_errors(step, expected, root, kappa, 1e-2)
  assert error > 1e-6  # stopped early: the test above is not vacuous


def test_iterative_schur_solve_compiles_under_xla():
  """The iterative Schur solve (elimination, SCHUR_JACOBI blocks, the CG
  loop, back-substitution) from given Jacobian blocks, compiled by XLA
  (jit_compile=True), at tolerance eta = 1e-12: the camera step within
  kappa eta (previous test) and the whole step (points back-substituted)
  the dense step to 1e-9."""
  lam, scaling, gradient, expected, root, kappa = _reference(_TWICE, 2)
  linearization, _ = _linearization(
      _TWICE, tf.constant(_TWICE.cameras), tf.constant(_TWICE.points),
      iterative=True, tolerance=1e-12)
  rebuild = type(linearization)

  @tf.function(jit_compile=True, autograph=False)
  def solve(lam, scaling, gradient, *blocks):
    return rebuild(*blocks).damped_solver(lam, scaling)(
        None, gradient).solution

  step = solve(tf.constant(lam, tf.float64), tf.constant(scaling),
               tf.constant(gradient), *linearization.blocks).numpy()
  _, whole = _iterative_step_errors(step, expected, root, kappa, 1e-12)
  assert whole <= 1e-9, whole


def test_schur_jacobi_blocks_are_the_diagonal_of_s():
  """The SCHUR_JACOBI blocks of the iterative solver (pairs of one camera's
  edges sharing a point) equal the diagonal blocks of the dense S of the
  'schur' path (all pairs), on a problem where cameras see a point more
  than once, and differ from U's blocks (the elimination is in them)."""
  cameras, points = tf.constant(_TWICE.cameras), tf.constant(_TWICE.points)
  lam = tf.constant(1e-3, tf.float64)
  dense, _ = _linearization(_TWICE, cameras, points)
  iterative, _ = _linearization(_TWICE, cameras, points, iterative=True)
  assert dense.structure.reduced == 0  # the cameras are kept
  scaling = dense.column_norms()
  schur = dense.reduced_matrix(dense.eliminate(lam, scaling)).numpy()
  elimination = iterative.eliminate(lam, scaling)
  blocks = iterative.schur_jacobi(elimination).numpy()
  diagonal = np.stack([schur[i:i + 9, i:i + 9]
                       for i in range(0, schur.shape[0], 9)])
  np.testing.assert_allclose(blocks, diagonal, rtol=1e-12,
                             atol=1e-12 * np.abs(diagonal).max())
  assert np.abs(blocks - elimination.u.numpy()).max() > 1e-3 * np.abs(
      diagonal).max()


def test_schur_pairs_cover_every_shared_point():
  """The static pair list: every (k, l) sharing a point with c(k) <= c(l),
  each once (compared with a double loop over the edges)."""
  problem, _ = io.synthetic_bal(4, 5, num_observations=13, seed=3)
  first, second = _schur._pairs(  # pylint: disable=protected-access
      problem.camera_index.astype(np.int32),
      problem.point_index.astype(np.int32))
  c, p = problem.camera_index, problem.point_index
  expected = sorted((k, l) for k in range(len(c)) for l in range(len(c))
                    if p[k] == p[l] and c[k] <= c[l])
  assert sorted(zip(first.tolist(), second.tolist())) == expected


@pytest.mark.parametrize(
    "mode, linear_solver",  # tf.function: the program
    [("eager", "schur"), ("eager", "iterative_schur")])
def test_noise_free_problem_reaches_zero_cost(mode, linear_solver):
  """A noise-free problem solved with 'schur' or 'iterative_schur' (its
  default tolerance: inexact steps) from a perturbed start reaches zero
  cost; the start was far from it."""
  start, truth = io.synthetic_bal(3, 8, observations_per_point=3,
                                  pixel_noise=0.0, start_perturbation=0.05,
                                  seed=4)

  def build(cameras, points):
    variables, terms = bundle_adjustment.factor_graph_problem(
        start, cameras, points)
    results = factor_graph.least_squares(variables, terms,
                                         linear_solver=linear_solver,
                                         max_iterations=100)
    return results.initial_cost, results.cost, results.converged

  initial, cost, converged = modes.run(build, [start.cameras, start.points],
                                       mode)
  assert float(io.bal_cost(*truth)) < 1e-20
  assert initial > 1e2
  assert cost < 1e-16 * initial
  assert converged


def _program(tmp_path, source, *extra):
  stdout = python_io.StringIO()
  status = bundle_adjustment.main(
      [str(source), "--output", str(tmp_path / "out.txt"), *extra],
      stdout=stdout)
  return status, stdout.getvalue()


def test_program_round_trips_a_bal_file(tmp_path):
  """The program end to end (tf.function): one line per iteration, the
  summary, and an output file whose cost is the printed final cost."""
  start, _ = _tiny(seed=5, noise=0.5)
  source = tmp_path / "in.txt"
  io.write_bal(source, start)
  status, text = _program(tmp_path, source, "--max-iterations", "30")
  assert status == 0, text
  iterations = int(text.split("\niterations ")[1].split()[0])
  numbered = [int(line.split()[0]) for line in text.splitlines()
              if line.split()[:1] and line.split()[0].isdigit()]
  assert numbered == list(range(iterations + 1))
  for needle in ("initial cost", "tracing", "linear solver schur",
                 "stop reason", "wrote"):
    assert needle in text, text
  initial = float(text.split("initial cost")[1].split()[0])
  final = float(text.split("final cost")[1].split()[0])
  written = io.read_bal(tmp_path / "out.txt")
  np.testing.assert_array_equal(written.observations, start.observations)
  np.testing.assert_array_equal(written.camera_index, start.camera_index)
  assert final < initial
  assert float(io.bal_cost(*written)) == pytest.approx(final, rel=1e-12)
  assert float(io.bal_cost(*start)) == pytest.approx(initial, rel=1e-12)


def test_program_rejects_a_malformed_file(tmp_path):
  """Exit status 2 and the line of the bad value."""
  start, _ = _tiny(seed=6)
  source = tmp_path / "in.txt"
  io.write_bal(source, start)
  lines = source.read_text().splitlines()
  lines[3] = lines[3].replace(lines[3].split()[2], "x1.5")
  source.write_text("\n".join(lines) + "\n")
  status, text = _program(tmp_path, source)
  assert status == 2
  assert "line 4" in text and "expected a finite number" in text, text
  assert not (tmp_path / "out.txt").exists()


def test_schur_names_what_it_cannot_solve():
  """'schur' needs two tables, each term reading one row of each;
  'iterative_schur' refuses the trust region."""
  start, _ = _tiny(seed=7)
  cameras = factor_graph.Variables(start.cameras, name="cameras")
  points = factor_graph.Variables(start.points, name="points")
  data = [start.observations]
  one_table = factor_graph.Term(
      lambda a, b, o: a[:, :2] - b[:, :2] - o,
      [(cameras, start.camera_index), (cameras, start.camera_index)],
      data=data)
  with pytest.raises(ValueError, match="exactly two variable tables"):
    factor_graph.least_squares([cameras], [one_table], linear_solver="schur")
  with pytest.raises(ValueError, match="one row of each of the two tables"):
    factor_graph.least_squares([cameras, points], [one_table],
                               linear_solver="schur")
  reprojections = factor_graph.Term(
      bundle_adjustment.reprojection_error,
      [(cameras, start.camera_index), (points, start.point_index)],
      data=data)
  with pytest.raises(ValueError, match="'trust_region' damping"):
    factor_graph.least_squares([cameras, points], [reprojections],
                               linear_solver="iterative_schur",
                               damping="trust_region")
