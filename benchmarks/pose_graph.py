"""Pose-graph optimization on the shared g2o graphs: tfg_optim vs GTSAM.

For each graph (2-D: intel, CSAIL, MIT; 3-D: parking-garage, smallGrid3D,
tinyGrid3D), tfg_optim (tfg_optim/examples/pose_graph.py: the first pose
held fixed, one `tf.function`) runs with each requested linear solver:
'cholesky' / 'cg' are the factor-graph model (`tfg_optim.factor_graph`,
block-sparse linearization, its default damping: Nielsen's with the
current clamped diagonal; 'auto' picks Cholesky up to n = 10000), 'dense'
the former `least_squares` over Power(SE2/SE3, N - 1).
GTSAM's `LevenbergMarquardtOptimizer` runs in its own interpreter on the
graph of `gtsam.readG2o(path, is3D)` plus a `PriorFactorPose2/3` on the
first pose at its initial value (the variances of GTSAM's
Pose2SLAMExample_g2o.py / Pose3SLAMExample_g2o.py), with default
`LevenbergMarquardtParams` (as those examples) and with tight tolerances
(relative and absolute error 1e-14, at most 200 iterations: how low GTSAM's
LM gets).

Every final cost is evaluated one way: GTSAM's `graph.error` (the graph
WITHOUT the prior) at the solver's output vertices; tfg_optim's output is
written with `write_g2o` and read back by `gtsam.readG2o` in the GTSAM
interpreter (`pose_graph_cost` agrees with `graph.error` to 1e-14; see
benchmarks/pose_graph_cost_check.py).

Times: `trace` is `get_concrete_function` (Python tracing of the whole
solve); `solve` is the first call of the traced function (it includes
TensorFlow's graph optimizations, or XLA compilation with --xla), or, with
--repeat, a second call; GTSAM's is optimizer construction + `optimize()`.
`first call` is always the first call's time (graph optimization or XLA
compilation included). For 'sparse_cholesky' the table adds nnz(L)
(off-diagonal blocks of the factor) and the elimination tree's height (the
sequential level steps of each factorization; `_sparse_cholesky`).
`to GTSAM cost` is the solve time (same rule) of a second program that
stops as soon as the cost is at most GTSAM-default's final cost
(`cost_tolerance`; '-' if it never gets there). Ratios are tfg_optim /
GTSAM-default.

    PYTHONPATH=. python benchmarks/pose_graph.py \
        [--gtsam-python /work/venv-gtsam/bin/python] \
        [--data ../shared/data/posegraph] [--graphs intel tinyGrid3D ...] \
        [--solvers auto cholesky cg dense sparse_cholesky] \
        [--max-iterations 100] \
        [--repeat] [--xla]

A dense solve whose J^T J and J would need more than --dense-memory-gb
(default 0.2) is skipped and listed as such (its real peak is far larger:
`tf.vectorized_map` over the n tangent directions; intel grew past 10 GB),
and so is a 'cholesky' solve above --cholesky-limit coordinates (default
10000, `factor_graph.AUTO_CHOLESKY_LIMIT`: J^T J is n^2 doubles and each
factorization n^3 / 3 flops). The GTSAM
helper is the same script with --gtsam-only JSON.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
GRAPHS = ("intel", "CSAIL", "MIT", "parking-garage", "smallGrid3D",
          "tinyGrid3D")
THREE_D = {"tinyGrid3D", "smallGrid3D", "parking-garage"}


def gtsam_problem(gtsam, name, path, first=None):
  """(graph, initial values, the graph with a prior on pose `first`, the
  smallest id by default, at its initial value: what GTSAM optimizes)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  is_3d = name in THREE_D
  graph, initial = gtsam.readG2o(path, is_3d)
  first = min(initial.keys()) if first is None else first
  if is_3d:
    model = gtsam.noiseModel.Diagonal.Variances(
        np.array([1e-6, 1e-6, 1e-6, 1e-4, 1e-4, 1e-4]))
    prior = gtsam.PriorFactorPose3(first, initial.atPose3(first), model)
  else:
    model = gtsam.noiseModel.Diagonal.Variances(np.array([1e-6, 1e-6, 1e-8]))
    prior = gtsam.PriorFactorPose2(first, initial.atPose2(first), model)
  with_prior = gtsam.NonlinearFactorGraph(graph)
  with_prior.add(prior)
  return graph, initial, with_prior


def gtsam_parameters(gtsam, tight):
  """GTSAM's default `LevenbergMarquardtParams`, or the tight ones."""
  params = gtsam.LevenbergMarquardtParams()
  if tight:
    params.setRelativeErrorTol(1e-14)
    params.setAbsoluteErrorTol(1e-14)
    params.setMaxIterations(200)
  return params


def gtsam_run(request):
  """Runs in the GTSAM interpreter; request: {"graphs": [{name, path,
  first, evaluate: {label: path}}]}. Returns JSON-able results."""
  import gtsam  # pylint: disable=g-import-not-at-top
  output = {}
  for item in request["graphs"]:
    if not item.get("optimize", True):
      graph, _ = gtsam.readG2o(item["path"], item["name"] in THREE_D)
      output[item["name"]] = {"evaluated": {
          label: graph.error(gtsam.readG2o(path, item["name"] in THREE_D)[1])
          for label, path in item["evaluate"].items()}}
      continue
    is_3d = item["name"] in THREE_D
    graph, initial, with_prior = gtsam_problem(gtsam, item["name"],
                                               item["path"],
                                               int(item["first"]))
    runs = {}
    for label, tight in (("gtsam-default", False), ("gtsam-tight", True)):
      params = gtsam_parameters(gtsam, tight)
      begin = time.perf_counter()
      optimizer = gtsam.LevenbergMarquardtOptimizer(with_prior, initial,
                                                    params)
      result = optimizer.optimize()
      seconds = time.perf_counter() - begin
      runs[label] = {"time": seconds, "iterations": optimizer.iterations(),
                     "cost": graph.error(result)}
    evaluated = {}
    for label, path in item["evaluate"].items():
      _, values = gtsam.readG2o(path, is_3d)
      evaluated[label] = graph.error(values)
    output[item["name"]] = {"runs": runs, "initial": graph.error(initial),
                            "evaluated": evaluated}
  return output


def _structure(graph):
  """The `_sparse_cholesky.Structure` of the graph's problem (nnz(L),
  etree height)."""
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  from tfg_optim import _sparse_cholesky
  from tfg_optim import factor_graph
  from tfg_optim.examples import pose_graph
  # pylint: enable=g-import-not-at-top
  variables, terms = pose_graph.factor_graph_problem(
      graph, tf.constant(graph.poses))
  layout, _ = factor_graph._layout(variables, terms)  # pylint: disable=protected-access
  return _sparse_cholesky.Structure(layout)


def run_in_gtsam(python, request, script=__file__):
  """Runs `script --gtsam-only REQUEST` (its `gtsam_run`) in GTSAM's
  interpreter; its JSON answer."""
  command = [python, script, "--gtsam-only", json.dumps(request)]
  completed = subprocess.run(command, capture_output=True, text=True,
                             check=False)
  if completed.returncode:
    raise RuntimeError(completed.stderr)
  return json.loads(completed.stdout.strip().splitlines()[-1])


def add_common_arguments(parser):
  """--data, --gtsam-python, --max-iterations and --gtsam-only (the GTSAM
  helper's request) of this script and pose_graph_convergence.py."""
  parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" /
                                            "posegraph"))
  parser.add_argument("--gtsam-python", default=os.environ.get(
      "GTSAM_PYTHON", "/work/venv-gtsam/bin/python"))
  parser.add_argument("--max-iterations", type=int, default=100)
  parser.add_argument("--gtsam-only", metavar="JSON")


def parse_arguments(parser, answer):
  """(args, {graph: path of its .g2o file}) of the command line, ready
  for TensorFlow (quiet logs, the repository on sys.path); or (None, None)
  after answering a --gtsam-only request (in GTSAM's interpreter) with
  `answer(request)`'s JSON."""
  args = parser.parse_args()
  if args.gtsam_only:
    print(json.dumps(answer(json.loads(args.gtsam_only))))
    return None, None
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.path.insert(0, str(ROOT))
  return args, {name: str(pathlib.Path(args.data) / f"{name}.g2o")
                for name in args.graphs}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_common_arguments(parser)
  parser.add_argument("--graphs", nargs="+", default=list(GRAPHS))
  parser.add_argument("--solvers", nargs="+", default=["auto", "cg"],
                      choices=["auto", "cholesky", "cg", "dense",
                               "sparse_cholesky"])
  parser.add_argument("--dense-memory-gb", type=float, default=0.2)
  parser.add_argument("--cholesky-limit", type=int, default=10000)
  parser.add_argument("--repeat", action="store_true",
                      help="time a second call as the solve time")
  parser.add_argument("--xla", action="store_true")
  args, paths = parse_arguments(parser, gtsam_run)
  if args is None:
    return 0
  # pylint: disable=g-import-not-at-top
  from tfg_optim import io
  from tfg_optim._engine import StopReason
  from tfg_optim.examples import pose_graph
  # pylint: enable=g-import-not-at-top

  graphs = {name: io.read_g2o(path, missing_vertices="chain")
            for name, path in paths.items()}
  reference = run_in_gtsam(args.gtsam_python, {"graphs": [
      {"name": name, "path": paths[name],
       "first": int(graphs[name].vertex_ids[0]), "evaluate": {}}
      for name in args.graphs]})

  scratch = pathlib.Path(tempfile.mkdtemp(prefix="pose_graph_bench_"))
  rows, request = [], {"graphs": []}
  for name in args.graphs:
    graph = graphs[name]
    target = reference[name]["runs"]["gtsam-default"]["cost"]
    n = (len(graph.vertex_ids) - 1) * graph.tangent_size
    m = len(graph.edges) * graph.tangent_size
    item = {"name": name, "path": paths[name], "optimize": False,
            "evaluate": {}}
    solvers = []
    for solver in args.solvers:
      picked = pose_graph.picked_solver(graph, solver)
      label = f"tfg {solver}" + (f"->{picked}" if solver == "auto" else "")
      if solver != "auto" and picked in [p for _, p in solvers]:
        continue  # 'auto' already ran it
      solvers.append((label, picked))
    for label, picked in solvers:
      row = {"graph": name, "n": n, "m": m, "solver": label}
      gigabytes = 8.0 * (n * n + m * n) / 1e9
      if picked == "dense" and gigabytes > args.dense_memory_gb:
        row["skipped"] = (f"dense J and J^T J need {gigabytes:.1f} GB > "
                          f"{args.dense_memory_gb:g} GB")
      if picked == "cholesky" and n > args.cholesky_limit:
        row["skipped"] = f"n > --cholesky-limit {args.cholesky_limit}"
      if "skipped" in row:
        rows.append(row)
        print(f"{name}: {label} skipped ({row['skipped']})", flush=True)
        continue
      solution = pose_graph.optimize(graph, args.max_iterations, picked,
                                     args.xla, repeat=args.repeat)
      results = solution.results
      output = scratch / f"{name}-{picked}.g2o"
      io.write_g2o(output, solution.graph)
      item["evaluate"][label] = str(output)
      # The capped run repeats the full run's iterates: run it only if the
      # full run got there.
      reached = float(results.cost) <= target
      to_target = solution
      if reached:
        to_target = pose_graph.optimize(graph, args.max_iterations, picked,
                                        args.xla, repeat=args.repeat,
                                        cost_tolerance=target)
      row.update(structure=_structure(graph) if picked == "sparse_cholesky"
                 else None, first_call=solution.run_time)
      row.update(trace=solution.trace_time, solve=solution.solve_time,
                 to_target=to_target.solve_time if reached else None,
                 iterations=int(results.num_iterations),
                 own_cost=float(results.cost),
                 reason=StopReason(int(results.stop_reason)).name.lower())
      rows.append(row)
      print(f"{name}: {label} trace {solution.trace_time:.2f} s, solve "
            f"{solution.solve_time:.2f} s, {row['iterations']} iterations, "
            f"cost {row['own_cost']:.12g} ({row['reason']}); to GTSAM's "
            f"cost: " + (f"{to_target.solve_time:.2f} s" if reached else
                         "not reached"), flush=True)
    request["graphs"].append(item)
  evaluated = run_in_gtsam(args.gtsam_python, request)

  header = ("| graph | n | solver | trace s | first call s | solve s | "
            "to GTSAM cost s | iterations | final cost (GTSAM graph.error) | "
            "cost / GTSAM-default | cost / GTSAM-tight | "
            "time to cost / GTSAM-default | stop | nnz(L) blocks | "
            "etree height |")
  print()
  print(header)
  print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        "---:|---:|")
  for name in args.graphs:
    ours = [row for row in rows if row["graph"] == name]
    theirs = reference[name]
    default = theirs["runs"]["gtsam-default"]
    tight = theirs["runs"]["gtsam-tight"]
    n = ours[0]["n"]
    for label, run in (("GTSAM LM default", default),
                       ("GTSAM LM tight", tight)):
      print(f"| {name} | {n} | {label} | - | - | {run['time']:.4f} | - | "
            f"{run['iterations']} | {run['cost']:.15g} | "
            f"{run['cost'] / default['cost']:.9f} | "
            f"{run['cost'] / tight['cost']:.9f} | "
            f"{run['time'] / default['time']:.1f} | | | |")
    for row in ours:
      if "skipped" in row:
        print(f"| {name} | {n} | {row['solver']} | skipped: {row['skipped']}"
              " | | | | | | | | | | | |")
        continue
      cost = evaluated[name]["evaluated"][row["solver"]]
      to_target = ("-" if row["to_target"] is None else
                   f"{row['to_target']:.2f}")
      ratio = ("-" if row["to_target"] is None else
               f"{row['to_target'] / default['time']:.1f}")
      structure = row["structure"]
      sparse = ("- | -" if structure is None else
                f"{structure.nnz_blocks} | {structure.height}")
      print(f"| {name} | {n} | {row['solver']} | {row['trace']:.2f} | "
            f"{row['first_call']:.2f} | "
            f"{row['solve']:.2f} | {to_target} | {row['iterations']} | "
            f"{cost:.15g} | {cost / default['cost']:.9f} | "
            f"{cost / tight['cost']:.9f} | {ratio} | {row['reason']} | "
            f"{sparse} |")
  print(f"\n(tfg_optim's output graphs: {scratch})")
  print("(initial costs: " + ", ".join(
      f"{name} {reference[name]['initial']:.6g}" for name in args.graphs) +
        ")")
  return 0


if __name__ == "__main__":
  sys.exit(main())
