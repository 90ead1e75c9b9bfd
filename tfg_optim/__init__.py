"""tfg_optim: numerical optimizers that run as TensorFlow graph ops.

- `levenberg_marquardt.minimize`: TensorFlow Graphics' Levenberg-Marquardt.
- `least_squares`: a robust solver with tolerances, losses and results.
- `riemannian.levenberg_marquardt`: Manopt's Riemannian Levenberg-Marquardt.
- `manifolds`, `stopping`, `results`, `damping`: its building blocks; the
  damping policies (`NielsenDamping`, `TrustRegionDamping`,
  `GainRatioDamping`, `MultiplicativeDamping`) for
  `least_squares(damping=...)`.
- `lbfgs.minimize_lbfgs` / `minimize_bfgs`: Paddle's L-BFGS/BFGS interface.
"""

from tfg_optim import lbfgs
from tfg_optim import levenberg_marquardt
from tfg_optim import manifolds
from tfg_optim import results
from tfg_optim import riemannian
from tfg_optim import stopping
from tfg_optim import damping
from tfg_optim._engine import StopReason
from tfg_optim.damping import DampingPolicy
from tfg_optim.damping import GainRatioDamping
from tfg_optim.damping import MultiplicativeDamping
from tfg_optim.damping import NielsenDamping
from tfg_optim.damping import TrustRegionDamping
from tfg_optim.nonlinear_least_squares import least_squares
from tfg_optim.results import LeastSquaresResults

__version__ = "0.1.0"

__all__ = ["lbfgs", "levenberg_marquardt", "least_squares", "riemannian",
           "manifolds", "stopping", "results", "damping", "LeastSquaresResults",
           "StopReason", "DampingPolicy", "NielsenDamping",
           "TrustRegionDamping", "GainRatioDamping", "MultiplicativeDamping"]
