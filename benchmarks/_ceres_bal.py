"""Ceres on a BAL file through COLMAP's bundle adjuster (pycolmap): the peer
of benchmarks/bundle_adjustment.py, run in its own venv (pyceres, pycolmap,
numpy, scipy; no TensorFlow):

    /work/venv-ceres/bin/python benchmarks/_ceres_bal.py IN.txt OUT.txt \
        [--max-iterations N] [--linear-solver auto|DENSE_SCHUR|SPARSE_SCHUR|
                              ITERATIVE_SCHUR]

BAL's camera is COLMAP's RADIAL camera (f, cx, cy, k1, k2) with the
principal point held at 0 and a frame turned by 180 degrees about x: BAL
projects p = -P_xy / P_z with P = R X + t (the camera looks down -z);
with R' = diag(1, -1, -1) R, t' = diag(1, -1, -1) t COLMAP's P' = R' X + t'
= (P_x, -P_y, -P_z) projects to P'_xy / P'_z = (p_x, -p_y), so observing
(x, -y) gives the same residuals up to the sign of y, and the same cost.
Each BAL camera is one COLMAP camera (its own intrinsics) and one image.
Ceres' solver is left as COLMAP configures it (Levenberg-Marquardt, sparse
Schur or dense Schur by size, Ceres' initial trust-region radius 1e4;
`--linear-solver` other than 'auto' turns COLMAP's choice by size off and
names Ceres' linear solver, ITERATIVE_SCHUR with the SCHUR_JACOBI
preconditioner and COLMAP's other linear-solver settings: at most 200 CG
iterations, Ceres' forcing sequence eta = 0.1), with
function, gradient and parameter tolerances 1e-12 (tfg_optim's program:
relative cost change 1e-12, relative step 1e-12), two threads, no loss
function; the gauge is not fixed (UNSPECIFIED), as in Ceres' own BAL
example. COLMAP refuses points seen once (track length 1).

Prints one JSON line: initial and final cost (Ceres' summary), iterations,
solve time (the BundleAdjuster's Solve, Python set-up apart), the process'
peak resident memory (MB), and writes
OUT.txt (the optimized problem in BAL form, floats by repr) so that the
benchmark evaluates every solver's cost one way.
"""

import argparse
import json
import resource
import sys
import time

import numpy as np
import pycolmap
import pyceres
from scipy.spatial.transform import Rotation

FLIP = np.diag([1.0, -1.0, -1.0])


def read_bal(path):
  with open(path, encoding="utf-8") as stream:
    tokens = stream.read().split()
  cameras, points, observations = (int(x) for x in tokens[:3])
  table = np.array(tokens[3:3 + 4 * observations]).reshape(-1, 4)
  rest = np.array(tokens[3 + 4 * observations:], np.float64)
  return (rest[:9 * cameras].reshape(-1, 9), rest[9 * cameras:].reshape(-1, 3),
          table[:, 0].astype(np.int64), table[:, 1].astype(np.int64),
          table[:, 2:].astype(np.float64))


def write_bal(path, cameras, points, camera_index, point_index, observed):
  lines = [f"{len(cameras)} {len(points)} {len(observed)}"]
  lines += [f"{c} {p} {x!r} {y!r}" for c, p, (x, y) in zip(
      camera_index.tolist(), point_index.tolist(), observed.tolist())]
  lines += map(repr, cameras.ravel().tolist())
  lines += map(repr, points.ravel().tolist())
  with open(path, "w", encoding="utf-8") as stream:
    stream.write("\n".join(lines) + "\n")


def reconstruction(cameras, points, camera_index, point_index, observed):
  """A pycolmap.Reconstruction of the BAL problem (see the docstring)."""
  scene = pycolmap.Reconstruction()
  point_ids = [scene.add_point3D(x, pycolmap.Track(), np.zeros(3, np.uint8))
               for x in points]
  image_ids = []
  for c, camera in enumerate(cameras):
    colmap_camera = pycolmap.Camera(
        model="RADIAL", width=2000, height=2000,
        params=[camera[6], 0.0, 0.0, camera[7], camera[8]], camera_id=c + 1)
    scene.add_camera_with_trivial_rig(colmap_camera)
    rotation = FLIP @ Rotation.from_rotvec(camera[:3]).as_matrix()
    pose = pycolmap.Rigid3d(pycolmap.Rotation3d(rotation), FLIP @ camera[3:6])
    mine = np.flatnonzero(camera_index == c)
    image = pycolmap.Image(
        name=f"{c}", camera_id=c + 1, image_id=c + 1,
        points2D=pycolmap.Point2DList([
            pycolmap.Point2D(np.array([x, -y])) for x, y in observed[mine]]))
    scene.add_image_with_trivial_frame(image, pose)
    for slot, k in enumerate(mine):
      scene.add_observation(point_ids[point_index[k]],
                            pycolmap.TrackElement(c + 1, slot))
    image_ids.append(c + 1)
  return scene, point_ids, image_ids


def back_to_bal(scene, point_ids, count):
  cameras = np.zeros([count, 9])
  for c in range(count):
    image = scene.image(c + 1)
    pose = image.cam_from_world()
    rotation = FLIP @ pose.rotation.matrix()
    cameras[c, :3] = Rotation.from_matrix(rotation).as_rotvec()
    cameras[c, 3:6] = FLIP @ pose.translation
    f, _, _, k1, k2 = scene.camera(c + 1).params
    cameras[c, 6:] = f, k1, k2
  points = np.array([scene.point3D(i).xyz for i in point_ids])
  return cameras, points


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("input")
  parser.add_argument("output")
  parser.add_argument("--max-iterations", type=int, default=100)
  parser.add_argument("--linear-solver", default="auto",
                      choices=["auto", "DENSE_SCHUR", "SPARSE_SCHUR",
                               "ITERATIVE_SCHUR"])
  args = parser.parse_args()
  cameras, points, camera_index, point_index, observed = read_bal(args.input)
  begin = time.perf_counter()
  scene, point_ids, image_ids = reconstruction(cameras, points, camera_index,
                                               point_index, observed)
  config = pycolmap.BundleAdjustmentConfig()
  for image_id in image_ids:
    config.add_image(image_id)
  options = pycolmap.BundleAdjustmentOptions()
  options.refine_focal_length = True
  options.refine_extra_params = True
  options.refine_principal_point = False
  options.print_summary = False
  solver = options.ceres.solver_options
  solver.max_num_iterations = args.max_iterations
  solver.function_tolerance = 1e-12
  solver.gradient_tolerance = 1e-12
  solver.parameter_tolerance = 1e-12
  solver.num_threads = 2
  if args.linear_solver != "auto":
    options.ceres.auto_select_solver_type = False
    solver.linear_solver_type = getattr(pyceres.LinearSolverType,
                                        args.linear_solver)
    if args.linear_solver == "ITERATIVE_SCHUR":
      solver.preconditioner_type = pyceres.PreconditionerType.SCHUR_JACOBI
  options.ceres.solver_options = solver
  setup = time.perf_counter() - begin
  adjuster = pycolmap.create_default_bundle_adjuster(options, config, scene)
  begin = time.perf_counter()
  summary = adjuster.solve()
  solve_time = time.perf_counter() - begin
  optimized = back_to_bal(scene, point_ids, len(cameras))
  write_bal(args.output, *optimized, camera_index, point_index, observed)
  report = {"setup_time": setup, "solve_time": solve_time,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss /
                       1024}
  for name in ("initial_cost", "final_cost", "num_successful_steps",
               "num_unsuccessful_steps", "termination_type", "message",
               "linear_solver_type_used", "preconditioner_type_used",
               "num_linear_solves"):
    for source in (summary, getattr(summary, "ceres_summary", None)):
      if source is not None and hasattr(source, name):
        value = getattr(source, name)
        report[name] = value if isinstance(value, (int, float, str)) else str(
            value)
        break
  print(json.dumps(report))
  return 0


if __name__ == "__main__":
  sys.exit(main())
