"""What every benchmark script shares: appending a dated, attributed section to BENCHMARKS.md."""

from __future__ import annotations

import atexit
import datetime
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS_MD = os.path.join(REPO_ROOT, "BENCHMARKS.md")


def record(title: str, info: dict[str, str], body: str) -> None:
    """Appends a dated section to BENCHMARKS.md (creating the file with its header)."""
    if not os.path.exists(BENCHMARKS_MD):
        with open(BENCHMARKS_MD, "w") as f:
            f.write("# Benchmarks\n")
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [f"\n## {title} ({stamp})\n"]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines += ["- command: `" + " ".join(["python", *sys.argv]) + "`", "", body, ""]
    with open(BENCHMARKS_MD, "a") as f:
        f.write("\n".join(lines))
    print(f"appended to {BENCHMARKS_MD}")


def scratch_dir(prefix: str) -> str:
    """A fresh temporary directory for what a benchmark keeps only while it runs (its
    latency model, a profiler trace), removed when the process exits (at its end, on an
    error, on Ctrl-C, or on SIGTERM or SIGHUP: ``exit_on_termination``; SIGKILL leaves
    it), so runs leave nothing behind in the system's temporary directory."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    exit_on_termination()
    return path


def exit_on_termination() -> None:
    """Makes SIGTERM and SIGHUP (``kill``, a closed terminal, a job scheduler's stop) exit
    the process as Ctrl-C does, through ``SystemExit``, so its ``atexit`` handlers run
    (by default these signals end it at once, without running them). A disposition someone else
    set stays (a handler of their own, or SIGHUP ignored under ``nohup``), and so does the
    default off the main thread, where Python allows no handler to be set. The exit status
    is the shell's for a signal, 128 + its number."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _exit_for_signal)


def _exit_for_signal(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def library_revision() -> str:
    """Git commit of this checkout, flagged when the library sources have local changes."""

    def git(*args: str) -> str:
        run = subprocess.run(["git", "-C", REPO_ROOT, *args], capture_output=True, text=True,
                             check=True)
        return run.stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "coserve_jax", "pallas_kernels")
    except (OSError, subprocess.CalledProcessError):
        return f"{REPO_ROOT} (not a git checkout)"
    return commit + (" + uncommitted library changes" if dirty else "")


def machine_line() -> str:
    """The machine a record was measured on: CPU, cores, jax and its platform."""
    import platform

    import jax

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"jax {jax.__version__} on {jax.devices()[0].platform}")


def cpu_steal() -> tuple[int, int] | None:
    """The host's CPU time so far, all of it and the part stolen by the hypervisor for other
    guests (``/proc/stat``, in clock ticks); None where the file is not there (not Linux).
    Two readings give the steal share of a span: a virtual machine whose co-tenants take its
    cores runs slow for reasons no benchmark of its own can see."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    ticks = [int(x) for x in fields[1:]]
    return sum(ticks[:8]), ticks[7] if len(ticks) > 7 else 0


def steal_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of the host's CPU time stolen between two ``cpu_steal`` readings (None
    without both, or with no time between them)."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    return (after[1] - before[1]) / (after[0] - before[0])


# ----- measuring on a device (imports jax lazily: a caller may only orchestrate) --------------


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def time_per_call(fn, args: tuple, repeats: int, calls_per_repeat: int = 1) -> float:
    """Median seconds per call of ``fn(*args)`` after two warm-up calls (compilation).

    Each repeat dispatches ``calls_per_repeat`` calls and waits once, so the host's
    dispatch overlaps the device's work and short kernels are not timed as launch gaps.
    """
    import statistics
    import time

    import jax

    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(calls_per_repeat):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls_per_repeat)
    return statistics.median(times)


def copy_bandwidth(nbytes: int, repeats: int, dtype: str = "bfloat16") -> float:
    """Device bytes/s of ``x + 1`` over random data (one read and one write per element)."""
    import jax
    import jax.numpy as jnp

    itemsize = jnp.dtype(dtype).itemsize
    # A random block tiled to the size: random (not zeros, which can run faster), and no
    # random-bits generation over more than 2^31 elements.
    block = min(nbytes // itemsize, 1 << 24)
    x = jnp.tile(jax.random.normal(jax.random.key(0), (block,), dtype),
                 max(nbytes // itemsize // block, 1))
    add = jax.jit(lambda x: x + 1)
    seconds = time_per_call(add, (x,), max(repeats, 5), calls_per_repeat=4)
    return 2 * x.size * itemsize / seconds


def matmul_flops(n: int, repeats: int, dtype: str = "bfloat16") -> float:
    """Device FLOP/s of an ``n x n`` by ``n x n`` matmul over random data."""
    import jax

    a = jax.random.normal(jax.random.key(1), (n, n), dtype)
    b = jax.random.normal(jax.random.key(2), (n, n), dtype)
    mm = jax.jit(lambda a, b: a @ b)
    return 2 * n**3 / time_per_call(mm, (a, b), max(repeats, 5), calls_per_repeat=4)


def relative_error(out, ref) -> float:
    """``||out - ref|| / ||ref||`` (Frobenius, in float64); inf when ``out`` is not finite."""
    import numpy as np

    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    if out.shape != ref.shape:
        raise ValueError(f"shapes differ: {out.shape} vs {ref.shape}")
    if not np.isfinite(out).all():
        return float("inf")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def poison_allocator(nbytes: int) -> None:
    """Fills ``nbytes`` of freshly allocated device memory with NaN and frees it.

    The device allocator hands freed blocks to the next allocations, so an output that a
    kernel then leaves partly unwritten is likely to hold NaN there rather than stale
    finite values: a best-effort poisoning of outputs we do not allocate ourselves.
    """
    import jax
    import jax.numpy as jnp

    poison = jnp.full((max(nbytes // 4, 1),), jnp.nan, jnp.float32)
    jax.block_until_ready(poison)
    poison.delete()


def distribution_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed version of each distribution, or ``"absent"``."""
    from importlib import metadata

    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions
