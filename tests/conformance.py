"""One table of option combinations for every front-end, sampled pairwise.

`FACTORS` lists each option and its levels; `cells()` picks, deterministically,
a small set of combinations (the valid ones only, see `valid`) that covers
every valid pair of levels of every two factors (greedy all-pairs). Each cell
is one solve whose answer is known in closed form (`PROBLEMS`), run in its
mode by `tests.modes.run`.
"""

import itertools

import numpy as np
from scipy.spatial.transform import Rotation

FACTORS = {
    "front_end": ("least_squares", "riemannian"),
    "problem": ("rosenbrock", "sphere", "rotation", "pose"),
    # soft_l1 and arctan share huber's and cauchy's code path (an elementwise
    # rho and its derivatives): test_least_squares checks every loss against
    # scipy; inactive bounds: test_inactive_bounds_change_nothing.
    "loss": ("linear", "huber", "cauchy"),
    "bounds": ("none", "active"),
    "acceleration": ("on", "off"),
    "damping": ("trust_region", "nielsen", "tfg", "manopt"),
    # cg_inexact: linear_solver='cg' with inexact_steps=True.
    "linear_solver": ("dense", "cg", "cg_inexact"),
    "batch_dims": (0, 1),
    "mode": ("eager", "function", "xla", "session"),
    "dtype": ("float64", "float32"),
    "shapes": ("static", "dynamic"),
}


def valid(cell):
  """Whether a combination means something."""
  if cell["bounds"] != "none" and cell["problem"] != "rosenbrock":
    return False  # bounds are for Euclidean variables
  if cell["front_end"] == "riemannian" and (
      cell["loss"] != "linear" or cell["bounds"] != "none" or
      cell["acceleration"] != "off" or cell["damping"] != "manopt" or
      cell["linear_solver"] != "dense"):
    return False  # Manopt's contract: none of these options
  if cell["linear_solver"] != "dense" and cell["mode"] == "eager":
    # Eagerly each CG iteration is ~20 Python-dispatched ops (the slowest
    # cells by far); eager CG solves: test_linear_solvers, test_implicit.
    return False
  return True


def cells():
  """Greedy all-pairs cover of the valid combinations (deterministic): each
  round takes the first combination covering the most uncovered pairs."""
  names = list(FACTORS)
  combos = [dict(zip(names, values))
            for values in itertools.product(*FACTORS.values())]
  combos = [c for c in combos if valid(c)]
  # Each (factor a, level, factor b, level) pair numbered; covers[i, p]:
  # whether combination i covers pair p (one matrix: the greedy rounds are
  # matrix-vector products, not set intersections).
  numbers = {}
  rows = [[numbers.setdefault((a, c[a], b, c[b]), len(numbers))
           for a, b in itertools.combinations(names, 2)] for c in combos]
  covers = np.zeros((len(combos), len(numbers)), np.int32)
  np.put_along_axis(covers, np.array(rows), 1, axis=1)
  uncovered = np.ones(len(numbers), np.int32)
  chosen = []
  while uncovered.any():
    best = int(np.argmax(covers @ uncovered))
    chosen.append(combos[best])
    uncovered[covers[best] > 0] = 0
  return chosen


def cell_id(cell):
  return "-".join(str(v) for v in cell.values())


# -- problems with known answers -------------------------------------------------

_RNG = np.random.default_rng(7)
SPHERE_B = _RNG.standard_normal((5, 3))
SPHERE_TRUTH = np.array([0.48, -0.6, 0.64])
POINTS = _RNG.standard_normal((8, 3))
ROTATION_TRUTH = Rotation.from_rotvec([0.3, -0.2, 0.5]).as_matrix()
TRANSLATION_TRUTH = np.array([0.5, -1.0, 2.0])


def starts(problem, batch_dims):
  """Start(s) of a problem: one, or a batch of two different ones."""
  if problem == "rosenbrock":
    one, two = np.array([-1.2, 1.0]), np.array([0.3, -0.4])
  elif problem == "sphere":
    one, two = (np.array([0.0, 0.0, 1.0]),
                np.array([0.6, 0.0, 0.8]))
  else:
    one = np.eye(3)
    two = Rotation.from_rotvec([0.2, 0.1, 0.0]).as_matrix()
  if problem == "pose":
    one, two = (one, np.zeros(3)), (two, np.ones(3))
  if batch_dims == 0:
    return one
  if problem == "pose":
    return tuple(np.stack([a, b]) for a, b in zip(one, two))
  return np.stack([one, two])


def truth(problem, bounds):
  if problem == "rosenbrock":
    return np.array([0.5, 0.25]) if bounds == "active" else np.ones(2)
  if problem == "sphere":
    return SPHERE_TRUTH
  if problem == "rotation":
    return ROTATION_TRUTH
  return (ROTATION_TRUTH, TRANSLATION_TRUTH)


def data(problem):
  """The data a residual reads (fed as inputs, so 'dynamic' cells have an
  unknown number of residuals)."""
  if problem == "rosenbrock":
    return [np.array([1.0, 10.0])]
  if problem == "sphere":
    return [SPHERE_B, SPHERE_B @ SPHERE_TRUTH]
  observed = POINTS @ ROTATION_TRUTH.T
  if problem == "pose":
    observed = observed + TRANSLATION_TRUTH
  return [POINTS, observed]
