"""Manifolds for Riemannian optimization (Riemannian Levenberg-Marquardt).

Every manifold has `dim`, `point_shape`, `name` and
`retract(p, c)`, `tangent_vector(p, c)`, `coordinates(p, v)`,
`project(p, v)`, `inner(p, u, v)`, `norm(p, v)`, `distance_to_manifold(p)`,
`contains(p, atol=None)`, `check_point(p, atol=None)`,
`check_shape(p, batch_dims=None)`, `as_point(p)`,
`random_point(batch_shape, dtype, seed)`;
points are [B..., *point_shape], coordinates [B..., dim] in an orthonormal
tangent basis. See docs/manifolds.md.

Rigid motions (`lie_groups`): `SE2` (points (x, y, theta)) and `SE3`
(points (x, y, z, qx, qy, qz, qw)), coordinates twists translation first,
retraction X Exp(c); the group maps `se2_exp`, `se2_log`, `se3_exp`,
`se3_log`, `compose`, `inverse`, `between`, `transform` and the matrix and
quaternion conversions.
"""

from tfg_optim.manifolds.base import Manifold
from tfg_optim.manifolds.euclidean import Euclidean
from tfg_optim.manifolds.lie_groups import SE2
from tfg_optim.manifolds.lie_groups import SE3
from tfg_optim.manifolds.lie_groups import between
from tfg_optim.manifolds.lie_groups import compose
from tfg_optim.manifolds.lie_groups import inverse
from tfg_optim.manifolds.lie_groups import quaternion_to_rotation_matrix
from tfg_optim.manifolds.lie_groups import rotation_matrix_to_quaternion
from tfg_optim.manifolds.lie_groups import se2_exp
from tfg_optim.manifolds.lie_groups import se2_from_matrix
from tfg_optim.manifolds.lie_groups import se2_log
from tfg_optim.manifolds.lie_groups import se2_to_matrix
from tfg_optim.manifolds.lie_groups import se3_exp
from tfg_optim.manifolds.lie_groups import se3_from_matrix
from tfg_optim.manifolds.lie_groups import se3_log
from tfg_optim.manifolds.lie_groups import se3_to_matrix
from tfg_optim.manifolds.lie_groups import transform
from tfg_optim.manifolds.product import Power
from tfg_optim.manifolds.product import Product
from tfg_optim.manifolds.sphere import Sphere
from tfg_optim.manifolds.stiefel import SpecialOrthogonal
from tfg_optim.manifolds.stiefel import Stiefel
from tfg_optim.manifolds.stiefel import hat
from tfg_optim.manifolds.stiefel import rodrigues
from tfg_optim.manifolds.stiefel import skew_basis

__all__ = ["Manifold", "Euclidean", "Sphere", "SpecialOrthogonal", "Stiefel",
           "Product", "Power", "hat", "rodrigues", "skew_basis", "SE2", "SE3",
           "se2_exp", "se2_log", "se3_exp", "se3_log", "compose", "inverse",
           "between", "transform", "se2_to_matrix", "se2_from_matrix",
           "se3_to_matrix", "se3_from_matrix", "quaternion_to_rotation_matrix",
           "rotation_matrix_to_quaternion"]
