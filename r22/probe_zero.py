import numpy as np, tensorflow as tf, tfg_optim
from tfg_optim import _linearization
m = 64
Z = np.stack([_linearization._rademacher([m], p, tf.float64).numpy() for p in range(8)])
pairs = [(i, k) for i in range(m) for k in range(i + 1, m) if np.all(Z[:, i] == -Z[:, k])]
print("PAIRS", pairs[:5], len(pairs))
i, k = pairs[0]
# residual of length m: x0 enters rows i and k (a mean of two data), x1..: each one row
y = tf.constant(np.linspace(1, 2, m))
def res(x):

  rows = [None] * m
  others = [j for j in range(m) if j not in (i, k)]
  for idx, j in enumerate(others):
    rows[j] = x[1 + idx] - y[j]
  rows[i] = x[0] - y[i]
  rows[k] = x[0] - y[k]
  return tf.stack(rows)
n = m - 1
x0 = tf.zeros([n], tf.float64)
for solver in ("cg", "auto"):
  with tf.GradientTape() as tape:
    tape.watch(y)
    r = tfg_optim.least_squares(res, x0, linear_solver=solver)
    out = r.position[0]
  g = tape.gradient(out, y).numpy()
  print(f"PROBE {solver}: x0={r.position[0].numpy():.6f} (truth {(y[i].numpy()+y[k].numpy())/2:.6f}) dx0/dy[i,k]={g[i]:.3f},{g[k]:.3f} (truth 0.5,0.5)")
