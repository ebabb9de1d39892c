"""The XLA options the suite's own processes compile with, and the environment without them.

The suite compiles some hundreds of small programs and runs each a few times, so on the CPU
its time is mostly XLA's compile. Two options of jaxlib 0.10.2's CPU backend cut a step
program's compile to a third (20.5 s -> 6.6 s for the twelve inference buckets of
test_engine's config on the 2-core VM, 2026-12-04; the legacy fusion emitters alone 14.2 s)
and the suite from 28 to 15 minutes: the legacy fusion emitters and no LLVM optimization.
Both cost run time, which is why they are the suite's and not the engine's: a decode step of
8 sequences of the embedded model took 8.84 ms with the legacy emitters against 7.97 ms,
and the small tier's 137.9 ms against 133.6 ms; without LLVM's optimization the 600-step
test_finetune_learns took 157 s against 106 s. Results move in the last bits at most (fast
math stays off; of the kernel errors tests/pallas_kernels prints, one changed: 4.75e-7 ->
4.38e-7); no tolerance was touched.

A test whose time is in running, not compiling, asks for LLVM's optimization back
(``OPTIMIZED``); a test of what a user runs (``make demo``, the notebooks) runs it in
``users_environment()``.
"""

from __future__ import annotations

import os

SUITE_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0"

OPTIMIZED = "xla_backend_optimization_level=3"
"""``KernelConfig.xla_options`` for an engine whose programs run long enough that LLVM's
optimization (XLA's default level) pays for its compile."""


def with_suite_flags(flags: str) -> str:
    """``XLA_FLAGS`` text ``flags`` with ``SUITE_XLA_FLAGS`` added (once). The suite's
    conftest sets it before jax starts a backend (XLA reads the flags then), and the
    subprocesses the tests start inherit it."""
    return flags if SUITE_XLA_FLAGS in flags else f"{flags} {SUITE_XLA_FLAGS}".strip()


def users_environment() -> dict[str, str]:
    """This process's environment without ``SUITE_XLA_FLAGS``: what a user's shell has."""
    env = dict(os.environ)
    flags = env.pop("XLA_FLAGS", "").replace(SUITE_XLA_FLAGS, "").strip()
    if flags:
        env["XLA_FLAGS"] = flags
    return env
