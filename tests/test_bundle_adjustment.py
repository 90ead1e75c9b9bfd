"""Bundle adjustment: the Schur complement solver (`tfg_optim._schur`) and
the BAL program (`tfg_optim/examples/bundle_adjustment.py`).

The Schur step is checked against the damped normal equations assembled
from the dense Jacobian of `io.bal_residuals` (reverse mode over the whole
tables, no blocks) and solved by NumPy; the solve against the truth of a
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


def _schur_step(problem):
  """build(cameras, points, lam, scaling) -> the Schur solver's step."""

  def build(cameras, points, lam, scaling):
    variables, terms = bundle_adjustment.factor_graph_problem(
        problem, cameras, points)
    layout, _ = factor_graph._layout(variables, terms)  # pylint: disable=protected-access
    kind = _schur.SchurKind(layout)
    point = (cameras, points)
    linearization = kind.at(point, None)
    gradient = linearization.gradient(layout.residual(point))
    solve = linearization.damped_solver(lam, scaling)
    return solve(None, gradient)
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


@pytest.mark.parametrize("mode", ["eager"])  # tf.function: the program
def test_noise_free_problem_reaches_zero_cost(mode):
  """A noise-free problem solved with 'schur' from a perturbed start
  reaches zero cost; the start was far from it."""
  start, truth = io.synthetic_bal(3, 8, observations_per_point=3,
                                  pixel_noise=0.0, start_perturbation=0.05,
                                  seed=4)

  def build(cameras, points):
    variables, terms = bundle_adjustment.factor_graph_problem(
        start, cameras, points)
    results = factor_graph.least_squares(variables, terms,
                                         linear_solver="schur",
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
  """'schur' needs two tables, each term reading one row of each."""
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
