import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The XLA cells test that the solvers' graphs compile under jit_compile=True
# and compute the right answers; LLVM's optimization of the generated CPU
# code, and its split into modules compiled in parallel (no gain with one
# core per test worker), are not under test and took about half of each
# cell's time (the conformance table's rotation cell: 11 -> 6 s of CPU). The
# HLO, XLA's own passes and the CPU runtime are the ones users get. Set
# XLA_FLAGS to override.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                      "--xla_cpu_parallel_codegen_split_count=1")
