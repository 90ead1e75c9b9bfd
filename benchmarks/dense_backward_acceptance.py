"""The dense front-ends' implicit derivatives on the reproducers of the
backward solves' acceptance (`least_squares` with the Gauss-Newton and the
exact implicit Hessian, `lbfgs.minimize_lbfgs` / `minimize_bfgs`): the
largest error of d x* / d theta (tape.jacobian) against NumPy float64
truth, or NaN. float64, eagerly, tiny n.

- hidden: r = (x0 - t0, a (x1 - t1), b (1 - x1^2)), a = 1e-3, b^2 =
  (a^2 + 1e-9) / 2, solved from x = 0 (a saddle: the exact H is
  diag(1, -1e-9)): the answer must be NaN (NumPy's solve, -H^-1 d2f/dxdt,
  is the saddle's: row 1 = -1000). L-BFGS/BFGS: f = x0^2 / 2 - 1e-9 x1^2 /
  2 - t0 x0 + t1 x1 (H = diag(1, -1e-9); NumPy: 1e9).
- gauge s: r = A (x - mean(x)) - t, A 5 x 4 standard normal (seed s): a
  gauge (x -> x + c 1), J^T J's Cholesky meets a rounding-size pivot;
  truth pinv(A P). L-BFGS: f = ||r||^2 / 2.
- units: the gauge of r = (0.7 d - t0, 0.3 d - t1, 1e-5 (x2 - t2)), d = x0 -
  x1 (x2 in units whose column is 1e-5); truth pinv(J). L-BFGS: f =
  (x0 - x1 - t0)^2 / 2 + 1e-10 (x2 - t1)^2 / 2 (truth: pinv of its H).
- ill: r = J x - t, J = [[1, 1], [1, 1 + 2e-5]] (cond(J^T J) 4e10), relative
  error against inv(J) (eps cond(J) 9e-12 from rounding the data alone:
  about 1e-6 expected for the solve's J^T J).

Run (main's rule against this tree's, side by side):
  PYTHONPATH=<old tree> python benchmarks/dense_backward_acceptance.py
  PYTHONPATH=. python benchmarks/dense_backward_acceptance.py
"""

import numpy as np
import tensorflow as tf

import tfg_optim
from tfg_optim import lbfgs


def least_squares(residual, start, theta, hessian):
  theta = tf.constant(theta, tf.float64)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(theta)
    x = tfg_optim.least_squares(lambda x: residual(x, theta),
                                tf.constant(start, tf.float64),
                                implicit_hessian=hessian).position
  return tape.jacobian(x, theta, experimental_use_pfor=False).numpy()


def minimize(method, objective, start, theta):
  theta = tf.constant(theta, tf.float64)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(theta)
    x = method(lambda x: objective(x, theta), tf.constant(start, tf.float64),
               dtype="float64", max_iters=200)[2]
  return tape.jacobian(x, theta, experimental_use_pfor=False).numpy()


def error(got, want, relative=False):
  if not np.all(np.isfinite(got)):
    return "NaN"
  value = np.abs(got - want).max()
  return f"{value / np.abs(want).max() if relative else value:.1e}"


A_HIDDEN = 1e-3
B_HIDDEN = np.sqrt((A_HIDDEN ** 2 + 1e-9) / 2)
ILL = np.array([[1.0, 1.0], [1.0, 1.0 + 2e-5]])


def hidden(x, t):
  return tf.stack([x[0] - t[0], A_HIDDEN * (x[1] - t[1]),
                   B_HIDDEN * (1.0 - x[1] ** 2)])


def saddle(x, t):
  return 0.5 * x[0] ** 2 - 0.5e-9 * x[1] ** 2 - t[0] * x[0] + t[1] * x[1]


def centered(seed):
  a = np.random.default_rng(seed).standard_normal((5, 4))
  return a, a @ (np.eye(4) - 0.25)


def gauge_residual(a):
  return lambda x, t: tf.linalg.matvec(a, x - tf.reduce_mean(x)) - t


def units(x, t):
  d = x[0] - x[1]
  return tf.stack([0.7 * d - t[0], 0.3 * d - t[1], 1e-5 * (x[2] - t[2])])


def units_objective(x, t):
  return 0.5 * (x[0] - x[1] - t[0]) ** 2 + 0.5e-10 * (x[2] - t[1]) ** 2


def main():
  rows = []
  saddle_truth = np.diag([1.0, -1000.0])  # (what NumPy's solve gives)
  for hessian in ("gauss_newton", "exact"):
    name = f"least_squares {hessian}"
    if hessian == "exact":
      rows.append((name, "hidden", error(least_squares(
          hidden, [0.0, 0.0], [0.5, 0.0], hessian), saddle_truth)))
    for seed in (0, 1, 3, 5):
      a, j = centered(seed)
      rows.append((name, f"gauge {seed}", error(least_squares(
          gauge_residual(a), np.zeros(4), np.zeros(5), hessian),
                                              np.linalg.pinv(j))))
    j = np.array([[0.7, -0.7, 0.0], [0.3, -0.3, 0.0], [0.0, 0.0, 1e-5]])
    rows.append((name, "units", error(least_squares(
        units, np.zeros(3), [1.0, 2.0, 3.0], hessian),
                                      np.linalg.pinv(j) @ np.diag(
                                          [1.0, 1.0, 1e-5]))))
    rows.append((name, "ill", error(least_squares(
        lambda x, t: tf.linalg.matvec(ILL, x) - t, np.zeros(2), [1.0, 2.0],
        hessian), np.linalg.inv(ILL), relative=True)))
  for method in (lbfgs.minimize_lbfgs, lbfgs.minimize_bfgs):
    name = method.__name__
    rows.append((name, "hidden", error(minimize(
        method, saddle, [0.0, 0.0], [0.5, 0.0]), np.diag([1.0, 1e9]))))
    for seed in (0, 1, 3, 5):
      a, j = centered(seed)
      residual = gauge_residual(a)
      rows.append((name, f"gauge {seed}", error(minimize(
          method, lambda x, t, r=residual: 0.5 * tf.reduce_sum(r(x, t) ** 2),
          np.zeros(4), np.zeros(5)), np.linalg.pinv(j))))
    h = np.array([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 1e-10]])
    cross = np.array([[-1.0, 0.0], [1.0, 0.0], [0.0, -1e-10]])
    rows.append((name, "units", error(minimize(
        method, units_objective, np.zeros(3), [1.0, 2.0]),
                                      -np.linalg.pinv(h) @ cross)))
  for row in rows:
    print(f"{row[0]:28s} {row[1]:10s} {row[2]}")


if __name__ == "__main__":
  main()
