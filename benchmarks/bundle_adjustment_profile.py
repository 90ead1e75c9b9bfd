"""Where the time of a Schur bundle-adjustment solve goes.

On `io.synthetic_bal(50, 20000, num_observations=100000, seed=0)`, in a
graph (`tf.function`) and under XLA: the best of 3 calls of (1) the
residuals, (2) the Jacobian blocks (`_block_sparse` forward mode), (3) one
Schur solve from given blocks (U, V, W, S assembled and factored, the step
back-substituted), each a `tf.function` of its own; then the whole solve
(tfg_optim/examples/bundle_adjustment.py's `make_solver`, best of 3 calls
after the first, like the pieces) capped at 1 and at 5 iterations, whose
difference / 4 is the cost of one iteration inside the engine's loop.
(4) 'other loop work': what else an iteration of the loop computes from
the blocks (the residual at the candidate, J^T r, ||J v||^2 for the model
decrease, three column norms: the vanishing-column refusal's two and the
policy's scaling). (5) The Schur solve inside a one-trip `tf.while_loop`
and the Jacobian blocks inside a `tf.cond`, as the loop runs them (the
step in the loop body, the relinearization in a cond).

    PYTHONPATH=. python benchmarks/bundle_adjustment_profile.py [--xla] \
        [--intra-op-threads N]

`--intra-op-threads N`: TensorFlow's (and XLA:CPU's) intra-op thread pool
of N threads (default: TensorFlow's choice, one per core).
"""

import argparse
import time

import tensorflow as tf

from tfg_optim import _schur
from tfg_optim import factor_graph
from tfg_optim import io
from tfg_optim.examples import bundle_adjustment


def best_of(function, arguments, count=3):
  function(*arguments)
  times = []
  for _ in range(count):
    begin = time.perf_counter()
    function(*arguments)
    times.append(time.perf_counter() - begin)
  return min(times)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--xla", action="store_true")
  parser.add_argument("--intra-op-threads", type=int, default=None)
  args = parser.parse_args()
  if args.intra_op_threads:
    tf.config.threading.set_intra_op_parallelism_threads(
        args.intra_op_threads)
  start, _ = io.synthetic_bal(50, 20000, num_observations=100000, seed=0)
  cameras, points = tf.constant(start.cameras), tf.constant(start.points)

  def setup(c, p):
    variables, terms = bundle_adjustment.factor_graph_problem(start, c, p)
    layout, _ = factor_graph._layout(variables, terms)  # pylint: disable=protected-access
    return layout, _schur.SchurKind(layout)

  compile_ = lambda f: tf.function(f, jit_compile=args.xla)

  @compile_
  def residual(c, p):
    return setup(c, p)[0].residual((c, p))

  @compile_
  def blocks(c, p):
    return setup(c, p)[1].at((c, p), None).blocks

  @compile_
  def schur_step(c, p, *given):
    layout, kind = setup(c, p)
    linearization = kind.linearization_class(*given)
    gradient = linearization.gradient(layout.residual((c, p)))
    solve = linearization.damped_solver(tf.constant(1e-3, tf.float64),
                                        linearization.column_norms())
    return solve(None, gradient).solution

  @compile_
  def other_loop_work(c, p, *given):
    layout, kind = setup(c, p)
    linearization = kind.linearization_class(*given)
    residual = layout.residual((c, p))
    gradient = linearization.gradient(residual)
    return (residual, gradient, linearization.curvature(gradient),
            [linearization.column_norms() for _ in range(3)])

  # The same pieces embedded as the engine's loop embeds them: the step's
  # solve in a tf.while_loop body (one trip), the relinearization in a
  # tf.cond (a data-dependent predicate, true).
  @compile_
  def schur_step_in_loop(c, p, *given):
    return tf.while_loop(
        lambda i, _: i < 1,
        lambda i, x: (i + 1, schur_step.python_function(c, p, *given)),
        (tf.constant(0), tf.zeros([start.cameras.size + start.points.size],
                                  tf.float64)))[1]

  @compile_
  def blocks_in_cond(c, p):
    computed = lambda: tuple(blocks.python_function(c, p))
    return tf.cond(tf.reduce_sum(c) > -1e300, computed,
                   lambda: tuple(tf.zeros(b.shape, b.dtype) for b in given))

  mode = "XLA" if args.xla else "graph"
  given = blocks(cameras, points)
  for name, function, arguments in (
      ("residuals", residual, (cameras, points)),
      ("Jacobian blocks", blocks, (cameras, points)),
      ("Schur solve", schur_step, (cameras, points) + tuple(given)),
      ("other loop work", other_loop_work,
       (cameras, points) + tuple(given)),
      ("Schur solve in a while_loop", schur_step_in_loop,
       (cameras, points) + tuple(given)),
      ("Jacobian blocks in a cond", blocks_in_cond, (cameras, points))):
    print(f"{mode:<6} {name:<30} {best_of(function, arguments):8.3f} s",
          flush=True)
  totals = {}
  for iterations in (1, 5):
    solve = bundle_adjustment.make_solver(start, iterations, "schur",
                                          xla=args.xla)
    totals[iterations] = best_of(solve, (cameras, points))
    print(f"{mode:<6} {f'whole solve, {iterations} iteration(s)':<30} "
          f"{totals[iterations]:8.3f} s", flush=True)
  print(f"{mode:<6} {'one iteration in the loop':<30} "
        f"{(totals[5] - totals[1]) / 4:8.3f} s")


if __name__ == "__main__":
  main()
