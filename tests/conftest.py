import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The XLA cells test that the solvers' graphs compile under jit_compile=True
# and compute the right answers. How XLA turns the optimized HLO into CPU
# code is not under test, and it was half of each cell's time: LLVM's
# optimization, the module's split for parallel compilation (no gain with one
# core per test worker), and the MLIR fusion emitters (the legacy elemental
# emitter compiles the same fusions in about half the time). The conformance
# table's sphere cell: 10 -> 5-6.5 s of CPU; its rotation cell 11 -> 6 s.
# The HLO, XLA's own passes and the runtime are the ones users get, and
# test_distributed's worker 0 and every benchmark compile with XLA's
# defaults. Set XLA_FLAGS to override.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                      "--xla_cpu_parallel_codegen_split_count=1 "
                      "--xla_cpu_use_fusion_emitters=false")
