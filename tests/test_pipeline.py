"""`cushing pipeline` (and the MLproject entry point `pipeline`) on a small real cohort, end to end.

The first pipeline is the own-cohort tutorial's "In one command" block (marked `<!-- test: pipeline -->` on the page;
tests/test_tutorial.py runs the step-by-step blocks), run as the page shows it with only the sizes made tiny: faces
(landmark hull) -> audit -> a two-configuration study -> promote -> dashboard -> evaluate on a second cohort. Then,
on the same store and pipeline folder, each a module fixture after the one before (they change what is on disk):
a plan and a rerun under `mlflow run` that reuse every step; one training option changed; a study whose
configuration raises; a SIGTERM during the sweep and the printed resume command.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import celeba_identities, env_vars, faceless, mlflow_run, photo_cohort
from tests.test_tutorial import PAGE, blocks

pytestmark = [pytest.mark.slow, pytest.mark.dlib]

PHOTOS = {("F", 1): 9, ("M", 1): 9, ("F", 0): 12, ("M", 0): 12}  # 42 photos, one per CelebA identity: 6
# patients in each split (min_positives is 5), each with a face (a photo without one stops the pipeline)
EXTERNAL = {("F", 1): 4, ("M", 1): 4, ("F", 0): 6, ("M", 0): 6}  # 20 other identities
SUBSTITUTIONS = [  # (what the page's study says, what the test trains): small and offline, nothing else
    (r"epochs: \d+", "epochs: 1"),
    (r"img_size: \d+", "img_size: 42"),  # 3 x 3 DINOv2 patches of 14
    (r"bootstrap: \d+", "bootstrap: 50"),
    (r"pretrained: true", "pretrained: false"),
]
STEPS = ["faces", "audit", "sweep", "promote", "dashboard", "evaluate"]


def page_block() -> str:
    """The page's pipeline block with the sizes substituted (a substitution that matches nothing fails)."""
    (code,) = [c for kind, c in blocks(PAGE.read_text()) if kind == "pipeline"]
    for pattern, repl in SUBSTITUTIONS:
        code, n = re.subn(pattern, repl, code)
        assert n == 1, f"{pattern!r} no longer matches the pipeline block of {PAGE.name}"
    return code


def _env(cushing_home: Path) -> dict:
    env = {**os.environ, "CUSHING_HOME": str(cushing_home), "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID",
              "CUSHING_OPTUNA_STORAGE"):
        env.pop(k, None)
    return env


def _bash(code: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", "set -euo pipefail\n" + code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _runs(d: Path) -> list:
    import mlflow

    with env_vars({"MLFLOW_TRACKING_URI": f"sqlite:///{d / 'mlflow.db'}"}):
        c = mlflow.MlflowClient()
        exp = c.get_experiment_by_name("cushing")
        return sorted(c.search_runs([exp.experiment_id], max_results=5000), key=lambda r: r.info.start_time)


def _pipeline(d: Path, run_id: str) -> dict:
    """A pipeline run, its step runs (children tagged with their step) and its links (step -> run, reused)."""
    runs = _runs(d)
    run = next(r for r in runs if r.info.run_id == run_id)
    children = {r.data.tags["cushing.pipeline.step"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == run_id and "cushing.pipeline.step" in r.data.tags}
    t = run.data.tags
    links = {s: (t[f"cushing.pipeline.{s}.run"], t[f"cushing.pipeline.{s}.reused"] == "true")
             for s in STEPS if f"cushing.pipeline.{s}.run" in t}
    return {"run": run, "steps": children, "links": links, "runs": runs}


def _last_pipeline(d: Path) -> str:
    return [r for r in _runs(d) if r.data.tags.get("task") == "pipeline"][-1].info.run_id


def _trainings(runs: list) -> list:
    return [r for r in runs if r.data.tags.get("sweep_config")]


def _resume_line(stderr: str) -> str:
    """The command a failed or stopped pipeline prints to resume it (the line after the one announcing it)."""
    lines = stderr.splitlines()
    i = next(i for i, ln in enumerate(lines) if "resume" in ln and ln.rstrip().endswith(":"))
    return lines[i + 1].strip()


@pytest.fixture(scope="module")
def first(tmp_path_factory, celeba_dir, cushing_home):
    d = tmp_path_factory.mktemp("pipeline-study")
    celeba = celeba_identities(celeba_dir)
    no_face = faceless(celeba, celeba_dir, PHOTOS, set(), tmp_path_factory.mktemp("candidates"))
    used = photo_cohort(celeba, celeba_dir, d / "photos", PHOTOS, no_face, "photo")
    photo_cohort(celeba, celeba_dir, d / "external", EXTERNAL, used, "ext")
    env = _env(cushing_home)
    t0 = time.monotonic()
    r = _bash(page_block(), d, env)
    assert r.returncode == 0, f"the page's pipeline failed:\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}"
    print(f"first pipeline: {time.monotonic() - t0:.0f} s")
    return {"dir": d, "env": env, "stdout": r.stdout, "id": _last_pipeline(d)}


def test_the_page_pipeline_ran_every_step_as_a_child_of_one_pipeline_run(first):
    d, out = first["dir"], first["stdout"]
    p = _pipeline(d, first["id"])
    assert p["run"].info.status == "FINISHED" and p["run"].data.tags["mlflow.runName"] == "pipeline-my-cohort"
    assert list(p["steps"]) == STEPS, "each step a child of the pipeline run, in order"
    assert all(r.info.status == "FINISHED" and r.data.tags.get("cushing.pipeline.key") for r in p["steps"].values())
    assert p["links"] == {s: (r.info.run_id, False) for s, r in p["steps"].items()}, "linked on the pipeline run"
    # the plan came first and said every step would run
    assert out.index("estimated time: no estimate on CPU") < out.index("[pipeline] faces: running")
    assert re.search(r"^  faces +run$", out, re.M)


def test_each_step_handed_its_output_to_the_next(first):
    d = first["dir"]
    p = _pipeline(d, first["id"])
    outputs = {s: json.loads(r.data.tags["cushing.pipeline.outputs"]) for s, r in p["steps"].items()}
    crops = d / "pipeline" / "faces" / "manifest.csv"
    assert outputs["faces"]["manifest"] == str(crops) and crops.exists()
    trained = _trainings(p["runs"])
    assert sorted(r.data.tags["model"] for r in trained) == ["dinov2_s", "resnet18"]
    for r in trained:  # the study's data is the face-crop manifest; the trainings sit under the sweep step
        assert r.data.params["data"] == str(crops) and r.data.tags["face_mask_source"] == "landmark_hull"
        assert r.data.tags["mlflow.parentRunId"] == outputs["sweep"]["parent_run"] == p["steps"]["sweep"].info.run_id
        assert r.info.status == "FINISHED" and r.data.params["epochs"] == "1" and r.data.params["img_size"] == "42"
    assert outputs["promote"]["champion"] == outputs["promote"]["version"] == "1"
    assert outputs["evaluate"]["model_uri"] == "models:/cushing/1"
    evaluation = p["steps"]["evaluate"]
    assert evaluation.data.tags["task"] == "external_validation" and evaluation.data.metrics["external/n"] > 0
    assert evaluation.data.tags["model_version"] == "1"


def test_the_end_says_champion_card_dashboard_and_how_to_serve(first):
    d, out = first["dir"], first["stdout"]
    assert re.search(r"^champion: version 1 \((resnet18|dinov2_s), run [0-9a-f]{32}", out, re.M)
    card = d / "pipeline" / "model_card.md"
    assert f"model card: {card}" in out and "cushing" in card.read_text() and "version 1" in card.read_text()
    dashboard = d / "pipeline" / "dashboard.html"
    assert f"dashboard: {dashboard}" in out and "PHOTO_" not in dashboard.read_text()
    serve = f"MLFLOW_TRACKING_URI=sqlite:///{d / 'mlflow.db'} mlflow models serve -m models:/cushing@champion"
    assert serve in out
    summary = json.loads((d / "pipeline" / "pipeline.json").read_text())
    assert [s["step"] for s in summary["steps"]] == STEPS and summary["pipeline_run"] == first["id"]


def test_the_pipeline_run_logs_its_inputs_and_links_each_step_run(first):
    """The run list tells pipelines apart by their params, the pipeline run's page (its description) links each
    step's run, and the end names the experiment's runs table in the MLflow UI."""
    d, out = first["dir"], first["stdout"]
    p = _pipeline(d, first["id"])
    params, exp = p["run"].data.params, p["run"].info.experiment_id
    assert params["study"] == str(d / "study.yaml") and params["set"] == "" and params["model"] == ""
    assert re.fullmatch(r"[0-9a-f]{16}", params["photos_digest"]) and re.fullmatch(r"[0-9a-f]{16}",
                                                                                       params["study_digest"])
    assert params["external_digest"] not in ("", params["photos_digest"]), "the external cohort, by content"
    note = p["run"].data.tags["mlflow.note.content"]
    assert note.startswith("0 of 6 steps reused.")
    for s, r in p["steps"].items():
        assert f"| {s} | [{r.info.run_id[:8]}]({_run_route(exp, r.info.run_id)}) | ran here |" in note
    assert p["runs"] and _kind(d) == "custom_model_development", "a model-development experiment"
    link = f"http://127.0.0.1:5000/#/experiments/{exp}/runs?workflowType=machine_learning"
    assert f"runs in the MLflow UI: {link} (once `mlflow ui --backend-store-uri sqlite:///{d / 'mlflow.db'} " \
           "--port 5000` runs)" in out


def _run_route(exp: str, run_id: str) -> str:
    """A run's page in the MLflow UI, in its model-training mode."""
    return f"#/experiments/{exp}/runs/{run_id}?workflowType=machine_learning"


def _kind(d: Path) -> str:
    import mlflow

    with env_vars({"MLFLOW_TRACKING_URI": f"sqlite:///{d / 'mlflow.db'}"}):
        return mlflow.MlflowClient().get_experiment_by_name("cushing").tags.get("mlflow.experimentKind", "")


@pytest.fixture(scope="module")
def rerun(first):
    """`--plan` (with a GPU named) and then the same pipeline through `mlflow run`, from the study folder."""
    d, env = first["dir"], first["env"]
    before = sorted(p.relative_to(d) for p in d.rglob("*")), len(_runs(d))
    plan = _bash("cushing pipeline --photos photos/manifest.csv --study study.yaml --external external/manifest.csv"
                 " --plan --gpu h200", d, env)
    after = sorted(p.relative_to(d) for p in d.rglob("*")), len(_runs(d))
    run_id, r = mlflow_run(d, env, "pipeline", "photos=photos/manifest.csv", "study=study.yaml",
                           "external=external/manifest.csv")
    return {"plan": plan, "unchanged": before == after, "id": run_id, "stdout": r.stdout}


def test_the_plan_shows_every_step_reused_and_writes_nothing(first, rerun):
    plan = rerun["plan"]
    assert plan.returncode == 0, plan.stderr[-3000:]
    steps = _pipeline(first["dir"], first["id"])["steps"]
    for s in STEPS:
        assert re.search(rf"^  {s} +reuse run {steps[s].info.run_id}: ", plan.stdout, re.M), (s, plan.stdout)
    assert "estimated time: nothing to train (the sweep is reused)" in plan.stdout
    assert "[pipeline]" not in plan.stdout and rerun["unchanged"], "--plan only prints"


def test_a_rerun_under_mlflow_run_reuses_every_step_and_trains_nothing(first, rerun):
    d = first["dir"]
    p = _pipeline(d, rerun["id"])
    assert p["run"].data.tags["task"] == "pipeline", "the run `mlflow run` created is the pipeline run"
    earlier = _pipeline(d, first["id"])["steps"]
    assert p["links"] == {s: (earlier[s].info.run_id, True) for s in STEPS}
    assert not p["steps"], "no step ran again"
    assert all(f"[pipeline] {s}: reused run {earlier[s].info.run_id}" in rerun["stdout"] for s in STEPS)
    assert len(_trainings(p["runs"])) == 2


def test_a_rerun_says_which_steps_it_reused_and_links_the_runs_it_reused(first, rerun):
    d = first["dir"]
    p, earlier = _pipeline(d, rerun["id"]), _pipeline(d, first["id"])
    note, exp = p["run"].data.tags["mlflow.note.content"], p["run"].info.experiment_id
    assert note.startswith("6 of 6 steps reused.")
    for s in STEPS:
        rid = earlier["steps"][s].info.run_id
        assert f"| {s} | [{rid[:8]}]({_run_route(exp, rid)}) | reused (finished earlier with the same inputs) |" \
            in note
        assert p["run"].data.tags[f"cushing.pipeline.{s}.reused"] == "true"
    params = p["run"].data.params
    assert params["study"] == "study.yaml" and params["resolved/study"] == str(d / "study.yaml"), \
        "`mlflow run` logged the -P value; the pipeline's resolved path is beside it"
    assert params["photos_digest"] == earlier["run"].data.params["photos_digest"], "the same photos, by content"


@pytest.mark.chromium
def test_the_printed_link_opens_the_runs_table_and_the_description_links_the_reused_runs(first, rerun):
    """In a browser that never opened MLflow before (MLflow 3.17 then opens an experiment on its GenAI overview),
    the link the pipeline printed lands on the experiment's runs table; the rerun's row there opens its page, whose
    description links the step runs it reused. Screenshots: test-artifacts/pipeline-runs-link.png,
    pipeline-rerun-description.png."""
    from tests import mlflow_ui as mu

    d = first["dir"]
    link = re.search(r"^runs in the MLflow UI: (http://127\.0\.0\.1:5000/(\S+))", first["stdout"], re.M)
    earlier, rerun_run = _pipeline(d, first["id"]), _pipeline(d, rerun["id"])["run"]
    exp = rerun_run.info.experiment_id
    with mu.mlflow_ui(f"sqlite:///{d / 'mlflow.db'}") as server, mu.browser() as b:
        fresh = b.new_context(viewport=mu.DOCS_VIEWPORT)  # no settings kept from an earlier visit
        ui = mu.UIPage(fresh.new_page(), server.url)
        ui.goto(f"{server.url}/{link.group(2)}")
        mu.wait_for_rest(ui, "runs/search", lambda c: isinstance(c.request, dict)
                         and exp in c.request.get("experiment_ids", []))
        mu.wait_for_text(ui, "pipeline-my-cohort")
        mu.settle(ui)
        mu.screenshot(ui, "pipeline-runs-link", full=False)
        shown = ui.page.inner_text("body")
        assert "/runs?" in ui.page.url and "matching run" in shown and "Detect Issues" not in shown, shown[:600]
        plain = mu.UIPage(b.new_context(viewport=mu.DOCS_VIEWPORT).new_page(), server.url)
        plain.goto(f"#/experiments/{exp}")
        mu.wait_for_text(plain, "Detect Issues")  # why the link asks for the UI's model-training mode
        ui.page.locator(f"a[href$='/runs/{rerun_run.info.run_id}']").first.click()  # the rerun's row
        mu.wait_for_text(ui, "6 of 6 steps reused")  # its page: the description, rendered
        mu.settle(ui)
        mu.screenshot(ui, "pipeline-rerun-description")
        hrefs = ui.page.eval_on_selector_all("a[href*='/runs/']", "els => els.map(e => e.getAttribute('href'))")
    for s in STEPS:
        assert _run_route(exp, earlier["steps"][s].info.run_id) in hrefs, (s, hrefs)


@pytest.fixture(scope="module")
def changed(first, rerun):
    d, env = first["dir"], first["env"]
    r = _bash("cushing pipeline --photos photos/manifest.csv --study study.yaml --external external/manifest.csv"
              " --set lr=0.02", d, env)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-4000:]}"
    return {"id": _last_pipeline(d), "stdout": r.stdout}


def test_changing_one_training_option_reruns_training_promote_and_dashboard_only(first, changed):
    d = first["dir"]
    p, earlier = _pipeline(d, changed["id"]), _pipeline(d, first["id"])
    assert {s for s, (_, reused) in p["links"].items() if not reused} >= {"sweep", "promote", "dashboard"}
    for s in ("faces", "audit"):
        assert p["links"][s] == (earlier["steps"][s].info.run_id, True)
    sweep = json.loads(p["steps"]["sweep"].data.tags["cushing.pipeline.outputs"])
    new = [r for r in _trainings(p["runs"]) if r.data.tags["mlflow.parentRunId"] == sweep["parent_run"]]
    assert sorted(r.data.params["lr"] for r in new) == ["0.02", "0.02"]
    champion = json.loads(p["steps"]["promote"].data.tags["cushing.pipeline.outputs"])["champion"]
    evaluated = p["links"]["evaluate"]
    if champion == "1":  # the champion stayed: its evaluation is reused
        assert evaluated == (earlier["steps"]["evaluate"].info.run_id, True)
    else:
        assert not evaluated[1] and p["steps"]["evaluate"].data.tags["model_version"] == champion


def _sweep_parents(d: Path, *pipeline_ids: str) -> tuple[list[str], dict[str, str]]:
    """The sweep parent run of each pipeline, and every run's name."""
    runs = _pipeline(d, pipeline_ids[0])["runs"]
    parents = [json.loads(_pipeline(d, i)["steps"]["sweep"].data.tags["cushing.pipeline.outputs"])["parent_run"]
               for i in pipeline_ids]
    return parents, {r.info.run_id: r.data.tags.get("mlflow.runName", "") for r in runs}


def test_a_sweep_with_set_is_told_apart_by_name_and_its_children_carry_the_override(first, changed):
    d = first["dir"]
    (before, after), names = _sweep_parents(d, first["id"], changed["id"])
    assert re.fullmatch(r"sweep-my-cohort-[0-9a-f]{8}", names[before])
    assert re.fullmatch(re.escape(names[before]) + r"-set-[0-9a-f]{6}", names[after]), "the overrides' digest"
    p = _pipeline(d, changed["id"])
    kids = [r for r in _trainings(p["runs"]) if r.data.tags["mlflow.parentRunId"] == after]
    assert sorted(r.data.tags["mlflow.runName"] for r in kids) == ["dinov2_s-frozen[lr=0.02]", "resnet18[lr=0.02]"]
    assert sorted(r.data.tags["sweep_config"] for r in kids) == ["dinov2_s-frozen[lr=0.02]", "resnet18[lr=0.02]"]
    assert p["run"].data.params["set"] == "lr=0.02"


def _leaderboard(html: str) -> dict[str, tuple[str, str]]:
    """The dashboard's leaderboard rows: run id -> (registry alias, the row's text)."""
    rows = re.findall(r'<tr data-run="([0-9a-f]{32})" data-alias="(\w*)">(.*?)</tr>', html, re.S)
    return {run: (alias, " ".join(re.sub(r"<[^>]+>", " ", text).split())) for run, alias, text in rows}


def test_the_dashboard_ranks_the_registrys_champion_and_challenger_from_any_sweep(first, changed):
    """After the --set sweep, its dashboard ranks the registry's champion (marked, and named as from the first
    sweep when it stayed) as the model card does; the first sweep's dashboard, built now, ranks the challenger
    the --set sweep registered, marked as from that sweep."""
    import mlflow

    d = first["dir"]
    (before, after), names = _sweep_parents(d, first["id"], changed["id"])
    with env_vars({"MLFLOW_TRACKING_URI": f"sqlite:///{d / 'mlflow.db'}"}):
        c = mlflow.MlflowClient()
        run_of = {a: c.get_model_version_by_alias("cushing", a).tags["source_run"] for a in ("champion", "challenger")}
        parent_of = {a: c.get_run(r).data.tags["mlflow.parentRunId"] for a, r in run_of.items()}
    assert f"Source run: `{run_of['champion']}`" in (d / "pipeline" / "model_card.md").read_text()
    second = _leaderboard((d / "pipeline" / "dashboard.html").read_text())
    assert second[run_of["champion"]][0] == "champion", "the dashboard names the card's champion"
    if parent_of["champion"] == before:  # the champion stayed: trained in the first sweep
        assert f"champion from {names[before]}" in second[run_of["champion"]][1]
    assert parent_of["challenger"] == after, "the --set sweep's best is the challenger"
    r = _bash(f"cushing dashboard --experiment cushing --parent-run {before} --out first.html --no-log", d,
              first["env"])
    assert r.returncode == 0, r.stderr[-3000:]
    earlier = _leaderboard((d / "first.html").read_text())
    alias, text = earlier[run_of["challenger"]]
    assert alias in ("challenger", "champion") and f"from {names[after]}" in text, text
    assert {k for k, (a, t) in earlier.items() if "from " not in t} >= {
        r.info.run_id for r in _trainings(_pipeline(d, first["id"])["runs"]) if r.data.tags["mlflow.parentRunId"] ==
        before}, "the first sweep's own runs, unmarked"


@pytest.fixture(scope="module")
def failed(first, changed):
    """A study refused at validation (a subgroup column the photos lack), then one that fails after it (a
    configuration's weights file is missing: found only when its training builds the model)."""
    d, env = first["dir"], first["env"]
    (d / "unknown.yaml").write_text("name: unknown\nkind: sweep\nbase: {pretrained: false, epochs: 1, img_size: 32}\n"
                                    "configurations:\n  - {model: resnet18, subgroups: 'sex,site'}\n")
    before = len(_runs(d)), sorted(p.relative_to(d) for p in d.rglob("*"))
    refused = _bash("cushing pipeline --photos photos/manifest.csv --study unknown.yaml", d, env)
    after = len(_runs(d)), sorted(p.relative_to(d) for p in d.rglob("*"))
    (d / "broken.yaml").write_text("name: broken\nkind: sweep\nbase: {pretrained: false, epochs: 1, img_size: 32}\n"
                                   "configurations:\n  - {model: resnet18, weights: missing.safetensors}\n")
    r = _bash("cushing pipeline --photos photos/manifest.csv --study broken.yaml --external external/manifest.csv",
              d, env)
    return {"refused": refused, "unchanged": before == after, "result": r, "id": _last_pipeline(d)}


def test_a_study_refused_at_validation_leaves_no_run_and_no_file(failed):
    r = failed["refused"]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "subgroup column 'site' is not in the manifest" in r.stderr
    assert failed["unchanged"], "no FAILED runs, nothing written in the study or pipeline folder"


def test_a_failed_step_names_itself_its_run_and_the_resume_command(first, failed):
    d, r = first["dir"], failed["result"]
    assert r.returncode == 1, r.stderr[-3000:]
    found = re.search(r"step sweep failed \(run ([0-9a-f]{32})\): WeightsUnavailable: pretrained weights for "
                      r"resnet18 .*'missing.safetensors' does not exist", r.stderr)
    assert found, r.stderr[-3000:]
    assert _resume_line(r.stderr) == (
        f"MLFLOW_TRACKING_URI=sqlite:///{d / 'mlflow.db'} cushing pipeline --photos {d / 'photos/manifest.csv'} "
        f"--study {d / 'broken.yaml'} --external {d / 'external/manifest.csv'} --out {d / 'pipeline'} "
        "--experiment cushing")
    p = _pipeline(d, failed["id"])
    assert p["run"].info.status == "FAILED"
    assert list(p["steps"]) == ["sweep"] and p["steps"]["sweep"].info.run_id == found.group(1)
    assert p["steps"]["sweep"].info.status == "FAILED"
    assert set(p["links"]) == {"faces", "audit"}, "nothing after the failed step ran"
    # each FAILED run says why in one line: the pipeline, its step, the training that failed
    assert p["run"].data.tags["cushing.error"].startswith(f"StepFailed: step sweep failed (run {found.group(1)})")
    assert p["steps"]["sweep"].data.tags["cushing.error"].startswith("WeightsUnavailable: pretrained weights for")
    (training,) = [t for t in _trainings(p["runs"]) if t.data.tags["sweep"].startswith("broken-")]
    assert training.info.status == "FAILED" and "missing.safetensors" in training.data.tags["cushing.error"]
    assert all("\n" not in x.data.tags["cushing.error"] for x in (p["run"], p["steps"]["sweep"], training))


@pytest.fixture(scope="module")
def stopped(first, failed, tmp_path_factory):
    """A pipeline (another seed) sent SIGTERM while the sweep trains its second configuration, then resumed with
    the command it printed, from another folder."""
    d, env = first["dir"], first["env"]
    cmd = ["cushing", "pipeline", "--photos", "photos/manifest.csv", "--study", "study.yaml", "--external",
           "external/manifest.csv", "--set", "seed=1"]
    with open(d / "stopped.err", "w") as err:
        proc = subprocess.Popen(cmd, cwd=d, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        lines, second = [], threading.Event()

        def read() -> None:
            for line in proc.stdout:
                lines.append(line)
                if re.search(r"configuration 2/2 \S+: training", line):
                    second.set()
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert second.wait(300), "".join(lines)[-3000:]
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
        reader.join(10)
    stderr = (d / "stopped.err").read_text()
    stopped_id = _last_pipeline(d)
    resume = _bash(_resume_line(stderr), tmp_path_factory.mktemp("elsewhere"), env)
    return {"code": code, "stderr": stderr, "id": stopped_id, "resume": resume, "resumed_id": _last_pipeline(d)}


def test_a_sigterm_during_the_sweep_then_the_resume_command_trains_nothing_twice(first, stopped):
    d = first["dir"]
    assert stopped["code"] == 128 + signal.SIGTERM, stopped["stderr"][-3000:]
    assert "stopped during step sweep" in stopped["stderr"]
    p = _pipeline(d, stopped["id"])
    assert p["run"].info.status == "KILLED" and p["steps"]["sweep"].info.status == "KILLED"
    r = stopped["resume"]
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-4000:]}"
    assert re.search(r"^  sweep +run: 1 of 2 configurations to train \(1 finished earlier\)$", r.stdout, re.M), \
        f"{r.stdout[-3000:]}\n--- the stopped pass:\n{stopped['stderr'][-3000:]}"
    resumed = _pipeline(d, stopped["resumed_id"])
    assert resumed["run"].info.status == "FINISHED"
    assert {s for s, (_, reused) in resumed["links"].items() if reused} >= {"faces", "audit"}
    parent = json.loads(resumed["steps"]["sweep"].data.tags["cushing.pipeline.outputs"])["parent_run"]
    assert parent == p["steps"]["sweep"].info.run_id, "the stopped pass's sweep, picked up"
    finished = [t for t in _trainings(resumed["runs"])
                if t.data.tags["mlflow.parentRunId"] == parent and t.info.status == "FINISHED"]
    labels = sorted(t.data.tags["sweep_config"] for t in finished)
    assert labels == ["dinov2_s-frozen[seed=1]", "resnet18[seed=1]"], \
        "each configuration trained (and finished) exactly once, its label carrying --set"
    assert all(t.data.params["seed"] == "1" for t in finished)


@pytest.fixture(scope="module")
def skipping(first, stopped):
    """The photos with two rows a real cohort may have: a photo of a wall (no face) and a typo in a file name. By
    default the typo is refused before anything is made; with --skip-bad-photos true both are left out, counted."""
    from PIL import Image

    d, env = first["dir"], first["env"]
    Image.new("RGB", (300, 300), (200, 190, 180)).save(d / "photos" / "wall.png")
    rows = pd.read_csv(d / "photos" / "manifest.csv")
    extra = pd.DataFrame({"image": ["wall.png", "photo_0O1.jpg"], "label": [1, 0], "sex": ["F", "M"],
                          "subject_id": ["WALL", "TYPO"]})
    pd.concat([rows, extra], ignore_index=True).to_csv(d / "photos" / "more.csv", index=False)
    command = "cushing pipeline --photos photos/more.csv --study study.yaml --model resnet18"
    before = len(_runs(d))
    refused = _bash(command, d, env)
    made = len(_runs(d)) - before
    r = _bash(command + " --skip-bad-photos true", d, env)
    return {"refused": refused, "made": made, "result": r, "id": _last_pipeline(d)}


def test_photos_that_cannot_be_used_stop_the_pipeline_unless_skipped_and_then_are_counted(first, skipping):
    d, refused, r = first["dir"], skipping["refused"], skipping["result"]
    assert refused.returncode == 2 and "photo_0O1.jpg: file not found" in refused.stderr, refused.stderr[-2000:]
    assert "--skip-bad-photos true leaves them out" in refused.stderr and skipping["made"] == 0
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-4000:]}"
    assert "skipped photos: 2 (--skip-bad-photos true" in r.stdout
    p = _pipeline(d, skipping["id"])
    counts = {"": 2, "/patient": 1, "/control": 1, "/female": 1, "/male": 1}  # the wall (F, 1) and the typo (M, 0)
    sweep = json.loads(p["steps"]["sweep"].data.tags["cushing.pipeline.outputs"])["parent_run"]
    (training,) = [t for t in _trainings(p["runs"]) if t.data.tags["mlflow.parentRunId"] == sweep]
    faces = next(x for x in p["runs"] if x.data.tags.get("cushing.pipeline.step") == "faces"
                 and x.data.tags["mlflow.parentRunId"] == skipping["id"])
    for run in (faces, training):  # the face stage's run, and the training on its crops
        assert {k: run.data.metrics[f"skipped_photos{k}"] for k in counts} == counts, run.info.run_name
    version = json.loads(p["steps"]["promote"].data.tags["cushing.pipeline.outputs"])["version"]
    with env_vars({"MLFLOW_TRACKING_URI": f"sqlite:///{d / 'mlflow.db'}"}):
        import mlflow

        card = mlflow.MlflowClient().get_model_version("cushing", version).description
    assert "Photos left out (not found, unreadable or no face crop; `skip_bad_photos`): 2 (patients 1, controls 1; " \
           "female 1, male 1)." in card


def test_the_plan_in_an_empty_folder_writes_nothing(tmp_path, celeba_dir, cushing_home):
    photo_cohort(celeba_identities(celeba_dir), celeba_dir, tmp_path / "photos", {("F", 1): 1, ("M", 0): 1}, set(),
                 "p")
    before = sorted(tmp_path.rglob("*"))
    r = subprocess.run(["cushing", "pipeline", "--photos", "photos/manifest.csv", "--model", "resnet18", "--plan"],
                       cwd=tmp_path, env=_env(cushing_home), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pipeline paper:" in r.stdout, "the study's default is the paper's, read in the project folder"
    assert [ln.split()[0] for ln in r.stdout.splitlines() if ln.startswith("  ") and ln.split()[0] in STEPS] == \
        STEPS[:-1], "no evaluate without an external cohort"
    assert "estimated time: no estimate on CPU" in r.stdout and sorted(tmp_path.rglob("*")) == before


def test_a_plan_under_mlflow_run_names_its_run_a_plan(tmp_path, celeba_dir, cushing_home):
    """`mlflow run -e pipeline -P plan=true` has a run before the plan prints: it is named for the plan, not left
    with a random name beside the pipeline's real runs."""
    import mlflow

    photo_cohort(celeba_identities(celeba_dir), celeba_dir, tmp_path / "photos", {("F", 1): 1, ("M", 0): 1}, set(),
                 "p")
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("plans"))
    env = {**_env(cushing_home), "MLFLOW_TRACKING_URI": uri, "MLFLOW_RUN_ID": run.info.run_id}
    r = subprocess.run(["cushing", "pipeline", "--photos", "photos/manifest.csv", "--model", "resnet18", "--plan"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["mlflow.runName"] == "pipeline paper (plan)" and tags["cushing.pipeline_plan"] == "true"
