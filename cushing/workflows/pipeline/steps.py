"""The pipeline's steps: faces -> audit -> sweep -> promote -> dashboard -> evaluate. For each: what it is keyed on
(its own inputs and the upstream outputs it reads), what it runs (the core function its `cushing` command calls)
and what it hands on (JSON outputs: paths with their digests, run ids, the champion's version)."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cushing import tracking
from cushing.config import TrainConfig
from cushing.data.audit import AuditSettings
from cushing.data.manifest import sha256_file
from cushing.faces.run import run_faces
from cushing.faces.settings import FaceSettings
from cushing.release.registry import PromotionPolicy, promote, registry_status
from cushing.tracking.stores import store_lock
from cushing.workflows.cohort_audit import run_audit
from cushing.workflows.dashboard import build_dashboard, dashboards_dir
from cushing.workflows.jobs import run_evaluate
from cushing.workflows.pipeline.inputs import PipelineSpec, code_version, derived_study, manifest_digest, \
    study_identity, study_of, write_study
from cushing.workflows.studies import Study
from cushing.workflows.sweeps import run_sweep

__all__ = ["Context", "Step", "StepError", "steps_for", "DASHBOARD_DEFINITION"]

DASHBOARD_DEFINITION = "paper"


class StepError(RuntimeError):
    """A step refused to hand on what it made (no face found, configurations unfinished, nothing to promote)."""


@dataclass
class Context:
    """One pipeline's inputs and the outputs of its steps so far (reused or just run)."""

    spec: PipelineSpec
    experiment: str
    code: str
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    _studies: dict[str, Study] = field(default_factory=dict)

    @property
    def crops(self) -> Path:
        return Path(self.outputs.get("faces", {}).get("manifest", self.spec.out / "faces" / "manifest.csv"))

    def study_mapping(self) -> dict[str, Any]:
        """The derived study (with the crops' digest once faces is known; a placeholder while planning)."""
        digest = self.outputs.get("faces", {}).get("digest", "pending0")
        return derived_study(self.spec, data=str(self.crops), data_digest=digest, experiment=self.experiment)

    def study(self) -> Study:
        mapping = self.study_mapping()
        text = json.dumps(mapping, sort_keys=True, default=str)
        if text not in self._studies:
            self._studies[text] = study_of(mapping)
        return self._studies[text]

    def protocol(self) -> TrainConfig:
        """The study's base protocol: its statistics settings also serve the external evaluation."""
        return self.study().config_for({})

    def policy(self) -> PromotionPolicy:
        return PromotionPolicy(**self.study().promote)


@dataclass(frozen=True)
class Step:
    name: str
    needs: tuple[str, ...]  # the steps whose outputs it reads
    params: Callable[[Context], dict[str, Any]]  # its inputs: digests, parameters, upstream outputs it reads
    run: Callable[[Context], dict[str, Any]]  # does the work; returns what it hands on
    still_there: Callable[[dict[str, Any]], bool]  # a finished step's outputs are intact (files, runs)
    describe: Callable[[dict[str, Any]], str]  # one line from its outputs

    def inputs(self, ctx: Context) -> dict[str, Any] | None:
        """Everything its key is made of, or None while an upstream step has yet to run (planning)."""
        if any(n not in ctx.outputs for n in self.needs):
            return None
        return {"code": ctx.code, **self.params(ctx)}


def _face_settings(spec: PipelineSpec) -> FaceSettings:
    return FaceSettings(sam_checkpoint=spec.sam_checkpoint or None)


def _faces(ctx: Context) -> dict[str, Any]:
    res = run_faces(manifest=str(ctx.spec.photos), out=str(ctx.spec.out / "faces"),
                    settings=_face_settings(ctx.spec), experiment=ctx.experiment,
                    skip_bad_photos=ctx.spec.skip_bad_photos)
    o = res.outcome
    if o.extracted == 0:
        raise StepError(f"no face could be extracted from {len(o.report)} photos (why: "
                        f"{o.manifest.parent / 'faces_report.csv'})")
    rejected = o.report.loc[o.report["status"] != "ok", "reason"].value_counts()
    return {"manifest": str(o.manifest), "digest": manifest_digest(o.manifest), "photos": len(o.report),
            "extracted": o.extracted, "skipped": len(o.skipped),
            "rejected": {str(k): int(v) for k, v in rejected.items()},
            "mask": o.settings.mask_method}


def _crops_intact(o: dict[str, Any]) -> bool:
    return Path(o["manifest"]).is_file() and manifest_digest(o["manifest"]) == o["digest"]


def _audit(ctx: Context) -> dict[str, Any]:
    p = ctx.protocol()  # the study's audit_threshold, audit_decisions and audit_curve (--set audit_threshold=...)
    res = run_audit(manifest=str(ctx.crops), out=str(ctx.spec.out / "audit"), experiment=ctx.experiment,
                    threshold=p.audit_threshold, decisions=p.audit_decisions, curve=p.audit_curve)
    pairs = res.audit.pairs
    different = pairs.loc[~pairs["same_subject"], "outcome"].value_counts() if len(pairs) else {}
    return {"audit": str(res.out), "sha256": sha256_file(res.out),
            "pairs": {str(k): int(v) for k, v in dict(different).items()}}


def _audit_keys(ctx: Context) -> dict[str, Any]:
    """What the audit step's result depends on from the study: the threshold, and the decisions and curve files
    by content (a revised review reruns the audit)."""
    p = ctx.protocol()
    files = {k: v for k, v in (("decisions", p.audit_decisions), ("curve", p.audit_curve)) if v}
    return {"audit_threshold": p.audit_threshold,
            **{k: sha256_file(v) if Path(v).is_file() else v for k, v in files.items()}}


def _file_intact(key: str) -> Callable[[dict[str, Any]], bool]:
    return lambda o: Path(o[key]).is_file() and sha256_file(o[key]) == o["sha256"]


def _sweep(ctx: Context) -> dict[str, Any]:
    study = ctx.study()
    path = write_study(ctx.study_mapping(), ctx.spec.out / "study.yaml")
    res = run_sweep(path, workers=ctx.spec.workers)
    done = {r.tags["sweep_config"] for r in tracking.find_runs(ctx.experiment, parent_run_id=res.parent_run_id)
            if r.status == "FINISHED" and r.tags.get("sweep_config")}
    missing = [label for label in study.labels if label not in done]
    if missing:
        raise StepError(f"configuration(s) {', '.join(missing)} did not finish (a training error is not retried: "
                        f"fix the study, which makes a new sweep; their trials: `cushing sweep {path} --report`)")
    best = res.table2.iloc[0] if not res.table2.empty else None
    return {"parent_run": res.parent_run_id, "study": res.study_name, "configurations": len(study.labels),
            "trained_here": max(res.trained, 0), "best": None if best is None else str(best["configuration"])}


def _run_exists(o: dict[str, Any]) -> bool:
    """The sweep's parent run is still in the store (its status may be KILLED: a pass that was stopped created it,
    a later one finished the grid)."""
    try:
        tracking.get_run(o["parent_run"])
        return True
    except Exception:  # deleted for good, or another store
        return False


def _promote(ctx: Context) -> dict[str, Any]:
    policy = ctx.policy()
    with store_lock(tracking.tracking_uri(), "registry"):  # two pipelines at once move the aliases in turn
        d = promote(experiment=ctx.experiment, policy=policy, parent_run_id=ctx.outputs["sweep"]["parent_run"])
    champion = next((s for s in registry_status(policy.registered_model) if s["alias"] == "champion"), None)
    if d.winner_run is None or champion is None:
        raise StepError(d.reason if d.winner_run is None else f"no champion: {d.reason}")
    return {"registered_model": policy.registered_model, "version": str(d.version),
            "champion": str(champion["version"]), "champion_run": champion["run"], "reason": d.reason,
            "changed": d.changed}


def _dashboard(ctx: Context) -> dict[str, Any]:
    path = build_dashboard(experiment=ctx.experiment, parent_run_id=ctx.outputs["sweep"]["parent_run"],
                           out=ctx.spec.out / "dashboard.html", name=DASHBOARD_DEFINITION)
    return {"path": str(path), "sha256": sha256_file(path)}


def _model_uri(ctx: Context) -> str:
    p = ctx.outputs["promote"]
    return f"models:/{p['registered_model']}/{p['champion']}"


def _evaluate(ctx: Context) -> dict[str, Any]:
    cfg = ctx.protocol()
    res = run_evaluate(model_uri=_model_uri(ctx), manifest=str(ctx.spec.external), experiment=ctx.experiment,
                       min_positives=cfg.min_positives, bootstrap=cfg.bootstrap, seed=cfg.seed,
                       prevalence=cfg.prevalence)
    m = res.report.metrics
    return {"run": res.run_id, "model_uri": _model_uri(ctx), "excluded": sum(res.excluded.values()),
            **{k: m.get(f"external/{k}", math.nan) for k in ("n", "auc", "f1", "recall", "specificity")}}


def _evaluate_params(ctx: Context) -> dict[str, Any]:
    cfg = ctx.protocol()
    return {"external": manifest_digest(ctx.spec.external), "model": _model_uri(ctx),
            "stats": [cfg.min_positives, cfg.bootstrap, cfg.seed, cfg.prevalence]}


def _n(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3f}"


STEPS = (
    Step("faces", (), lambda c: {"photos": manifest_digest(c.spec.photos), "out": str(c.spec.out / "faces"),
                                 "settings": _face_settings(c.spec).to_dict(), "skip": c.spec.skip_bad_photos},
         _faces, _crops_intact, lambda o: f"{o['extracted']} of {o['photos']} photos extracted ({o['mask']}"
                                          f"{'; ' + str(o['skipped']) + ' skipped' if o.get('skipped') else ''}): "
                                          f"{o['manifest']}"),
    Step("audit", ("faces",), lambda c: {"crops": c.outputs["faces"]["digest"], "out": str(c.spec.out / "audit"),
                                          "settings": dataclasses.asdict(AuditSettings()),
                                          "threshold": _audit_keys(c)}, _audit,
         _file_intact("audit"), lambda o: f"{o['pairs'].get('merged', 0)} pairs merged, "
                                          f"{o['pairs'].get('precaution', 0)} kept in one split as a precaution "
                                          f"(for review): {o['audit']}"),
    Step("sweep", ("faces",), lambda c: {"crops": c.outputs["faces"]["digest"], "study": study_identity(c.study())},
         _sweep, _run_exists, lambda o: f"{o['configurations']} configurations (best on validation: {o['best']}), "
                                        f"parent run {o['parent_run']}"),
    Step("promote", ("sweep",), lambda c: {"parent_run": c.outputs["sweep"]["parent_run"],
                                           "policy": dataclasses.asdict(c.policy())}, _promote, lambda o: True,
         lambda o: o["reason"]),
    Step("dashboard", ("sweep", "promote"), lambda c: {
        "parent_run": c.outputs["sweep"]["parent_run"], "champion": c.outputs["promote"]["champion"],
        "out": str(c.spec.out / "dashboard.html"), "definition": DASHBOARD_DEFINITION,
        "dashboards": code_version(dashboards_dir())}, _dashboard, _file_intact("path"), lambda o: o["path"]),
    Step("evaluate", ("promote",), _evaluate_params, _evaluate, lambda o: True,
         lambda o: f"{o['model_uri']} on {o['n']:.0f} external photos: AUC {_n(o['auc'])}, F1 {_n(o['f1'])}"),
)


def steps_for(spec: PipelineSpec) -> tuple[Step, ...]:
    """The steps this pipeline runs: evaluate only when an external cohort is given."""
    return STEPS if spec.external else STEPS[:-1]
