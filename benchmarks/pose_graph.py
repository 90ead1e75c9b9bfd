"""Pose-graph optimization on the shared g2o graphs: tfg_optim vs GTSAM.

For each graph (2-D: intel, CSAIL, MIT; 3-D: parking-garage, smallGrid3D,
tinyGrid3D), tfg_optim's `least_squares` (tfg_optim/examples/pose_graph.py:
the first pose held fixed, the others on Power(SE2/SE3, N - 1), one
`tf.function`) runs with each requested linear solver, and GTSAM's
`LevenbergMarquardtOptimizer` runs in its own interpreter on the graph of
`gtsam.readG2o(path, is3D)` plus a `PriorFactorPose2/3` on the first pose at
its initial value (the variances of GTSAM's Pose2SLAMExample_g2o.py /
Pose3SLAMExample_g2o.py), with default `LevenbergMarquardtParams` (as those
examples) and with tight tolerances (relative and absolute error 1e-14, at
most 200 iterations: how low GTSAM's LM gets).

Every final cost is evaluated one way: GTSAM's `graph.error` (the graph
WITHOUT the prior) at the solver's output vertices; tfg_optim's output is
written with `write_g2o` and read back by `gtsam.readG2o` in the GTSAM
interpreter (`pose_graph_cost` agrees with `graph.error` to 1e-14; see
benchmarks/pose_graph_cost_check.py).

Times: `trace` is `get_concrete_function` (Python tracing of the whole
solve); `solve` is the first call of the traced function (it includes
TensorFlow's graph optimizations, or XLA compilation with --xla), or, with
--repeat, a second call; GTSAM's is optimizer construction + `optimize()`.
Ratios are tfg_optim / GTSAM-default.

    PYTHONPATH=. python benchmarks/pose_graph.py \
        [--gtsam-python /work/venv-gtsam/bin/python] \
        [--data ../shared/data/posegraph] [--graphs intel tinyGrid3D ...] \
        [--solvers auto dense cg] [--max-iterations 100] [--repeat] [--xla]

A dense solve whose J^T J and J would need more than --dense-memory-gb
(default 0.2) is skipped and listed as such. The real peak is far larger:
the dense Jacobian is built by `tf.vectorized_map` over the n tangent
directions, whose intermediates are [n, K, ...]; intel (n = 5181, J and
J^T J 0.53 GB) grew past 10 GB of resident memory, so it is skipped at the
default. The GTSAM helper is the same
script with --gtsam-only JSON.
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


def gtsam_run(request):
  """Runs in the GTSAM interpreter; request: {"graphs": [{name, path,
  first, evaluate: {label: path}}]}. Returns JSON-able results."""
  import gtsam  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  output = {}
  for item in request["graphs"]:
    is_3d = item["name"] in THREE_D
    graph, initial = gtsam.readG2o(item["path"], is_3d)
    first = int(item["first"])
    if is_3d:
      model = gtsam.noiseModel.Diagonal.Variances(
          np.array([1e-6, 1e-6, 1e-6, 1e-4, 1e-4, 1e-4]))
      prior = gtsam.PriorFactorPose3(first, initial.atPose3(first), model)
    else:
      model = gtsam.noiseModel.Diagonal.Variances(np.array([1e-6, 1e-6, 1e-8]))
      prior = gtsam.PriorFactorPose2(first, initial.atPose2(first), model)
    with_prior = gtsam.NonlinearFactorGraph(graph)
    with_prior.add(prior)
    runs = {}
    for label, tight in (("gtsam-default", False), ("gtsam-tight", True)):
      params = gtsam.LevenbergMarquardtParams()
      if tight:
        params.setRelativeErrorTol(1e-14)
        params.setAbsoluteErrorTol(1e-14)
        params.setMaxIterations(200)
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


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" /
                                            "posegraph"))
  parser.add_argument("--gtsam-python", default=os.environ.get(
      "GTSAM_PYTHON", "/work/venv-gtsam/bin/python"))
  parser.add_argument("--graphs", nargs="+", default=list(GRAPHS))
  parser.add_argument("--solvers", nargs="+", default=["auto", "dense"],
                      choices=["auto", "dense", "cg"])
  parser.add_argument("--max-iterations", type=int, default=100)
  parser.add_argument("--dense-memory-gb", type=float, default=0.2)
  parser.add_argument("--repeat", action="store_true",
                      help="time a second call as the solve time")
  parser.add_argument("--xla", action="store_true")
  parser.add_argument("--gtsam-only", metavar="JSON")
  args = parser.parse_args()
  if args.gtsam_only:
    print(json.dumps(gtsam_run(json.loads(args.gtsam_only))))
    return 0

  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.path.insert(0, str(ROOT))
  # pylint: disable=g-import-not-at-top
  from tfg_optim import io
  from tfg_optim._engine import StopReason
  from tfg_optim.examples import pose_graph
  # pylint: enable=g-import-not-at-top

  scratch = pathlib.Path(tempfile.mkdtemp(prefix="pose_graph_bench_"))
  rows, request = [], {"graphs": []}
  for name in args.graphs:
    path = str(pathlib.Path(args.data) / f"{name}.g2o")
    graph = io.read_g2o(path, missing_vertices="chain")
    n = (len(graph.vertex_ids) - 1) * graph.tangent_size
    m = len(graph.edges) * graph.tangent_size
    item = {"name": name, "path": path, "first": int(graph.vertex_ids[0]),
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
        rows.append(row)
        print(f"{name}: {label} skipped ({row['skipped']})", flush=True)
        continue
      solution = pose_graph.optimize(graph, args.max_iterations, picked,
                                     args.xla, repeat=args.repeat)
      results = solution.results
      output = scratch / f"{name}-{picked}.g2o"
      io.write_g2o(output, solution.graph)
      item["evaluate"][label] = str(output)
      row.update(trace=solution.trace_time, solve=solution.solve_time,
                 iterations=int(results.num_iterations),
                 own_cost=float(results.cost),
                 reason=StopReason(int(results.stop_reason)).name.lower())
      rows.append(row)
      print(f"{name}: {label} trace {solution.trace_time:.2f} s, solve "
            f"{solution.solve_time:.2f} s, {row['iterations']} iterations, "
            f"cost {row['own_cost']:.12g} ({row['reason']})", flush=True)
    request["graphs"].append(item)

  command = [args.gtsam_python, __file__, "--gtsam-only", json.dumps(request)]
  completed = subprocess.run(command, capture_output=True, text=True,
                             check=False)
  if completed.returncode:
    print(completed.stderr)
    return 1
  reference = json.loads(completed.stdout.strip().splitlines()[-1])

  header = (f"| graph | n | solver | trace s | solve s | iterations | "
            f"final cost (GTSAM graph.error) | cost / GTSAM-default | "
            f"cost / GTSAM-tight | time / GTSAM-default | stop |")
  print()
  print(header)
  print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
  for name in args.graphs:
    ours = [row for row in rows if row["graph"] == name]
    theirs = reference[name]
    default = theirs["runs"]["gtsam-default"]
    tight = theirs["runs"]["gtsam-tight"]
    n = ours[0]["n"]
    for label, run in (("GTSAM LM default", default),
                       ("GTSAM LM tight", tight)):
      print(f"| {name} | {n} | {label} | - | {run['time']:.4f} | "
            f"{run['iterations']} | {run['cost']:.15g} | "
            f"{run['cost'] / default['cost']:.9f} | "
            f"{run['cost'] / tight['cost']:.9f} | "
            f"{run['time'] / default['time']:.1f} | |")
    for row in ours:
      if "skipped" in row:
        print(f"| {name} | {n} | {row['solver']} | skipped: {row['skipped']}"
              " | | | | | | | |")
        continue
      cost = theirs["evaluated"][row["solver"]]
      print(f"| {name} | {n} | {row['solver']} | {row['trace']:.2f} | "
            f"{row['solve']:.2f} | {row['iterations']} | {cost:.15g} | "
            f"{cost / default['cost']:.9f} | {cost / tight['cost']:.9f} | "
            f"{row['solve'] / default['time']:.0f} | {row['reason']} |")
  print(f"\n(tfg_optim's output graphs: {scratch})")
  print("(initial costs: " + ", ".join(
      f"{name} {reference[name]['initial']:.6g}" for name in args.graphs) +
        ")")
  return 0


if __name__ == "__main__":
  sys.exit(main())
