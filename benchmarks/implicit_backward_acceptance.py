"""The implicit backward solves' acceptance on the reproducers of the review
of branch implicit2 (review21_repro/): the relative error of each backward
solve against NumPy float64 truth, or NaN.

On the pair graph of tests/test_factor_graph_implicit.py (`_pair_graph`:
f_k = w_k (L (a_i - c b_j) - y_k), 7 rows of 2, 8 edges; J = A known in
closed form), per solver ('cholesky', 'sparse_cholesky', 'schur', 'cg'):

- hidden: nothing held (a gauge: the two translations), H = A^T A + x s
  Q_x (Q_x moves the x translation's eigenvalue to x s, s = max_j
  ||A_j||^2), rhs = A^T c + r ||A^T c|| t_x: x < 0 must give NaN; x >= 0
  the pseudo-inverse's w on H's range (error of w's projection on the
  eigenvectors with |lambda| > 1e-13 s);
- illcond: a_0 held, L = [[1, 1], [1, 1 + e]] (cond(A_F^T A_F) 2e8 at
  e = 1e-3, 2e10 at 1e-4, 2e12 at 1e-5), float64 and (e = 0.1, 0.03: cond 2e4, 2e5;
  0.01, 0.001: cond 2e6, 2e8, a weak subspace below sqrt(eps), review22's
  f32band: right to eps cond or NaN) float32, Gauss-Newton and exact (H = J^T J's blocks): A w against
  pinv(A_F)^T u;
- scaled: nothing held, b in units c = 1e-3, 1e-5 (and 1);
- f32: nothing held, float32, L = [[2, 0.5], [-0.3, l]] (range condition
  21, 180, 840 for l = 1, 0.3, 0.1);
- api: tfg_optim.factor_graph.least_squares('schur') on the held-row
  graph at e = 1e-4 (cond 2e10), u^T dx/dy against the closed form.

Run: PYTHONPATH=. python benchmarks/implicit_backward_acceptance.py
"""

import numpy as np
import tensorflow as tf

from tests import test_factor_graph_implicit as T
from tfg_optim import _block_sparse
from tfg_optim import _implicit

_implicit.CG_MAX_ITERATIONS = 300
SOLVERS = ("cholesky", "sparse_cholesky", "schur", "cg")


def show(value):
  return "NaN" if not np.isfinite(value) else f"{value:.1e}"


def pair_error(graph, w, u):
  truth = T._pair_truth(graph, u)  # pylint: disable=protected-access
  return np.linalg.norm(graph["design"] @ w - truth) / np.linalg.norm(truth)


def gauss_newton(graph, solver, u):
  dtype = graph["dtype"]
  w, _ = _implicit.backward_solve(
      graph["linearizations"][solver], tf.constant(u * graph["free"], dtype),
      tf.constant(graph["free"], dtype))
  return w.numpy().astype(np.float64)


def exact(graph, solver, u, blocks=None):
  w, ok = T._exact_solve(graph, solver,  # pylint: disable=protected-access
                         graph["gram"] if blocks is None else blocks, u)
  return w if ok else np.full_like(w, np.nan)


def hidden():
  graph = T._pair_graph()  # pylint: disable=protected-access
  design = graph["design"]
  scale = np.max(np.sum(np.square(design), 0))
  along_x = np.kron(np.ones([2, 2]), np.diag([1.0, 0.0])) * 7 / 32 * scale
  t_x = np.tile([1.0, 0.0], 7) / np.sqrt(7)
  c = np.random.default_rng(8).normal(size=16)
  for x, r in [(-0.5 * 1.49e-8, 1e-5), (-0.5 * 1.49e-8, 1e-9),
               (-0.02 * 1.49e-8, 1e-5), (-1e-9, 0.0), (0.0, 1e-3),
               (1e-11, 1e-3), (3e-9, 1e-3)]:
    blocks = graph["gram"] + x * along_x
    rhs = design.T @ c
    rhs = rhs + r * np.linalg.norm(rhs) * t_x
    hessian = _block_sparse.EdgeHessian(
        graph["layout"], [tf.constant(blocks)]).dense().numpy()
    values, vectors = np.linalg.eigh(hessian)
    kept = np.abs(values) > 1e-13 * scale
    truth = np.linalg.pinv(hessian, rcond=1e-13) @ rhs
    out = []
    for solver in SOLVERS:
      w = exact(graph, solver, rhs, blocks)
      error = (np.linalg.norm(vectors[:, kept].T @ (w - truth)) /
               np.linalg.norm(vectors[:, kept].T @ truth))
      out.append(f"{solver}={show(error)}")
    print(f"hidden x={x:.2e} s r={r:.0e} (expect "
          f"{'NaN' if x < 0 else 'finite'}):", " ".join(out), flush=True)


def illcond(dtype, values):
  for e in values:
    graph = T._pair_graph(np.array([[1.0, 1.0], [1.0, 1.0 + e]]), dtype,  # pylint: disable=protected-access
                          held=True)
    free_design = graph["design"][:, 2:]
    u = np.random.default_rng(8).normal(size=14) * graph["free"]
    out = []
    for solver in SOLVERS:
      for label, method in (("GN", gauss_newton), ("exact", exact)):
        out.append(f"{solver}/{label}="
                   f"{show(pair_error(graph, method(graph, solver, u), u))}")
    print(f"illcond {dtype.name} e={e} cond "
          f"{np.linalg.cond(free_design.T @ free_design):.1e}:",
          " ".join(out), flush=True)


def scaled():
  for unit in (1.0, 1e-3, 1e-5):
    graph = T._pair_graph(unit=unit)  # pylint: disable=protected-access
    u = np.random.default_rng(8).normal(size=14)
    out = []
    for solver in SOLVERS:
      for label, method in (("GN", gauss_newton), ("exact", exact)):
        out.append(f"{solver}/{label}="
                   f"{show(pair_error(graph, method(graph, solver, u), u))}")
    print(f"scaled unit={unit}:", " ".join(out), flush=True)


def single():
  for last in (1.0, 0.3, 0.1):
    graph = T._pair_graph(np.array([[2.0, 0.5], [-0.3, last]]), tf.float32)  # pylint: disable=protected-access
    u = np.random.default_rng(8).normal(size=14)
    out = []
    for solver in SOLVERS:
      for label, method in (("GN", gauss_newton), ("exact", exact)):
        out.append(f"{solver}/{label}="
                   f"{show(pair_error(graph, method(graph, solver, u), u))}")
    print(f"f32 l={last}:", " ".join(out), flush=True)


def api():
  saved = T._L  # pylint: disable=protected-access
  T._L = np.array([[1.0, 1.0], [1.0, 1.0001]])  # pylint: disable=protected-access
  closed, _ = T._linear_closed_form()  # pylint: disable=protected-access
  y, anchor = tf.constant(T._Y), tf.constant(T._A0)  # pylint: disable=protected-access
  u = np.random.default_rng(1).normal(size=12)
  out = []
  for solver in ("schur", "sparse_cholesky", "cholesky"):
    for hessian in ("gauss_newton", "exact"):
      with tf.GradientTape() as tape:
        tape.watch(y)
        a, b = T._linear_solve(y, anchor, solver, implicit_hessian=hessian)  # pylint: disable=protected-access
        flat = tf.concat([tf.reshape(a[1:], [-1]), tf.reshape(b, [-1])], 0)
      g = tape.gradient(flat, y, output_gradients=tf.constant(u)).numpy()
      truth = closed.T @ u
      out.append(f"{solver}/{hessian}="
                 f"{show(np.linalg.norm(g.reshape(-1) - truth) / np.linalg.norm(truth))}")
  T._L = saved  # pylint: disable=protected-access
  print("api e=1e-4 cond 2e10:", " ".join(out), flush=True)


if __name__ == "__main__":
  hidden()
  illcond(tf.float64, (1e-3, 1e-4, 1e-5))
  illcond(tf.float32, (0.1, 0.03, 0.01, 0.001))
  scaled()
  single()
  api()
