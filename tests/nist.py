"""The 27 NIST StRD nonlinear regression problems: parser and models.

One definition serves TensorFlow and NumPy: every model is written as
`model(b, x, ops)` with `ops` a namespace of elementwise functions (`TF` or
`NP` below). `b` is the parameter vector with optional leading batch
dimensions, [..., n]; `x` the predictor data, [m] (Nelson: [2, m]); the
result is the model prediction, [..., m]. Residuals are `y - model(b, x)`
(Nelson's response is log(y)).

`load(name)` parses `tests/data/nist_strd/<name>.dat` into a `Dataset`:
the two starts, the certified values and residual sum of squares, the data.
`lre(b, certified)` is the log relative error per parameter, capped at 11.
"""

import collections
import os
import re
import types

import numpy as np
import tensorflow as tf

DATA_DIR = os.path.join(os.path.dirname(__file__), "data", "nist_strd")

TF = types.SimpleNamespace(exp=tf.exp, cos=tf.cos, sin=tf.sin, atan=tf.atan,
                           log=tf.math.log, pi=np.pi)
NP = types.SimpleNamespace(exp=np.exp, cos=np.cos, sin=np.sin, atan=np.arctan,
                           log=np.log, pi=np.pi)

Dataset = collections.namedtuple(
    "Dataset", ["name", "starts", "certified", "certified_std",
                "certified_rss", "x", "y", "difficulty"])


def _params(b, n):
  """The n parameters as [..., 1] slices, broadcasting against x [m]."""
  return [b[..., i:i + 1] for i in range(n)]


def _misra1a(b, x, ops):  # also BoxBOD
  b1, b2 = _params(b, 2)
  return b1 * (1.0 - ops.exp(-b2 * x))


def _misra1b(b, x, ops):
  b1, b2 = _params(b, 2)
  return b1 * (1.0 - (1.0 + b2 * x / 2.0) ** -2.0)


def _misra1c(b, x, ops):
  b1, b2 = _params(b, 2)
  return b1 * (1.0 - (1.0 + 2.0 * b2 * x) ** -0.5)


def _misra1d(b, x, ops):
  b1, b2 = _params(b, 2)
  return b1 * b2 * x / (1.0 + b2 * x)


def _chwirut(b, x, ops):
  b1, b2, b3 = _params(b, 3)
  return ops.exp(-b1 * x) / (b2 + b3 * x)


def _lanczos(b, x, ops):
  b1, b2, b3, b4, b5, b6 = _params(b, 6)
  return b1 * ops.exp(-b2 * x) + b3 * ops.exp(-b4 * x) + b5 * ops.exp(-b6 * x)


def _gauss(b, x, ops):
  b1, b2, b3, b4, b5, b6, b7, b8 = _params(b, 8)
  return (b1 * ops.exp(-b2 * x) + b3 * ops.exp(-(x - b4) ** 2 / b5 ** 2) +
          b6 * ops.exp(-(x - b7) ** 2 / b8 ** 2))


def _danwood(b, x, ops):
  b1, b2 = _params(b, 2)
  return b1 * x ** b2


def _kirby2(b, x, ops):
  b1, b2, b3, b4, b5 = _params(b, 5)
  return (b1 + b2 * x + b3 * x ** 2) / (1.0 + b4 * x + b5 * x ** 2)


def _cubic_over_cubic(b, x, ops):  # Hahn1, Thurber
  b1, b2, b3, b4, b5, b6, b7 = _params(b, 7)
  return ((b1 + b2 * x + b3 * x ** 2 + b4 * x ** 3) /
          (1.0 + b5 * x + b6 * x ** 2 + b7 * x ** 3))


def _nelson(b, x, ops):  # the response is log(y)
  b1, b2, b3 = _params(b, 3)
  return b1 - b2 * x[0] * ops.exp(-b3 * x[1])


def _mgh17(b, x, ops):
  b1, b2, b3, b4, b5 = _params(b, 5)
  return b1 + b2 * ops.exp(-x * b4) + b3 * ops.exp(-x * b5)


def _enso(b, x, ops):
  b1, b2, b3, b4, b5, b6, b7, b8, b9 = _params(b, 9)
  w = 2.0 * ops.pi * x
  return (b1 + b2 * ops.cos(w / 12.0) + b3 * ops.sin(w / 12.0) +
          b5 * ops.cos(w / b4) + b6 * ops.sin(w / b4) +
          b8 * ops.cos(w / b7) + b9 * ops.sin(w / b7))


def _mgh09(b, x, ops):
  b1, b2, b3, b4 = _params(b, 4)
  return b1 * (x ** 2 + x * b2) / (x ** 2 + x * b3 + b4)


def _thurber(b, x, ops):
  return _cubic_over_cubic(b, x, ops)


def _roszman1(b, x, ops):
  b1, b2, b3, b4 = _params(b, 4)
  return b1 - b2 * x - ops.atan(b3 / (x - b4)) / ops.pi


def _eckerle4(b, x, ops):
  b1, b2, b3 = _params(b, 3)
  return (b1 / b2) * ops.exp(-0.5 * ((x - b3) / b2) ** 2)


def _rat42(b, x, ops):
  b1, b2, b3 = _params(b, 3)
  return b1 / (1.0 + ops.exp(b2 - b3 * x))


def _mgh10(b, x, ops):
  b1, b2, b3 = _params(b, 3)
  return b1 * ops.exp(b2 / (x + b3))


def _rat43(b, x, ops):
  b1, b2, b3, b4 = _params(b, 4)
  return b1 / (1.0 + ops.exp(b2 - b3 * x)) ** (1.0 / b4)


def _bennett5(b, x, ops):
  b1, b2, b3 = _params(b, 3)
  return b1 * (b2 + x) ** (-1.0 / b3)


MODELS = {
    "Misra1a": _misra1a, "Chwirut2": _chwirut, "Chwirut1": _chwirut,
    "Lanczos3": _lanczos, "Gauss1": _gauss, "Gauss2": _gauss,
    "DanWood": _danwood, "Misra1b": _misra1b,
    "Kirby2": _kirby2, "Hahn1": _cubic_over_cubic, "Nelson": _nelson,
    "MGH17": _mgh17, "Lanczos1": _lanczos, "Lanczos2": _lanczos,
    "Gauss3": _gauss, "Misra1c": _misra1c, "Misra1d": _misra1d,
    "Roszman1": _roszman1, "ENSO": _enso,
    "MGH09": _mgh09, "Thurber": _thurber, "BoxBOD": _misra1a,
    "Rat42": _rat42, "MGH10": _mgh10, "Eckerle4": _eckerle4, "Rat43": _rat43,
    "Bennett5": _bennett5,
}
# NIST's order: lower, average, higher difficulty.
NAMES = tuple(MODELS)

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def load(name):
  """Parses one StRD file into a `Dataset` (float64 NumPy arrays)."""
  with open(os.path.join(DATA_DIR, name + ".dat")) as f:
    lines = f.read().splitlines()
  starts, certified, std = [], [], []
  rss = None
  data_start = None
  difficulty = None
  for i, line in enumerate(lines):
    match = re.match(r"\s*b\d+\s*=\s*(.*)$", line)
    if match:
      values = [float(v) for v in re.findall(_NUMBER, match.group(1))]
      if len(values) != 4:
        raise ValueError(f"{name}: cannot parse parameter line {line!r}")
      starts.append(values[:2])
      certified.append(values[2])
      std.append(values[3])
    elif line.startswith("Residual Sum of Squares:"):
      rss = float(line.split(":")[1])
    elif re.search(r"(Lower|Average|Higher) Level of Difficulty", line):
      difficulty = line.split()[0].lower()
    elif line.startswith("Data:") and re.match(r"Data:\s+y\s", line):
      data_start = i + 1
  if not certified or rss is None or data_start is None:
    raise ValueError(f"{name}: unexpected file layout")
  data = np.array([[float(v) for v in line.split()]
                   for line in lines[data_start:] if line.strip()])
  y, x = data[:, 0], data[:, 1:].T
  if x.shape[0] == 1:
    x = x[0]
  if name == "Nelson":
    y = np.log(y)
  starts = np.array(starts).T  # [2, n]
  return Dataset(name, starts, np.array(certified), np.array(std), rss, x, y,
                 difficulty)


def residual_fn(dataset, ops=TF, dtype=tf.float64):
  """b -> y - model(b, x), in TensorFlow (ops=TF) or NumPy (ops=NP)."""
  model = MODELS[dataset.name]
  if ops is NP:
    return lambda b: dataset.y - model(np.asarray(b), dataset.x, NP)
  # Constants are made at call time, in whatever graph the call builds.
  return lambda b: (tf.constant(dataset.y, dtype) -
                    model(b, tf.constant(dataset.x, dtype), TF))


def lre(b, certified):
  """Log relative error per parameter, -log10(|b - c| / |c|), in [0, 11]."""
  b = np.asarray(b, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    relative = np.abs(b - certified) / np.abs(certified)
    value = -np.log10(relative)
  value = np.where(np.isnan(value), 0.0, value)  # NaN parameters: no digits.
  return np.clip(value, 0.0, 11.0)


def solve(dataset, dtype=tf.float64, starts=None, **options):
  """Fits `dataset` from both starts at once (a batch of 2) in one
  `tf.function` with `tfg_optim.least_squares(**options)`; returns the
  results as NumPy values (position [2, n], counts [2], ...)."""
  import tfg_optim  # pylint: disable=g-import-not-at-top
  residual = residual_fn(dataset, TF, dtype)
  starts = dataset.starts if starts is None else starts

  @tf.function(autograph=False)
  def fit(start):
    return tfg_optim.least_squares(residual, start, batch_dims=1, **options)

  result = fit(tf.constant(starts, dtype))
  return tf.nest.map_structure(lambda v: v.numpy(), result)
