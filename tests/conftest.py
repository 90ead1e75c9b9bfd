import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The XLA cells test that the solvers' graphs compile under jit_compile=True
# and compute the right answers; LLVM's optimization of the generated CPU
# code is not under test and took about a third of each cell's time (the
# rotation fit's cell: 11.4 -> 7.0 s of CPU). The HLO, XLA's own passes and
# the CPU runtime are the ones users get. Set XLA_FLAGS to override.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
