import numpy as np, tensorflow as tf, tfg_optim
y = tf.constant([1.0, 2.0, 0.5], tf.float64)
def res(x):
  return tf.stack([x[0] - x[1] - y[0], x[1] - y[1], 0.1 * (x[2] - y[2])])
x0 = tf.constant([0.0, 0.0, 0.0], tf.float64)
for groups in (None, [0, 1, 2], [0, 0, 1], [0, 0, 0]):
  for mode in ("eager", "function", "xla"):
    def run(y_):
      with tf.GradientTape() as tape:
        tape.watch(y_)
        global y
        y = y_
        r = tfg_optim.least_squares(res, x0, linear_solver="cg", column_groups=groups)
        out = tf.reduce_sum(r.position * tf.constant([1.0, 2.0, 3.0], tf.float64))
      return r.position, r.stop_reason if hasattr(r, "stop_reason") else tf.constant(0), tape.gradient(out, y_)
    f = run if mode == "eager" else tf.function(run, jit_compile=(mode == "xla"))
    try:
      p, s, g = f(tf.constant([1.0, 2.0, 0.5], tf.float64))
      print(f"GROUPS {groups} {mode}: x={np.round(p.numpy(), 10)} (truth [3 2 0.5]) grad={np.round(g.numpy(), 8)} (truth [1 3 300])")
    except Exception as e:
      print(f"GROUPS {groups} {mode}: {type(e).__name__} {str(e).splitlines()[0][:200]}")
