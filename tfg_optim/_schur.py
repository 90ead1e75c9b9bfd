"""The Schur complement solvers of the damped normal equations (bundle
adjustment): the reduced camera system by dense Cholesky ('schur') or by
conjugate gradients on the implicit reduced system ('iterative_schur').

For a factor graph of two tables, a reduced one (cameras, N_c rows of
dimension d_c) and an eliminated one (points, N_p rows of dimension d_p),
whose every residual term reads one row of each (an observation of point
p(k) by camera c(k)), the damped normal equations
(J^T J + lambda D) delta = -g have the block form

    [ U    W ] [delta_c]   [-g_c]
    [ W^T  V ] [delta_p] = [-g_p],

    U_c = sum_{k: c(k) = c} J_ck^T J_ck + lambda D_c   ([N_c, d_c, d_c])
    V_p = sum_{k: p(k) = p} J_pk^T J_pk + lambda D_p   ([N_p, d_p, d_p])
    W   = sum_k  E_c(k) J_ck^T J_pk E_p(k)^T           (W_k = J_ck^T J_pk,
                                                          [K, d_c, d_p])

with V block diagonal, so the points are eliminated in closed form:

    S delta_c = -g_c + W V^-1 g_p,      S = U - W V^-1 W^T,
    delta_p   = V^-1 (-g_p - W^T delta_c).

Both solvers share the per-edge products (`Elimination`: U, V^-1 by a
batched Cholesky of the [N_p, d_p, d_p] blocks, W_k and W_k V_p(k)^-1), the
right-hand side and the back-substitution; they differ in how they solve
the reduced system.

**Dense ('schur').** S ([N_c d_c, N_c d_c]) has the block

    S_ab = U_a [a = b] - sum_p sum_{k, l: p(k) = p(l) = p, c(k) = a,
                                       c(l) = b} W_k V_p^-1 W_l^T,

a sum over the pairs of edges that share a point. The pairs are listed once
from the (static) index tensors, with NumPy: only pairs with c(k) <= c(l)
(S is symmetric: S_ba = S_ab^T), so their [T, d_c, d_c] products are
segment-summed into [N_c^2, d_c, d_c] and mirrored. S is factored by a
dense Cholesky (a failed factorization gives NaN steps: a rejected step, as
for every solver of `_linear_solvers`). Memory O(K + T + N_c^2 d_c^2) with
T = sum_p n_p (n_p + 1) / 2 pairs for n_p observations of point p.

**Iterative ('iterative_schur', Ceres' ITERATIVE_SCHUR with the
SCHUR_JACOBI preconditioner).** S is never formed: preconditioned conjugate
gradients (`_linear_solvers._cg_loop`) on S delta_c = b use the product

    S x = U x - W (V^-1 (W^T x))

(per edge: a gather of x_c(k), W_k^T, a segment sum per point, V_p^-1, W_k,
a segment sum per camera: O(K) per iteration), preconditioned by the block
diagonal of S,

    M_c = U_c - sum_{k, l: c(k) = c(l) = c, p(k) = p(l)} W_k V_p(k)^-1 W_l^T,

i.e. the pairs of edges of one camera that share a point (k = l alone
unless a camera sees a point twice): [N_c, d_c, d_c] blocks factored by a
batched Cholesky. Conjugate gradients stop when the residual has fallen
by `tolerance` in the M^-1 norm, ||S x - b||_M^-1 <= tolerance ||b||_M^-1,
or after `max_iterations` (defaults `ITERATIVE_TOLERANCE` = 1e-3,
`ITERATIVE_MAX_ITERATIONS` = 500): a truncated Newton step, as Ceres' LM
takes with its forcing sequence (Ceres stops CG by the relative decrease of
the quadratic model, eta = 0.1; here a fixed residual tolerance), judged by
the gain ratio with its own model decrease like every step. Memory
O(K + N_p d_p^2 + N_c d_c^2): no pair list beyond one camera's, no N_c^2
term. A non-finite right-hand side or preconditioner gives NaN steps (a
rejection).

A diagonal entry of U or V that is zero (a row no residual sees, held rows:
their columns of J are zero and so are their entries of g) is set to 1, so
the step leaves it at zero, as the dense path's Marquardt floor does.

`SchurKind` is the `_block_sparse.BlockSparseKind` whose linearizations
carry `damped_solver(regularization, scaling)`, the hook that
`_linear_solvers.damped_solver` calls. See docs/bundle_adjustment.md.
"""

import collections

import numpy as np
import tensorflow as tf

from tfg_optim import _batch
from tfg_optim import _block_sparse
from tfg_optim import _linear_solvers

# 'iterative_schur': conjugate gradients stop once the residual of the
# reduced system has fallen by this factor in the SCHUR_JACOBI
# preconditioner's inverse norm, or after this many iterations (Ceres'
# default max_linear_solver_iterations). A fixed tolerance, not a forcing
# sequence: on the synthetic BAL problems of docs/bundle_adjustment.md,
# 1e-3 took the dense solver's iteration count (5 and 6) and the least time
# of 1e-1, 1e-2, 1e-3 and 1e-6 (a Jacobian costs as much as many CG
# iterations there, so fewer, better steps pay).
ITERATIVE_TOLERANCE = 1e-3
ITERATIVE_MAX_ITERATIONS = 500


class Structure:
  """The static structure of a two-table problem for the Schur complement.

  Attributes:
    reduced, eliminated: the indices of the kept (camera) and eliminated
      (point) tables in the layout.
    slots: per term, (slot of the reduced table, slot of the eliminated one).
    reduced_index, eliminated_index: int32 NumPy [K] (all terms' edges
      concatenated in term order): c(k) and p(k).
    first, second: int32 NumPy [T]: the pairs (k, l) of edges sharing a
      point with c(k) <= c(l) (dense S only; None for the iterative
      solver).
    pair_block: int32 NumPy [T]: c(k) N_c + c(l), the S block of a pair
      (dense only).
    diagonal_first, diagonal_second: int32 NumPy [T_d]: the pairs (k, l)
      of edges of one camera sharing a point, both orders (the SCHUR_JACOBI
      blocks; iterative only).
  """

  def __init__(self, layout, eliminate=None, dense=True):
    solver = "'schur'" if dense else "'iterative_schur'"
    if len(layout.tables) != 2:
      raise ValueError(f"linear_solver={solver} needs exactly two variable "
                       f"tables (cameras and points), got "
                       f"{len(layout.tables)}.")
    if eliminate is None:  # the larger table: the smaller reduced system
      sizes = [t.size * t.dim for t in layout.tables]
      eliminate = 1 if sizes[1] >= sizes[0] else 0
    self.eliminated, self.reduced = eliminate, 1 - eliminate
    self.slots, reduced_index, eliminated_index = [], [], []
    for number, term in enumerate(layout.terms):
      if sorted(term.tables) != [0, 1]:
        raise ValueError(
            f"linear_solver={solver}: term {number} must read one row of "
            "each of the two tables (a camera and a point), it reads tables "
            f"{list(term.tables)}.")
      slot_r = term.tables.index(self.reduced)
      slot_e = term.tables.index(self.eliminated)
      self.slots.append((slot_r, slot_e))
      for slot, out in ((slot_r, reduced_index), (slot_e, eliminated_index)):
        value = tf.get_static_value(term.indices[slot])
        if value is None:
          raise ValueError(
              f"linear_solver={solver} needs index tensors known while "
              "tracing "
              f"(NumPy arrays or constants); term {number} slot {slot} is "
              "not.")
        out.append(np.asarray(value, np.int64).reshape(-1))
    self.reduced_index = np.concatenate(reduced_index).astype(np.int32)
    self.eliminated_index = np.concatenate(eliminated_index).astype(np.int32)
    self.first = self.second = self.pair_block = None
    self.diagonal_first = self.diagonal_second = None
    if dense:
      self.first, self.second = _pairs(self.reduced_index,
                                       self.eliminated_index)
      count = layout.tables[self.reduced].size
      self.pair_block = (self.reduced_index[self.first] * count +
                         self.reduced_index[self.second]).astype(np.int32)
    else:
      points = layout.tables[self.eliminated].size
      self.diagonal_first, self.diagonal_second = _sharing(
          self.reduced_index.astype(np.int64) * points +
          self.eliminated_index)


def _sharing(key):
  """(first, second) int32 [T]: every ordered pair of edges (k, l) with
  key[k] = key[l] (k = l included), built without a loop over keys: the
  edges sorted by key, each repeated by its key's count."""
  order = np.argsort(key, kind="stable")
  sorted_key = key[order]
  _, group, count = np.unique(sorted_key, return_inverse=True,
                              return_counts=True)
  start = np.cumsum(count) - count
  repeats = count[group]  # per sorted edge: the edges of its key
  first = np.repeat(np.arange(len(order)), repeats)
  within = np.arange(len(first)) - np.repeat(np.cumsum(repeats) - repeats,
                                             repeats)
  second = start[group[first]] + within
  return order[first].astype(np.int32), order[second].astype(np.int32)


def _pairs(reduced_index, eliminated_index):
  """(first, second) [T]: every pair of edges (k, l) that share a point,
  with c(k) <= c(l) (both orders when c(k) = c(l), and k = l), built
  without a loop over points."""
  first, second = _sharing(eliminated_index)
  keep = reduced_index[first] <= reduced_index[second]
  return first[keep], second[keep]


Elimination = collections.namedtuple(
    "Elimination", ["u", "v_inverse", "cross", "weighted"])
Elimination.__doc__ = """The per-edge products both Schur solvers use.

u: [N_c, d_c, d_c], the damped camera blocks U.
v_inverse: [N_p, d_p, d_p], V^-1 (symmetrized).
cross: [K, d_c, d_p], W_k = J_ck^T J_pk.
weighted: [K, d_c, d_p], W_k V_p(k)^-1.
"""


class SchurComplement(_block_sparse.BlockSparse):
  """A block-sparse linearization solved by the Schur complement (bound to
  a `Structure`, and to the dense or iterative reduced solve, by
  `SchurKind`)."""

  structure = None
  iterative = False
  tolerance = ITERATIVE_TOLERANCE
  max_iterations = ITERATIVE_MAX_ITERATIONS

  def damped_solver(self, regularization, scaling=None, products=None):
    """Returns solve(residual, gradient) -> the `_linear_solvers.
    SolveOutcome` of delta [n] for lambda =
    regularization ([]) and D = diag(scaling) ([n], or None for I): the
    reduced system by dense Cholesky, or by conjugate gradients on the
    implicit S (`iterative`), then the points by back-substitution
    (module docstring). With `products` (`eliminate`), of that matrix +
    lambda D instead of J^T J + lambda D."""
    elimination = self.eliminate(regularization, scaling, products)
    if self.iterative:
      reduced_solve = self._conjugate_gradients(elimination)
    else:
      factor = _linear_solvers._cholesky(self.reduced_matrix(elimination))  # pylint: disable=protected-access
      reduced_solve = lambda rhs: _linear_solvers.direct_outcome(
          tf.linalg.cholesky_solve(factor, rhs[:, tf.newaxis])[:, 0])
    return self._solver(elimination, reduced_solve)

  def eliminate(self, regularization, scaling=None, products=None):
    """The `Elimination` of the damped system (lambda = regularization,
    D = diag(scaling) or I).

    `products`: None (J^T J), or (term number, slot a, slot b) ->
    [K, d_a, d_b], the per-edge blocks of another symmetric matrix of
    J^T J's sparsity (the exact Hessian of the cost:
    `_block_sparse.EdgeHessian.pair`), whose U, V and W then replace
    J^T J's. Its point-point part is block diagonal too: an edge reads
    one point, so no block couples two points, whatever the edge's
    second derivatives (robust loss and retraction included). Its
    diagonal is taken as it is (a zero or negative entry is left to fail
    V's or S's factorization: no floor of 1 as for J^T J's unseen rows;
    coordinates to hold get 1 through `scaling`)."""
    structure, layout = self.structure, self.layout
    reduced = layout.tables[structure.reduced]
    eliminated = layout.tables[structure.eliminated]
    dtype = self.blocks[0].dtype
    gram_r, gram_e, cross = [], [], []
    for number, (slots, (slot_r, slot_e)) in enumerate(
        zip(self._by_term(), structure.slots)):
      if products is not None:
        gram_r.append(products(number, slot_r, slot_r))
        gram_e.append(products(number, slot_e, slot_e))
        cross.append(products(number, slot_r, slot_e))
        continue
      block_r, block_e = slots[slot_r][2], slots[slot_e][2]
      gram_r.append(tf.einsum("kra,krb->kab", block_r, block_r))
      gram_e.append(tf.einsum("kra,krb->kab", block_e, block_e))
      cross.append(tf.einsum("kra,krb->kab", block_r, block_e))
    lam = tf.convert_to_tensor(regularization, dtype)
    damping = lam * (tf.ones([layout.tangent_dim], dtype) if scaling is None
                     else tf.broadcast_to(scaling, [layout.tangent_dim]))
    damping = layout.split_tangent(damping)

    def damped(gram, index, table, extra):
      block = tf.math.unsorted_segment_sum(gram, index, table.size)
      diagonal = tf.linalg.diag_part(block) + extra
      if products is None:
        diagonal = tf.where(diagonal > 0, diagonal, tf.ones_like(diagonal))
      return tf.linalg.set_diag(block, diagonal)

    u = damped(_concat(gram_r), self._reduced_index(), reduced,
               damping[structure.reduced])
    v = damped(_concat(gram_e), self._eliminated_index(), eliminated,
               damping[structure.eliminated])
    eye = tf.eye(eliminated.dim, batch_shape=[eliminated.size], dtype=dtype)
    v_inverse = tf.linalg.cholesky_solve(_linear_solvers._cholesky(v), eye)  # pylint: disable=protected-access
    v_inverse = 0.5 * (v_inverse + tf.linalg.matrix_transpose(v_inverse))
    cross = _concat(cross)
    weighted = tf.einsum("kab,kbc->kac", cross,
                         tf.gather(v_inverse, self._eliminated_index()))
    return Elimination(u, v_inverse, cross, weighted)

  def reduced_matrix(self, elimination):
    """S, [N_c d_c, N_c d_c], assembled from the static pair list (dense
    solver only)."""
    structure = self.structure
    reduced = self.layout.tables[structure.reduced]
    products = tf.einsum(
        "tab,tcb->tac", tf.gather(elimination.weighted, structure.first),
        tf.gather(elimination.cross, structure.second))  # [T, d_c, d_c]
    count, dim = reduced.size, reduced.dim
    upper = tf.reshape(tf.math.unsorted_segment_sum(
        products, tf.constant(structure.pair_block), count * count),
                       [count, count, dim, dim])
    identity = tf.eye(count, dtype=products.dtype)[:, :, tf.newaxis,
                                                   tf.newaxis]
    # Blocks a < b once, a = b (already symmetric sums) once.
    reduction = (upper + tf.transpose(upper, [1, 0, 3, 2]) * (1.0 - identity))
    schur = identity * elimination.u[:, tf.newaxis] - reduction
    schur = tf.reshape(tf.transpose(schur, [0, 2, 1, 3]),
                       [count * dim, count * dim])
    return 0.5 * (schur + tf.transpose(schur))

  def schur_jacobi(self, elimination):
    """M, [N_c, d_c, d_c]: the diagonal blocks of S (the SCHUR_JACOBI
    preconditioner), from the pairs of one camera's edges sharing a point
    (iterative solver only)."""
    structure = self.structure
    products = tf.einsum(
        "tab,tcb->tac",
        tf.gather(elimination.weighted, structure.diagonal_first),
        tf.gather(elimination.cross, structure.diagonal_second))
    blocks = elimination.u - tf.math.unsorted_segment_sum(
        products, tf.constant(structure.reduced_index[
            structure.diagonal_first]),
        self.layout.tables[structure.reduced].size)
    return 0.5 * (blocks + tf.linalg.matrix_transpose(blocks))

  def _reduced_index(self):
    return tf.constant(self.structure.reduced_index)

  def _eliminated_index(self):
    return tf.constant(self.structure.eliminated_index)

  def _to_reduced(self, elimination, y):
    """sum_{k: c(k) = c} W_k y_p(k): [N_p, d_p] -> [N_c, d_c]."""
    return tf.math.unsorted_segment_sum(
        tf.einsum("kab,kb->ka", elimination.cross,
                  tf.gather(y, self._eliminated_index())),
        self._reduced_index(), self.layout.tables[self.structure.reduced].size)

  def _to_eliminated(self, elimination, x):
    """W^T x = sum_{k: p(k) = p} W_k^T x_c(k): [N_c, d_c] -> [N_p, d_p]."""
    return tf.math.unsorted_segment_sum(
        tf.einsum("kab,ka->kb", elimination.cross,
                  tf.gather(x, self._reduced_index())),
        self._eliminated_index(),
        self.layout.tables[self.structure.eliminated].size)

  def _solver(self, elimination, reduced_solve):
    """solve(residual, gradient) -> `_linear_solvers.SolveOutcome`: the
    reduced right-hand side, the reduced system by `reduced_solve` ([N_c d_c]
    -> the `SolveOutcome` of [N_c d_c]), the points by back-substitution
    (converged where the reduced solve converged and the step is
    finite)."""
    structure, layout = self.structure, self.layout
    reduced = layout.tables[structure.reduced]
    v_inverse = elimination.v_inverse

    def solve(residual, gradient):
      del residual
      parts = layout.split_tangent(gradient)
      g_r, g_e = parts[structure.reduced], parts[structure.eliminated]
      rhs = -g_r + self._to_reduced(
          elimination, tf.einsum("pab,pb->pa", v_inverse, g_e))
      outcome = reduced_solve(tf.reshape(rhs, [-1]))
      step_r = tf.reshape(outcome.solution, [reduced.size, reduced.dim])
      back = self._to_eliminated(elimination, step_r)
      step_e = tf.einsum("pab,pb->pa", v_inverse, -g_e - back)
      steps = [None, None]
      steps[structure.reduced], steps[structure.eliminated] = step_r, step_e
      step = layout.join_tangent(steps)
      finite = _batch.all_finite(step, 0)
      return outcome._replace(
          solution=step, converged=outcome.converged & finite,
          breakdown=outcome.breakdown | tf.logical_not(finite))

    return solve

  def _conjugate_gradients(self, elimination):
    """rhs -> the `_linear_solvers.SolveOutcome` of S^-1 rhs by
    SCHUR_JACOBI-preconditioned conjugate gradients on the implicit S
    ([N_c d_c] vectors); NaN (a breakdown) for a non-finite rhs or
    preconditioner."""
    reduced = self.layout.tables[self.structure.reduced]
    shape = [reduced.size, reduced.dim]
    preconditioner = self.schur_jacobi(elimination)
    factor = _linear_solvers._cholesky(preconditioner)  # pylint: disable=protected-access
    factor_finite = tf.reduce_all(tf.math.is_finite(factor))

    def operator(x):
      x = tf.reshape(x, shape)
      t = tf.einsum("pab,pb->pa", elimination.v_inverse,
                    self._to_eliminated(elimination, x))
      return tf.reshape(tf.einsum("cab,cb->ca", elimination.u, x) -
                        self._to_reduced(elimination, t), [-1])

    def precondition(r):
      return tf.reshape(tf.linalg.cholesky_solve(
          factor, tf.reshape(r, shape + [1])), [-1])

    def reduced_solve(rhs):
      outcome = _linear_solvers._cg_loop(  # pylint: disable=protected-access
          operator, rhs, precondition, self.max_iterations, self.tolerance)
      finite = _batch.all_finite(rhs, 0) & factor_finite
      return outcome._replace(
          solution=tf.where(finite, outcome.solution,
                            tf.constant(np.nan, rhs.dtype)),
          converged=outcome.converged & finite,
          breakdown=outcome.breakdown | tf.logical_not(finite))

    return reduced_solve


def _concat(parts):
  return parts[0] if len(parts) == 1 else tf.concat(parts, 0)


class SchurKind(_block_sparse.BlockSparseKind):
  """`BlockSparseKind` whose linearizations solve by the Schur complement.

  Args:
    layout: a two-table `_block_sparse.Layout` (see `Structure`).
    eliminate: the index of the table to eliminate, or None for the one
      with more tangent coordinates (the points of bundle adjustment).
    iterative: False for the dense Cholesky of S ('schur'), True for
      SCHUR_JACOBI-preconditioned conjugate gradients on the implicit S
      ('iterative_schur').
    tolerance, max_iterations: the conjugate gradients' stop (iterative
      only; None: `ITERATIVE_TOLERANCE`, `ITERATIVE_MAX_ITERATIONS`).
  """

  def __init__(self, layout, eliminate=None, iterative=False,
               tolerance=None, max_iterations=None):
    structure = Structure(layout, eliminate, dense=not iterative)
    super().__init__(layout, dense=False)
    self.structure = structure
    self.linearization_class = type(
        "SchurComplement", (SchurComplement,),
        {"layout": layout, "dense": False, "structure": structure,
         "iterative": iterative,
         "tolerance": float(ITERATIVE_TOLERANCE if tolerance is None
                            else tolerance),
         "max_iterations": int(ITERATIVE_MAX_ITERATIONS if max_iterations
                               is None else max_iterations)})
