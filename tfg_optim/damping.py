"""Damping policies: how Levenberg-Marquardt chooses lambda and judges steps.

A policy keeps a state per problem (a named tuple of [B...] tensors), turns
it into the regularization lambda of the damped system
(J^T J + lambda D) s = -J^T F, solves it (most policies with the dense
Cholesky solver; the trust region with its own), and after each trial step
says whether the step is accepted and how the state changes. Its methods
mirror Ceres' `TrustRegionStrategy`: `solver` (ComputeStep), `update`
(StepAccepted / StepRejected) and `invalid` (StepIsInvalid: a step refused
after the fact, e.g. one that made a Jacobian column vanish).

    policy          lambda                       accept iff        state
    Multiplicative  starts at lambda_0, *= k     cost decreases    lambda
                    on rejection (TF Graphics)
    GainRatio       mu ||F||^2 (Manopt)          rho >= eta        mu
    Nielsen         Nielsen's update, D scaled   rho > acceptance  lambda, nu, D
    TrustRegion     from a radius (More 1978)    rho > 1e-4        radius, lambda, D

with the gain ratio rho = actual decrease / the model's predicted decrease
and D Marquardt's scaling: the running maximum of diag(J^T J) (MINPACK's
choice; a column that has always been zero gets 1), which makes the method
invariant to the scale of each variable.
"""

import collections

import numpy as np
import tensorflow as tf

from tfg_optim import _batch
from tfg_optim import _linear_solvers

__all__ = ["Step", "DampingPolicy", "MultiplicativeDamping",
           "GainRatioDamping", "NielsenDamping", "TrustRegionDamping",
           "MultiplicativeState", "GainRatioState", "NielsenState",
           "TrustRegionState"]

Step = collections.namedtuple(
    "Step", ["cost", "candidate_cost", "model_decrease", "penalty", "finite",
             "scaled_norm", "curvature"])
Step.__doc__ = """What a damping policy sees of one trial step.

cost: cost at the current point. candidate_cost: cost at the candidate.
model_decrease: decrease of the Gauss-Newton model, -g^T v - 1/2 ||J v||^2,
  for the damped step v (without geodesic acceleration).
penalty: 1/2 lambda v^T D v, the damping term of the regularized model.
finite: whether the step and the candidate cost are finite.
scaled_norm: ||D^1/2 s|| of the step s tried (||s|| for an unscaled policy).
curvature: ||J v||^2, the model's curvature term.
"""

MultiplicativeState = collections.namedtuple("MultiplicativeState", ["lam"])
GainRatioState = collections.namedtuple("GainRatioState", ["mu"])
NielsenState = collections.namedtuple("NielsenState", ["lam", "nu", "scale"])
TrustRegionState = collections.namedtuple("TrustRegionState",
                                          ["radius", "lam", "scale"])


class DampingPolicy:
  """The interface the engine's loop calls; see the module docstring.

  A `scaled` policy's state has a `scale` field, D's diagonal [B..., n].
  """

  scaled = False

  def initial(self, dtype, batch_shape, linearization):
    """The state at the start, from the linearization there (J through
    `column_norms()`, `matvec`, `rmatvec`; see `tfg_optim._linearization`)."""
    raise NotImplementedError

  def observe_linearization(self, state, linearization):
    """The state after the linearization changed (Marquardt's running
    maximum)."""
    del linearization
    return state

  def scaling(self, state):
    """D's diagonal [B..., n] (scaled policies only)."""
    return state.scale

  def damping_value(self, state):
    """The [B...] number reported as `damping` in results and records."""
    return self.regularization(state, None)

  def regularization(self, state, cost):
    """lambda [B...] for the current cost."""
    raise NotImplementedError

  def solver(self, state, linearization, gradient, regularization,
             scaling):
    """(`solve(residual, gradient)` for this iteration, returning a
    `_linear_solvers.SolveOutcome`, and the state that `update` is given);
    by default the dense Cholesky solver (conjugate gradients for a
    matrix-free linearization, to the forcing tolerance of `gradient`
    where it asks for inexact steps)."""
    return (_linear_solvers.damped_solver(linearization, regularization,
                                          scaling, gradient), state)

  def update(self, state, step):
    """(accepted [B...] bool, new state) after a trial `Step`."""
    raise NotImplementedError

  def invalid(self, state, step):
    """The state after a step that was refused after the fact: as after a
    rejection of `step`."""
    raise NotImplementedError


def _marquardt_scale(linearization, previous=None):
  """diag(J^T J), the squared column norms [B..., n]: at the start with 1
  for a zero column, later the running maximum with `previous`."""
  column_norms = linearization.column_norms()
  if previous is None:
    return tf.where(column_norms > 0, column_norms, tf.ones_like(column_norms))
  return tf.maximum(previous, column_norms)


class _MarquardtScaled(DampingPolicy):
  """A policy whose state carries Marquardt's D as `scale`."""

  def observe_linearization(self, state, linearization):
    return state._replace(scale=_marquardt_scale(linearization, state.scale))


def _gain_ratio_test(step, threshold):
  """(rho, accepted): rho = actual / Gauss-Newton model decrease; accepted
  iff the step is finite, the model decreases and rho > threshold."""
  gain = (step.cost - step.candidate_cost) / step.model_decrease
  accepted = (step.finite & (step.model_decrease > 0) &
              (gain > tf.constant(threshold, gain.dtype)))
  return gain, accepted


class MultiplicativeDamping(DampingPolicy):
  """TensorFlow Graphics' rule: lambda starts at `initial_regularizer`.

  Accept iff cost(q) < cost(p) strictly; on rejection lambda *= multiplier;
  lambda never decreases.
  """

  def __init__(self, initial_regularizer, multiplier):
    self.initial_regularizer = initial_regularizer
    self.multiplier = multiplier

  def initial(self, dtype, batch_shape, linearization):
    return MultiplicativeState(
        tf.fill(batch_shape, tf.constant(self.initial_regularizer, dtype)))

  def regularization(self, state, cost):
    return state.lam

  def invalid(self, state, step):
    return MultiplicativeState(
        state.lam * tf.constant(self.multiplier, state.lam.dtype))

  def update(self, state, step):
    accepted = tf.less(step.candidate_cost, step.cost) & step.finite
    return accepted, MultiplicativeState(
        tf.where(accepted, state.lam, self.invalid(state, step).lam))


class GainRatioDamping(DampingPolicy):
  """Manopt's rule (Adachi, Okuno & Takeda 2022, Algorithm 1).

  lambda = mu ||F(p)||^2. The gain ratio
      rho = (||F(p)||^2 - ||F(q)||^2) / (2 * predicted decrease)
  compares the actual decrease with the decrease of the regularized model.
  Accept iff rho >= eta; then, if `expect_zero_residual`,
  mu <- max(mu_min, mu / beta). Reject: mu <- beta mu.
  """

  def __init__(self, eta, damping_term_min, beta, expect_zero_residual):
    self.eta = eta
    self.damping_term_min = damping_term_min
    self.beta = beta
    self.expect_zero_residual = expect_zero_residual

  def initial(self, dtype, batch_shape, linearization):
    return GainRatioState(
        tf.fill(batch_shape, tf.constant(self.damping_term_min, dtype)))

  def damping_value(self, state):
    return state.mu

  def regularization(self, state, cost):
    return state.mu * (2.0 * cost)

  def invalid(self, state, step):
    return GainRatioState(state.mu * tf.constant(self.beta, state.mu.dtype))

  def update(self, state, step):
    mu = state.mu
    dtype = mu.dtype
    gain = (step.cost - step.candidate_cost) / (step.model_decrease -
                                                 step.penalty)
    accepted = (gain >= tf.constant(self.eta, dtype)) & step.finite
    if self.expect_zero_residual:
      on_accept = tf.maximum(tf.constant(self.damping_term_min, dtype),
                             mu / tf.constant(self.beta, dtype))
    else:
      on_accept = mu
    return accepted, GainRatioState(
        tf.where(accepted, on_accept, self.invalid(state, step).mu))


class NielsenDamping(_MarquardtScaled):
  """Gain-ratio acceptance with a lambda that also falls.

  Nielsen's update (Madsen, Nielsen & Tingleff 2004, sec. 3.2) with
  Marquardt's scaling D (unless `scaled=False`: then D = I and lambda starts
  relative to the largest diagonal entry of J^T J). lambda starts at
  `initial`. The gain ratio compares the actual decrease with the
  Gauss-Newton model's,
      rho = (cost(p) - cost(q)) / (-g^T s - 1/2 ||J s||^2).
  Accept iff rho > `acceptance`; then lambda *= max(1/3, 1 - (2 rho - 1)^3)
  (at least eps) and nu = 2; else lambda *= nu and nu *= 2 (lambda at most
  1e300, 1e37 in float32).

  `scaling` chooses D when scaled: 'running_max' (default), Marquardt's
  running maximum of diag(J^T J) (MINPACK); 'current', diag(J^T J) at the
  current point clamped to [1e-6, 1e32] (GTSAM's `diagonalDamping` with its
  `minDiagonal` / `maxDiagonal`, Ceres' bounds): D follows the curvature
  down after the start, which the running maximum never does (a pose
  graph started far from the solution, such as MIT's at cost 3.5e9, keeps
  the start's huge diagonal otherwise and crawls).
  """

  SCALINGS = ("running_max", "current")
  CURRENT_SCALE_BOUNDS = (1e-6, 1e32)

  def __init__(self, initial=1e-3, acceptance=0.0, scaled=True,
               scaling="running_max"):
    if scaling not in self.SCALINGS:
      raise ValueError(f"'scaling' must be one of {self.SCALINGS}, got "
                       f"{scaling!r}.")
    self.initial_lambda = initial
    self.acceptance = acceptance
    self.scaled = scaled
    self.scaling_kind = scaling

  def _current_scale(self, linearization):
    """diag(J^T J) [B..., n] clamped to CURRENT_SCALE_BOUNDS."""
    column_norms = linearization.column_norms()
    low, high = self.CURRENT_SCALE_BOUNDS
    return tf.clip_by_value(column_norms,
                            tf.constant(low, column_norms.dtype),
                            tf.constant(high, column_norms.dtype))

  def observe_linearization(self, state, linearization):
    if self.scaling_kind == "current":
      return state._replace(scale=self._current_scale(linearization))
    return super().observe_linearization(state, linearization)

  def initial(self, dtype, batch_shape, linearization):
    lam = tf.fill(batch_shape, tf.constant(self.initial_lambda, dtype))
    scale = _marquardt_scale(linearization)
    if self.scaled and self.scaling_kind == "current":
      scale = self._current_scale(linearization)
    if not self.scaled:  # lambda relative to the largest diagonal entry.
      lam *= tf.maximum(tf.reduce_max(scale, axis=-1),
                        tf.constant(1e-30, dtype))
    nu = tf.fill(batch_shape, tf.constant(2.0, dtype))
    return NielsenState(lam, nu, scale)

  def regularization(self, state, cost):
    return state.lam

  def invalid(self, state, step):
    dtype = state.lam.dtype
    huge = tf.constant(1e300 if dtype == tf.float64 else 1e37, dtype)
    return state._replace(
        lam=tf.minimum(state.lam * state.nu, huge),
        nu=tf.minimum(2.0 * state.nu, tf.constant(2.0 ** 60, dtype)))

  def update(self, state, step):
    lam = state.lam
    dtype = lam.dtype
    gain, accepted = _gain_ratio_test(step, self.acceptance)
    one = tf.constant(1.0, dtype)
    factor = tf.maximum(tf.constant(1.0 / 3.0, dtype),
                        one - tf.pow(2.0 * gain - one, 3))
    safe_factor = tf.where(accepted, factor, one)
    tiny = tf.constant(np.finfo(dtype.as_numpy_dtype).eps, dtype)
    rejected = self.invalid(state, step)
    return accepted, state._replace(
        lam=tf.where(accepted, tf.maximum(lam * safe_factor, tiny),
                     rejected.lam),
        nu=tf.where(accepted, tf.constant(2.0, dtype), rejected.nu))


# TrustRegionDamping's default radius expansion: above this gain ratio,
# to at least this many times the step tried (More 1978's rho > 3/4), and
# the threshold that `least_squares(..., damping='trust_region')` uses with
# the matrix-free solver (`linear_solver='cg'`), where Steihaug's step is
# the whole Gauss-Newton step whenever it fits (see the class docstring).
EXPAND_THRESHOLD = 0.75
EXPANSION = 3.0
MATRIX_FREE_EXPAND_THRESHOLD = 0.9

# TrustRegionDamping(method=None) uses Cholesky factorizations (MINPACK's
# lmpar) from this many parameters per problem in float64, the
# eigendecomposition below (see its docstring).
CHOLESKY_TRUST_REGION_MIN_N = 200


class TrustRegionDamping(_MarquardtScaled):
  """A trust region in Marquardt's scaled norm (More 1978, as in MINPACK).

  The step minimizes the Gauss-Newton model subject to ||D^1/2 s|| <= Delta
  (`_linear_solvers.trust_region_solver`): lambda solves the secular
  equation ||D^1/2 s(lambda)|| = Delta by Newton's method, with
  `method='cholesky'` as MINPACK's `lmpar` does, to within 0.1 Delta by a
  few Cholesky factorizations of J^T J + lambda D (at most
  `newton_iterations`, default 10; the previous iteration's lambda is the
  first guess), or with `method='eigh'` to rounding from one
  eigendecomposition of D^-1/2 J^T J D^-1/2 (at most `newton_iterations`,
  default 30, O(n) steps). `method=None` (default): 'cholesky' in float64
  from n = `CHOLESKY_TRUST_REGION_MIN_N` (200) parameters per problem, where
  it was measured 1.6-1.8x faster per iteration in `tf.function`
  (benchmarks/damping_cost.py; below, per-op overhead makes it 0.6-0.9x as
  fast, and its graph is larger to trace); 'eigh' otherwise, and always in
  float32 (there the Cholesky path walks NIST's MGH10 start 1 to where
  ||J^T F|| overflows as reported; docs/solvers.md). The first
  radius is `initial_radius` (default 100, as MINPACK's `factor`) times the
  scaled norm of the Gauss-Newton step, so the first trial step is the Gauss-Newton step. With
  the gain ratio rho = (cost(p) - cost(q)) / (-g^T s - 1/2 ||J s||^2):
  accept iff rho > 1e-4; rho < 1/4 or rejected:
  Delta = min(Delta, ||D^1/2 s||) / 4 (from the step tried: while the
  Gauss-Newton step is inside the radius, shrinking only the radius would
  retry the same step); rho > `expand_threshold` (default 3/4):
  Delta = max(Delta, `expansion` ||D^1/2 s||) (default 3). The reported
  damping is lambda.

  `expand_threshold=0.9` (what `least_squares(..., damping='trust_region')`
  uses with the matrix-free solver, `MATRIX_FREE_EXPAND_THRESHOLD`) grows
  the radius only after a step the model predicted within 10%. Where the
  Gauss-Newton step is consistently too long (a model of large residual
  curvature: smooth total variation, benchmarks/matrix_free.py), 3/4 lets
  every good step on the boundary (rho ~ 0.8) triple the radius, so that
  the next step is the whole Gauss-Newton step, rejected, and the radius
  falls to a quarter of it: every other iteration is lost. With 0.9 the
  radius stays where such steps succeed (16 iterations to the target
  instead of 25 at 100x100, CG to 1e-6 with the exact diagonal; never more
  iterations or CG on benchmarks/matrix_free.py --nearly-linear).
  """

  scaled = True

  def __init__(self, initial_radius=100.0, newton_iterations=None,
               method=None, expand_threshold=EXPAND_THRESHOLD,
               expansion=EXPANSION):
    if method not in (None, "cholesky", "eigh"):
      raise ValueError(
          f"'method' must be 'cholesky', 'eigh' or None, not {method!r}")
    if not 0.25 <= expand_threshold < 1.0:
      raise ValueError("'expand_threshold' must be in [0.25, 1) (the gain "
                       "ratio above which the radius grows; below 1/4 it "
                       f"shrinks), not {expand_threshold!r}")
    if not expansion >= 1.0:
      raise ValueError(f"'expansion' must be >= 1, not {expansion!r}")
    self.initial_radius = initial_radius
    self.method = method
    self.newton_iterations = newton_iterations
    self.expand_threshold = float(expand_threshold)
    self.expansion = float(expansion)

  def _method(self, dtype, num_parameters):
    """The secular-equation solve for `dtype` and n (static, or None):
    (method, iterations)."""
    method = self.method or (
        "cholesky" if dtype == tf.float64 and num_parameters is not None and
        num_parameters >= CHOLESKY_TRUST_REGION_MIN_N else "eigh")
    iterations = self.newton_iterations or (
        _linear_solvers.SECULAR_MAX_FACTORIZATIONS if method == "cholesky"
        else 30)
    return method, iterations

  def initial(self, dtype, batch_shape, linearization):
    # A negative radius is relative to the Gauss-Newton step (the first).
    radius = tf.fill(batch_shape, tf.constant(-self.initial_radius, dtype))
    return TrustRegionState(radius, tf.zeros(batch_shape, dtype),
                            _marquardt_scale(linearization))

  def regularization(self, state, cost):
    return state.lam

  def solver(self, state, linearization, gradient, regularization,
             scaling):
    method, iterations = self._method(gradient.dtype, gradient.shape[-1])
    solve, radius, lam = _linear_solvers.trust_region_solver(
        linearization, gradient, state.scale, state.radius, iterations,
        method, previous_lambda=state.lam)
    # A radius shrunk to 0 (underflow, or a zero step's norm) allows only the
    # zero step, which the engine reports as STALLED when it is rejected;
    # the solvers' secular equations have no root there and would return
    # the Gauss-Newton step.
    collapsed = tf.equal(radius, 0)

    def within_radius(residual, rhs_gradient):
      outcome = solve(residual, rhs_gradient)
      step = outcome.solution
      return outcome._replace(
          solution=_batch.select(collapsed, tf.zeros_like(step), step))

    return within_radius, state._replace(radius=radius, lam=lam)

  def _shrunk(self, state, step):
    tried = tf.where(tf.math.is_finite(step.scaled_norm),
                     tf.minimum(state.radius, step.scaled_norm), state.radius)
    return tried / 4.0

  def invalid(self, state, step):
    return state._replace(radius=self._shrunk(state, step))

  def update(self, state, step):
    radius = state.radius
    gain, accepted = _gain_ratio_test(step, 1e-4)
    good = accepted & (gain > self.expand_threshold)
    poor = tf.logical_not(accepted) | (gain < 0.25)
    new_radius = tf.where(
        poor, self._shrunk(state, step),
        tf.where(good, tf.maximum(radius, self.expansion * step.scaled_norm),
                 radius))
    return accepted, state._replace(radius=new_radius)
