"""From signatures to suspicious pairs: duplicate photos and same-person pairs of different subject ids, as
audit.csv rows (a pair number, CSV lines and keyed subject hashes, never paths or raw ids) with each pair's decision
and outcome, and the subject groups a splitter keeps whole (merged and precaution pairs)."""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from cushing.data.audit.hashing import duplicate_pairs
from cushing.data.audit.sameperson import ThresholdChoice, same_person_pairs
from cushing.data.audit.settings import PAIR_KINDS, TOGETHER, AuditSettings
from cushing.data.audit.signatures import Signatures

__all__ = ["merged_groups"]


def _pairs_frame(rows: list[pd.DataFrame], subjects: pd.Series, split: pd.Series | None) -> pd.DataFrame:
    cols = ["pair", "kind", "distance", "decision", "verdict", "outcome", "line_a", "line_b", "subject_a", "subject_b"]
    df = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["kind", "i", "j", "distance", "decision", "verdict"])
    i, j = df["i"].to_numpy(dtype=np.int64), df["j"].to_numpy(dtype=np.int64)
    decision, verdict = df["decision"].astype(str).to_numpy(), df["verdict"].fillna("").astype(str).to_numpy()
    subj = subjects.to_numpy()
    out = pd.DataFrame({"kind": df["kind"].astype(str), "distance": df["distance"].astype(float), "decision": decision,
                        "verdict": verdict, "outcome": np.select([verdict == "same", verdict == "different"],
                                                                 ["merged", "released"], decision),
                        "line_a": i + 2, "line_b": j + 2,  # the CSV header is line 1
                        "subject_a": subj[i], "subject_b": subj[j], "same_subject": subj[i] == subj[j],
                        "detail": df["detail"].fillna("").astype(str).to_numpy() if len(df) else []})
    if split is not None:
        sp = split.astype(str).to_numpy()
        out = out.assign(split_a=sp[i], split_b=sp[j], straddles_splits=sp[i] != sp[j])
        cols += ["split_a", "split_b", "straddles_splits"]
    out = out.sort_values(["kind", "distance", "line_a", "line_b"], ignore_index=True)
    out["pair"] = np.arange(1, len(out) + 1)  # the key the review page shows: not a subject id
    return out[cols + ["same_subject", "detail"]]


def _find_pairs(sig: Signatures, subject_ids: np.ndarray, sex: np.ndarray, s: AuditSettings,
                verdicts: dict[tuple[int, int], str]) -> tuple[list[pd.DataFrame], ThresholdChoice | None]:
    """Duplicate photos (merged, unless a person said different) and same-person pairs with their decisions; the
    threshold choice (None when faces were not described)."""
    dup = duplicate_pairs(sig.hashes, s.duplicate_max_bits, mirrors=sig.mirrors if s.mirror else None,
                          valid=sig.ok, thumbs=sig.thumbs, max_color=s.duplicate_max_color)
    dup = dup.assign(kind="duplicate_photo", detail=np.where(dup["mirrored"], "mirrored", ""), decision="merged",
                     verdict=[verdicts.get((a + 2, b + 2), "") for a, b in zip(dup["i"], dup["j"])])
    rows, choice = [dup.drop(columns="mirrored")], None
    if sig.descriptors is not None:
        forced = [(int(a), int(b)) for a, b in zip(dup["i"], dup["j"]) if subject_ids[a] != subject_ids[b]]
        same, choice = same_person_pairs(sig.descriptors, subject_ids, sex, s, fingerprint=sig.fingerprint,
                                         verdicts=verdicts, forced=forced)
        src = np.asarray(sig.source)
        i, j = same["i"].to_numpy(dtype=np.int64), same["j"].to_numpy(dtype=np.int64)
        detail = np.where((src[i] == "detected") & (src[j] == "detected"), "", "whole_image")
        rows.append(same.drop(columns="mutual").assign(kind="same_person", detail=detail))
    return [r for r in rows if len(r)], choice


def merged_groups(pairs: pd.DataFrame, subject_ids: Sequence | pd.Series, *, kinds: Iterable[str] = PAIR_KINDS,
                  outcomes: Iterable[str] = TOGETHER) -> pd.Series:
    """Group id per manifest row: subjects joined by a pair (transitively) share one id, the smallest raw subject id
    in the group (unmerged subjects keep their own), so a splitter can group on it instead of `subject_id`. Pairs
    with an `outcome` join only for `outcomes` (default: merged and precaution). Raw ids: never log them."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    given = pd.Series(subject_ids)
    codes, names = pd.factorize(given.astype(str))
    sel = pairs[pairs["kind"].isin(list(kinds))]
    if "outcome" in sel:
        sel = sel[sel["outcome"].isin(list(outcomes))]
    a, b = (codes[sel[c].to_numpy(dtype=np.int64) - 2] for c in ("line_a", "line_b"))
    component = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(len(names),) * 2), directed=False)[1]
    smallest = pd.Series(names).groupby(component).transform("min").to_numpy()
    return pd.Series(smallest[codes], index=given.index, name=given.name)
