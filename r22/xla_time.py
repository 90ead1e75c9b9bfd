import time
src = open('/work/wt/review22/r22/cmp.py').read().replace("@tf.function", "@tf.function(jit_compile=True)")
src = src[:src.index("only = sys.argv")]
exec(src)
for name, solver, hess in [("graph", "sparse_cholesky", "gauss_newton"), ("graph", "schur", "exact"), ("graph", "cg", "exact")]:
  f, args = graph(solver, hess)
  s = time.perf_counter(); f(*args)[1].numpy(); first = time.perf_counter() - s
  ts = []
  for _ in range(5):
    s = time.perf_counter(); f(*args)[1].numpy(); ts.append(time.perf_counter() - s)
  print(f"XT {solver}/{hess} first call {first:.1f}s steady {min(ts)*1e3:.1f}ms", flush=True)
