import sys, numpy as np, tensorflow as tf
sys.path.append('/work/wt/review22')
import benchmarks.implicit_backward_acceptance as B
from tests import test_factor_graph_implicit as T
for e in [3e-6, 1e-6, 3e-7]:
  graph = T._pair_graph(np.array([[1.0, 1.0], [1.0, 1.0 + e]]), tf.float64, held=True)
  fd = graph["design"][:, 2:]
  u = np.random.default_rng(8).normal(size=14) * graph["free"]
  out = []
  for solver in B.SOLVERS:
    for label, method in (("GN", B.gauss_newton), ("exact", B.exact)):
      out.append(f"{solver}/{label}={B.show(B.pair_error(graph, method(graph, solver, u), u))}")
  D = np.sum(fd**2, 0); Hs = fd.T@fd/np.sqrt(np.outer(D,D))
  print(f"f64 e={e} cond {np.linalg.cond(fd.T@fd):.1e} lmin_s {np.linalg.eigvalsh(Hs)[0]:.1e}:", " ".join(out), flush=True)
