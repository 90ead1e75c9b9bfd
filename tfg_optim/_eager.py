"""Eager calls that reuse a compiled solve.

Called eagerly, a solver's `tf.while_loop` runs op by op: about 0.1-0.2 s
per iteration whatever the problem's size, because every op is dispatched
from Python. Inside `tf.function` the same loop runs in milliseconds, but
tracing it costs seconds. A front-end called eagerly therefore runs its
first call with a given problem op by op and, from the second call with the
same problem, calls a `tf.function` traced once and cached here. A first
call that runs past `TRIAL_ITERATIONS` iterations is given up and compiled
at once (`trial`): a long solve's first call costs about a trace, not
0.05 s per iteration.

"The same problem" is decided by a fingerprint (`fingerprint`) of the
residual/objective functions and of everything they capture, recursively
(closure cells, the globals their code names, default arguments), and of
the solver's options:

- tensors by identity (eager tensors are immutable; the cache keeps them
  alive so their ids cannot be reused), `tf.Variable`s by identity (the
  compiled function reads them when it runs, so assignments are seen);
- NumPy arrays by value (a hash of their bytes: an array changed in place
  is a new problem);
- numbers, strings, None by value; lists, tuples and dicts element-wise;
- functions by their code and captures; methods by their function and
  their object;
- modules by name, and the module attributes the code names that hold
  data (tensors, arrays, numbers, strings, containers of them), by value as
  above: `config.scale = 2.0` is seen;
- any other object by identity and by its attributes (`vars(obj)`): data
  as above, other attribute values by identity, so `self.target = y2` is a
  new problem (objects without a `__dict__`, e.g. with `__slots__`, by
  identity only). A change deeper inside an attribute object (an attribute
  of an attribute) is not seen: pass `eager_compile=False`, or a new
  function.

The starting point is an argument of the compiled function, not part of
the key: new starts of the same shape reuse the trace. The cache holds the
`MAX_ENTRIES` most recently used problems.
"""

import collections
import contextlib
import hashlib
import threading
import types

import numpy as np
import tensorflow as tf

MAX_ENTRIES = 32
_MAX_DEPTH = 6
# The op-by-op iterations an 'auto' first call may take before it is given
# up and the solve compiled (`trial`): about 0.5 s op by op, a few times the
# iterations of a typical short fit; a longer solve then costs that plus one
# trace (under a second for a small problem) instead of 0.05 s per iteration.
TRIAL_ITERATIONS = 10
# The Riemannian solver's: its op-by-op iterations cost about twice as much
# (0.11 s on a Sphere(8) fit under load), its trace less.
RIEMANNIAN_TRIAL_ITERATIONS = 5

_CACHE = collections.OrderedDict()  # key -> (tf.function, kept objects)
_SEEN = collections.OrderedDict()   # keys called once, op by op


class _Uncacheable(Exception):
  pass


def _fingerprint(value, depth, kept):
  if depth > _MAX_DEPTH:
    raise _Uncacheable()
  if isinstance(value, tf.Variable):
    kept.append(value)
    return ("variable", id(value))
  if isinstance(value, tf.Tensor):
    kept.append(value)
    return ("tensor", id(value))
  if isinstance(value, np.ndarray):
    if value.dtype == object:
      raise _Uncacheable()
    digest = hashlib.sha1(np.ascontiguousarray(value).tobytes()).hexdigest()
    return ("array", value.dtype.str, value.shape, digest)
  if isinstance(value, np.generic):
    return ("scalar", value.dtype.str, value.item())
  if value is None or isinstance(value, (bool, int, float, complex, str,
                                         bytes)):
    return ("value", type(value).__name__, value)
  if isinstance(value, (list, tuple)):
    return (type(value).__name__,
            tuple(_fingerprint(v, depth + 1, kept) for v in value))
  if isinstance(value, dict):
    return ("dict", tuple(sorted(
        (repr(k), _fingerprint(v, depth + 1, kept))
        for k, v in value.items())))
  if isinstance(value, types.ModuleType):
    return ("module", value.__name__)
  if isinstance(value, (types.BuiltinFunctionType, type, np.ufunc)):
    return ("callable", id(value))
  if isinstance(value, types.FunctionType):
    kept.append(value)
    return ("function", id(value.__code__),
            _captures(value, depth + 1, kept))
  if isinstance(value, types.MethodType):
    return ("method", _fingerprint(value.__func__, depth + 1, kept),
            _fingerprint(value.__self__, depth + 1, kept))
  kept.append(value)
  return ("object", type(value).__name__, id(value),
          _attributes(value, depth + 1, kept))


def _is_data(value):
  """Whether `value` is data (compared by value or identity), not code."""
  if isinstance(value, (list, tuple)):
    return all(_is_data(v) for v in value)
  if isinstance(value, dict):
    return all(_is_data(v) for v in value.values())
  return value is None or isinstance(value, (
      tf.Tensor, tf.Variable, np.ndarray, np.generic, bool, int, float,
      complex, str, bytes))


def _attributes(value, depth, kept):
  """An object's attributes: data by value (see `_fingerprint`), anything
  else by identity."""
  try:
    attributes = vars(value)
  except TypeError:  # No __dict__ (slots, builtins).
    return ()
  parts = []
  for name in sorted(attributes):
    item = attributes[name]
    if _is_data(item):
      parts.append((name, _fingerprint(item, depth, kept)))
    else:
      kept.append(item)
      parts.append((name, "id", id(item)))
  return tuple(parts)


def _names(code):
  """The global names `code` and the code nested in it may read."""
  names = set(code.co_names)
  for constant in code.co_consts:
    if isinstance(constant, types.CodeType):
      names |= _names(constant)
  return names


def _captures(function, depth, kept):
  parts = []
  for cell in function.__closure__ or ():
    try:
      contents = cell.cell_contents
    except ValueError:  # An empty cell (a name assigned later).
      raise _Uncacheable() from None
    if contents is function:  # Recursion.
      parts.append(("self",))
      continue
    parts.append(_fingerprint(contents, depth, kept))
  namespace = function.__globals__
  names = _names(function.__code__)
  for name in sorted(names):
    if name in namespace and namespace[name] is not function:
      value = namespace[name]
      parts.append((name, _fingerprint(value, depth, kept)))
      if isinstance(value, types.ModuleType):  # module.data the code names
        for attribute in sorted(names):
          item = getattr(value, attribute, None)
          if item is not None and _is_data(item):
            parts.append((name, attribute, _fingerprint(item, depth, kept)))
  parts.append(_fingerprint(function.__defaults__, depth, kept))
  parts.append(_fingerprint(function.__kwdefaults__, depth, kept))
  return tuple(parts)


def fingerprint(value):
  """(key, objects to keep alive), or (None, None) if `value` cannot be
  fingerprinted (then nothing is cached)."""
  kept = []
  try:
    return _fingerprint(value, 0, kept), kept
  except _Uncacheable:
    return None, None


def wanted(eager_compile, callback):
  """Whether a front-end's call should try the cached compiled solve: a
  valid `eager_compile` ('auto', True, False; else ValueError naming it),
  eager execution, and for 'auto' no callback (a callback given eagerly
  expects eager tensors)."""
  if eager_compile not in ("auto", True, False):
    raise ValueError("'eager_compile' must be 'auto', True or False, got "
                     f"{eager_compile!r}.")
  return bool(eager_compile and tf.executing_eagerly() and
              (callback is None or eager_compile is True))


class TrialExceeded(Exception):
  """An eager first call ran past `TRIAL_ITERATIONS` (raised by the engine
  inside `trial`)."""


class FirstCall:
  """What `compiled` returns for a problem's first call under 'auto': run it
  op by op inside `trial`; on `TrialExceeded`, `compile()` gives the
  compiled solve."""

  def __init__(self, compile_now):
    self.compile = compile_now


_TRIAL = threading.local()


@contextlib.contextmanager
def trial(iterations=TRIAL_ITERATIONS):
  """Within it, the eager loop of the front-end that claims it
  (`claim_trial`) stops after `TRIAL_ITERATIONS` and raises `TrialExceeded`
  if a problem is still running (`loop_bound`, `end_loop`)."""
  previous = getattr(_TRIAL, "cap", None)
  _TRIAL.cap = iterations
  try:
    yield
  finally:
    _TRIAL.cap = previous


def claim_trial():
  """The iteration cap of an enclosing `trial`, for the front-end that calls
  this first (eagerly, before it evaluates anything the user wrote), or
  None; cleared, so that solves nested in the residuals are not capped."""
  cap = getattr(_TRIAL, "cap", None) if tf.executing_eagerly() else None
  _TRIAL.cap = None
  return cap


def loop_bound(max_iterations, cap):
  """(bound, capped): a solver loop's iteration bound, `max_iterations` or
  the trial's `cap` (from `claim_trial`) where that is smaller; pass
  `capped` to `end_loop`."""
  if cap is None or (max_iterations is not None and
                     int(max_iterations) <= cap):
    return max_iterations, False
  return cap, True


def end_loop(capped, running):
  """Raises `TrialExceeded` if a `capped` loop left a problem `running`."""
  if capped and bool(tf.reduce_any(running)):
    raise TrialExceeded()


def run_first_call(first_call, op_by_op, iterations=TRIAL_ITERATIONS):
  """`op_by_op()` inside `trial`; past it, the compiled solve (the op-by-op
  iterations are dropped: the compiled solve starts from the start)."""
  try:
    with trial(iterations):
      return op_by_op()
  except TrialExceeded:
    pass
  solve = first_call.compile()
  return op_by_op() if solve is None else solve()


def compiled(key, kept, build, compile_now):
  """The cached `tf.function` for `key`; None to run op by op (`key` is
  None); a `FirstCall` for its first call (not `compile_now`).

  Args:
    key: from `fingerprint` (None: never cached).
    kept: the objects `key` refers to by identity.
    build: () -> the Python function to compile (called once per key).
    compile_now: compile at the first call instead of the second.
  """
  if key is None:
    return None
  if key in _CACHE:
    _CACHE.move_to_end(key)
    return _CACHE[key][0]
  if not compile_now and key not in _SEEN:
    _SEEN[key] = kept
    while len(_SEEN) > MAX_ENTRIES:
      _SEEN.popitem(last=False)
    return FirstCall(lambda: compiled(key, kept, build, True))
  _SEEN.pop(key, None)
  function = tf.function(build(), autograph=False)
  _CACHE[key] = (function, kept)
  while len(_CACHE) > MAX_ENTRIES:
    _CACHE.popitem(last=False)
  return function


def clear():
  """Forgets every compiled solve."""
  _CACHE.clear()
  _SEEN.clear()
