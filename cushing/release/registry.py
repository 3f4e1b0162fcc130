"""Promotion in the model registry: rank runs on a validation metric, gate, register, move aliases.
Registered model `cushing`, aliases `challenger` (the best of the candidates just ranked) and `champion` (moved
only when the challenger beats it on validation). Test metrics are shown in the ranking, never used to choose.
Idempotent: a second call with nothing new changes nothing and logs nothing."""
from __future__ import annotations

import json
import math
from contextlib import suppress
from dataclasses import dataclass, field

import pandas as pd

from cushing.stats.metrics import GAP_METRICS, final_metric_problem, lower_is_better
from cushing.stats.subgroups import gap_name
from cushing.tracking import artifact_dir, client, download_artifact, experiments_with_runs, find_runs, launcher_run, \
    log_artifacts_to, start_run
from cushing.config import ConfigError, to_params, TrainConfig
from cushing.release.card import CardInputs, render_card

REGISTERED_MODEL = "cushing"

__all__ = ["REGISTERED_MODEL", "PromotionPolicy", "Decision", "promote", "rank_candidates", "model_version_of",
           "link_evaluation", "publish_card", "model_card", "registry_status"]

TIE_BREAKERS = (("val/auc", False), ("val/brier", True))  # (metric, lower is better); then the older run


@dataclass(frozen=True)
class PromotionPolicy:
    metric: str = "val/f1"
    min_value: float | None = None  # gate: the metric must reach this
    max_sex_gap: float | None = None  # gate: |female - male| of the metric (its /sex_gap) at most this
    registered_model: str = REGISTERED_MODEL
    allow_synthetic: bool = False  # a model trained on synthetic data may become champion (the demo flow only)
    max_subgroup_gap: float | None = None  # gate: best - worst subgroup of every other subgroup column, at most this

    def __post_init__(self) -> None:
        if not self.metric.startswith("val/"):
            raise ConfigError(f"promotion ranks on validation metrics only (val/...), got {self.metric!r}")
        if why := final_metric_problem(self.metric):
            raise ConfigError(why)
        gates = [g for g in ("max_sex_gap", "max_subgroup_gap") if getattr(self, g) is not None]
        if gates and self.metric.split("/")[1] not in GAP_METRICS:
            raise ConfigError(f"a gap gate ({' and '.join(gates)}) needs a metric with gaps "
                              f"({', '.join(f'val/{m}' for m in GAP_METRICS)}), got {self.metric!r}")


@dataclass
class Decision:
    winner_run: str | None
    version: str | None
    challenger_moved: bool
    champion_moved: bool
    registered_new_version: bool
    reason: str
    ranking: pd.DataFrame = field(default_factory=pd.DataFrame)
    logged_run: str | None = None

    @property
    def changed(self) -> bool:
        return self.challenger_moved or self.champion_moved or self.registered_new_version


def rank_candidates(runs: list, policy: PromotionPolicy) -> pd.DataFrame:
    """One row per run with a logged model: validation metric, tie-breakers, gates, test metrics for show."""
    rows = []
    for r in runs:
        m, tags = r.metrics, r.tags
        if r.status != "FINISHED" or "model_uri" not in tags:
            continue
        value, gap = m.get(policy.metric, math.nan), m.get(policy.metric + "/sex_gap", math.nan)
        why = []
        n, pos = m.get("val/n", math.nan), m.get("val/positives", math.nan)
        if n > 0 and pos in (0, n):  # F1 and accuracy have a value on one class, but it estimates nothing
            why.append(f"{policy.metric} not estimable: validation has {pos:.0f} patients, {n - pos:.0f} controls")
        elif not math.isfinite(value):
            why.append(f"{policy.metric} missing or not estimable")
        elif policy.min_value is not None and (value < policy.min_value if not lower_is_better(policy.metric)
                                               else value > policy.min_value):
            why.append(f"{policy.metric}={value:.4f} misses the gate {policy.min_value}")
        if policy.max_sex_gap is not None and (not math.isfinite(gap) or abs(gap) > policy.max_sex_gap):
            why.append(f"sex gap {gap:.4f} exceeds {policy.max_sex_gap}" if math.isfinite(gap)
                       else "sex gap not estimable")
        if policy.max_subgroup_gap is not None:
            why += _subgroup_gap_problems(m, r.params.get("subgroups", "sex"), policy)
        rows.append({"run_id": r.run_id, "run_name": tags.get("mlflow.runName", ""), "model": tags.get("model"),
                     "freeze": tags.get("freeze"), policy.metric: value, "sex_gap": gap,
                     **{t: m.get(t, math.nan) for t, _ in TIE_BREAKERS},
                     **{f"test/{k} (not used)": m.get(f"test/{k}", math.nan) for k in ("f1", "auc")},
                     "start_time": r.start_time, "eligible": not why, "excluded_because": "; ".join(why),
                     "model_uri": tags["model_uri"], "threshold": m.get("threshold", math.nan),
                     "data_digest": tags.get("data_digest", ""),
                     "synthetic_data": tags.get("synthetic_data") == "true"})
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    keys = [policy.metric] + [t for t, _ in TIE_BREAKERS] + ["start_time"]
    asc = [lower_is_better(policy.metric)] + [lo for _, lo in TIE_BREAKERS] + [True]
    df = df.sort_values(["eligible"] + keys, ascending=[False] + asc, na_position="last", kind="mergesort")
    df.insert(0, "rank", range(1, len(df) + 1))
    return df.reset_index(drop=True)


def _subgroup_gap_problems(metrics: dict[str, float], subgroups: str, policy: PromotionPolicy) -> list[str]:
    """The --max-subgroup-gap gate: every subgroup column other than sex needs an estimable gap (range over its
    subgroups with enough positives) of the selection metric within the limit."""
    out = []
    for col in [c for c in TrainConfig(subgroups=subgroups).subgroup_columns if c != "sex"]:
        gap = metrics.get(f"{policy.metric}/{gap_name(col)}", math.nan)
        if not math.isfinite(gap):
            out.append(f"{col} gap of {policy.metric} not estimable")
        elif gap > policy.max_subgroup_gap:
            out.append(f"{col} gap {gap:.4f} exceeds {policy.max_subgroup_gap}")
    return out


def _version_for_run(c, name: str, run_id: str):
    try:
        versions = c.search_model_versions(f"name = '{name}' and tags.source_run = '{run_id}'")
    except Exception:  # the registered model does not exist yet
        return None
    return max(versions, key=lambda v: int(v.version)) if versions else None


def _alias_version(c, name: str, alias: str):
    with suppress(Exception):  # no such alias (or registered model)
        return c.get_model_version_by_alias(name, alias)
    return None


def _register(c, policy: PromotionPolicy, row: pd.Series):
    import mlflow

    mv = mlflow.register_model(row["model_uri"], policy.registered_model, tags={
        "source_run": row["run_id"], "model": str(row["model"]), "freeze": str(row["freeze"]),
        "threshold": f"{row['threshold']:.6f}", "data_digest": row["data_digest"], "selection_metric": policy.metric,
        "selection_value": f"{row[policy.metric]:.6f}", "synthetic_data": str(bool(row["synthetic_data"])).lower()})
    if not c.get_registered_model(policy.registered_model).description:  # made just now by register_model
        c.update_registered_model(policy.registered_model, description=(
            "Cushing's syndrome screening from frontal facial photos (research use). Aliases: challenger = best of "
            "the last ranked candidates, champion = best on validation so far."))
    publish_card(policy.registered_model, mv.version)
    return mv


def _csv(run_id: str, path: str) -> pd.DataFrame | None:
    with artifact_dir() as d, suppress(Exception):  # not logged by this run
        return pd.read_csv(download_artifact(run_id, path, d))
    return None


def _external(c, mv) -> list[dict]:
    runs = [k.split("/", 1)[1] for k in mv.tags if k.startswith("external_validation/")]
    metrics = {r: c.get_run(r).data.metrics for r in runs}
    return [{"run_id": r, "auc": m.get("external/auc"), "f1": m.get("external/f1"), "n": m.get("external/n", 0)}
            for r, m in metrics.items()]


def publish_card(name: str, version: str) -> str:
    """Render the version's model card from its source run, log model_card.md/.html there and make the Markdown
    the registered version's description (what the registry's version page shows). Returns the Markdown."""
    c = client()
    mv = c.get_model_version(name, version)
    run = c.get_run(run_id := mv.tags["source_run"])
    subgroups = _csv(run_id, "per_subgroup.csv")
    md, page = render_card(CardInputs(
        name, str(version), run_id, dict(run.data.metrics), dict(run.data.params), dict(run.data.tags),
        splits=_csv(run_id, "splits.csv"), per_subgroup=subgroups if subgroups is not None else
        _csv(run_id, "per_sex.csv"), external=_external(c, mv), defaults=to_params(TrainConfig())))
    with artifact_dir() as d:
        (d / "model_card.md").write_text(md)
        (d / "model_card.html").write_text(page)
        log_artifacts_to(run_id, d)
    c.update_model_version(name, version, description=md)
    return md


def promote(*, experiment: str, policy: PromotionPolicy = PromotionPolicy(), parent_run_id: str | None = None,
            log: bool = True) -> Decision:
    c = client()
    ranking = rank_candidates(find_runs(experiment, parent_run_id=parent_run_id), policy)
    eligible = ranking[ranking["eligible"]] if not ranking.empty else ranking
    if eligible.empty:
        d = Decision(None, None, False, False, False, _nothing_eligible(experiment, parent_run_id, ranking), ranking)
        if log and launcher_run():
            d.logged_run = _log_decision(experiment, d, policy, parent_run_id)
        return d
    best, name = eligible.iloc[0], policy.registered_model
    mv = _version_for_run(c, name, best["run_id"])
    if new_version := mv is None:
        mv = _register(c, policy, best)
    challenger = _alias_version(c, name, "challenger")
    moved_challenger = challenger is None or challenger.version != mv.version
    if moved_challenger:
        c.set_registered_model_alias(name, "challenger", mv.version)
    champion = _alias_version(c, name, "champion")
    verdict = _against_champion(c, best, policy, champion)
    refused = bool(best["synthetic_data"]) and not policy.allow_synthetic
    moved_champion = not refused and (champion is None or (champion.version != mv.version and verdict.better))
    if moved_champion:
        c.set_registered_model_alias(name, "champion", mv.version)
    _alias_tags(c, name)
    reason = _reason(best, policy, champion, verdict, moved_champion, mv.version)
    if refused and (champion is None or champion.version != mv.version):
        reason = (f"best eligible run {best['run_id']} ({best['run_name']}) was trained on SYNTHETIC data: version "
                  f"{mv.version} is challenger but is not made champion without --allow-synthetic")
    d = Decision(best["run_id"], mv.version, moved_challenger, moved_champion, new_version, reason, ranking)
    if log and (d.changed or launcher_run()):
        d.logged_run = _log_decision(experiment, d, policy, parent_run_id)
    return d


def _alias_tags(c, name: str) -> None:
    """Registered-model tags saying what champion and challenger were trained on: the registered model's page
    shows these tags beside the aliases, so a synthetic champion cannot pass unnoticed."""
    for alias in ("champion", "challenger"):
        mv = _alias_version(c, name, alias)
        if mv is not None:
            c.set_registered_model_tag(name, f"{alias}_synthetic_data", mv.tags.get("synthetic_data", "unknown"))
            c.set_registered_model_tag(name, f"{alias}_version", mv.version)


def _nothing_eligible(experiment: str, parent_run_id: str | None, ranking: pd.DataFrame) -> str:
    if not ranking.empty:
        return (f"no eligible run: {len(ranking)} candidates, none passing the gates (see excluded_because)")
    where = f"the children of run {parent_run_id}" if parent_run_id else f"experiment {experiment!r}"
    others = ", ".join(f"{name!r} ({n} runs)" for name, n in experiments_with_runs() if name != experiment)
    return (f"no candidate in {where}: no finished run with a logged model"
            + (f". Experiments with runs: {others}" if others else ""))


@dataclass(frozen=True)
class _Verdict:
    better: bool
    value: float  # the champion's score on policy.metric (nan when it has none)
    note: str  # why the scores were or were not compared


def _against_champion(c, best: pd.Series, policy: PromotionPolicy, champion) -> _Verdict:
    """Whether the best eligible run should replace the champion. A champion trained on synthetic data gives way
    to any real winner; scores are compared only on one metric (read from the champion's run when it was chosen
    on another) and one cohort: validation scores on two cohorts say nothing about which model is better."""
    if champion is None:
        return _Verdict(True, math.nan, "")
    value = _champion_value(c, champion, policy.metric)
    if champion.tags.get("synthetic_data") == "true" and not best["synthetic_data"]:
        return _Verdict(True, value, "the champion was trained on SYNTHETIC data")
    digest = champion.tags.get("data_digest", "")
    if digest and best["data_digest"] and digest != best["data_digest"]:
        return _Verdict(False, value, f"the champion was trained on another cohort (data digest {digest[:12]}, this "
                                      f"run {best['data_digest'][:12]}): their validation scores are not comparable. "
                                      f"To replace it anyway: MlflowClient().set_registered_model_alias("
                                      f"{policy.registered_model!r}, 'champion', VERSION)")
    if not math.isfinite(value):
        return _Verdict(True, value, f"the champion has no {policy.metric}")
    new = float(best[policy.metric])
    return _Verdict(new < value if lower_is_better(policy.metric) else new > value, value, "")


def _champion_value(c, champion, metric: str) -> float:
    if champion.tags.get("selection_metric") == metric:
        return float(champion.tags.get("selection_value", "nan"))
    with suppress(Exception):  # the source run was deleted
        return float(c.get_run(champion.tags["source_run"]).data.metrics.get(metric, math.nan))
    return math.nan


def _reason(best, policy, champion, verdict: _Verdict, moved, version) -> str:
    head = f"best eligible run {best['run_id']} ({best['run_name']}) with {policy.metric}={best[policy.metric]:.4f}"
    if champion is None:
        return f"{head}; no champion yet: version {version} becomes champion"
    if champion.version == version:
        return f"{head}; already champion (version {version})"
    was = f"champion version {champion.version} ({verdict.value:.4f})"
    if verdict.note:
        return f"{head}; {was}: {verdict.note}: " + (f"champion moved to {version}" if moved else "champion stays")
    return (f"{head} beats {was}: champion moved to {version}" if moved
            else f"{head} does not beat {was}: champion stays")


def _log_decision(experiment: str, d: Decision, policy: PromotionPolicy, parent_run_id: str | None) -> str:
    """The decision in a run tagged task=promote: the run `mlflow run -e promote` created (even when nothing
    changed, so it is never left empty), nested under the sweep it ranked; else a new run, only on a change."""
    decision = d.reason if d.changed else f"no change: {d.reason}"
    with start_run(experiment=experiment, run_name="promote", tags={"task": "promote", "decision": decision[:4900],
                   "promoted_version": str(d.version), "winner_run": str(d.winner_run),
                   "changed": str(d.changed).lower()}, use_env_run=True) as r:
        r.nest_under(parent_run_id)
        r.log_params({"metric": policy.metric, "min_value": policy.min_value, "max_sex_gap": policy.max_sex_gap,
                      "registered_model": policy.registered_model,
                      "allow_synthetic": str(policy.allow_synthetic).lower()})
        if not d.ranking.empty:
            r.log_table(d.ranking.drop(columns=["model_uri"]), "ranking.csv")
        with artifact_dir() as folder:
            (folder / "decision.json").write_text(json.dumps({
                "winner_run": d.winner_run, "version": d.version, "challenger_moved": d.challenger_moved,
                "champion_moved": d.champion_moved, "registered_new_version": d.registered_new_version,
                "reason": decision, "policy": policy.__dict__}, indent=1, default=str))
            r.log_files(folder)
        return r.run_id


def model_version_of(model_uri: str) -> str | None:
    """'models:/name@alias' or 'models:/name/3' -> the version number; None for run or logged-model URIs."""
    if not model_uri.startswith("models:/"):
        return None
    rest = model_uri[len("models:/"):]
    c = client()
    if "@" in rest:
        mv = _alias_version(c, *rest.split("@", 1))
        return mv.version if mv else None
    parts = rest.split("/")
    return parts[1] if len(parts) == 2 and parts[1].isdigit() else None


def link_evaluation(model_uri: str, run_id: str) -> None:
    """Record an external-validation run on the model version it evaluated."""
    name = model_uri[len("models:/"):].split("@")[0].split("/")[0]
    if version := model_version_of(model_uri):
        client().set_model_version_tag(name, version, f"external_validation/{run_id}", "see run")
        publish_card(name, version)  # the card lists the version's external evaluations


def model_card(name: str, version: str) -> str:
    """A registered version's model card, as the registry shows it (its description; `publish_card` wrote it)."""
    return client().get_model_version(name, version).description or ""


def registry_status(name: str = REGISTERED_MODEL) -> list[dict[str, str]]:
    """Champion and challenger of the registered model, if any (for reports and dashboards)."""
    c = client()
    aliases = {alias: _alias_version(c, name, alias) for alias in ("champion", "challenger")}
    return [{"alias": alias, "version": mv.version, "model": mv.tags.get("model", ""),
             "run": mv.tags.get("source_run", ""),
             "selection": f"{mv.tags.get('selection_metric', '')} = {mv.tags.get('selection_value', '')}"}
            for alias, mv in aliases.items() if mv is not None]
