import numpy as np, tensorflow as tf, tfg_optim
t = tf.constant(np.linspace(0, 1, 20))
def make(ys):
  def res(x):  # member 0: regular exp fit; member 1 same model with gauge if flag
    a, b, c = x[..., 0:1], x[..., 1:2], x[..., 2:3]
    gauge = tf.constant([[0.0], [1.0]], tf.float64)[:x.shape[0]] if x.shape.rank == 2 else 0.0
    # with gauge=1: c enters as (c + a) -> a and c not separately identifiable? use a*(exp) + c + gauge*(a) ... keep simple:
    return (a + gauge * c) * tf.exp(-b * t) + (1 - gauge) * c - ys
  return res
y0 = 2.0 * np.exp(-1.3 * np.linspace(0, 1, 20)) + 0.3 + 0.01 * np.sin(np.arange(20))
y1 = 1.5 * np.exp(-0.7 * np.linspace(0, 1, 20)) + 0.02 * np.cos(np.arange(20))
for label, Y in (("alone", np.stack([y0])), ("batch", np.stack([y0, y1]))):
  Yt = tf.constant(Y)
  with tf.GradientTape() as tape:
    tape.watch(Yt)
    r = tfg_optim.least_squares(make(Yt), tf.constant([[1.0, 1.0, 0.0]] * len(Y), tf.float64), batch_dims=1, linear_solver="cg")
    out = tf.reduce_sum(r.position * tf.constant([1.0, -2.0, 0.5], tf.float64))
  g = tape.gradient(out, Yt).numpy()
  print(f"BATCH {label}: member0 grad norm {np.linalg.norm(g[0]):.15e}; others {[np.linalg.norm(x) for x in g[1:]]}")
