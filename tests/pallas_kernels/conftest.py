"""Prints the largest kernel-vs-reference error of each test file after the run."""

from __future__ import annotations

import collections


def pytest_terminal_summary(terminalreporter):
    try:
        from kernel_cases import OBSERVED
    except ImportError:  # pragma: no cover - the kernel tests did not run
        return
    if not OBSERVED:
        return
    worst: dict[tuple[str, str], float] = collections.defaultdict(float)
    for test, what, err in OBSERVED:
        name = test.split("::")[0].rsplit("/", 1)[-1]
        worst[(name, what)] = max(worst[(name, what)], err)
    terminalreporter.section("kernel max relative errors (max abs err / max |reference|)")
    for (name, what), err in sorted(worst.items()):
        terminalreporter.write_line(f"{name:40s} {what:10s} {err:.2e}")
