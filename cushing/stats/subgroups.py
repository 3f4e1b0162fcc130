"""Subgroups a clinician asks about: sex (the paper's Table III), and any manifest column (site, age band, ...).
Metric names: sex keeps the contract names `test/f1/female` and `test/f1/male`; any other column reads
`test/f1/<column>:<value>` (MLflow forbids `=` in names; `:` is the closest character it accepts, on Linux and
macOS clients), with characters MLflow refuses in names replaced by `_` (`site:St_Marys`)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where used: the config (and `cushing --help`) reach this module without pandas
    import pandas as pd

__all__ = ["Subgroup", "subgroups_of", "subgroup_name", "gap_name", "check_subgroup_columns", "SEX_NAMES",
           "SubgroupError", "IDENTIFYING"]

SEX_NAMES = {"F": "female", "M": "male"}
_UNSAFE = re.compile(r"[^\w.\- ]")
MAX_LEVELS = 50
# columns whose values identify a patient or a photo: as a subgroup they would put them into metric names,
# predictions.csv, per_subgroup.csv and the model card
IDENTIFYING = ("subject_id", "image", "path", "source_image", "sha256")


class SubgroupError(ValueError):
    """A subgroup column that cannot be used; the message says why and what to do."""


def subgroup_name(column: str, value: object) -> str:
    if column == "sex" and value in SEX_NAMES:
        return SEX_NAMES[value]
    return f"{_UNSAFE.sub('_', column)}:{_UNSAFE.sub('_', str(value)).strip() or '_'}"


def gap_name(column: str) -> str:
    """The name of a column's subgroup gap (`test/f1/gap:site`), cleaned as subgroup names are."""
    return f"gap:{_UNSAFE.sub('_', column)}"


@dataclass(frozen=True)
class Subgroup:
    """All rows (column None) or the rows where `column == value`; `name` is what metric names carry."""

    name: str
    column: str | None = None
    value: str | None = None

    def mask(self, table: pd.DataFrame) -> np.ndarray:
        if self.column is None:
            return np.ones(len(table), bool)
        return (table[self.column].astype(str) == self.value).to_numpy()


OVERALL = Subgroup("overall")


def subgroups_of(table: pd.DataFrame, columns: tuple[str, ...] = ("sex",)) -> list[Subgroup]:
    """Overall, then each column's values in sorted order (sex: female, male)."""
    out = [OVERALL]
    for col in columns:
        values = sorted(table[col].dropna().astype(str).unique()) if col in table.columns else []
        if col == "sex":
            values = [v for v in ("F", "M") if v in values]
        out += [Subgroup(subgroup_name(col, v), col, v) for v in values]
    return out


def check_subgroup_columns(table: pd.DataFrame, columns: tuple[str, ...]) -> None:
    """Refuse columns that identify patients or photos (protected health information in every metric name and
    table), columns that do not exist, numeric columns (a value per patient is not a subgroup: bin it) and columns
    with so many values that no subgroup could be estimated or that single out patients."""
    import pandas as pd
    problems = []
    subjects = table["subject_id"].nunique() if "subject_id" in table.columns else len(table)
    for col in columns:
        values = table[col].dropna().astype(str) if col in table.columns else pd.Series(dtype=str)
        n = values.nunique()
        numeric = len(values) > 0 and pd.to_numeric(values, errors="coerce").notna().mean() == 1.0
        if col in IDENTIFYING:
            problems.append(f"subgroup column {col!r} identifies patients or photos: its values would be logged in "
                            f"metric names and tables (protected health information)")
        elif col not in table.columns:
            problems.append(f"subgroup column {col!r} is not in the manifest (columns: {', '.join(table.columns)})")
        elif col != "label" and numeric and n > 10:
            problems.append(f"subgroup column {col!r} is numeric with {n} values: add a banded column to the manifest "
                            f"(e.g. {col}_band with 18-39, 40-59, 60+) and name that")
        elif n > MAX_LEVELS:
            problems.append(f"subgroup column {col!r} has {n} values (at most {MAX_LEVELS})")
        elif col not in ("label", "sex") and subjects > 5 and n >= subjects:
            problems.append(f"subgroup column {col!r} has a value per subject ({n} values, {subjects} subjects): it "
                            "would single out patients in metric names and tables")
    if problems:
        raise SubgroupError("; ".join(problems))
