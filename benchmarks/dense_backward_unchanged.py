"""Gradients on the existing tests' problems (tests/test_implicit.py: a
linear 6 x 3 least squares with respect to A and b, the curve fit, an
active bound, a batch of three curve fits, the quadratic minimized by
L-BFGS and BFGS), saved to an .npz, to compare two trees:

  PYTHONPATH=<old tree> python benchmarks/dense_backward_unchanged.py old.npz
  PYTHONPATH=. python benchmarks/dense_backward_unchanged.py new.npz

(integ22 against densebwd: every one equal to 1.2e-15 relative.)
"""
import sys

import numpy as np
import tensorflow as tf

import tfg_optim
from tfg_optim import lbfgs

out = {}
def jac(f, theta):
  theta = tf.constant(theta)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(theta)
    y = f(theta)
  return tape.jacobian(y, theta, experimental_use_pfor=False).numpy()
rng = np.random.default_rng(0)
a = rng.standard_normal((6, 3)); b = rng.standard_normal(6)
T = np.linspace(0, 1, 8); Y = 2.0 * np.exp(-1.3 * T) + 0.05 * np.sin(9 * T)
for h in ("gauss_newton", "exact"):
  out["linear_b_" + h] = jac(lambda bb: tfg_optim.least_squares(lambda x: tf.linalg.matvec(a, x) - bb, tf.zeros(3, tf.float64), implicit_hessian=h).position, b)
  out["linear_A_" + h] = jac(lambda aa: tfg_optim.least_squares(lambda x: tf.linalg.matvec(aa, x) - b, tf.zeros(3, tf.float64), implicit_hessian=h).position, a)
  out["curve_" + h] = jac(lambda y: tf.stack(tfg_optim.least_squares(lambda p, q: p * tf.exp(q * T) - y, [tf.constant(1.0, tf.float64), tf.constant(-1.0, tf.float64)], implicit_hessian=h).position), Y)
  out["bounds_" + h] = jac(lambda bb: tfg_optim.least_squares(lambda x: tf.linalg.matvec(a, x) - bb, tf.zeros(3, tf.float64), bounds=([0.0, -10.0, -10.0], [10.0, 10.0, 10.0]), implicit_hessian=h).position, b)
ys = np.stack([Y, 0.5 * Y, 2 * Y])
out["batch_gn"] = jac(lambda y: tfg_optim.least_squares(lambda p: p[..., :1] * tf.exp(p[..., 1:] * T) - y, tf.constant([[1.0, -1.0]] * 3, tf.float64), batch_dims=1).position, ys)
m = rng.standard_normal((4, 4)); A = m @ m.T + 4 * np.eye(4); bq = rng.standard_normal(4)
for method in (lbfgs.minimize_lbfgs, lbfgs.minimize_bfgs):
  out[method.__name__] = jac(lambda bb: method(lambda x: 0.5 * tf.reduce_sum(x * tf.linalg.matvec(A, x)) - tf.reduce_sum(bb * x), tf.zeros(4, tf.float64), dtype="float64", max_iters=100)[2], bq)
np.savez(sys.argv[1], **out)
