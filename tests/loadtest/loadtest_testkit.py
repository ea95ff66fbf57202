"""Helpers shared by the load-test tests (importable: pytest puts this folder on sys.path)."""

from __future__ import annotations

import re


def report_table(markdown: str) -> dict[str, list[str]]:
    """The per-arm comparison table of a report: arm -> its cells after the arm name."""
    rows = {}
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Arm | Precision | Requests"))
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("*")] = cells[1:]
    return rows


def agreement_values(cell: str) -> tuple[list[float], int]:
    """('0.946 / 0.993 / 1.000 (n=37)') -> ([0.946, 0.993, 1.0], 37)."""
    m = re.match(r"([\d. /–-]+) \(n=(\d+)\)", cell)
    assert m, f"no agreement figures in {cell!r}"
    return [float(v) for v in m.group(1).split(" / ")], int(m.group(2))
