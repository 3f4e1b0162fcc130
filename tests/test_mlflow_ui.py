"""The README's demo flow (sweep, promote, dashboard) as a user reads it in the real MLflow UI: `mlflow server` on
loopback, Debian's headless Chromium. Where the DOM is virtualised or drawn by Plotly, the assertion reads the REST
call the page itself made (named in each check); every page is kept as a screenshot in test-artifacts/, and the
pages the documentation shows are also saved, after their checks pass, as docs/assets/screenshots/*.png."""
from __future__ import annotations

import pytest

from tests import mlflow_ui as mu
from tests.conftest import env_vars

pytestmark = [pytest.mark.slow, pytest.mark.chromium]


@pytest.fixture(scope="module")
def flow(demo_sweep):
    import mlflow

    with env_vars({"MLFLOW_TRACKING_URI": demo_sweep["uri"]}):
        c = mlflow.MlflowClient()
        exp = c.get_experiment_by_name("cushing-demo")
        kids = {r.data.tags["sweep_config"]: r for r in c.search_runs([exp.experiment_id])
                if r.data.tags.get("sweep_config")}
        champion = c.get_model_version_by_alias("cushing", "champion")
    epochs = int(next(iter(kids.values())).data.params["epochs"])
    return {"exp_id": exp.experiment_id, "kids": kids, "champion": champion, "epochs": epochs,
            "uri": demo_sweep["uri"]}


@pytest.fixture(scope="module")
def server(flow):
    with mu.mlflow_ui(flow["uri"]) as s:
        yield s


@pytest.fixture(scope="module")
def ui(server):
    with mu.browser() as b, mu.ui_page(server.url, browser_=b) as page:
        yield page


def test_the_experiment_link_lands_on_the_runs_table_in_a_fresh_browser(server, flow):
    """`mlflow run --experiment-name cushing-demo` made the experiment; the project's first run in it marked it
    as model development (the kind tag of MLflow 3's UI). MLflow 3.17's UI still opens any experiment on its GenAI
    overview ("Detect Issues", traces, the assistant) in a browser that has not chosen "Model training" in the
    sidebar, so the link the project gives (`runs_link`, printed by `cushing pipeline`) asks for that mode: in a
    browser with no MLflow settings it lands on the runs table. DOM: the page's text; REST: runs/search of the
    experiment, which only the runs table makes."""
    import mlflow

    from cushing import tracking

    with env_vars({"MLFLOW_TRACKING_URI": flow["uri"]}):
        kind = mlflow.MlflowClient().get_experiment(flow["exp_id"]).tags.get("mlflow.experimentKind")
    assert kind == "custom_model_development"
    with env_vars({"MLFLOW_TRACKING_URI": server.url}):
        link = tracking.runs_link("cushing-demo")
    assert link == f"{server.url}/#/experiments/{flow['exp_id']}/runs?workflowType=machine_learning"
    with mu.browser() as b:
        plain = mu.UIPage(b.new_context(viewport=mu.DOCS_VIEWPORT).new_page(), server.url)
        plain.goto(f"#/experiments/{flow['exp_id']}")
        mu.wait_for_text(plain, "Detect Issues")  # the bare experiment URL: MLflow's GenAI overview
        mu.screenshot(plain, "demo-flow-bare-experiment-url", full=False)
        ui = mu.UIPage(b.new_context(viewport=mu.VIEWPORT).new_page(), server.url)
        ui.goto(link)
        mu.wait_for_rest(ui, "runs/search", lambda c: flow["exp_id"] in _experiment_ids(c))
        mu.wait_for_text(ui, "sweep-demo")
        mu.settle(ui)
        text = ui.page.inner_text("body")
        assert "matching run" in text and "Detect Issues" not in text and "Evaluation runs" not in text, text[:800]
        mu.screenshot(ui, "demo-flow-runs-link")
        mu.docs_screenshot(ui, "mlflow-runs")
        assert ui.unexpected_errors() == []


def _experiment_ids(call) -> list:
    return call.request.get("experiment_ids", []) if isinstance(call.request, dict) else []


def test_a_child_runs_per_epoch_f1_has_one_point_per_epoch(ui, flow):
    """REST: metrics/get-history, which the metric page fetches for every run and key."""
    run = flow["kids"]["resnet18"]
    view = mu.open_metric_chart(ui, None, flow["exp_id"], [run.info.run_id], "epoch/val/f1")
    mu.screenshot(ui, "demo-flow-epoch-val-f1")
    points = view.data["history"][run.info.run_id]["epoch/val/f1"]
    assert sorted(p["step"] for p in points) == list(range(1, flow["epochs"] + 1))
    final = mu.open_metric_chart(ui, None, flow["exp_id"], [run.info.run_id], "val/f1")
    assert [p["step"] for p in final.data["history"][run.info.run_id]["val/f1"]] == [0], "the final value, once"


def test_compare_view_shows_female_f1_for_both_runs(ui, flow):
    """DOM: the compare page's metric rows (scrolled into view); REST: runs/search of the compared runs."""
    a, b = flow["kids"]["resnet18"], flow["kids"]["resnet18-bs16"]
    view = mu.open_compare(ui, None, flow["exp_id"], [a.info.run_id, b.info.run_id], find_metrics=["test/f1/female"])
    mu.screenshot(ui, "demo-flow-compare")
    shown = view.data["metric_rows"]["test/f1/female"]
    assert len(shown) == 2 and all(s not in ("", "NaN") for s in shown), shown
    for s, r in zip(shown, (a, b)):
        assert float(s) == pytest.approx(r.data.metrics["test/f1/female"], abs=0.006)
    mu.docs_screenshot(ui, "mlflow-compare")


def test_run_page_shows_the_male_subgroup_counts(ui, flow):
    """DOM: the run page's metrics table (a NaN male F1 is hidden; the counts explain it)."""
    run = flow["kids"]["resnet18"]
    view = mu.open_run(ui, None, flow["exp_id"], run.info.run_id)
    mu.screenshot(ui, "demo-flow-run")
    shown = view.data["metrics_table"]
    assert shown["test/positives/male"] == f"{run.data.metrics['test/positives/male']:g}"
    assert "test/n/male" in shown and "not_estimable" in view.text
    mu.docs_screenshot(ui, "mlflow-run")


def test_registered_model_page_shows_aliases_and_synthetic_data(ui, flow):
    """DOM and REST registered-models/get: aliases and the registered model's tags."""
    view = mu.open_registered_model(ui, None, "cushing")
    mu.screenshot(ui, "demo-flow-registered-model")
    version = str(flow["champion"].version)
    assert view.data["aliases"]["champion"] == version and "challenger" in view.data["aliases"]
    assert view.data["tags_shown"]["champion_synthetic_data"] == "true"
    mu.docs_screenshot(ui, "mlflow-registered-model")


def test_model_version_page_shows_its_model_card(ui, flow):
    """DOM: the version's description is its model card (rendered Markdown); REST model-versions/get: the same
    text is the version's description, and the version carries the champion alias."""
    version = str(flow["champion"].version)
    view = mu.open_model_version(ui, None, "cushing", version)
    mu.wait_for_text(ui, "Intended use")
    description = view.data["version"].get("description", "")
    assert "TRAINED ON SYNTHETIC DATA" in description and "not a diagnostic device" in description
    assert "champion" in view.data["aliases"]
    shown = ui.page.inner_text("body")
    assert "Intended use" in shown and "not a diagnostic device" in shown, "the card is shown on the page"
    for item in ("95% intervals counting subjects", "Clinical utility (decision curve, test)",
                 "Net benefit at the operating threshold", "Cohort size: with "):
        assert item in description and item in shown, item
    mu.screenshot(ui, "demo-flow-model-version")
    mu.docs_screenshot(ui, "mlflow-model-card")
    size = ui.page.viewport_size
    ui.page.set_viewport_size(mu.DOCS_VIEWPORT)  # lay out at the picture's size first, then scroll: its own picture
    ui.page.wait_for_timeout(800)
    ui.page.get_by_text("Performance (95% intervals counting subjects").first.evaluate("e => e.scrollIntoView()")
    mu.docs_screenshot(ui, "mlflow-model-card-evidence")
    ui.page.set_viewport_size(size)


def test_run_chart_view_draws_the_epoch_curves_as_lines(ui, flow):
    """DOM: the run's Model metrics tab filtered to the per-epoch series (Plotly line traces, not bars); REST:
    get-history-bulk-interval of epoch/val/f1, one point per epoch."""
    run = flow["kids"]["resnet18"]
    view = mu.open_run_charts(ui, None, flow["exp_id"], run.info.run_id, search="^epoch/",
                              wait_keys=["epoch/val/f1"])
    cards = {c["title"]: c for c in view.data["cards"]}
    assert cards["epoch/val/f1"]["type"] == "line" and cards["epoch/train/loss"]["type"] == "line", cards
    assert {c["section"] for c in cards.values()} <= {"epoch/val", "epoch/train"}
    assert [p["step"] for p in view.data["history"]["epoch/val/f1"]] == list(range(1, flow["epochs"] + 1))
    mu.screenshot(ui, "demo-flow-run-charts")
    shown = mu.search_charts(ui, "^epoch/val/", scroll=False)  # the docs' picture: the validation curves
    assert {c["title"] for c in shown["cards"]} >= {"epoch/val/f1", "epoch/val/auc"}, shown["cards"]
    mu.docs_screenshot(ui, "mlflow-charts")


def test_grad_cam_aggregates_open_in_the_artifact_view(ui, flow):
    """DOM: the run's Artifacts tab opened on a mean Grad-CAM map shows it as an image that loaded; REST
    artifacts/list (the calls the tab made): the cam/ folder holds aggregates only (mean maps, no overlays)."""
    run = flow["kids"]["resnet18"]
    view = mu.open_run_artifact(ui, None, flow["exp_id"], run.info.run_id, "cam")
    maps = sorted(n for n in view.data["files"] if n.startswith("cam/mean_") and n.endswith(".png"))
    assert maps and not [n for n in view.data["files"] if "overlay" in n], view.data["files"]
    shown = "cam/mean_all.png" if "cam/mean_all.png" in maps else maps[0]  # every true x predicted x sex map
    mu.open_run_artifact(ui, None, flow["exp_id"], run.info.run_id, shown)
    img = ui.page.locator(f"img[alt='{shown}']").first  # the preview: a blob: image, its alt the artifact path
    img.wait_for(timeout=30_000)
    ui.page.wait_for_function("(i) => i.complete && i.naturalWidth > 0", arg=img.element_handle(), timeout=30_000)
    mu.screenshot(ui, "demo-flow-grad-cam")
    mu.docs_screenshot(ui, "grad-cam")
