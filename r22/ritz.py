import sys, numpy as np, tensorflow as tf
sys.path.append('/work/wt/review22')
import benchmarks.implicit_backward_acceptance as B
from tests import test_factor_graph_implicit as T
from tfg_optim import _implicit
orig = tf.linalg.eigh
def eigh(m):
  v, q = orig(m); print("   ritz", np.array2string(v.numpy(), precision=2)); return v, q
_implicit.tf.linalg.eigh = eigh  # same tf module object; restore after
for label, dtype, L, held in [("f32 gauge l=1", tf.float32, [[2, .5], [-.3, 1.]], False),
                              ("f32 gauge l=0.1", tf.float32, [[2, .5], [-.3, .1]], False),
                              ("f32 held e=0.01", tf.float32, [[1, 1], [1, 1.01]], True),
                              ("f64 gauge", tf.float64, [[2, .5], [-.3, 1.]], False),
                              ("f64 held e=3e-7", tf.float64, [[1, 1], [1, 1 + 3e-7]], True)]:
  graph = T._pair_graph(np.array(L), dtype, held=held)
  u = np.random.default_rng(8).normal(size=14) * graph["free"]
  print(label, "rho", [float(x) for x in _implicit.rounding_levels(dtype, graph["free"].sum())])
  for solver in ("cholesky",):
    print("  GN err", B.show(B.pair_error(graph, B.gauss_newton(graph, solver, u), u)))
