"""The review page (`cushing audit --review-page OUT.html`): each pair's two photos side by side, in one
self-contained HTML file (photos embedded as JPEG data URIs, at most 256 px). It shows faces and file names: it is
PHI, written locally only and logged to MLflow only with allow_phi_artifacts."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Sequence

import pandas as pd

from cushing.data.audit.settings import OUTCOMES
from cushing.data.imageio import BadImage, open_rgb

__all__ = ["review_page", "REVIEWED"]

REVIEWED = ("merged", "precaution", "review")  # the outcomes a person should look at (and any pair with a verdict)
_SIDE = 256


def _img(path: str, caption: str | None = None) -> str:
    from PIL import Image

    name = html.escape(caption or Path(path).name)
    try:
        im = Image.fromarray(open_rgb(path))
    except BadImage as e:
        body = f"<div class=missing>unreadable ({html.escape(e.reason)})</div>"
    else:
        im.thumbnail((_SIDE, _SIDE))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        body = f"<img src='data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}' alt='{name}'>"
    return f"<figure>{body}<figcaption>{name}</figcaption></figure>"


_STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:70em}
.pair{display:flex;gap:1.5em;align-items:center;border-top:1px solid #ccc;padding:.8em 0}
figure{margin:0;text-align:center}img{height:200px}figcaption{font-size:.8em;color:#555}
.merged{background:#ffe8e0}.precaution{background:#fff4e0}.review{background:#eef4ff}
.missing{width:160px;height:200px;background:#eee}
.meta{min-width:16em}code{background:#f2f2f2;padding:0 .2em}"""


def review_page(pairs: pd.DataFrame, paths: Sequence[str], *, choice=None, manifest: str = "",
                captions: Sequence[str] | None = None) -> str:
    """HTML for the pairs to review (merged, precaution, review, or with a verdict), closest first. `pairs` is
    audit.csv (line 2 = row 0 of `paths`); `choice` the ThresholdChoice (None: faces not described); `captions`
    (one per row) name each photo as the manifest does, default the file's name."""
    def img(line: int) -> str:
        return _img(paths[line - 2], captions[line - 2] if captions is not None else None)

    sel = pairs[pairs["outcome"].isin(REVIEWED) | (pairs["verdict"].fillna("") != "")]
    sel = sel[~sel["same_subject"]].sort_values(["kind", "distance"], kind="stable")
    counts = "; ".join(f"{n} {OUTCOMES[o]}" for o in OUTCOMES if (n := int((sel["outcome"] == o).sum())))
    head = (f"<h1>Cohort audit: {len(sel)} pairs to review</h1><p>{html.escape(counts)}.</p><p>Manifest <code>"
            f"{html.escape(manifest)}</code>" + (f"; same-person threshold {choice.threshold:.3f}, strict distance "
                                                 f"{choice.strict:.3f}" if choice is not None else "")
            + ". Each pair has the number it has in the "
            "<code>pair</code> column of audit.csv. To decide, copy audit.csv to reviewed.csv, write <code>same"
            "</code> (merge) or <code>different</code> (release) in the <code>verdict</code> column of the pairs you "
            "checked, and run again with <code>--decisions reviewed.csv</code> (training: <code>audit_decisions="
            "reviewed.csv</code>).</p>")
    rows = []
    for r in sel.itertuples():
        verdict = f"<br>verdict: <b>{html.escape(r.verdict)}</b>" if r.verdict else ""
        meta = (f"<div class=meta><b>pair {r.pair}</b>: {html.escape(OUTCOMES[r.outcome])} ({html.escape(r.kind)})"
                f"<br>distance {r.distance:.3f}<br>lines {r.line_a} and {r.line_b}{verdict}</div>")
        rows.append(f"<div class='pair {html.escape(r.outcome)}'>{meta}{img(r.line_a)}{img(r.line_b)}</div>")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>Cohort audit review</title>"
            f"<style>{_STYLE}</style></head><body>{head}{''.join(rows)}</body></html>")
