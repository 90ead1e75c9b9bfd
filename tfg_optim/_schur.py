"""The Schur complement solver of the damped normal equations (bundle
adjustment).

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

The reduced camera system S ([N_c d_c, N_c d_c]) has the block

    S_ab = U_a [a = b] - sum_p sum_{k, l: p(k) = p(l) = p, c(k) = a,
                                       c(l) = b} W_k V_p^-1 W_l^T,

a sum over the pairs of edges that share a point. The pairs are listed once
from the (static) index tensors, with NumPy: only pairs with c(k) <= c(l)
(S is symmetric: S_ba = S_ab^T), so their [T, d_c, d_c] products are
segment-summed into [N_c^2, d_c, d_c] and mirrored. V's [N_p, d_p, d_p]
blocks are inverted by a batched Cholesky, S is factored by a dense
Cholesky (a failed factorization gives NaN steps: a rejected step, as for
every solver of `_linear_solvers`). There is no Python loop over points or
edges; memory is O(K + T + N_c^2 d_c^2) with T = sum_p n_p (n_p + 1) / 2
pairs for n_p observations of point p.

A diagonal entry of U or V that is zero (a row no residual sees, held rows:
their columns of J are zero and so are their entries of g) is set to 1, so
the step leaves it at zero, as the dense path's Marquardt floor does.

`SchurKind` is the `_block_sparse.BlockSparseKind` whose linearizations
carry `damped_solver(regularization, scaling)`, the hook that
`_linear_solvers.damped_solver` calls. See docs/sparse.md.
"""

import numpy as np
import tensorflow as tf

from tfg_optim import _block_sparse
from tfg_optim import _linear_solvers


class Structure:
  """The static structure of a two-table problem for the Schur complement.

  Attributes:
    reduced, eliminated: the indices of the kept (camera) and eliminated
      (point) tables in the layout.
    slots: per term, (slot of the reduced table, slot of the eliminated one).
    reduced_index, eliminated_index: int32 NumPy [K] (all terms' edges
      concatenated in term order): c(k) and p(k).
    first, second: int32 NumPy [T]: the pairs (k, l) of edges sharing a
      point with c(k) <= c(l).
    pair_block: int32 NumPy [T]: c(k) N_c + c(l), the S block of a pair.
  """

  def __init__(self, layout, eliminate=None):
    if len(layout.tables) != 2:
      raise ValueError("linear_solver='schur' needs exactly two variable "
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
            f"linear_solver='schur': term {number} must read one row of "
            "each of the two tables (a camera and a point), it reads tables "
            f"{list(term.tables)}.")
      slot_r = term.tables.index(self.reduced)
      slot_e = term.tables.index(self.eliminated)
      self.slots.append((slot_r, slot_e))
      for slot, out in ((slot_r, reduced_index), (slot_e, eliminated_index)):
        value = tf.get_static_value(term.indices[slot])
        if value is None:
          raise ValueError(
              "linear_solver='schur' needs index tensors known while tracing "
              f"(NumPy arrays or constants); term {number} slot {slot} is "
              "not.")
        out.append(np.asarray(value, np.int64).reshape(-1))
    self.reduced_index = np.concatenate(reduced_index).astype(np.int32)
    self.eliminated_index = np.concatenate(eliminated_index).astype(np.int32)
    self.first, self.second = _pairs(self.reduced_index,
                                     self.eliminated_index)
    count = layout.tables[self.reduced].size
    self.pair_block = (self.reduced_index[self.first] * count +
                       self.reduced_index[self.second]).astype(np.int32)


def _pairs(reduced_index, eliminated_index):
  """(first, second) [T]: every pair of edges (k, l) that share a point,
  with c(k) <= c(l) (both orders when c(k) = c(l), and k = l), built
  without a loop over points."""
  order = np.argsort(eliminated_index, kind="stable")
  point = eliminated_index[order]
  count = np.bincount(point, minlength=int(point.max()) + 1 if len(point)
                      else 0)
  start = np.cumsum(count) - count
  repeats = count[point]  # per sorted edge: the edges of its point
  first = np.repeat(np.arange(len(order)), repeats)
  within = np.arange(len(first)) - np.repeat(np.cumsum(repeats) - repeats,
                                             repeats)
  second = start[point[first]] + within
  first, second = order[first], order[second]
  keep = reduced_index[first] <= reduced_index[second]
  return first[keep].astype(np.int32), second[keep].astype(np.int32)


class SchurComplement(_block_sparse.BlockSparse):
  """A block-sparse linearization solved by the Schur complement (bound to
  a `Structure` by `SchurKind`)."""

  structure = None

  def damped_solver(self, regularization, scaling=None):
    """Forms and factors S for lambda = regularization ([] ) and D =
    diag(scaling) ([n], or None for I); returns solve(residual, gradient)
    -> delta [n] (module docstring)."""
    structure, layout = self.structure, self.layout
    reduced = layout.tables[structure.reduced]
    eliminated = layout.tables[structure.eliminated]
    dtype = self.blocks[0].dtype
    grouped = self._by_term()
    gram_r, gram_e, cross = [], [], []
    for slots, (slot_r, slot_e) in zip(grouped, structure.slots):
      block_r, block_e = slots[slot_r][2], slots[slot_e][2]
      gram_r.append(tf.einsum("kra,krb->kab", block_r, block_r))
      gram_e.append(tf.einsum("kra,krb->kab", block_e, block_e))
      cross.append(tf.einsum("kra,krb->kab", block_r, block_e))
    concat = lambda parts: parts[0] if len(parts) == 1 else tf.concat(parts, 0)
    reduced_index = tf.constant(structure.reduced_index)
    eliminated_index = tf.constant(structure.eliminated_index)
    cross = concat(cross)  # W_k, [K, d_c, d_p]
    lam = tf.convert_to_tensor(regularization, dtype)
    damping = lam * (tf.ones([layout.tangent_dim], dtype) if scaling is None
                     else tf.broadcast_to(scaling, [layout.tangent_dim]))
    damping = layout.split_tangent(damping)

    def damped(gram, index, table, extra):
      block = tf.math.unsorted_segment_sum(gram, index, table.size)
      diagonal = tf.linalg.diag_part(block) + extra
      diagonal = tf.where(diagonal > 0, diagonal, tf.ones_like(diagonal))
      return tf.linalg.set_diag(block, diagonal)

    u = damped(concat(gram_r), reduced_index, reduced,
               damping[structure.reduced])  # [N_c, d_c, d_c]
    v = damped(concat(gram_e), eliminated_index, eliminated,
               damping[structure.eliminated])  # [N_p, d_p, d_p]
    eye = tf.eye(eliminated.dim, batch_shape=[eliminated.size], dtype=dtype)
    v_inverse = tf.linalg.cholesky_solve(_linear_solvers._cholesky(v), eye)  # pylint: disable=protected-access
    v_inverse = 0.5 * (v_inverse + tf.linalg.matrix_transpose(v_inverse))
    # W_k V_p(k)^-1, [K, d_c, d_p].
    q = tf.einsum("kab,kbc->kac", cross,
                  tf.gather(v_inverse, eliminated_index))
    products = tf.einsum(
        "tab,tcb->tac", tf.gather(q, structure.first),
        tf.gather(cross, structure.second))  # [T, d_c, d_c]
    count, dim = reduced.size, reduced.dim
    upper = tf.reshape(tf.math.unsorted_segment_sum(
        products, tf.constant(structure.pair_block), count * count),
                       [count, count, dim, dim])
    identity = tf.eye(count, dtype=dtype)[:, :, tf.newaxis, tf.newaxis]
    # Blocks a < b once, a = b (already symmetric sums) once.
    reduction = (upper + tf.transpose(upper, [1, 0, 3, 2]) * (1.0 - identity))
    schur = identity * u[:, tf.newaxis] - reduction
    schur = tf.reshape(tf.transpose(schur, [0, 2, 1, 3]),
                       [count * dim, count * dim])
    schur = 0.5 * (schur + tf.transpose(schur))
    factor = _linear_solvers._cholesky(schur)  # pylint: disable=protected-access

    def solve(residual, gradient):
      del residual
      parts = layout.split_tangent(gradient)
      g_r, g_e = parts[structure.reduced], parts[structure.eliminated]
      v_g = tf.einsum("pab,pb->pa", v_inverse, g_e)
      rhs = -g_r + tf.math.unsorted_segment_sum(
          tf.einsum("kab,kb->ka", cross, tf.gather(v_g, eliminated_index)),
          reduced_index, count)
      step_r = tf.reshape(tf.linalg.cholesky_solve(
          factor, tf.reshape(rhs, [-1, 1])), [count, dim])
      back = tf.math.unsorted_segment_sum(
          tf.einsum("kab,ka->kb", cross, tf.gather(step_r, reduced_index)),
          eliminated_index, eliminated.size)
      step_e = tf.einsum("pab,pb->pa", v_inverse, -g_e - back)
      steps = [None, None]
      steps[structure.reduced], steps[structure.eliminated] = step_r, step_e
      return layout.join_tangent(steps)

    return solve


class SchurKind(_block_sparse.BlockSparseKind):
  """`BlockSparseKind` whose linearizations solve by the Schur complement.

  Args:
    layout: a two-table `_block_sparse.Layout` (see `Structure`).
    eliminate: the index of the table to eliminate, or None for the one
      with more tangent coordinates (the points of bundle adjustment).
  """

  def __init__(self, layout, eliminate=None):
    structure = Structure(layout, eliminate)
    super().__init__(layout, dense=False)
    self.structure = structure
    self.linearization_class = type(
        "SchurComplement", (SchurComplement,),
        {"layout": layout, "dense": False, "structure": structure})
