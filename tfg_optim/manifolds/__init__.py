"""Manifolds for Riemannian optimization (Riemannian Levenberg-Marquardt).

Every manifold has `dim`, `point_shape`, `name` and
`retract(p, c)`, `tangent_vector(p, c)`, `coordinates(p, v)`,
`project(p, v)`, `inner(p, u, v)`, `norm(p, v)`, `distance_to_manifold(p)`,
`contains(p, atol=None)`, `check_point(p, atol=None)`,
`check_shape(p, batch_dims=None)`, `as_point(p)`,
`random_point(batch_shape, dtype, seed)`;
points are [B..., *point_shape], coordinates [B..., dim] in an orthonormal
tangent basis. See docs/manifolds.md.
"""

from tfg_optim.manifolds.base import Manifold
from tfg_optim.manifolds.euclidean import Euclidean
from tfg_optim.manifolds.product import Power
from tfg_optim.manifolds.product import Product
from tfg_optim.manifolds.sphere import Sphere
from tfg_optim.manifolds.stiefel import SpecialOrthogonal
from tfg_optim.manifolds.stiefel import Stiefel
from tfg_optim.manifolds.stiefel import hat
from tfg_optim.manifolds.stiefel import rodrigues
from tfg_optim.manifolds.stiefel import skew_basis

__all__ = ["Manifold", "Euclidean", "Sphere", "SpecialOrthogonal", "Stiefel",
           "Product", "Power", "hat", "rodrigues", "skew_basis"]
