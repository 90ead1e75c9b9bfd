import sys, numpy as np, tensorflow as tf
sys.path.append('/work/wt/review22')
from tests import test_factor_graph_implicit as T
from tfg_optim import _implicit
for e in (1e-2, 1e-4):
  graph = T._pair_graph(np.array([[1.0, 1.0], [1.0, 1.0 + e]]), tf.float64, held=True)
  for solver in ("cholesky", "sparse_cholesky", "schur", "cg"):
    w, ok = _implicit.backward_solve(graph["linearizations"][solver], tf.zeros([14], tf.float64),
                                     tf.constant(graph["free"]))
    print(f"ZERO e={e} {solver}: w finite={np.all(np.isfinite(w.numpy()))} max|w|={np.nanmax(np.abs(w.numpy()))} ok={ok.numpy()}")
