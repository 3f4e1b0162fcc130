"""A model card for a registered version, following the TRIPOD+AI items that apply to a screening model. Pure
rendering: the caller (release.registry) gathers the source run's metrics, params, tags and tables and gets back
Markdown (the version's description) and a self-contained HTML page. PHI rules apply: aggregates only; no faces,
no file names (a manifest path is shown as its content digest)."""
from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from cushing.stats.metrics import METRICS
from cushing.stats.report import interval_of, shown
from cushing.stats.size import known_to

__all__ = ["CardInputs", "render_card"]
INTENDED_USE = ("A screening aid for research, not a diagnostic device: it flags frontal facial photos whose "
                "appearance resembles Cushing's syndrome (moon facies, plethora) so that a clinician-researcher can "
                "study or prioritise them. It does not diagnose, exclude or stage Cushing's syndrome; biochemical "
                "testing decides. Intended users: clinician-researchers and the ML engineers beside them.")


@dataclass
class CardInputs:
    name: str  # registered model name
    version: str
    run_id: str
    metrics: dict[str, float]
    params: dict[str, str]
    tags: dict[str, str]
    splits: pd.DataFrame | None = None  # splits.csv: Table I
    per_subgroup: pd.DataFrame | None = None  # per_subgroup.csv (or per_sex.csv)
    external: list[dict[str, Any]] = field(default_factory=list)  # evaluations linked to the version
    defaults: dict[str, str] = field(default_factory=dict)  # TrainConfig defaults, to print only what differs


def _with_ci(m: dict[str, float], name: str) -> str:
    ci = interval_of(m, name)
    return f"{m[name]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else shown(m.get(name, math.nan))


def _table(rows: list[list[str]], head: list[str]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _performance(m: dict[str, float], tags: dict[str, str]) -> str:
    how = ("all from the subject bootstrap, as several photos share a subject" if tags.get("interval_method") ==
           "subject_bootstrap" else "Wilson for proportions, subject bootstrap for F1 and AUC")
    rows = [[metric] + [_with_ci(m, f"{split}/{metric}") for split in ("val", "test")] for metric in METRICS]
    return f"## Performance (95% intervals counting subjects: {how})\n" + _table(rows, ["metric", "validation", "test"])


def _subgroups(c: CardInputs) -> str:
    t = c.per_subgroup
    if t is None or t.empty:
        return "No per-subgroup table was logged."
    rows = [[str(r["group"]), str(int(r["n"])), str(int(r.get("patients", r["positives"])))] +
            [shown(r.get(k)) for k in ("recall", "specificity", "f1", "auc")]
            for _, r in t[t["split"] == "test"].iterrows()]  # runs before patients were counted: their photos
    return _table(rows, ["test subgroup", "images", "patients", "recall", "specificity", "F1", "AUC"])


def _cohort(c: CardInputs) -> str:
    if c.splits is None or c.splits.empty:
        return "No split table was logged."
    rows = [[str(r["split"]), str(r["sex"]), "patient" if int(r["label"]) else "control", str(int(r["subjects"])),
             str(int(r["images"]))] for _, r in c.splits.iterrows()]
    return _table(rows, ["split", "sex", "label", "subjects", "images"])


def _utility(m: dict[str, float]) -> str:
    nb = m.get("test/net_benefit")
    if nb is None:
        return "No decision curve was logged."
    return (f"Net benefit at the operating threshold: {_with_ci(m, 'test/net_benefit')} vs "
            f"{shown(m.get('test/net_benefit/treat_all'))} for treating everyone and 0 for no one, at prevalence "
            f"{shown(m.get('prevalence'))}: {shown(100 * nb, 1)} true cases found per 100 people screened, net of the "
            "unnecessary work-ups this threshold accepts (below 0: worse than screening no one).")


def _known_to(c: CardInputs) -> str:
    """How well recall is known with the test patients per sex (the line `cushing size` and the audit give)."""
    t = c.splits
    if t is None or t.empty:
        return ""
    test = t[(t["split"].astype(str) == "test") & (t["label"].astype(int) == 1)].groupby("sex")["subjects"].sum()
    return "Cohort size: " + known_to({{"F": "female", "M": "male"}.get(k, k): int(test.get(k, 0))
                                       for k in sorted(t["sex"].unique())}) + "."


def _skipped(m: dict[str, float]) -> str:
    if not (n := int(m.get("skipped_photos", 0))):
        return "none" if "skipped_photos" in m else "not recorded"
    return f"{n} (" + ", ".join(f"{k}s {int(m.get(f'skipped_photos/{k}', 0))}" for k in ("patient", "control")) + \
        "; " + ", ".join(f"{k} {int(m.get(f'skipped_photos/{k}', 0))}" for k in ("female", "male")) + ")"


def _command(c: CardInputs) -> str:
    """The `mlflow run` that reproduces the run: every parameter that differs from the defaults."""
    digest = f"<your manifest: content digest {c.tags.get('data_digest', '')[:16]}>"
    args = [f"-P {k}={digest if k == 'data' and v != 'demo' else v}" for k, v in sorted(c.params.items())
            if k not in ("experiment", "run_name", "resume") and not k.startswith("resolved/")
            and c.defaults.get(k) != v and v not in ("", "''")]
    exp = c.params.get("experiment", "cushing")
    return f"mlflow run . --env-manager local --experiment-name {exp} " + " ".join(args)


def _limitations(c: CardInputs) -> list[str]:
    m, tags = c.metrics, c.tags
    patients = {s: int(m.get(f"{s}/patients", m.get(f"{s}/positives", 0))) for s in ("val", "test")}
    out = [f"Small test set: {int(m.get('test/n', 0))} images with {patients['test']} patients; one "
           "patient more or less moves recall by several points. Read the intervals, not the third decimal.",
           f"The operating threshold ({shown(m.get('threshold'))}) was chosen on a validation split with "
           f"{patients['val']} patients (rule {c.params.get('threshold', 'f1')}); a new site should "
           "re-check it on its own validation data.",
           "Predictive values depend on prevalence: PPV and NPV below assume "
           f"{shown(m.get('prevalence'))} (set with -P prevalence=...)."]
    if tags.get("not_estimable"):
        out.append(f"Not estimable (too few patients): {tags['not_estimable']}.")
    if tags.get("synthetic_data") == "true":
        out.insert(0, "**TRAINED ON SYNTHETIC DATA** (the procedurally drawn demo cohort, not patients): for trying "
                      "the service only, never for real photos.")
    if tags.get("audit_warning"):
        out.append(tags["audit_warning"])
    return out


def _audit_line(tags: dict[str, str]) -> str:
    """The audit's words: merged as one person (certain) apart from kept together as a precaution (suspected)."""
    if tags.get("audit", "off") == "off":
        return "off"
    if "audit_precautions" not in tags:  # a run from before the two were told apart: its count holds both
        return f"{tags['audit']} ({tags.get('audit_merges', '0')} subject ids kept in one split with another)"
    return (f"{tags['audit']} ({tags.get('audit_merges', '0')} subject ids merged as one photo or one person; "
            f"{tags.get('audit_precautions', '0')} kept in one split as a precaution, for review)")


def _markdown(c: CardInputs) -> str:
    m, p, t = c.metrics, c.params, c.tags
    weights = ("pretrained (" + (p.get("weights") if p.get("weights") not in (None, "", "''") else
                                 f"timm: {t.get('timm_id', '')}") + ")") if t.get("pretrained") == "true" \
        else "random initialisation (pretrained=false)"
    external = "\n".join(f"- run `{e['run_id']}`: external AUC {shown(e.get('auc'))}, F1 {shown(e.get('f1'))}, "
                         f"{int(e.get('n', 0))} images" for e in c.external) or "None linked yet (`cushing evaluate`)."
    limits = "\n".join(f"- {x}" for x in _limitations(c))
    return f"""# Model card: {c.name} version {c.version}

{"> **TRAINED ON SYNTHETIC DATA**: not for real photos." if t.get("synthetic_data") == "true" else ""}

## Intended use
{INTENDED_USE}

## Model
- Backbone: `{t.get('model', p.get('model', ''))}` ({t.get('model_type', '')}, timm `{t.get('timm_id', '')}`), \
{'frozen backbone, head trained' if t.get('freeze') == 'true' else 'fine-tuned'}; weights: {weights}.
- Input: a frontal facial photo (base64 JPEG/PNG); face stage: \
{t.get('face_mask_source', 'none (trained on the images as given)')}; {p.get('img_size', '')} px.
- Operating threshold: {shown(m.get('threshold'), 4)}, chosen on validation by rule `{p.get('threshold', 'f1')}`\
{f" ({t['threshold_guarantee']})" if t.get('threshold_guarantee') else ''}; best epoch \
{int(m.get('best_epoch', 0))} of {int(m.get('epochs_run', 0))} chosen on `{p.get('select_metric', 'val/f1')}`.
- Source run: `{c.run_id}`.

## Training data
- Content digest `{t.get('data_digest', '')}`; synthetic: {t.get('synthetic_data', 'false')}; split: \
{t.get('split_source', '')}; cohort audit: {_audit_line(t)}.
- Photos left out (not found, unreadable or no face crop; `skip_bad_photos`): {_skipped(m)}.

{_cohort(c)}

{_known_to(c)}

{_performance(m, t)}

## Per subgroup (test)
{_subgroups(c)}

Sex gap (female - male), test: recall {_with_ci(m, 'test/recall/sex_gap')}, F1 {_with_ci(m, 'test/f1/sex_gap')}.

## Calibration
Brier {shown(m.get('test/brier'))} (test), ECE {shown(m.get('test/ece'))}; PPV {_with_ci(m, 'test/ppv')} and NPV \
{_with_ci(m, 'test/npv')} at prevalence {shown(m.get('prevalence'))}. Reliability plot: `plots/calibration.png` of the \
source run.

## Clinical utility (decision curve, test)
{_utility(m)} Curve: `plots/decision_curve.png` and `decision_curve.csv` of the source run.

## External evaluations
{external}

## Limitations
{limits}

## Reproduce
```
{_command(c)}
```
"""


def render_card(c: CardInputs) -> tuple[str, str]:
    """(Markdown, self-contained HTML) of the card."""
    md = _markdown(c)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>Model card {html.escape(c.name)} "
            f"v{html.escape(c.version)}</title><meta http-equiv='Content-Security-Policy' content=\"default-src "
            "'none'; style-src 'unsafe-inline'\"><style>body{font:14px sans-serif;max-width:900px;margin:2em auto}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}pre{background:#f4f4f4;"
            f"padding:8px;white-space:pre-wrap}}</style></head><body>{_html(md)}</body></html>")
    return md, page


def _inline(text: str) -> str:
    e = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(text))
    return re.sub(r"`(.+?)`", r"<code>\1</code>", e)


_BLOCKS = (("# ", "<h1>", "</h1>"), ("## ", "<h2>", "</h2>"), ("- ", "<li>", "</li>"), ("> ", "<p><em>", "</em></p>"))


def _html(md: str) -> str:
    """The small Markdown subset the card uses (headings, tables, bullets, a code block, quotes, paragraphs)."""
    out, table, code = [], [], None
    for line in md.splitlines() + [""]:
        if code is not None:
            if line.startswith("```"):
                out.append(f"<pre>{html.escape(chr(10).join(code))}</pre>")
                code = None
            else:
                code.append(line)
            continue
        if line.startswith("| "):
            if not line.startswith("|---"):
                table.append(line)
            continue
        if table:
            cells = [[_inline(x.strip()) for x in r.strip("| ").split(" | ")] for r in table]
            out.append("<table><tr>" + "".join(f"<th>{x}</th>" for x in cells[0]) + "</tr>" + "".join(
                "<tr>" + "".join(f"<td>{x}</td>" for x in r) + "</tr>" for r in cells[1:]) + "</table>")
            table = []
        if line.startswith("```"):
            code = []
        elif line.strip():
            mark, start, end = next((b for b in _BLOCKS if line.startswith(b[0])), ("", "<p>", "</p>"))
            out.append(f"{start}{_inline(line[len(mark):])}{end}")
    return "\n".join(out)
