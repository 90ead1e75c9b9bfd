import sys
src = open('/work/wt/review22/r22/cmp.py').read().replace("@tf.function", "@tf.function(jit_compile=True)")
src = src[:src.index("only = sys.argv")]
exec(src)
for name, solver, hess in cases:
  f, args = (curve if name == "curve" else graph)(solver, hess)
  try:
    v, g = f(*args)
    print(f"XLA {name}/{solver}/{hess} ok norm={np.linalg.norm(g.numpy()):.12e}", flush=True)
  except Exception as e:
    print(f"XLA {name}/{solver}/{hess} ERROR {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
