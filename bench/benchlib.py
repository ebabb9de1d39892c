"""What every benchmark script shares: appending a dated, attributed section to BENCHMARKS.md."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys

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
