"""NIST StRD nonlinear regression: tfg_optim.least_squares vs scipy 'lm'.

Fits all 27 datasets from both NIST starts (54 problems) with the DEFAULT
options of `tfg_optim.least_squares` (autodiff Jacobian, float64, the two
starts of a dataset solved as a batch of 2 in one `tf.function`), and in the
same run scipy `least_squares(method='lm')` (MINPACK) with the exact Jacobian
(the same model, differentiated by TensorFlow) at scipy's default tolerances
(ftol = xtol = gtol = 1e-8) and at 1e-15. Accuracy is the minimum over the
parameters of the log relative error to the certified values,
LRE = -log10(|b - c| / |c|), capped at 11. Prints a markdown table
(docs/nist.md holds one). With --float32 (or --dtype float32), fits in
float32 instead and reports our LRE only. Run:

    PYTHONPATH=. python benchmarks/nist_strd.py [--float32] [names...]

Other options of ours: --damping nielsen, --geodesic-acceleration 0.75
(or none), e.g. `--damping nielsen MGH10`.
"""

import time

import numpy as np
import scipy.optimize
import tensorflow as tf

import _harness
from tests import nist
from tfg_optim import StopReason


def _scipy_fit(dataset, start, tolerance):
  residual_tf = nist.residual_fn(dataset, nist.TF)

  @tf.function(autograph=False)
  def jacobian(b):
    with tf.GradientTape() as tape:
      tape.watch(b)
      value = residual_tf(b)
    return tape.jacobian(value, b)

  residual = nist.residual_fn(dataset, nist.NP)
  options = {} if tolerance is None else dict(ftol=tolerance, xtol=tolerance,
                                              gtol=tolerance)
  result = scipy.optimize.least_squares(
      residual, start, jac=lambda b: jacobian(tf.constant(b)).numpy(),
      method="lm", **options)
  return result.x, result.nfev, result.njev


def main():
  parser = _harness.parser(__doc__, dtype="float64")
  parser.add_argument("--float32", action="store_true",
                      help="the same as --dtype float32")
  parser.add_argument("--damping", default="trust_region",
                      help="least_squares damping (default: trust_region)")
  parser.add_argument("--geodesic-acceleration", default=None,
                      help="alpha, or 'none'; default: least_squares' own")
  parser.add_argument("names", nargs="*", default=list(nist.NAMES))
  args = parser.parse_args()
  args.float32 = args.float32 or args.dtype == "float32"
  dtype = tf.float32 if args.float32 else tf.float64
  rows = []
  start_time = time.time()
  for name in args.names:
    dataset = nist.load(name)
    options = dict(damping=args.damping)
    if args.geodesic_acceleration is not None:
      options["geodesic_acceleration"] = (
          None if args.geodesic_acceleration == "none" else
          float(args.geodesic_acceleration))
    result = nist.solve(dataset, dtype, **options)
    for s in range(2):
      ours = nist.lre(result.position[s], dataset.certified).min()
      finite = bool(np.all(np.isfinite(result.position[s])))
      row = dict(name=name, start=s + 1, difficulty=dataset.difficulty,
                 ours=ours, finite=finite,
                 iterations=int(result.num_iterations[s]),
                 residual_evaluations=int(result.num_residual_evaluations[s]),
                 jacobian_evaluations=int(result.num_jacobian_evaluations[s]),
                 stop=StopReason(int(result.stop_reason[s])).name.lower())
      if not args.float32:
        for key, tolerance in (("default", None), ("tight", 1e-15)):
          x, nfev, njev = _scipy_fit(dataset, dataset.starts[s], tolerance)
          row[key] = nist.lre(x, dataset.certified).min()
          row[key + "_evaluations"] = f"{nfev}/{njev}"
      rows.append(row)
  elapsed = time.time() - start_time

  if args.float32:
    _harness.print_table(
        ("dataset", "start", "LRE (float32)", "finite", "iterations",
         "evaluations F/J", "stop"),
        [(r["name"], r["start"], f"{r['ours']:.1f}", r["finite"],
          r["iterations"],
          f"{r['residual_evaluations']}/{r['jacobian_evaluations']}",
          r["stop"]) for r in rows])
  else:
    _harness.print_table(
        ("dataset", "start", "ours LRE", "iterations", "evaluations F/J",
         "stop", "scipy default LRE", "F/J", "scipy 1e-15 LRE", "F/J"),
        [(r["name"], r["start"], f"{r['ours']:.1f}", r["iterations"],
          f"{r['residual_evaluations']}/{r['jacobian_evaluations']}",
          r["stop"], f"{r['default']:.1f}", r["default_evaluations"],
          f"{r['tight']:.1f}", r["tight_evaluations"]) for r in rows])
  mean = lambda key: np.mean([r[key] for r in rows])
  print()
  print(f"problems: {len(rows)}; ours LRE >= 6: "
        f"{sum(r['ours'] >= 6 for r in rows)}; mean LRE {mean('ours'):.2f}; "
        f"mean iterations {mean('iterations'):.1f}; mean residual evaluations "
        f"{mean('residual_evaluations'):.1f}; mean Jacobian evaluations "
        f"{mean('jacobian_evaluations'):.1f}")
  if args.float32:
    print("ours LRE >= k for k = 2..6:",
          [sum(r["ours"] >= k for r in rows) for k in range(2, 7)],
          "; all finite:", all(r["finite"] for r in rows))
  else:
    for key in ("default", "tight"):
      print(f"scipy {key}: LRE >= 6: {sum(r[key] >= 6 for r in rows)}; "
            f"mean LRE {mean(key):.2f}")
  print("below 6 (ours):", [f"{r['name']}/{r['start']}" for r in rows
                            if r["ours"] < 6])
  print(f"wall time {elapsed:.0f} s")


if __name__ == "__main__":
  main()
