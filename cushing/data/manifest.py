"""The manifest contract: load, validate (every problem at once), digest.

Columns: image (path, relative to the manifest's folder or absolute), label (0/1), sex (F/M), subject_id
(defaults to the image stem), optional split (train/val/test). Extra columns are kept.
"""
from __future__ import annotations

import hashlib
import hmac
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from cushing.data.imageio import BadImage, open_rgb

__all__ = ["Manifest", "ManifestError", "load_manifest", "REQUIRED", "SPLITS", "hash_subject", "subject_key",
           "sha256_file", "skipped_counts"]

REQUIRED = ("image", "label", "sex")
SPLITS = ("train", "val", "test")
SEXES = ("F", "M")


class ManifestError(ValueError):
    """Every problem found in a manifest, each with its CSV line; nothing was written."""

    def __init__(self, path: str | Path, problems: list[str], hint: str = ""):
        self.path, self.problems = str(path), problems
        head = f"{path}: {len(problems)} problem{'s' if len(problems) != 1 else ''} in the manifest"
        super().__init__(head + ":\n  " + "\n  ".join(problems[:200])
                         + (f"\n  ... and {len(problems) - 200} more" if len(problems) > 200 else "") + hint)


@dataclass(frozen=True)
class Manifest:
    """A validated cohort. `table` has the contract columns plus `path` (absolute) and `sha256` (image bytes)."""

    source: Path
    table: pd.DataFrame
    digest: str  # sha256 over image bytes, labels, sexes, subjects and splits (not file names)
    synthetic: bool
    # photos that cannot be used, left out (skip_bad_photos): line, image, path, subject_id, sex, label, reason, detail
    skipped: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def has_split(self) -> bool:
        return "split" in self.table.columns and self.table["split"].notna().all()

    @property
    def subject_key(self) -> str:
        """The key of this cohort's hashed subject ids (from the photos' bytes; never logged)."""
        return subject_key(self.table["sha256"])

    @property
    def lines(self) -> np.ndarray:
        """The CSV line of each row of `table` (the rows of skipped photos are not in it)."""
        gone = set(self.skipped["line"]) if len(self.skipped) else set()
        return np.array([n for n in range(2, len(self.table) + len(gone) + 2) if n not in gone])

    def subject_hashes(self) -> pd.Series:
        key = self.subject_key
        return self.table["subject_id"].map(lambda s: hash_subject(s, key))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def subject_key(image_sha256s) -> str:
    """The HMAC key for `hash_subject`, derived from the sha256 of every photo of the cohort. It is stable for a
    cohort (so hashed ids join across runs) and never logged: the manifest digest, which is logged, is not it,
    so a reader of MLflow with a list of candidate ids (MRNs, "P001", ...) but not the photos cannot match them."""
    shas = sorted(str(s) for s in image_sha256s if isinstance(s, str) and s)
    if not shas:
        raise ValueError("hashing subject ids needs the photos' sha256 (load the manifest with check_images=True)")
    return hashlib.sha256(("cushing-subject-key\n" + "\n".join(shas)).encode()).hexdigest()


def hash_subject(subject_id: str, key: str) -> str:
    """Keyed hash of a subject id (key: `subject_key` of the cohort): stable within a cohort, not reversible by a
    dictionary of ids without the photos."""
    return hmac.new(key.encode(), str(subject_id).encode(), hashlib.sha256).hexdigest()[:16]


def _check_image(path: Path) -> tuple[str | None, BadImage | None]:
    """(sha256, why it cannot be used) for one photo. The photo is decoded by the decoder training and serving
    use (at a reduced JPEG scale, which still reads every byte), so a truncated file, a corrupt one or one over the
    pixel limit is refused here, with its line, instead of crashing training later."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, BadImage("file_not_found")
    except OSError as e:
        return None, BadImage("unreadable", e.strerror or str(e))
    try:
        open_rgb(data, draft=256)
    except BadImage as e:
        return hashlib.sha256(data).hexdigest(), e
    return hashlib.sha256(data).hexdigest(), None


def skipped_counts(rows: pd.DataFrame) -> dict[str, float]:
    """How many photos were left out (unreadable, missing, no usable face), in all, per class and per sex."""
    label, sex = pd.to_numeric(rows.get("label", pd.Series(dtype=float))), rows.get("sex", pd.Series(dtype=str))
    return {"skipped_photos": float(len(rows)), "skipped_photos/patient": float((label == 1).sum()),
            "skipped_photos/control": float((label == 0).sum()), "skipped_photos/female": float((sex == "F").sum()),
            "skipped_photos/male": float((sex == "M").sum())}


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[])
    except FileNotFoundError:
        raise ManifestError(path, ["manifest file not found"]) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ManifestError(path, [f"not a readable CSV: {e}"]) from None


def _row_problems(df: pd.DataFrame) -> list[str]:
    problems = []
    for i, row in df.iterrows():
        line = i + 2  # header is line 1
        if not row["image"].strip():
            problems.append(f"line {line}: image is empty")
        for col, allowed, words in (("label", ("0", "1"), "0 or 1"), ("sex", SEXES, "F or M"),
                                    ("split", SPLITS + ("",), "train, val or test")):
            if col in df.columns and row[col].strip() not in allowed:
                problems.append(f"line {line}: {col} must be {words}, got {row[col]!r}")
    return problems


def _group_problems(df: pd.DataFrame, stem_ids: pd.Series) -> list[str]:
    """Duplicate images, and subjects whose rows disagree; `stem_ids` marks the rows whose subject id is their
    file name's stem (no subject_id given), which folders numbered per class make collide."""
    problems = []
    for key, what in (("path", "the same image file"), ("sha256", "identical image bytes")):
        dup = df[df[key].notna() & df[key].duplicated(keep=False)]
        problems += [f"lines {', '.join(str(i + 2) for i in grp.index)}: duplicate images ({what})"
                     for _, grp in dup.groupby(key)]
    for col, values, what in (("label", ("0", "1"), "is both a patient and a control (labels 1 and 0)"),
                              ("sex", SEXES, "has two sexes"),
                              ("split", SPLITS, "is in more than one split (leakage)")):
        if col in df.columns:
            n = df[df[col].isin(values)].groupby("subject_id")[col].nunique()
            for subject in n[n > 1].index:
                rows = df.index[df["subject_id"] == subject]
                hint = " (the file name's stem stands in for a missing subject_id: give each person's subject_id)" \
                    if stem_ids[rows].any() else ""
                problems.append(f"lines {', '.join(str(i + 2) for i in rows)}: subject {subject!r} {what}{hint}")
    if "split" in df.columns and 0 < (filled := (df["split"].str.strip() != "").sum()) < len(df):
        problems.append(f"split column is filled on {filled} of {len(df)} rows: fill all or none")
    return problems


def _digest(df: pd.DataFrame) -> str:
    cols = ["sha256", "label", "sex", "subject_id"] + (["split"] if "split" in df.columns else [])
    rows = sorted("|".join(str(r[c]) for c in cols) for _, r in df[cols].iterrows())
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def load_manifest(path: str | Path, *, workers: int = 8, check_images: bool = True,
                  skip_bad_photos: bool | None = None) -> Manifest:
    """Load and validate a manifest; raise ManifestError listing every problem at once. With `skip_bad_photos`,
    a photo that cannot be found or read is left out (`Manifest.skipped`) instead of being a problem; False says
    the caller offers that option (the error then names it), None that it does not."""
    path = Path(path).expanduser().resolve()
    df = _read_csv(path)
    if missing := [c for c in REQUIRED if c not in df.columns]:
        raise ManifestError(path, [f"missing column(s): {', '.join(missing)} (found: {', '.join(df.columns)})"])
    if df.empty:
        raise ManifestError(path, ["the manifest has no rows"])
    df["image"] = df["image"].str.strip()
    df["sex"] = df["sex"].str.strip().str.upper()
    subject = df.get("subject_id", pd.Series("", index=df.index)).str.strip()
    stem_ids = subject == ""
    df["subject_id"] = subject.where(~stem_ids, df["image"].map(lambda s: Path(s).stem))
    if "split" in df.columns:
        df["split"] = df["split"].str.strip().str.lower()
    problems = _row_problems(df)
    df["path"] = [str((path.parent / p).resolve()) if p else None for p in df["image"]]
    results = [(None, None)] * len(df)
    if check_images:
        with ThreadPoolExecutor(max(1, workers)) as pool:  # an empty image cell is a row problem
            results = list(pool.map(lambda p: _check_image(Path(p)) if p else (None, None), df["path"]))
    df["sha256"] = [r[0] for r in results]
    bad = [i for i, (_, e) in enumerate(results) if e]
    if not skip_bad_photos:
        problems += [f"line {i + 2}: {df.at[i, 'image']}: " + ("file not found" if results[i][1].reason ==
                     "file_not_found" else f"not a readable image ({results[i][1]})") for i in bad]
    problems += _group_problems(df, stem_ids)
    if problems:
        raise ManifestError(path, problems, f"\n({len(bad)} photos cannot be found or read: --skip-bad-photos true "
                                            "leaves them out)" if bad and skip_bad_photos is False else "")
    df["label"] = df["label"].astype(int)
    skipped = df.iloc[bad][["image", "path", "subject_id", "sex", "label"]].assign(
        line=[i + 2 for i in bad], reason=[results[i][1].reason for i in bad],
        detail=[results[i][1].detail for i in bad]).reset_index(drop=True)
    df = df.drop(index=bad).reset_index(drop=True)
    if "split" in df.columns and (df["split"] == "").all():
        df = df.drop(columns="split")
    synthetic = "synthetic" in df.columns and df["synthetic"].astype(str).str.lower().isin(["1", "true"]).all()
    return Manifest(source=path, table=df, digest=_digest(df) if check_images else "", synthetic=bool(synthetic),
                    skipped=skipped)
