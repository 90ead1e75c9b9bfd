"""Gradients and times through least_squares on ordinary problems (run under
both trees): prints per case gradient vector (hash), op count, fwd/fwd+bwd times."""
import sys, time, numpy as np, tensorflow as tf
import tfg_optim
from tfg_optim import factor_graph
tf.config.threading.set_inter_op_parallelism_threads(1)
tf.config.threading.set_intra_op_parallelism_threads(1)
rng = np.random.default_rng(0)
# curve fit
t = tf.constant(np.linspace(0, 2, 200))
yc = tf.constant(2.0 * np.exp(-1.3 * np.linspace(0, 2, 200)) + 0.3 + 0.01 * rng.normal(size=200))
def curve(solver, hess):
  @tf.function
  def f(y):
    with tf.GradientTape() as tape:
      tape.watch(y)
      r = tfg_optim.least_squares(lambda p: p[0] * tf.exp(-p[1] * t) + p[2] - y,
                                  tf.constant([1.0, 1.0, 0.0], tf.float64),
                                  linear_solver=solver, implicit_hessian=hess)
      out = tf.reduce_sum(r.position * tf.constant([1.0, -2.0, 0.5], tf.float64))
    return out, tape.gradient(out, y)
  return f, (yc,)
# bipartite range graph: anchors a (a_0 held), points b
A = 10; Bn = 20; K = 80
pairs = np.stack([rng.integers(0, A, K), rng.integers(0, Bn, K)], 1)
ta = rng.normal(size=[A, 2]); tb = rng.normal(size=[Bn, 2])
meas = tf.constant(np.linalg.norm(ta[pairs[:, 0]] - tb[pairs[:, 1]], axis=1)[:, None] + 0.01 * rng.normal(size=[K, 1]))
prior = tf.constant(tb + 0.01 * rng.normal(size=[Bn, 2]))
def graph(solver, hess):
  @tf.function
  def f(y):
    with tf.GradientTape() as tape:
      tape.watch(y)
      a = factor_graph.Variables(tf.constant(ta + 0.05), fixed=[0], name="a")
      b = factor_graph.Variables(tf.constant(tb + 0.05), name="b")
      rng_term = factor_graph.Term(lambda u, v, d: tf.norm(u - v, axis=-1, keepdims=True) - d,
                                   [(a, pairs[:, 0]), (b, pairs[:, 1])], data=[y])
      pr = factor_graph.Term(lambda u, v, d: 0.3 * (v - d), [(a, np.zeros(Bn, np.int64)), (b, np.arange(Bn))], data=[prior])
      r = factor_graph.least_squares([a, b], [rng_term, pr], linear_solver=solver,
                                     implicit_hessian=hess)
      out = tf.reduce_sum(r.position[1] * tf.constant(np.arange(2 * Bn).reshape(Bn, 2) % 7 - 3.0)) + tf.reduce_sum(r.position[0])
    return out, tape.gradient(out, y)
  return f, (meas,)
cases = [("curve", "dense", h) for h in ("gauss_newton", "exact")]
cases += [("graph", s, h) for s in ("cholesky", "sparse_cholesky", "schur", "iterative_schur", "cg")
          for h in ("gauss_newton", "exact")]
only = sys.argv[1:] 
for name, solver, hess in cases:
  if only and f"{name}/{solver}/{hess}" not in only: continue
  try:
    f, args = (curve if name == "curve" else graph)(solver, hess)
    cf = f.get_concrete_function(*args)
    ops = len(cf.graph.get_operations()) + sum(len(fn.definition.node_def) for fn in cf.graph._functions.values())
    v, g = f(*args)
    ts = []
    for _ in range(5):
      s = time.perf_counter(); f(*args)[1].numpy(); ts.append(time.perf_counter() - s)
    g = g.numpy()
    print(f"RES {name}/{solver}/{hess} ops={ops} t={min(ts)*1e3:.1f}ms g[:3]={g.ravel()[:3]} norm={np.linalg.norm(g):.15e}", flush=True)
    np.save(f"/tmp/r22_{name}_{solver}_{hess}_{sys.argv[0].split('/')[-2]}.npy", g)
  except Exception as e:
    print(f"RES {name}/{solver}/{hess} ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
