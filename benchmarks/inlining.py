"""First-call CPU of dense products inlined vs called, in one process.

`_linearization.trace_once(f, called=...)` decides whether graphs call a
traced product (one function body, instantiated and optimized once) or
inline it at every call site. This script measures what that choice costs
the first call (trace + graph optimization + one solve) of small fits, the
two ways alternated in one process so that machine load, which swings the
wall clock several-fold on a shared 2-core machine, hits both alike:

  called   every `trace_once` function called (the 2026-12-02 code);
  inlined  the dense forward/tangent products inlined, the matrix-free,
           chunked and block-sparse functions called (the current code).

Cases: `default` (the curve fit y = a exp(b t), m = 50, default options),
`nls` (Nielsen damping, no acceleration), `spheredense` / `spherecg` (a
batch of two sphere fits, dense / conjugate gradients; a cell of
tests/conformance.py), `so3` (a Riemannian rotation fit), `cg` (the curve
fit by conjugate gradients). Each round builds fresh `tf.function`s; round 0
warms TensorFlow's per-op caches and is dropped; the order of the two ways
alternates by round. Reported: median process CPU seconds
(`time.process_time`) per way, their ratio, and in how many rounds inlining
was the cheaper.

    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/inlining.py
    ... --cases default,cg --rounds 10
    ... --jit                      # jit_compile=True: XLA compilation
"""

import statistics
import time

import numpy as np
import tensorflow as tf

import _harness
import tfg_optim
from tfg_optim import _linearization
from tfg_optim import manifolds
from tfg_optim import riemannian

CASES = ("default", "nls", "spheredense", "so3", "cg", "spherecg")
_WAY = ["inlined"]
_trace_once = _linearization.trace_once


def _trace_once_for_way(function, called=True):
  return _trace_once(function, called=called or _WAY[0] == "called")


def _problem(case, shift):
  """(function to wrap in tf.function, its arguments)."""
  constant = lambda value: tf.constant(value, tf.float64)
  t = np.linspace(0.0, 1.0, 50)
  y = 2.0 * np.exp(-1.3 * t)
  curve = lambda a, b: a * tf.exp(b * t) - y
  start = (constant(1.0 + shift), constant(-1.0))
  options = {"default": {},
             "nls": dict(damping="nielsen", geodesic_acceleration=None),
             "cg": dict(linear_solver="cg")}
  if case in options:
    return (lambda a, b: tfg_optim.least_squares(
        curve, [a, b], **options[case]).position), start
  rng = np.random.default_rng(7)
  if case in ("spheredense", "spherecg"):
    b = rng.standard_normal((5, 3))
    target = b @ np.array([0.48, -0.6, 0.64])
    solver = "cg" if case == "spherecg" else "auto"
    return (lambda p: tfg_optim.least_squares(
        lambda p: tf.linalg.matvec(b, p) - target, p,
        manifold=manifolds.Sphere(3), linear_solver=solver,
        batch_dims=1).position), (
            constant([[0.0, 0.0, 1.0], [0.6, 0.0, 0.8]]),)
  if case == "so3":
    points = rng.standard_normal((8, 3))
    return (lambda r: riemannian.levenberg_marquardt(
        manifolds.SpecialOrthogonal(3),
        lambda r: tf.matmul(points, r, transpose_b=True) - points, r)), (
            tf.eye(3, dtype=tf.float64) * (1.0 + 0.0 * shift),)
  raise ValueError(f"unknown case {case!r}")


def main():
  parser = _harness.parser(__doc__)
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument("--rounds", type=int, default=6)
  parser.add_argument("--jit", action="store_true",
                      help="jit_compile=True: XLA compilation instead of graph optimization")
  args = parser.parse_args()
  _linearization.trace_once = _trace_once_for_way
  cases = args.cases.split(",")
  seconds = {}
  for round_index in range(args.rounds + 1):
    ways = ("called", "inlined") if round_index % 2 else ("inlined", "called")
    for case in cases:
      for way in ways:
        _WAY[0] = way
        function, arguments = _problem(case, round_index)
        fresh = tf.function(function, autograph=False, jit_compile=args.jit)
        begin = time.process_time()
        fresh.get_concrete_function(*arguments)
        fresh(*arguments)
        if round_index:
          seconds.setdefault((case, way), []).append(
              time.process_time() - begin)
  rows = []
  for case in cases:
    called, inlined = seconds[(case, "called")], seconds[(case, "inlined")]
    rows.append([case, f"{statistics.median(called):.3f}",
                 f"{statistics.median(inlined):.3f}",
                 f"{statistics.median(inlined) / statistics.median(called):.2f}",
                 f"{sum(b < a for a, b in zip(called, inlined))}/{len(called)}"])
  _harness.print_table(["case", "called: first call CPU [s]",
                        "inlined: first call CPU [s]", "inlined / called",
                        "rounds inlined cheaper"], rows)
  print(f"\nMedians over {args.rounds} rounds after a warm-up round; "
        "process CPU seconds of trace + first call.")


if __name__ == "__main__":
  main()
