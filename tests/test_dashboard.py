"""The dashboard from a real demo sweep, opened in headless Chromium (Debian's, no network); the rendered page is
also the documentation's picture (docs/assets/screenshots/dashboard.png)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import ROOT, env_vars
from tests.mlflow_ui import docs_screenshot


ARTIFACTS = Path(os.environ.get("CUSHING_TEST_ARTIFACTS", ROOT / "test-artifacts"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page_file(demo_sweep, tmp_path_factory):
    import tempfile

    import mlflow

    from cushing.workflows.dashboard import build_dashboard

    out = tmp_path_factory.mktemp("dash") / "dashboard.html"
    tmp, tempfile.tempdir = tempfile.tempdir, str(tmp_path_factory.mktemp("tmp"))  # the temporary files' folder
    try:
        with env_vars({"MLFLOW_TRACKING_URI": demo_sweep["uri"]}):
            c = mlflow.MlflowClient()
            exp = c.get_experiment_by_name("cushing-demo")
            parent = next(r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("task") == "sweep")
            path = build_dashboard(experiment="cushing-demo", parent_run_id=parent.info.run_id, out=out)
            logged = {a.path for a in c.list_artifacts(parent.info.run_id)}
        left = list(Path(tempfile.tempdir).iterdir())
    finally:
        tempfile.tempdir = tmp
    assert "dashboard.html" in logged, "logged as an artifact of the parent run"
    assert not left, f"temporary files left behind: {left}"
    return path


@pytest.mark.slow
def test_page_is_self_contained_and_marked_synthetic(page_file):
    html = page_file.read_text()
    assert "://" not in html, "no URL of any scheme: nothing to fetch at view time"
    assert "<script src" not in html and "<link" not in html
    assert "SYNTHETIC DATA" in html
    assert ".jpg" not in html and "demo_0" not in html, "no file names or subject ids"


@pytest.mark.slow
@pytest.mark.chromium
def test_renders_in_headless_chromium(page_file):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    errors, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(page_file.as_uri())
        page.wait_for_selector("body[data-ready=true]", state="attached")
        rows = page.locator("#leaderboard tbody tr")
        assert rows.count() == 3
        assert page.locator("#per-sex tbody tr").count() == 6
        assert page.locator("#cohort tbody tr").count() == 12  # split x sex x label, the paper's Table I
        assert page.locator("#synthetic-banner").is_visible()
        assert page.locator("td.na").count() > 0, "not-estimable subgroups are shown as such"
        first = rows.nth(0).locator("td").nth(0).inner_text()
        header = page.locator("#leaderboard thead th").nth(3)
        header.click()  # sorted descending on the ranking metric
        header.click()  # then ascending: the order flips
        assert rows.nth(2).locator("td").nth(0).inner_text() == first
        curves = page.locator("img[alt='decision curves']")
        assert curves.is_visible() and curves.evaluate("i => i.naturalWidth") > 300, "the top models' decision curves"
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        docs_screenshot(page, "dashboard")  # the documentation's picture, once the checks above passed
        page.locator("h2", has_text="Decision curve").evaluate("h => h.scrollIntoView()")  # its own picture
        docs_screenshot(page, "dashboard-decision-curve")
        browser.close()
    assert errors == [], errors
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


def test_empty_experiment_gives_a_clear_message(tmp_path, capsys):
    from cushing.cli import main

    with env_vars({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'empty.db'}"}):
        rc = main(["dashboard", "--experiment", "nothing-here", "--out", str(tmp_path / "d.html")])
    err = capsys.readouterr().err
    assert rc == 1 and "no finished training runs" in err and "nothing-here" in err
    assert not (tmp_path / "d.html").exists()


@pytest.mark.slow
def test_refuses_runs_with_per_image_artifacts(tmp_path, demo_manifest):
    """A run holding per-image overlays but not marked allow_phi_artifacts cannot feed a dashboard."""
    import mlflow

    from cushing.workflows.dashboard import DashboardError, collect

    with env_vars({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'phi.db'}"}):
        with mlflow.start_run(experiment_id=mlflow.MlflowClient().create_experiment("phi")) as run:
            mlflow.set_tags({"model": "resnet18", "allow_phi_artifacts": "false"})
            mlflow.log_metric("test/f1", 0.5)
            (tmp_path / "overlays").mkdir()
            (tmp_path / "overlays" / "x.png").write_bytes(b"png")
            mlflow.log_artifacts(str(tmp_path / "overlays"), "cam/overlays")
        with pytest.raises(DashboardError, match="allow_phi_artifacts"):
            collect("phi")
        mlflow.MlflowClient().set_tag(run.info.run_id, "allow_phi_artifacts", "true")
        assert len(collect("phi")) == 1


def _run(run_id: str, **metrics: float):
    from cushing.tracking import RunRecord
    from cushing.workflows.dashboard import RunData

    record = RunRecord(run_id, run_id, "FINISHED", "0", 0, 1, {}, metrics, {})
    return RunData(record, None, {}, None)


@pytest.mark.parametrize("metric,order", [("val/f1", ["b", "c", "a", "nan"]), ("val/brier", ["a", "c", "b", "nan"]),
                                          ("val/loss", ["a", "c", "b", "nan"])])
def test_leaderboard_ranks_in_the_metric_direction(metric, order):
    from cushing.workflows.dashboard import rank_runs

    runs = [_run("a", **{metric: 0.10}), _run("b", **{metric: 0.30}), _run("nan", **{metric: float("nan")}),
            _run("c", **{metric: 0.20})]
    assert [rd.run.run_id for rd in rank_runs(runs, metric)] == order, "lower is better for losses and Brier"
