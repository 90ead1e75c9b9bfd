"""What every benchmark shares: the timer, the side-by-side runner, the table.

  timing      `time_call(call, repeats, trace=None)`: the trace (when a
              tracing function is given), the first call (trace, graph
              optimization or XLA compilation, and one solve) and the steady
              state, the median of `repeats` further calls, each reported
              separately (`Timing`).
  side by side `interleave(calls, repeats)`: every solver's first call, then
              `repeats` rounds that call each solver once, so that a change
              of the shared machine's load falls on all solvers alike; one
              `Timing` per solver.
  peers       `run_peer(python, script, arguments)`: a peer that must not
              share the process with TensorFlow (optimistix in its JAX venv,
              Ceres) runs as a subprocess that prints one JSON line.
  modes       `compile_for(function, mode)`: eager, 'function'
              (`tf.function(autograph=False)`) or 'jit_compile'.
  tables      `markdown_table(header, rows)`: one markdown table, columns
              padded to their widest cell.
  arguments   `parser(doc, ...)`: argparse with the shared flags
              (`--repeats`, `--dtype`, `--json`).
  machine     `machine_info()`: lines that say what ran the benchmark.

Importing this module also makes the repository root importable when it is
not on sys.path, so that `python benchmarks/NAME.py` finds `tests.problems`,
`tests.nist` and this tree's `tfg_optim` without PYTHONPATH: right after the
script's folder (before an installed tfg_optim), or, when PYTHONPATH is set,
last (a PYTHONPATH that names another tree, as first_call.py --trees does,
keeps precedence). Benchmarks import it as `import _harness` (the script's
folder is on sys.path when a script runs); it imports only the standard
library.
"""

import argparse
import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if not any(os.path.abspath(p or os.curdir) == ROOT for p in sys.path):
  # Right after the script's folder, before an installed tfg_optim (another
  # tree), unless PYTHONPATH names the trees to use (first_call.py --trees).
  sys.path.insert(len(sys.path) if os.environ.get("PYTHONPATH") else 1, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_JAX_PYTHON = os.path.join(HERE, ".venv-jax", "bin", "python")
MODES = ("eager", "function", "jit_compile")

Timing = collections.namedtuple(
    "Timing", ["trace", "first_call", "seconds", "times", "output"])
Timing.__doc__ = """One solver's times, in seconds.

  trace       the tracing alone (`get_concrete_function`), None when not
              measured;
  first_call  the first call: trace (when not measured apart), graph
              optimization or XLA compilation, and one solve;
  seconds     the median of `times`;
  times       the steady-state calls after the first;
  output      what the last call returned.
"""


def _now():
  return time.perf_counter()


def time_call(call, repeats, trace=None):
  """Times `call()`: the trace, the first call, then `repeats` more calls.

  Args:
    call: a function of no arguments that runs one solve and returns its
      values as NumPy (so that the time includes the computation).
    repeats: the number of steady-state calls (0: the first call only, and
      `seconds` is that call).
    trace: optional function of no arguments that traces `call`'s function
      (e.g. `get_concrete_function`); timed before the first call and
      included in `first_call` (the first call then reuses the trace).

  Returns:
    A `Timing`.
  """
  begin = _now()
  traced = None
  if trace is not None:
    trace()
    traced = _now() - begin
  output = call()
  first = _now() - begin
  times = []
  for _ in range(repeats):
    start = _now()
    output = call()
    times.append(_now() - start)
  return Timing(traced, first, statistics.median(times) if times else first,
                times, output)


def interleave(calls, repeats, warm_up=True):
  """Times several solvers side by side in rounds.

  Args:
    calls: dict name -> function of no arguments (one solve, NumPy out).
    repeats: rounds; each round calls every solver once, in order.
    warm_up: first call each solver once (timed as `first_call`).

  Returns:
    dict name -> `Timing` (trace None; without warm-up, `first_call` is the
    first round's time).
  """
  first, outputs = {}, {}
  times = {name: [] for name in calls}
  if warm_up:
    for name, call in calls.items():
      begin = _now()
      outputs[name] = call()
      first[name] = _now() - begin
  for _ in range(repeats):
    for name, call in calls.items():
      begin = _now()
      outputs[name] = call()
      times[name].append(_now() - begin)
  return {name: Timing(
      None, first.get(name, times[name][0] if times[name] else None),
      statistics.median(times[name]) if times[name] else first.get(name),
      times[name], outputs.get(name)) for name in calls}


def compile_for(function, mode):
  """`function` as run in `mode`: itself (eager), in `tf.function`
  (autograph off) or in `tf.function(jit_compile=True)`."""
  if mode == "eager":
    return function
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.function(function, jit_compile=mode == "jit_compile",
                     autograph=False)


def run_peer(python, script, arguments=(), what=None, env=None):
  """Runs a peer's script in another interpreter; reads its JSON line.

  Args:
    python: the interpreter (e.g. `DEFAULT_JAX_PYTHON`).
    script: the script, relative to benchmarks/ or absolute.
    arguments: its command-line arguments (strings).
    what: the peer's name in notes (default: the script's name).
    env: the subprocess's environment (default: this one's).

  Returns:
    (result, note): the dict the script printed last and None, or None and a
    note saying why not (the interpreter is missing, or the script failed).
  """
  what = what or os.path.basename(script)
  if not os.path.exists(python):
    return None, (f"{what} skipped: {python} not found (see the "
                  "docstring for the set-up commands)")
  process = subprocess.run(
      [python, os.path.join(HERE, script)] + [str(a) for a in arguments],
      capture_output=True, text=True, check=False, env=env)
  if process.returncode != 0:
    return None, f"{what} failed:\n" + process.stderr[-2000:]
  return json.loads(process.stdout.strip().splitlines()[-1]), None


def peer_parser(doc, repeats, max_steps, tolerance, out=False):
  """The flags of a peer script that `run_peer` runs (optimistix's helpers).

  --data (the .npz the benchmark wrote), --repeats, --max-steps, --rtol and
  --atol (default `tolerance`), and with `out`, --out (a .npz to write).
  This module imports only the standard library, so a peer's interpreter
  without TensorFlow can import it.
  """
  result = argparse.ArgumentParser(description=doc.splitlines()[0])
  result.add_argument("--data", required=True)
  if out:
    result.add_argument("--out", required=True)
  result.add_argument("--repeats", type=int, default=repeats)
  result.add_argument("--max-steps", type=int, default=max_steps)
  result.add_argument("--rtol", type=float, default=tolerance)
  result.add_argument("--atol", type=float, default=tolerance)
  return result


def print_peer_result(result):
  """Prints `result` (a dict) as the one JSON line `run_peer` reads."""
  print(json.dumps(result), flush=True)


def markdown_table(header, rows):
  """A markdown table, each column padded to its widest cell.

  Args:
    header: the column titles.
    rows: sequences of cells (anything `str` formats), as long as `header`.

  Returns:
    The table's lines joined by newlines (no trailing newline).
  """
  table = [[str(cell) for cell in line] for line in [header] + list(rows)]
  widths = [max(len(line[i]) for line in table) for i in range(len(header))]
  lines = ["| " + " | ".join(cell.ljust(width)
                             for cell, width in zip(line, widths)) + " |"
           for line in table]
  lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
  return "\n".join(lines)


def print_table(header, rows):
  print(markdown_table(header, rows), flush=True)


def parser(doc, repeats=None, dtype=None, json_output=False):
  """An ArgumentParser described by `doc` with the shared flags.

  Args:
    doc: the benchmark's module docstring (its first line is the
      description; the whole of it the epilog of --help).
    repeats: default of `--repeats` (steady-state calls or rounds); None:
      no such flag.
    dtype: default of `--dtype` ('float32' or 'float64'); None: no flag.
    json_output: add `--json FILE` (write the raw results).
  """
  result = argparse.ArgumentParser(
      description=doc.splitlines()[0], epilog="\n".join(doc.splitlines()[1:]),
      formatter_class=argparse.RawDescriptionHelpFormatter)
  if repeats is not None:
    result.add_argument("--repeats", "--repeat", type=int, default=repeats,
                        help=f"timed calls (or rounds) per solver after the "
                        f"first call (default {repeats})")
  if dtype is not None:
    result.add_argument("--dtype", choices=("float32", "float64"),
                        default=dtype, help=f"default {dtype}")
  if json_output:
    result.add_argument("--json", help="also write the results to this file")
  return result


def write_json(path, value):
  """Writes `value` as indented JSON to `path` (nothing when path is None)."""
  if path:
    with open(path, "w") as out:
      json.dump(value, out, indent=1)


def _cpu_model():
  try:
    with open("/proc/cpuinfo") as cpuinfo:
      for line in cpuinfo:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def machine_info():
  """Lines describing the machine and the library versions."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    import scipy  # pylint: disable=g-import-not-at-top
    scipy_version = scipy.__version__
  except ImportError:
    scipy_version = "not installed"
  usable = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else "?")
  return [
      f"machine: {platform.machine()} {platform.processor() or ''}".rstrip(),
      f"cpu: {_cpu_model()}",
      f"cpu count: os.cpu_count()={os.cpu_count()}, usable={usable}",
      f"python {platform.python_version()}, tensorflow {tf.__version__}, "
      f"numpy {np.__version__}, scipy {scipy_version}",
      f"platform: {platform.platform()}",
      f"GPUs visible to TensorFlow: "
      f"{len(tf.config.list_physical_devices('GPU'))}",
  ]


def print_machine_info():
  print("Machine:")
  for line in machine_info():
    print("  " + line)
  sys.stdout.flush()
