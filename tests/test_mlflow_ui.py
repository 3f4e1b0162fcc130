"""The README's demo flow (sweep, promote, dashboard) as a user reads it in the real MLflow UI: `mlflow server` on
loopback, Debian's headless Chromium. Where the DOM is virtualised or drawn by Plotly, the assertion reads the REST
call the page itself made (named in each check); every page is kept as a screenshot in test-artifacts/."""
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
def ui(flow):
    with mu.mlflow_ui(flow["uri"]) as server, mu.browser() as b, mu.ui_page(server.url, browser_=b) as page:
        yield page


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


def test_run_page_shows_the_male_subgroup_counts(ui, flow):
    """DOM: the run page's metrics table (a NaN male F1 is hidden; the counts explain it)."""
    run = flow["kids"]["resnet18"]
    view = mu.open_run(ui, None, flow["exp_id"], run.info.run_id)
    mu.screenshot(ui, "demo-flow-run")
    shown = view.data["metrics_table"]
    assert shown["test/positives/male"] == f"{run.data.metrics['test/positives/male']:g}"
    assert "test/n/male" in shown and "not_estimable" in view.text


def test_registered_model_page_shows_aliases_and_synthetic_data(ui, flow):
    """DOM and REST registered-models/get: aliases and the registered model's tags."""
    view = mu.open_registered_model(ui, None, "cushing")
    mu.screenshot(ui, "demo-flow-registered-model")
    version = str(flow["champion"].version)
    assert view.data["aliases"]["champion"] == version and "challenger" in view.data["aliases"]
    assert view.data["tags_shown"]["champion_synthetic_data"] == "true"


def test_logged_model_shows_test_f1(ui, flow):
    """DOM: the logged model's metrics table; REST: logged-models/<id>."""
    model_id = flow["champion"].source.split("/")[-1] if flow["champion"].source.startswith("models:/") else \
        flow["kids"]["resnet18"].data.tags["model_uri"].split("/")[-1]
    view = mu.open_logged_model(ui, None, flow["exp_id"], model_id)
    mu.screenshot(ui, "demo-flow-logged-model")
    assert "test/f1" in [r[0] for r in view.data["metrics_table"]]
    assert view.data["metrics"]["test/f1"] > 0
