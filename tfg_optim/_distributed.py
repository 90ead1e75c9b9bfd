"""One least-squares problem over the replicas of a `tf.distribute` strategy.

The data rows (tensors with a shared leading dimension N) are split into R
contiguous shards, one per replica of a `tf.distribute.MirroredStrategy`
(several GPUs or logical CPU devices of one process) or of a
`tf.distribute.MultiWorkerMirroredStrategy` (several processes or machines):
replica r reads rows [floor(r N / R), floor((r + 1) N / R)). Since the
residual vector is the concatenation of the shards' residuals,
F = [F_1; ...; F_R], every quantity the loop needs is a sum over shards:

    cost    = 1/2 ||F||^2 = sum_r 1/2 ||F_r||^2,
    J^T J   = sum_r J_r^T J_r,
    J^T F   = sum_r J_r^T F_r,

so a cost pass all-reduces one number and a Jacobian pass the
n^2 + n + 1 numbers of (J^T [J | F], cost) (the unit `_chunked.chunk_terms`
computes; with `data_chunk_size` each replica sums it over chunks of its
shard first). Nothing else crosses devices.

The engine's loop runs once, in the cross-replica context (in a graph: the
front-end compiles an eager call); each pass is a `strategy.run` of the
shards' sums followed by a SUM all-reduce in the replica context. Every
replica, and every worker, receives the same bits of the sums (the ring
all-reduce hands each worker the same reduced values), so every worker's
loop takes the same decisions, runs the same number of passes (the
collectives match up) and ends at the same point with the same stop reason
and counters. The result equals the single-device solve up to the order of
the summation (rounding: ~ R ulps of the sums), the only difference.

The data may instead be a finite `tf.data.Dataset` of batches (or a
`tf.distribute.DistributedDataset` made from one by
`strategy.experimental_distribute_dataset` or
`distribute_datasets_from_function`): a pass then iterates the distributed
dataset once in the cross-replica context (`get_next_as_optional` in a
`tf.while_loop`), each replica adding its elements' (J^T [J | F], cost) to
its own running sum (each element is one chunk), and ends with the same one
SUM all-reduce. The distributed iterator synchronizes the end of the data
(`has_value` is true while any replica, on any worker, still has an
element; a replica without one gets an empty batch of 0 rows, whose terms
are zero), so every replica and worker runs the same number of loop steps
and of all-reduces however unevenly the elements split.

A non-finite residual on one shard makes the summed cost non-finite, hence
the usual engine rules: NOT_FINITE at the start, a rejected candidate later.
A batch of independent problems (`batch_dims` > 0) is split instead
(`split_batch`): each replica solves its part of the batch alone, and the
results are gathered once at the end.

Gradients are implicit, those of chunked data (`_implicit.attach_chunked`)
with its backward pass over the rows split over the replicas (`fold`):
every replica solves J^T J w = P^T x_bar with the all-reduced J^T J of the
solver's state, sums its shard's theta_bar_r = (dF_r/dtheta)^T u_r,
u_r = c_bar' F_r - J_r w, and computes its rows of the data's cotangent;
adding the theta_bar_r (the size of the captured tensors and variables:
one SUM all-reduce over workers, a `tf.add_n` in one process) is the
backward pass's only communication.

A worker that dies leaves the others waiting in a collective; each
all-reduce has a completion timeout (the strategy's own
`CommunicationOptions(timeout_seconds=...)` if it has one, else
`DEFAULT_TIMEOUT_SECONDS`), after which the solve fails; an eager call then
names the workers that no longer answer (`naming_workers`).
"""

import contextlib
import socket
import warnings

import tensorflow as tf

from tfg_optim import _chunked
from tfg_optim import _implicit
from tfg_optim import _linear_solvers

# The all-reduce completion timeout when the strategy sets none. It bounds
# how long a worker waits for the others in one pass: it must exceed the
# slowest replica's pass (a straggler past it fails the solve).
DEFAULT_TIMEOUT_SECONDS = 300.0

STRATEGIES = (tf.distribute.MirroredStrategy,
              tf.distribute.MultiWorkerMirroredStrategy)

_SUM = tf.distribute.ReduceOp.SUM


def check_strategy(strategy, gradients, eager_compile):
  """The `gradients` mode of a solve over `strategy`: 'implicit' (the
  backward pass of `DistributedKind.fold`) or 'none'.

  Raises:
    TypeError / ValueError naming 'strategy' (or 'gradients') for what a
    distributed solve cannot do.
  """
  _implicit.check_gradients(gradients)
  if not isinstance(strategy, STRATEGIES):
    raise TypeError("'strategy' must be a tf.distribute.MirroredStrategy or "
                    "MultiWorkerMirroredStrategy, got "
                    f"{type(strategy).__name__}.")
  if gradients == "unrolled":
    raise ValueError("'strategy' does not support gradients='unrolled' "
                     "(no gradient through the all-reduces); pass "
                     "gradients='implicit' or 'none'.")
  if _linear_solvers.in_xla():
    raise ValueError("'strategy' cannot run under XLA (jit_compile=True): "
                     "strategy.run and the all-reduces stay outside XLA; "
                     "call it in a plain tf.function.")
  if eager_compile is False and tf.executing_eagerly():
    raise ValueError("'strategy' needs a compiled solve: eager_compile=False "
                     "is not supported with it.")
  return gradients


def check_jit_compile_replicas(jit_compile_replicas, strategy, batch_dims):
  """`jit_compile_replicas` (a bool) if a solve can honour it.

  Raises:
    TypeError naming 'jit_compile_replicas' for a value that is not a bool;
    ValueError naming it for True without `strategy` (one device: compile
    the whole solve instead) or with `batch_dims` > 0 (not offered).
  """
  if not isinstance(jit_compile_replicas, bool):
    raise TypeError("'jit_compile_replicas' must be True or False, got "
                    f"{jit_compile_replicas!r}.")
  if jit_compile_replicas and strategy is None:
    raise ValueError("'jit_compile_replicas' compiles each replica's passes "
                     "of a 'strategy' solve with XLA; without 'strategy', "
                     "call the solve inside tf.function(jit_compile=True).")
  if jit_compile_replicas and batch_dims:
    raise ValueError("'jit_compile_replicas' is not offered with "
                     "'batch_dims' (a batch split over the replicas): pass "
                     "jit_compile_replicas=False.")
  return jit_compile_replicas


def _own_timeout(strategy):
  """The timeout of the strategy's `communication_options`, or None."""
  own = getattr(strategy.extended, "_communication_options", None)
  return getattr(own, "timeout_seconds", None) or None


def communication_options(strategy):
  """The all-reduce options: None (the strategy's own apply) if the
  strategy has a timeout, else ours with `DEFAULT_TIMEOUT_SECONDS`."""
  if _own_timeout(strategy):
    return None
  return tf.distribute.experimental.CommunicationOptions(
      timeout_seconds=DEFAULT_TIMEOUT_SECONDS)


def _replica_index():
  """(r, R) in the replica context: a Python int where static."""
  context = tf.distribute.get_replica_context()
  index = context.replica_id_in_sync_group
  static = tf.get_static_value(index)
  return (int(static) if static is not None else index,
          context.num_replicas_in_sync)


def bounds(length, replica, num_replicas):
  """[start, stop) = [floor(r N / R), floor((r + 1) N / R)): replica r's
  rows of N (Python ints where N and r are)."""
  return (replica * length // num_replicas,
          (replica + 1) * length // num_replicas)


def _length(data):
  """N, the shared leading dimension: an int if any tensor knows it."""
  for tensor in data:
    if tensor.shape[0] is not None:
      return tensor.shape[0]
  return tf.shape(data[0])[0]


def shard(data, replica, num_replicas):
  """Rows [floor(r N / R), floor((r + 1) N / R)) of each data tensor:
  static shapes where N and r are static."""
  start, stop = bounds(_length(data), replica, num_replicas)
  pieces = []
  for tensor in data:
    rank = tensor.shape.rank
    piece = tf.slice(tensor, tf.stack([start] + [0] * (rank - 1)),
                     tf.stack([stop - start] + [-1] * (rank - 1)))
    if isinstance(start, int) and isinstance(stop, int):
      piece.set_shape([stop - start] + tensor.shape[1:].as_list())
    pieces.append(piece)
  return pieces


class DistributedKind:
  """`_chunked.ChunkedKind` over the replicas of a strategy: builds `Gram`
  linearizations by a Jacobian pass (each replica over its shard, in chunks
  of `chunk_size` rows or whole), evaluates ||F|| by a cost pass; each pass
  ends in one SUM all-reduce.

  Made in the cross-replica context, in a graph. Data tensors: the shards
  are taken once (each replica slices its rows on its host's CPU and keeps
  them on its device), not per pass. A dataset (`_chunked.DATASETS`; then
  `chunk_size` is None): distributed once (`distribute_dataset`), iterated
  once per pass, each element one chunk.

  `jit_compile`: each replica's pass (its shard's fold, or one element's
  terms) is a `tf.function(jit_compile=True)`: one XLA computation per
  replica and pass, called inside `strategy.run`; the all-reduce stays
  outside it.
  """

  dense = True

  def __init__(self, chunk_residual, retract, tangent_dim, data, chunk_size,
               dtype, strategy, jit_compile=False):
    self.strategy = strategy
    self.options = communication_options(strategy)
    self.jit_compile = jit_compile
    n = tangent_dim
    zero = lambda *shape: tf.zeros(shape, dtype)
    self.dataset = self.plain_dataset = None
    if isinstance(data, _chunked.DATASETS):
      self.dataset, self.plain_dataset = distribute_dataset(strategy, data)
    else:
      def take_shard():
        replica, count = _replica_index()
        with tf.device("/device:CPU:0"):
          rows = shard(data, replica, count)
        return [tf.identity(t) for t in rows]

      self.shards = strategy.run(take_shard)
      self.length = _length(data)
      self.length_source = data[0]  # (A tensor of the forward pass's graph.)

    def fold(function, zeros, rows):
      if chunk_size is None:
        return function(rows)
      return _chunked.ChunkedData(rows, chunk_size).fold(function, zeros)

    def cost_terms(point, rows):
      def terms(chunk):
        residual = chunk_residual(point, chunk)
        return (0.5 * tf.reduce_sum(tf.square(residual)),)
      return fold(terms, (zero(),), rows)[0][tf.newaxis]

    def jacobian_terms(point, rows):
      augmented, cost = fold(
          lambda chunk: _chunked.chunk_terms(chunk_residual, retract, n,
                                             point, chunk),
          (zero(n, n + 1), zero()), rows)
      return tf.concat([tf.reshape(augmented, [-1]), cost[tf.newaxis]], 0)

    def count_terms(point, rows):
      def terms(chunk):
        return (tf.size(chunk_residual(point, chunk), tf.int64),)
      return fold(terms, (tf.constant(0, tf.int64),), rows)[0][tf.newaxis]

    if not tf.executing_eagerly():  # One trace per replica (device), reused.
      cost_terms, jacobian_terms = (
          tf.function(f, autograph=False, jit_compile=jit_compile or None)
          for f in (cost_terms, jacobian_terms))
    self.cost_pass = lambda point: self._sum(cost_terms, point, zero(1))[0]
    self.jacobian_pass = lambda point: tf.reshape(
        self._sum(jacobian_terms, point, zero(n * (n + 1) + 1))[
            :n * (n + 1)], [n, n + 1])
    self.count = lambda point: tf.cast(self._sum(
        count_terms, point, tf.zeros([1], tf.int64))[0], tf.int32)

  def fold(self, local_pass):
    """The backward pass of `_implicit.attach_chunked` over the replicas:
    (sums, rows).

    Each replica runs local_pass(its shard) -> (sums, rows): its shard's
    terms of theta_bar = sum_r (dF_r/dtheta)^T u_r, and the rows of
    data_bar = (dF_r/d data_r)^T u_r, with u_r = c_bar' F_r - J_r w from
    the w that every replica solved alike from the all-reduced J^T J. The
    sums, n_theta numbers (the entries of the captured tensors and
    variables), are added: over the replicas of one process
    (`MirroredStrategy`) in the cross-replica context, by `tf.add_n` of
    the replicas' local results; over workers by a SUM all-reduce (one
    per dtype; none without any), so every worker gets the whole
    theta_bar. Either is the single-device one up to the order of
    summation. (Not an all-reduce in one process: a collective op's
    instance key is captured at call time (`capture_call_time_value`),
    and the backward function that an eager `tf.GradientTape` builds for
    a `tf.function` (the eager call's compiled solve, or the user's)
    drops such captures from its inputs, so its call fails, "input #k
    was expected to be a double tensor but is a bool tensor"; TensorFlow
    2.21. An eager tape over a multi-worker solve that captures tensors
    meets the same limit: call it in a `tf.function` with the tape
    inside.) The rows are not
    communicated: the replicas' rows of this process, concatenated in
    replica order, and, over several workers, zero in the other workers'
    rows (a worker's solve reads only its own replicas' rows of its
    `data`, so its solution depends on no other row of its tensors; the
    workers' data_bar add up to the single-device one).

    `jit_compile`: each replica's pass is compiled by XLA, as the forward
    passes are.
    """
    strategy = self.strategy
    multi_worker = isinstance(strategy,
                              tf.distribute.MultiWorkerMirroredStrategy)
    length = self.length
    if self.jit_compile:
      local_pass = tf.function(local_pass, autograph=False, jit_compile=True)

    def replica_pass(rows):
      sums, pieces = local_pass(list(rows))
      sums = [tf.convert_to_tensor(t) for t in sums]
      if not multi_worker:
        return sums, pieces
      if sums and _separate_backward_graph(self.length_source):
        raise NotImplementedError(_EAGER_TAPE_MESSAGE)
      sums = _all_reduce_flat(sums, self.options)
      replica, count = _replica_index()
      start, stop = bounds(length, replica, count)
      return sums, pieces, tf.cast(tf.stack([start, stop]), tf.int64)

    outputs = strategy.run(replica_pass, args=(self.shards,))
    local = strategy.experimental_local_results
    if multi_worker:
      sums = [local(t)[0] for t in outputs[0]]
    else:  # Added here: no collective op in a backward pass (see above).
      sums = [tf.add_n(local(t)) for t in outputs[0]]
    rows = [tf.concat(local(t), 0) for t in outputs[1]]
    if multi_worker:  # Zero in the other workers' rows.
      start, stop = local(outputs[2])[0][0], local(outputs[2])[-1][1]
      after = tf.cast(length, tf.int64) - stop
      rows = [tf.pad(t, tf.concat([[[start, after]], tf.zeros(
          [t.shape.rank - 1, 2], tf.int64)], 0)) for t in rows]
    return sums, rows

  def _sum(self, terms, point, zeros):
    """sum over replicas of terms(point, shard), all-reduced: a vector
    shaped like `zeros`. Its input and output under `tf.stop_gradient`:
    the loop is never differentiated (its gradients are implicit, `fold`),
    and an all-reduce's own gradient, which TensorFlow builds for a
    `tf.cond` of the loop when a persistent tape watches the data (and a
    forward accumulator for every op it tracks), would need a replica
    context that the loop's trace does not have."""
    if self.dataset is not None:
      return self._dataset_sum(terms, point, zeros)
    def replica_sum(point, rows):
      return tf.stop_gradient(tf.distribute.get_replica_context().all_reduce(
          _SUM, tf.stop_gradient(terms(point, rows)), options=self.options))
    summed = self.strategy.run(replica_sum, args=(point, self.shards))
    return self.strategy.experimental_local_results(summed)[0]

  def _dataset_sum(self, terms, point, zeros):
    """sum over the distributed dataset's elements of terms(point, chunk):
    each replica sums its elements, then one all-reduce of the sums and of
    the number of rows (which must be positive: an empty dataset fails
    naming 'data')."""
    strategy = self.strategy
    checks = []
    if self.plain_dataset is not None:
      checks = _chunked.finite_cardinality_check(self.plain_dataset)
    with tf.control_dependencies(checks), _quiet_options_warning():
      iterator = iter(self.dataset)
      first = iterator.get_next_as_optional()

    def add(point, total, element):
      chunk = _chunked.dataset_chunk(element)
      value = terms(point, chunk)
      rows = tf.cast(tf.shape(chunk[0])[0], value.dtype)
      return total + tf.concat([value, rows[tf.newaxis]], 0)

    def body(optional, totals):
      totals = strategy.run(add, args=(point, totals, optional.get_value()))
      return iterator.get_next_as_optional(), totals

    totals = strategy.run(lambda: tf.concat([zeros, zeros[:1]], 0))
    _, totals = tf.while_loop(lambda optional, _: optional.has_value(), body,
                              (first, totals), parallel_iterations=1)
    summed = strategy.run(  # (identity: a tensor placed on the replica.)
        lambda total: tf.stop_gradient(
            tf.distribute.get_replica_context().all_reduce(
                _SUM, tf.stop_gradient(tf.identity(total)),
                options=self.options)),
        args=(totals,))
    summed = strategy.experimental_local_results(summed)[0]
    return _chunked.require_rows(summed[-1], summed[:-1])

  def residual_norm(self, point):
    """[1]: ||F(point)|| = sqrt(2 cost), from one cost pass."""
    return tf.sqrt(2.0 * self.cost_pass(point))[tf.newaxis]

  def at(self, point, residual):
    """The `Gram` linearization at `point` (one Jacobian pass)."""
    del residual
    return _chunked.Gram(self.jacobian_pass(point))

  def restore(self, tensors, point):
    del point
    return _chunked.Gram(*tensors)


_EAGER_TAPE_MESSAGE = (
    "least_squares(strategy=MultiWorkerMirroredStrategy): implicit "
    "gradients from an eager tf.GradientTape are not supported when the "
    "residuals capture tensors or tf.Variables (their cotangents are "
    "all-reduced over the workers, and TensorFlow cannot run a collective "
    "op in the backward function that an eager tape builds for a "
    "tf.function). Compute the gradient inside a tf.function (the tape "
    "and the solve in it), or pass gradients='none'.")


def _separate_backward_graph(forward_tensor):
  """Whether the graph being built is a function graph apart from the
  forward pass's (of `forward_tensor`): the backward function that an
  eager tape builds for a `tf.function`, rather than `tf.gradients` or a
  tape inside the forward's own function."""
  graph = tf.compat.v1.get_default_graph()
  if not getattr(graph, "building_function", False):
    return False

  def chain(graph):
    graphs = []
    while getattr(graph, "building_function", False):
      graphs.append(graph)
      graph = getattr(graph, "outer_graph", None)
    return graphs
  forward = chain(getattr(forward_tensor, "graph", None))
  return not any(g is f for g in chain(graph) for f in forward)


def _all_reduce_flat(tensors, options):
  """`tensors`, summed over the replicas (in the replica context) by one
  SUM all-reduce per dtype of their flattened entries."""
  if not tensors:
    return []
  groups = {}
  for index, tensor in enumerate(tensors):
    groups.setdefault(tensor.dtype, []).append(index)
  flat = [tf.concat([tf.reshape(tensors[i], [-1]) for i in indices], 0)
          for indices in groups.values()]
  flat = tf.distribute.get_replica_context().all_reduce(_SUM, flat,
                                                        options=options)
  summed = [None] * len(tensors)
  for indices, vector in zip(groups.values(), flat):
    sizes = [tensors[i].shape.num_elements() for i in indices]
    if None in sizes:
      sizes = tf.stack([tf.size(tensors[i]) for i in indices])
    pieces = tf.split(vector, sizes)
    for i, piece in zip(indices, pieces):
      summed[i] = tf.reshape(piece, tf.shape(tensors[i]))
      summed[i].set_shape(tensors[i].shape)
  return summed


def distribute_dataset(strategy, dataset):
  """(the distributed dataset, the plain dataset or None): a
  `tf.data.Dataset` distributed by `strategy.experimental_distribute_dataset`
  (each global batch split over the replicas; over workers, sharded by the
  dataset's `auto_shard_policy`), or a `DistributedDataset` as given."""
  if isinstance(dataset, tf.distribute.DistributedDataset):
    return dataset, None
  with _quiet_options_warning():
    return strategy.experimental_distribute_dataset(dataset), dataset


@contextlib.contextmanager
def _quiet_options_warning():
  """Silences TF's UserWarning that a dataset's options are read in a graph
  (distributing or iterating a dataset there reads them; the solve sets
  none)."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "To make it possible to preserve "
                            "tf.data options", UserWarning)
    yield


def _workers(strategy):
  """[(task name, address)] of the other workers of a multi-worker
  strategy ([] for one process)."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None:
    return []
  try:
    cluster = resolver.cluster_spec().as_dict()
  except (AttributeError, ValueError):
    return []
  own = (resolver.task_type, resolver.task_id)
  workers = []
  for job, tasks in sorted(cluster.items()):
    items = tasks.items() if isinstance(tasks, dict) else enumerate(tasks)
    for index, address in items:
      if (job, index) != own:
        workers.append((f"/job:{job}/replica:0/task:{index}", address))
  return workers


def _answers(address, timeout):
  host, _, port = address.rpartition(":")
  try:
    with socket.create_connection((host.strip("[]"), int(port)),
                                  timeout=timeout):
      return True
  except (OSError, ValueError):
    return False


def naming_workers(strategy, call, probe_timeout=2.0):
  """call(), with a communication failure re-raised naming the workers that
  no longer answer (a TCP connection to their server address fails).

  Collective failures are sticky: after one, the process must restart to
  run collectives again (TensorFlow's rule).
  """
  try:
    return call()
  except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError,
          tf.errors.CancelledError, tf.errors.AbortedError) as error:
    workers = _workers(strategy)
    if not workers:
      raise
    dead = [f"{name} at {address}" for name, address in workers
            if not _answers(address, probe_timeout)]
    timeout = _own_timeout(strategy) or DEFAULT_TIMEOUT_SECONDS
    if dead:
      message = ("least_squares(strategy=...): worker(s) "
                 f"{', '.join(dead)} stopped answering; the all-reduce "
                 f"gave up after its timeout ({timeout} s). Restart all "
                 "workers (a failed collective poisons this process).")
    else:
      message = ("least_squares(strategy=...): an all-reduce failed, yet "
                 "every worker answers: a worker may be slower than the "
                 f"all-reduce timeout ({timeout} s) or stuck. Original "
                 f"error: {error.message}")
    raise type(error)(error.node_def, error.op, message) from error


# --- batches of independent problems: split, no communication in the loop ---


def split_batch(strategy, solve, variables, data):
  """A batch of independent problems split over the replicas.

  The leading batch dimension B of `variables` (and of every `data` tensor,
  which must share it) is split into contiguous parts, one per replica;
  each replica runs `solve(part_of_variables, part_of_data)` (a whole
  `least_squares` solve of its problems, with their own damping, stops and
  counters: nothing is communicated while they run) and the results are
  gathered back along the batch axis: concatenated across the replicas of
  one process; across workers, each places its problems' results at their
  rows of zero tensors of the whole batch and one SUM all-reduce of all
  fields (as float64: exact for int32, bool and float32 values) gathers
  them, once, at the end. Every worker gets the whole batch's results. Eagerly, the solve runs compiled (traced
  at each call: wrap repeated calls in a `tf.function`).
  """
  flat_variables = tf.nest.flatten(variables)
  flat_data = [] if data is None else tf.nest.flatten(data)
  count = len(flat_variables)
  if tf.executing_eagerly():
    tensors = [tf.convert_to_tensor(t) for t in flat_variables + flat_data]
    function = tf.function(lambda *flat: split_batch(
        strategy, solve, tf.nest.pack_sequence_as(variables, flat[:count]),
        None if data is None else
        tf.nest.pack_sequence_as(data, flat[count:])), autograph=False)
    return naming_workers(strategy, lambda: function(*tensors))
  tensors = [tf.convert_to_tensor(t) for t in flat_variables + flat_data]
  sizes = {t.shape[0] for t in tensors if t.shape.rank}
  if any(t.shape.rank == 0 for t in tensors) or len(sizes - {None}) > 1:
    raise ValueError("'strategy' with 'batch_dims' splits the leading batch "
                     "dimension of 'variables' and of every 'data' tensor: "
                     "they must share it, got shapes "
                     f"{[t.shape.as_list() for t in tensors]}.")
  multi_worker = isinstance(strategy,
                            tf.distribute.MultiWorkerMirroredStrategy)

  def replica_solve():
    replica, replicas = _replica_index()
    with tf.device("/device:CPU:0"):
      parts = shard(tensors, replica, replicas)
    parts = [tf.identity(t) for t in parts]
    result = solve(tf.nest.pack_sequence_as(variables, parts[:count]),
                   None if data is None else
                   tf.nest.pack_sequence_as(data, parts[count:]))
    if multi_worker:  # The other workers' problems, in one all-reduce.
      result = _sum_into_batch(result, *bounds(_length(tensors), replica,
                                                replicas),
                               _length(tensors),
                               communication_options(strategy))
    return result

  results = strategy.run(replica_solve)
  local = lambda value: strategy.experimental_local_results(value)
  if multi_worker:
    return tf.nest.map_structure(lambda value: local(value)[0], results)
  return _map_batched(results, lambda value, axis: tf.concat(local(value),
                                                             axis),
                      lambda value: local(value)[0])


def _map_batched(result, batched, other=lambda value: value):
  """`LeastSquaresResults` with batched(value, axis) applied to the fields
  with a batch axis (`records`: axis 1; the others: axis 0) and other(value)
  to the rest (scalars the same on every replica)."""
  unbatched = ("num_residuals", "num_parameters", "wall_time", "tolerances")
  fields = {}
  for name, value in result._asdict().items():
    if name in unbatched:
      fields[name] = tf.nest.map_structure(other, value)
    else:
      axis = 1 if name == "records" else 0
      fields[name] = tf.nest.map_structure(lambda v: batched(v, axis), value)
  return type(result)(**fields)


def _sum_into_batch(result, start, stop, length, options):
  """The whole batch's results on every replica: this replica's rows
  [start, stop) of every batched field, zero elsewhere, summed over the
  replicas in one all-reduce (x + 0 = x exactly)."""
  placed, dtypes = [], []

  def place(value, axis):
    paddings = [[0, 0]] * value.shape.rank
    paddings[axis] = [start, length - stop]
    placed.append(tf.pad(tf.cast(value, tf.float64), paddings))
    dtypes.append(value.dtype)
    return len(placed) - 1

  indices = _map_batched(result, place)
  summed = tf.distribute.get_replica_context().all_reduce(
      _SUM, tf.concat([tf.reshape(t, [-1]) for t in placed], 0),
      options=options)
  pieces = tf.split(summed, tf.stack([tf.size(t) for t in placed]))
  values = [tf.cast(tf.reshape(piece, tf.shape(t)), dtype)
            for piece, t, dtype in zip(pieces, placed, dtypes)]
  for value, t in zip(values, placed):
    value.set_shape(t.shape)
  return _map_batched(indices, lambda index, axis: values[index])
