import sys, numpy as np, tensorflow as tf
sys.path.append('/work/wt/review22')
from tests import test_factor_graph_implicit as T
from tfg_optim import factor_graph
T._L = np.array([[1.0, 1.0], [1.0, 1.0001]])
y, anchor = tf.constant(T._Y), tf.constant(T._A0)
for solver in ("cholesky", "sparse_cholesky", "schur", "cg"):
  for hess in ("gauss_newton", "exact"):
    with tf.GradientTape() as tape:
      tape.watch(y)
      a = factor_graph.Variables(tf.concat([anchor[tf.newaxis], tf.zeros([2, 2], tf.float64)], 0), fixed=[0], name="a")
      b = factor_graph.Variables(tf.zeros([4, 2], tf.float64), name="b")
      m = tf.constant(T._L)
      term = factor_graph.Term(lambda x, z, d: tf.linalg.matvec(m, x - z) - d,
                               [(a, T._PAIRS[:, 0]), (b, T._PAIRS[:, 1])], data=[y])
      r = factor_graph.least_squares([a, b], [term], linear_solver=solver, implicit_hessian=hess, max_iterations=100)
      cost = r.cost
    g = tape.gradient(cost, y).numpy()
    # envelope: dcost/dy = -residual
    res = r.residual.numpy().reshape(g.shape)
    print(f"COST {solver}/{hess}: finite={np.all(np.isfinite(g))} err vs -r: {np.nanmax(np.abs(g + res)):.1e} |r|={np.abs(res).max():.1e}")
