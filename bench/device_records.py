"""Records of ``bench/device_check.py``'s parts: what a part collects (``Report``), its
JSON and Markdown files, and the summary table. Pure Python: the orchestrating process
reads and writes these without importing jax."""

from __future__ import annotations

import datetime
import json
import os
import time

from benchlib import markdown_table

PARTS = ("env", "kernels", "engine", "decode", "coserve")
STATUS_OK, STATUS_FAILED, STATUS_TIMED_OUT, STATUS_SKIPPED = "ok", "failed", "timed_out", "skipped"


def part_file(out_dir: str, index: int, part: str, ext: str) -> str:
    return os.path.join(out_dir, f"{index:02d}_{part}.{ext}")


def part_index(part: str) -> int:
    return PARTS.index(part) + 1


def render_markdown(record: dict) -> str:
    """A part's Markdown: status, checks, targets, then the part's own tables."""
    lines = [f"# {record['index']:02d} {record['part']}: {record['status']}", ""]
    lines.append(f"- summary: {record.get('summary') or '(none)'}")
    lines.append(f"- platform: {record.get('platform', '?')}; dry run: {record['dry_run']}")
    lines.append(f"- elapsed {record.get('elapsed_s', 0):.1f} s of a {record['budget_s']:.0f} s "
                 "budget")
    if record.get("error"):
        lines += ["", "## Error", "", "```", record["error"].rstrip(), "```"]
    if record.get("checks"):
        rows = [[c["name"], "pass" if c["passed"] else "FAIL", c["detail"]]
                for c in record["checks"]]
        lines += ["", "## Checks", "", markdown_table(["check", "result", "detail"], rows)]
    if record.get("targets"):
        rows = [[t["name"], {True: "met", False: "MISSED", None: "n/a"}[t["met"]], t["detail"]]
                for t in record["targets"]]
        lines += ["", "## Targets", "", markdown_table(["target", "result", "detail"], rows)]
    if record.get("body_md"):
        lines += ["", record["body_md"].rstrip()]
    if record.get("output_tail"):
        lines += ["", "## Output tail", "", "```", record["output_tail"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def write_record(out_dir: str, record: dict) -> None:
    """Writes a part's JSON and Markdown (each through a temporary file and a rename, so a
    reader, or a kill, never leaves half a file)."""
    index, part = record["index"], record["part"]
    for ext, text in (("json", json.dumps(record, indent=1, default=str)),
                      ("md", render_markdown(record))):
        path = part_file(out_dir, index, part, ext)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


def read_record(out_dir: str, part: str) -> dict | None:
    path = part_file(out_dir, part_index(part), part, "json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class Report:
    """What one part collects: checks (correctness: any failure fails the part), targets
    (performance aims: reported as met or missed), results and Markdown sections.

    ``save()`` rewrites the part's files; parts call it after each measurement, so what
    was measured survives a kill at the budget.
    """

    def __init__(self, out_dir: str, part: str, budget_s: float, dry_run: bool):
        self.out_dir, self.part, self.dry_run = out_dir, part, dry_run
        self.start = time.monotonic()
        self.budget_s = budget_s
        # Parts stop starting new work this long before the parent's kill.
        self.soft_deadline = self.start + budget_s - max(5.0, 0.15 * budget_s)
        self.checks: list[dict] = []
        self.targets: list[dict] = []
        self.results: dict = {}
        self.sections: list[str] = []
        self.summary = ""
        self.ran_out = False
        self.platform = "?"

    def time_left(self) -> float:
        return self.soft_deadline - time.monotonic()

    def out_of_time(self, what: str) -> bool:
        """True (and noted) when ``what`` should not start: the part's budget is spent."""
        if self.time_left() > 0:
            return False
        self.ran_out = True
        self.note(f"skipped for lack of time: {what}")
        print(f"[{self.part}] out of time: skipping {what}", flush=True)
        return True

    def check(self, name: str, passed: bool, detail: str = "") -> bool:
        self.checks.append({"name": name, "passed": bool(passed), "detail": detail})
        print(f"[{self.part}] check {'pass' if passed else 'FAIL'}: {name} {detail}", flush=True)
        return bool(passed)

    def target(self, name: str, met: bool | None, detail: str) -> None:
        """A performance aim; ``met=None`` where it does not apply (a dry run)."""
        self.targets.append({"name": name, "met": None if self.dry_run else met,
                             "detail": detail})

    def table(self, title: str, header: list[str], rows: list[list[str]]) -> None:
        text = f"## {title}\n\n{markdown_table(header, rows)}"
        self.sections.append(text)
        print(text, flush=True)

    def note(self, text: str) -> None:
        self.sections.append(text)

    def record(self, status: str, error: str | None = None) -> dict:
        return {
            "part": self.part, "index": part_index(self.part), "status": status,
            "dry_run": self.dry_run, "platform": self.platform, "budget_s": self.budget_s,
            "elapsed_s": time.monotonic() - self.start, "summary": self.summary,
            "error": error, "checks": self.checks, "targets": self.targets,
            "results": self.results, "body_md": "\n\n".join(self.sections),
            "written_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }

    def save(self, status: str = "running", error: str | None = None) -> dict:
        record = self.record(status, error)
        write_record(self.out_dir, record)
        return record

    def final_status(self) -> str:
        if not all(c["passed"] for c in self.checks):
            return STATUS_FAILED
        if self.ran_out:
            return STATUS_TIMED_OUT
        if not self.checks:  # a part that checked nothing has not shown anything
            return STATUS_FAILED
        return STATUS_OK


def summary_table(records: list[dict]) -> str:
    rows = []
    for r in records:
        failed = [c["name"] for c in r.get("checks", []) if not c["passed"]]
        missed = [t["name"] for t in r.get("targets", []) if t["met"] is False]
        detail = r.get("summary") or ""
        if failed:
            detail += f" | failed: {'; '.join(failed)}"[:400]
        if missed:
            detail += f" | missed: {'; '.join(missed)}"[:400]
        if r.get("error") and r["status"] != STATUS_OK:
            detail += " | " + r["error"].strip().splitlines()[-1][:200]
        rows.append([f"{r['index']:02d} {r['part']}", r["status"],
                     f"{r.get('elapsed_s', 0):.0f}/{r['budget_s']:.0f} s", detail])
    return markdown_table(["part", "status", "time", "summary"], rows)


def load_records(path: str) -> list[dict]:
    """The records of a run: a combined ``device_check.json`` or a per-part directory."""
    if os.path.isdir(path):
        records = []
        for part in PARTS:
            record = read_record(path, part)
            if record is not None:
                records.append(record)
        return records
    with open(path) as f:
        return json.load(f)
