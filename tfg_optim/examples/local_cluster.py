"""Worker processes of a `tf.distribute` cluster on this machine.

A `MultiWorkerMirroredStrategy` reads its cluster from the `TF_CONFIG`
environment variable of each worker process,

    {"cluster": {"worker": ["127.0.0.1:P0", "127.0.0.1:P1", ...]},
     "task": {"type": "worker", "index": i}},

fixed when the process starts. `worker_environments` picks free ports and
gives each worker its environment; `run_workers` runs the workers' commands
at once, bounded in time, and always ends them. Used by
`tfg_optim.examples.distributed_fit`, `tests/test_distributed.py` and
`benchmarks/distributed.py`. No TensorFlow here: a launcher need not
start it.
"""

import json
import os
import socket
import subprocess


def free_ports(count):
  """`count` TCP ports on 127.0.0.1 that were free a moment ago (bound
  together, so distinct, then released for the workers to bind)."""
  sockets = [socket.socket() for _ in range(count)]
  try:
    for s in sockets:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def tf_config(ports, index):
  """The `TF_CONFIG` (JSON) of worker `index` of the workers at
  127.0.0.1:`ports`."""
  return json.dumps({
      "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
      "task": {"type": "worker", "index": index}})


def worker_environments(count, **variables):
  """[the environment of worker i for i < count]: this process's
  environment, `variables`, and worker i's `TF_CONFIG` over `count` free
  ports."""
  ports = free_ports(count)
  return [dict(os.environ, **variables, TF_CONFIG=tf_config(ports, index))
          for index in range(count)]


def run_workers(command, environments, timeout):
  """Runs `command` (a list) once per environment, all at once; returns
  [(stdout, stderr)] in their order. Raises `subprocess.TimeoutExpired`
  if one runs past `timeout` seconds; every process still running is
  killed before this returns or raises."""
  processes = []
  try:
    for environment in environments:
      processes.append(subprocess.Popen(
          command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
          env=environment))
    return [p.communicate(timeout=timeout) for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.communicate()
