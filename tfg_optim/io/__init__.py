"""Readers and writers of pose-graph (g2o) and bundle-adjustment (BAL) files.

- `read_g2o`, `write_g2o`, `PoseGraph`: 2-D and 3-D g2o pose graphs, poses
  in the point representation of `manifolds.SE2` / `manifolds.SE3`;
  `pose_graph_errors`, `pose_graph_residuals`, `pose_graph_cost`: the
  pose-graph cost 1/2 sum e^T Omega e, e = Log(Z_ij^-1 X_i^-1 X_j), in
  TensorFlow (GTSAM's `graph.error`).
- `read_bal`, `write_bal`, `BalProblem`: Bundle Adjustment in the Large files;
  `bal_residuals`, `bal_cost`: the BAL reprojection error in TensorFlow;
  `synthetic_bal`: generated BAL problems of any size with their truth.

See docs/io.md.
"""

from tfg_optim.io.bal import BalProblem
from tfg_optim.io.bal import bal_cost
from tfg_optim.io.bal import bal_residuals
from tfg_optim.io.bal import read_bal
from tfg_optim.io.bal import synthetic_bal
from tfg_optim.io.bal import write_bal
from tfg_optim.io.g2o import PoseGraph
from tfg_optim.io.g2o import pose_graph_cost
from tfg_optim.io.g2o import pose_graph_errors
from tfg_optim.io.g2o import pose_graph_residuals
from tfg_optim.io.g2o import read_g2o
from tfg_optim.io.g2o import square_root_information
from tfg_optim.io.g2o import write_g2o

__all__ = ["PoseGraph", "read_g2o", "write_g2o", "pose_graph_errors",
           "pose_graph_residuals", "pose_graph_cost", "square_root_information",
           "BalProblem", "read_bal", "write_bal", "bal_residuals", "bal_cost",
           "synthetic_bal"]
