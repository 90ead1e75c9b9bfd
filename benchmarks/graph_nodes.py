"""Graph size of a traced `least_squares`: the nodes of the top graph and
of its library's functions, and the most frequent ops, for a curve fit
(y = 2 exp(-1.3 t), 50 samples, (a, b) from (1, -1), float64, defaults),
traced in `tf.function(autograph=False)` without a tape (a graph cannot
know whether a gradient will be taken: the implicit attachment is built).

  PYTHONPATH=<tree> python benchmarks/graph_nodes.py ["{'damping': 'nielsen'}"]

The optional argument: least_squares' options, a Python dict literal.
"""
import ast
import collections
import sys

import numpy as np
import tensorflow as tf

import tfg_optim

_T = np.linspace(0, 1, 50)
_Y = 2 * np.exp(-1.3 * _T)


def main():
  options = ast.literal_eval(sys.argv[1]) if len(sys.argv) > 1 else {}

  @tf.function(autograph=False)
  def solve(a, b):
    return tfg_optim.least_squares(lambda a, b: a * tf.exp(b * _T) - _Y,
                                   [a, b], **options).position

  graph = solve.get_concrete_function(
      tf.constant(1.0, tf.float64),
      tf.constant(-1.0, tf.float64)).graph.as_graph_def()
  functions = graph.library.function
  inner = sum(len(f.node_def) for f in functions)
  print(f"top nodes {len(graph.node)}, functions {len(functions)}, "
        f"function nodes {inner}, total {len(graph.node) + inner}")
  ops = collections.Counter(n.op for f in functions for n in f.node_def)
  ops += collections.Counter(n.op for n in graph.node)
  print(ops.most_common(15))


if __name__ == "__main__":
  main()
