"""Two trees' sparse Cholesky side by side in one process, against GTSAM.

`--before FILE` is another tree's tfg_optim/_sparse_cholesky.py (e.g.
/work/main/tfg_optim/_sparse_cholesky.py): it is loaded under another name
and put in `factor_graph`'s place while the 'before' solves are traced and
first called (every other module is this tree's; the solves are checked
to have traced once). For each graph (the example's problem,
`tfg_optim/examples/pose_graph.py`, linear_solver='sparse_cholesky', the
defaults of `factor_graph.least_squares`) each tree gets two traced
solves: to its own stop, and to GTSAM-default's final cost
(`cost_tolerance`). Then --rounds rounds, each: GTSAM's LM on every graph
(`pose_graph.gtsam_run` in GTSAM's interpreter: construction +
`optimize()`, default and tight parameters), then per graph each tree's two
solves, before and after alternately, one call each. Printed per graph and
tree: the iterations and final cost (`results.cost`, the first pose held),
the median and the smallest over the rounds of the solve time, of the time
per iteration (solve / iterations), of the time to GTSAM-default's cost
and of GTSAM-default's time, and the ratios of the medians.

    PYTHONPATH=. python benchmarks/sparse_cholesky_side_by_side.py \\
        --before /work/main/tfg_optim/_sparse_cholesky.py \\
        [--graphs parking-garage smallGrid3D tinyGrid3D] [--rounds 5] \\
        [--data ../shared/data/posegraph] [--gtsam-python PYTHON]
"""

import argparse
import collections
import importlib.util
import sys
import time

import numpy as np

import pose_graph as benchmark  # benchmarks/pose_graph.py


def _load(path):
  """The module of the file `path`, under another name."""
  spec = importlib.util.spec_from_file_location("_sparse_cholesky_before",
                                                path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _spread(values):
  """'median / smallest' of a list of seconds."""
  return f"{np.median(values):.4f} / {np.min(values):.4f}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  benchmark.add_common_arguments(parser)
  parser.add_argument("--before", required=True,
                      help="another tree's tfg_optim/_sparse_cholesky.py")
  parser.add_argument("--graphs", nargs="+",
                      default=["parking-garage", "smallGrid3D", "tinyGrid3D"])
  parser.add_argument("--rounds", type=int, default=5)
  args, paths = benchmark.parse_arguments(parser, benchmark.gtsam_run)
  if args is None:
    return 0
  # pylint: disable=g-import-not-at-top,protected-access
  import tensorflow as tf
  from tfg_optim import factor_graph
  from tfg_optim import io
  from tfg_optim.examples import pose_graph
  # pylint: enable=g-import-not-at-top
  after = factor_graph._sparse_cholesky
  trees = {"before": _load(args.before), "after": after}
  graphs = {name: io.read_g2o(path, missing_vertices="chain")
            for name, path in paths.items()}
  request = {"graphs": [{"name": name, "path": paths[name],
                         "first": int(graph.vertex_ids[0]), "evaluate": {}}
                        for name, graph in graphs.items()]}
  reference = benchmark.run_in_gtsam(args.gtsam_python, request)
  numpy = lambda results: tf.nest.map_structure(lambda t: t.numpy(), results)
  solves, outcomes = {}, {}
  for name, graph in graphs.items():
    target = reference[name]["runs"]["gtsam-default"]["cost"]
    start = tf.constant(graph.poses)
    for tree, module in trees.items():
      for goal, options in (("stop", {}),
                            ("cost", {"cost_tolerance": target})):
        solve = pose_graph.make_solver(graph, args.max_iterations,
                                       "sparse_cholesky", **options)
        factor_graph._sparse_cholesky = module
        try:
          outcomes[name, tree, goal] = numpy(solve(start))
        finally:
          factor_graph._sparse_cholesky = after
        solves[name, tree, goal] = (solve, start)
      stop = outcomes[name, tree, "stop"]
      print(f"{name} {tree}: {int(stop.num_iterations)} iterations, cost "
            f"{float(stop.cost):.15g}", flush=True)
  times = collections.defaultdict(list)
  for _ in range(args.rounds):
    answer = benchmark.run_in_gtsam(args.gtsam_python, request)
    for name in graphs:
      times[name, "gtsam"].append(
          answer[name]["runs"]["gtsam-default"]["time"])
      for tree in trees:
        for goal in ("stop", "cost"):
          solve, start = solves[name, tree, goal]
          begin = time.perf_counter()
          numpy(solve(start))
          times[name, tree, goal].append(time.perf_counter() - begin)
  for key, (solve, _) in solves.items():
    if solve.experimental_get_tracing_count() != 1:
      raise RuntimeError(f"{key} traced more than once")
  print(f"\n{args.rounds} rounds; seconds as median / smallest over them")
  print("| graph | tree | iterations | final cost | solve s | per iteration "
        "s | iterations to GTSAM cost | to GTSAM cost s | GTSAM-default s | "
        "to cost / GTSAM (medians) | after / before (medians, to cost) |")
  print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for name in graphs:
    gtsam = times[name, "gtsam"]
    for tree in trees:
      stop, cost = outcomes[name, tree, "stop"], outcomes[name, tree, "cost"]
      iterations = int(stop.num_iterations)
      per_iteration = np.array(times[name, tree, "stop"]) / iterations
      ratio = np.median(times[name, tree, "cost"]) / np.median(gtsam)
      change = "-"
      if tree == "after":
        change = np.median(times[name, "after", "cost"]) / np.median(
            times[name, "before", "cost"])
        change = f"{change:.2f}"
      print(f"| {name} | {tree} | {iterations} | {float(stop.cost):.15g} | "
            f"{_spread(times[name, tree, 'stop'])} | "
            f"{_spread(per_iteration)} | {int(cost.num_iterations)} | "
            f"{_spread(times[name, tree, 'cost'])} | {_spread(gtsam)} | "
            f"{ratio:.2f} | {change} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
