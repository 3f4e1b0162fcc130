"""A person's review of the audit's pairs: a CSV with `line_a`, `line_b` (the manifest's CSV lines, as in audit.csv)
and `verdict` (`same`, `different` or empty), e.g. audit.csv with its verdicts filled in. The next run merges a
`same` pair even above the threshold and never merges a `different` one. Hashed `subject_a`/`subject_b`, when
present, must still match the manifest's: a review of lines that now hold other subjects is refused rather than
applied to the wrong people. Errors name the file and its line.
"""
from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cushing.data.audit.settings import VERDICTS

__all__ = ["Decisions", "DecisionsError", "read_decisions"]


class DecisionsError(ValueError):
    """A decisions file that cannot be applied; the message names the file and the line."""


@dataclass(frozen=True)
class Decisions:
    path: Path
    digest: str  # sha256 of the file's bytes (logged; the file itself only when PHI artifacts are allowed)
    verdicts: dict[tuple[int, int], str] = field(default_factory=dict)  # (line_a, line_b), line_a < line_b
    unmatched: int = 0  # reviewed pairs whose lines are not in this manifest

    def count(self, verdict: str) -> int:
        return sum(v == verdict for v in self.verdicts.values())


def _row_pair(path: Path, n: int, row: dict[str, str], n_lines: int) -> tuple[int, int] | None:
    try:
        a, b = int(str(row["line_a"]).strip()), int(str(row["line_b"]).strip())
    except ValueError:
        raise DecisionsError(f"{path} line {n}: line_a and line_b must be manifest line numbers, got "
                             f"{row['line_a']!r} and {row['line_b']!r}") from None
    if a == b or min(a, b) < 2:
        raise DecisionsError(f"{path} line {n}: line_a and line_b must be two different data lines (>= 2), "
                             f"got {a} and {b}")
    if max(a, b) > n_lines + 1:
        return None
    return (a, b) if a < b else (b, a)


def read_decisions(path: str | Path, subjects: np.ndarray) -> Decisions:
    """The reviewed verdicts, checked against this manifest's hashed `subjects` (one per manifest row)."""
    p = Path(path)
    if not p.is_file():
        raise DecisionsError(f"decisions file {p} not found")
    data = p.read_bytes()
    try:
        rows = list(csv.DictReader(data.decode("utf-8-sig").splitlines()))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DecisionsError(f"{p}: not a readable CSV file ({e})") from None
    cols = set(rows[0]) if rows else set()
    if missing := [c for c in ("line_a", "line_b", "verdict") if c not in cols]:
        raise DecisionsError(f"{p}: needs the columns line_a, line_b and verdict (missing: {', '.join(missing)}); "
                             f"audit.csv with its verdict column filled in is such a file")
    verdicts: dict[tuple[int, int], tuple[str, int]] = {}
    unmatched = 0
    for n, row in enumerate(rows, start=2):
        v = (row.get("verdict") or "").strip().lower()
        if not v:
            continue
        if v not in VERDICTS:
            raise DecisionsError(f"{p} line {n}: verdict must be same or different (or empty), got {row['verdict']!r}")
        pair = _row_pair(p, n, row, len(subjects))
        if pair is None:
            unmatched += 1
            continue
        got = {(row.get("subject_a") or "").strip(), (row.get("subject_b") or "").strip()}  # hashed ids, if any
        if "" not in got and got != {subjects[pair[0] - 2], subjects[pair[1] - 2]}:
            raise DecisionsError(f"{p} line {n}: lines {pair[0]} and {pair[1]} now hold other subjects than when this "
                                 "pair was reviewed (the manifest changed): run the audit again and review its new "
                                 "audit.csv")
        if pair in verdicts and verdicts[pair][0] != v:
            raise DecisionsError(f"{p} line {n}: lines {pair[0]} and {pair[1]} are marked {v} here and "
                                 f"{verdicts[pair][0]} on line {verdicts[pair][1]}")
        verdicts[pair] = (v, n)
    return Decisions(p, hashlib.sha256(data).hexdigest(), {k: v for k, (v, _) in verdicts.items()}, unmatched)
