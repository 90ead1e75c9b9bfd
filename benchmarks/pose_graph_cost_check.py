"""Check: tfg_optim's pose-graph cost equals GTSAM's `graph.error(values)`.

For each g2o file, GTSAM (`gtsam.readG2o(path, is3D)`, BetweenFactor<Pose2>
/ BetweenFactor<Pose3> with GTSAM's own information-matrix permutation)
evaluates `graph.error(initial)`; tfg_optim evaluates
`io.pose_graph_cost(io.read_g2o(path))` (float64, eagerly). The table shows
both, their relative difference, and, for the 3-D files, the relative
difference of g2o's own EDGE_SE3 error (translation of Z^-1 X_i^-1 X_j and
twice its quaternion's vector part), which GTSAM does not use. Files
without VERTEX lines (CSAIL) are read with missing_vertices="chain", and
GTSAM's initial values are compared with those poses too.

GTSAM runs in its own interpreter, so it never shares a process with
TensorFlow:

    python -m venv benchmarks/.venv-gtsam
    benchmarks/.venv-gtsam/bin/pip install gtsam numpy
    PYTHONPATH=. python benchmarks/pose_graph_cost_check.py \
        [--gtsam-python benchmarks/.venv-gtsam/bin/python] \
        [--data ../shared/data/posegraph]

(the same script is the GTSAM helper when run with --gtsam-only FILE...).
Exit status 1 if a relative difference exceeds --tolerance (1e-9).
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
FILES = ("tinyGrid3D", "smallGrid3D", "parking-garage", "intel", "MIT",
         "CSAIL")
THREE_D = {"tinyGrid3D", "smallGrid3D", "parking-garage"}


def gtsam_errors(paths):
  """{path: {"error", "poses"}} by GTSAM; runs in the GTSAM interpreter."""
  import gtsam  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  results = {}
  for path in paths:
    is_3d = pathlib.Path(path).stem in THREE_D
    graph, initial = gtsam.readG2o(path, is_3d)
    poses = {}
    for key in initial.keys():
      if is_3d:
        pose = initial.atPose3(key)
        poses[int(key)] = np.asarray(pose.matrix()).tolist()
      else:
        pose = initial.atPose2(key)
        poses[int(key)] = [pose.x(), pose.y(), pose.theta()]
    results[path] = {"error": graph.error(initial), "factors": graph.size(),
                     "poses": poses}
  return results


def g2o_style_cost(graph):
  """1/2 sum e^T Omega e with g2o's EDGE_SE3 error (t, 2 q_vec) (3-D only)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from tfg_optim.manifolds import lie_groups
  first = graph.poses[graph.edges[:, 0]]
  second = graph.poses[graph.edges[:, 1]]
  relative = np.asarray(lie_groups.between(
      graph.measurements, lie_groups.between(first, second)))
  sign = np.where(relative[:, 6:] < 0, -1.0, 1.0)
  error = np.concatenate([relative[:, :3], 2.0 * sign * relative[:, 3:6]], 1)
  return 0.5 * float(np.einsum("ka,kab,kb->", error, graph.information, error))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" /
                                            "posegraph"))
  parser.add_argument("--gtsam-python", default=os.environ.get(
      "GTSAM_PYTHON", str(ROOT / "benchmarks" / ".venv-gtsam" / "bin" /
                          "python")))
  parser.add_argument("--tolerance", type=float, default=1e-9)
  parser.add_argument("--gtsam-only", nargs="+", metavar="FILE")
  args = parser.parse_args()
  if args.gtsam_only:
    print(json.dumps(gtsam_errors(args.gtsam_only)))
    return 0

  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import numpy as np  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(ROOT))
  from tfg_optim import io  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from tfg_optim.manifolds import lie_groups

  paths = [str(pathlib.Path(args.data) / f"{name}.g2o") for name in FILES]
  try:
    import gtsam  # pylint: disable=g-import-not-at-top,unused-import
    reference = gtsam_errors(paths)
  except ImportError:
    if not pathlib.Path(args.gtsam_python).exists():
      print(f"GTSAM not found: no `import gtsam` here and no interpreter at "
            f"{args.gtsam_python} (see the module docstring).")
      return 2
    output = subprocess.run(
        [args.gtsam_python, __file__, "--gtsam-only", *paths],
        check=True, capture_output=True, text=True).stdout
    reference = json.loads(output.strip().splitlines()[-1])

  print(f"{'file':<16}{'edges':>7}{'read s':>8}{'GTSAM error':>26}"
        f"{'tfg_optim cost':>26}{'rel. diff':>11}{'g2o-style':>11}"
        f"{'start poses':>12}")
  worst = 0.0
  for name, path in zip(FILES, paths):
    start = time.perf_counter()
    graph = io.read_g2o(path, missing_vertices="chain")
    seconds = time.perf_counter() - start
    ours = float(io.pose_graph_cost(graph))
    theirs = reference[path]["error"]
    relative = abs(ours - theirs) / abs(theirs)
    worst = max(worst, relative)
    other = ("" if graph.dimension == 2 else
             f"{abs(g2o_style_cost(graph) - theirs) / abs(theirs):.1e}")
    # The starting poses GTSAM built versus ours (same ids).
    gtsam_poses = reference[path]["poses"]
    positions = {int(i): k for k, i in enumerate(graph.vertex_ids)}
    mine = graph.poses[[positions[int(key)] for key in gtsam_poses]]
    theirs_poses = np.array(list(gtsam_poses.values()))
    if graph.dimension == 3:
      mine = np.asarray(lie_groups.se3_to_matrix(mine))
    else:
      mine = mine.copy()
      mine[:, 2] = np.asarray(lie_groups.wrap_angle(mine[:, 2]))
    pose_difference = float(np.max(np.abs(mine - theirs_poses)))
    assert reference[path]["factors"] == len(graph.edges), name
    print(f"{name:<16}{len(graph.edges):>7}{seconds:>8.3f}{theirs:>26.17g}"
          f"{ours:>26.17g}{relative:>11.1e}{other:>11}"
          f"{pose_difference:>12.1e}")
  print(f"largest relative difference: {worst:.2e} (tolerance "
        f"{args.tolerance:.0e})")
  return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
  sys.exit(main())
