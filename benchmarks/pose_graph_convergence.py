"""Where the pose-graph iterations go: tfg_optim's trials against GTSAM's.

For each shared g2o graph, tfg_optim's factor-graph solve (the example's
problem, `tfg_optim/examples/pose_graph.py`; `--solver`, default
'sparse_cholesky') runs with each damping / stopping configuration below,
every trial step logged from inside the loop (a `NielsenDamping` whose
`update` `tf.print`s the step it judges to a file): the cost, the actual
and the Gauss-Newton model's relative decrease, the gain ratio, lambda and
whether the step was taken. GTSAM's `LevenbergMarquardtOptimizer` (the
benchmark's default and tight parameters, `benchmarks/pose_graph.py`) runs
one `iterate()` at a time in its own interpreter, recording its error and
lambda after each outer iteration (an outer iteration retries lambda x 10
until a step is taken; none was retried on these graphs).

Configurations:
  old: the factor-graph defaults before issue 12's convergence work:
       Nielsen's lambda from 1e-6 with the current clamped diag(J^T J), and
       `tfg_optim.least_squares`' criterion (relative cost change 1e-16,
       gradient cosine 1e-14, relative step 1e-12).
  new: `factor_graph.least_squares`' defaults (lambda from
       `factor_graph.DEFAULT_INITIAL_LAMBDA`, `factor_graph.default_criterion`).
  new, lambda L (--other-lambdas L ...): 'new' with lambda from L.

    PYTHONPATH=. python benchmarks/pose_graph_convergence.py \\
        [--graphs tinyGrid3D smallGrid3D MIT CSAIL intel parking-garage] \\
        [--trajectory parking-garage] [--other-lambdas 1e-8 1e-12] \\
        [--gtsam-python PYTHON]

Prints one summary table (iterations to GTSAM-default's cost and to
GTSAM-tight's cost x (1 + 1e-12), total trials (GTSAM: `iterations()`),
rejected, stop reason, final cost over GTSAM-tight's; costs are each
solver's own, ours `results.cost` with the first pose held, GTSAM's
`graph.error` after optimizing with a prior on it), and, for each
--trajectory graph, the trials side by side (GTSAM's per `iterate()`
call).
"""

import argparse
import pathlib
import sys
import tempfile

import pose_graph  # benchmarks/pose_graph.py: GTSAM's problem, the options

GRAPHS = ("tinyGrid3D", "smallGrid3D", "MIT", "CSAIL", "intel",
          "parking-garage")
TIGHT_MARGIN = 1e-12


def gtsam_run(request):
  """In the GTSAM interpreter: {name: {label: {"history": [[error,
  lambda], ...], "iterations": n}}}, the error (graph without the prior)
  and lambda before the first and after every `iterate()` call, and
  GTSAM's own count of iterations (`iterations()`: the last call, which
  stops on a change below the tolerance without taking a step, is not
  counted), default and tight parameters."""
  import gtsam  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  output = {}
  for name, path in request.items():
    graph, initial, with_prior = pose_graph.gtsam_problem(gtsam, name, path)
    output[name] = {}
    for label, tight in (("default", False), ("tight", True)):
      params = pose_graph.gtsam_parameters(gtsam, tight)
      optimizer = gtsam.LevenbergMarquardtOptimizer(with_prior, initial,
                                                    params)
      history = [[graph.error(initial), optimizer.lambda_()]]
      # NonlinearOptimizer::defaultOptimize's loop and checkConvergence.
      while optimizer.iterations() < params.getMaxIterations():
        before = optimizer.error()
        optimizer.iterate()
        after = optimizer.error()
        history.append([graph.error(optimizer.values()), optimizer.lambda_()])
        decrease = before - after
        if (decrease <= params.getRelativeErrorTol() * before or
            decrease <= params.getAbsoluteErrorTol() or
            not np.isfinite(after)):
          break
      output[name][label] = {"history": history,
                             "iterations": optimizer.iterations()}
  return output


def _configurations(other_lambdas=()):
  """{label: options of `factor_graph.least_squares`} (see the docstring;
  plus 'new, lambda L' for each L of `other_lambdas`: the new criterion with
  lambda from L)."""
  # pylint: disable=g-import-not-at-top
  from tfg_optim import factor_graph
  from tfg_optim import stopping
  # pylint: enable=g-import-not-at-top
  old_criterion = (stopping.StopWhenRelativeCostChangeLess(1e-16) |
                   stopping.StopWhenGradientCosineLess(1e-14) |
                   stopping.StopWhenRelativeStepLess(1e-12))
  configurations = {
      "old": dict(initial=1e-6, stopping_criterion=old_criterion),
      "new": dict(initial=factor_graph.DEFAULT_INITIAL_LAMBDA,
                  stopping_criterion=None),
  }
  for value in other_lambdas:
    configurations[f"new, lambda {value:g}"] = dict(initial=value,
                                                    stopping_criterion=None)
  return configurations


def _logged_solve(graph, solver, initial, stopping_criterion, log_path,
                  max_iterations):
  """(results as NumPy, [[cost, candidate cost, model decrease, lambda,
  accepted], ...] per trial)."""
  # pylint: disable=g-import-not-at-top
  import numpy as np
  import tensorflow as tf
  from tfg_optim import damping
  from tfg_optim.examples import pose_graph
  # pylint: enable=g-import-not-at-top

  class Logged(damping.NielsenDamping):
    """`factor_graph.default_damping()`'s kind, logging each judged step."""

    def update(self, state, step):
      accepted, new_state = super().update(state, step)
      tf.print(step.cost, step.candidate_cost, step.model_decrease,
               state.lam, tf.cast(accepted, step.cost.dtype),
               output_stream="file://" + log_path)
      return accepted, new_state

  options = {"damping": Logged(initial=initial, scaling="current")}
  if stopping_criterion is not None:
    options["stopping_criterion"] = stopping_criterion
  solution = pose_graph.optimize(graph, max_iterations, solver, **options)
  trials = np.loadtxt(log_path, ndmin=2)
  return solution.results, trials


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  pose_graph.add_common_arguments(parser)
  parser.add_argument("--graphs", nargs="+", default=list(GRAPHS))
  parser.add_argument("--solver", default="sparse_cholesky")
  parser.add_argument("--trajectory", nargs="*", default=[])
  parser.add_argument("--other-lambdas", nargs="*", type=float, default=[],
                      help="also the new criterion with these first lambdas")
  args, paths = pose_graph.parse_arguments(parser, gtsam_run)
  if args is None:
    return 0
  # pylint: disable=g-import-not-at-top
  import numpy as np
  from tfg_optim import io
  from tfg_optim._engine import StopReason
  # pylint: enable=g-import-not-at-top

  reference = pose_graph.run_in_gtsam(args.gtsam_python, paths, __file__)
  scratch = pathlib.Path(tempfile.mkdtemp(prefix="pose_graph_convergence_"))
  rows, logs = [], {}
  for name in args.graphs:
    graph = io.read_g2o(paths[name], missing_vertices="chain")
    default_cost = reference[name]["default"]["history"][-1][0]
    tight_cost = reference[name]["tight"]["history"][-1][0]
    for label, (initial, criterion) in (
        (k, (v["initial"], v["stopping_criterion"]))
        for k, v in _configurations(args.other_lambdas).items()):
      log_path = str(scratch / f"{name}-{label}.txt")
      results, trials = _logged_solve(graph, args.solver, initial,
                                      criterion, log_path,
                                      args.max_iterations)
      logs[name, label] = trials
      accepted = trials[:, 4] > 0
      costs = np.where(accepted, trials[:, 1], trials[:, 0])

      def first(mask):
        hits = np.nonzero(mask)[0]
        return str(hits[0] + 1) if hits.size else "-"

      rows.append(
          f"| {name} | tfg {label} | {first(costs <= default_cost)} | "
          f"{first(costs <= tight_cost * (1 + TIGHT_MARGIN))} | "
          f"{int(results.num_iterations)} | {int(results.num_rejected)} | "
          f"{StopReason(int(results.stop_reason)).name.lower()} | "
          f"{float(results.cost) / tight_cost - 1:.1e} |")
      print(rows[-1], flush=True)
    for label in ("default", "tight"):
      history = np.array(reference[name][label]["history"])
      errors = history[1:, 0]
      rows.append(
          f"| {name} | GTSAM {label} | {first(errors <= default_cost)} | "
          f"{first(errors <= tight_cost * (1 + TIGHT_MARGIN))} | "
          f"{reference[name][label]['iterations']} | 0 | | "
          f"{errors[-1] / tight_cost - 1:.1e} |")
  print()
  print("| graph | solver | iterations to GTSAM-default's cost | to "
        f"GTSAM-tight's x (1 + {TIGHT_MARGIN:g}) | iterations | rejected | "
        "stop | final cost / GTSAM-tight - 1 |")
  print("|---|---|---:|---:|---:|---:|---|---:|")
  for row in rows:
    print(row)

  for name in args.trajectory:
    tight_cost = reference[name]["tight"]["history"][-1][0]
    print(f"\n{name}: per trial, cost after it / GTSAM-tight's - 1 "
          "(rel. dec.: actual and model decrease / cost; lambda before "
          "the trial, tfg's relative to diag(J^T J), GTSAM's to I)")
    print("| it | tfg old: cost gap | actual | model | lambda | taken | "
          "tfg new: cost gap | actual | model | lambda | taken | "
          "GTSAM default: cost gap | lambda | GTSAM tight: cost gap |")
    print("|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---:|---:|"
          "---:|")
    columns = []
    for label in ("old", "new"):
      trials = logs[name, label]
      cells = []
      for cost, candidate, model, lam, taken in trials:
        after = candidate if taken else cost
        cells.append(f"{after / tight_cost - 1:.1e} | "
                     f"{(cost - candidate) / cost:.1e} | {model / cost:.1e} | "
                     f"{lam:.1e} | {'yes' if taken else 'no'}")
      columns.append(cells)
    for label in ("default", "tight"):
      history = reference[name][label]["history"]
      cells = []
      for (_, lam), (error, _) in zip(history[:-1], history[1:]):
        cells.append(f"{error / tight_cost - 1:.1e}" +
                     (f" | {lam:.0e}" if label == "default" else ""))
      columns.append(cells)
    widths = (5, 5, 2, 1)  # cells per column group
    for i in range(max(len(c) for c in columns)):
      cells = [c[i] if i < len(c) else " | ".join([""] * width).strip()
               for c, width in zip(columns, widths)]
      print(f"| {i + 1} | " + " | ".join(cells) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
