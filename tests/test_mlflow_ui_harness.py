"""Self-test of tests/mlflow_ui.py: a tiny store logged with the MLflow client (no training), the real MLflow UI
(`mlflow server`) on loopback, each page kind opened in Debian's headless Chromium."""
from __future__ import annotations

import math
import socket

import pytest

from tests import mlflow_ui as mu
from tests.conftest import env_vars

pytestmark = [pytest.mark.slow, pytest.mark.chromium]

REGISTERED = "ui-harness-model"
EPOCHS = 5


def _fill_store(uri: str, exp_id: str) -> dict:
    """Experiment "ui-harness": a parent run with children alpha and beta.

    Each child: ``epoch/val/f1`` and ``epoch/train/loss`` at steps 1..5; ``test/f1``, ``test/f1/female``,
    ``test/f1/male``, ``test/positives/male``, ``test/positives/female`` and ``test/auc/male`` (NaN) once at step 0.
    alpha also logs a pyfunc model: the step-0 metrics logged before it are linked to the model by ``log_model``;
    ``test/f1_calibrated`` is logged afterwards with ``model_id=``; also afterwards, without ``model_id``,
    ``late/step0`` (fluent API, step 0: linked too), ``late/step3`` (fluent, step 3) and ``late/client``
    (MlflowClient, step 0). The model is registered twice (versions 1 and 2, aliases champion and challenger),
    with a ``synthetic_data`` tag on the registered model and on version 1.
    """
    import mlflow

    class Constant(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return [0.5] * len(model_input)

    ids: dict = {"uri": uri, "exp_id": exp_id}
    with env_vars({"MLFLOW_TRACKING_URI": uri}):
        c = mlflow.MlflowClient()
        with mlflow.start_run(experiment_id=exp_id, run_name="sweep") as parent:
            for i, name in enumerate(["alpha", "beta"]):
                with mlflow.start_run(experiment_id=exp_id, run_name=name, nested=True) as run:
                    mlflow.set_tags({"synthetic_data": "true", "model": name})
                    for step in range(1, EPOCHS + 1):
                        mlflow.log_metrics({"epoch/val/f1": 0.5 + 0.05 * step + 0.01 * i,
                                            "epoch/train/loss": 1.0 / step}, step=step)
                    mlflow.log_metrics({"test/f1": 0.7 + 0.1 * i, "test/f1/female": 0.65 + 0.1 * i,
                                        "test/f1/male": 0.6, "test/positives/male": 7, "test/positives/female": 9,
                                        "test/auc/male": math.nan}, step=0)
                    ids[name] = run.info.run_id
                    if name == "alpha":
                        info = mlflow.pyfunc.log_model(name="model", python_model=Constant(),
                                                       pip_requirements=["mlflow"])
                        mlflow.log_metric("test/f1_calibrated", 0.72, step=0, model_id=info.model_id)
                        mlflow.log_metric("late/step0", 1.0, step=0)
                        mlflow.log_metric("late/step3", 1.0, step=3)
                        c.log_metric(run.info.run_id, "late/client", 1.0, step=0)
                        ids["model_id"] = info.model_id
        ids["parent"] = parent.info.run_id
        for _ in range(2):
            mlflow.register_model(f"models:/{ids['model_id']}", REGISTERED)
        c.set_registered_model_alias(REGISTERED, "champion", "1")
        c.set_registered_model_alias(REGISTERED, "challenger", "2")
        c.set_registered_model_tag(REGISTERED, "synthetic_data", "true")
        c.set_model_version_tag(REGISTERED, "1", "synthetic_data", "true")
    return ids


@pytest.fixture(scope="module")
def store_and_server(tmp_path_factory):
    """The store is filled while the server boots: creating the SQLite schema (the client's first call) and the
    server's start take most of the set-up time, and the server needs the schema to exist first."""
    import mlflow

    d = tmp_path_factory.mktemp("ui-store")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    exp_id = mlflow.MlflowClient(uri).create_experiment("ui-harness", artifact_location=(d / "artifacts").as_uri())
    with mu.mlflow_ui(uri, wait=False) as s:
        ids = _fill_store(uri, exp_id)
        s.wait_ready()
        yield ids, s
    assert s.proc.poll() is not None, "the server process is gone"
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", s.port)) != 0, "nothing listens on the port any more"


@pytest.fixture(scope="module")
def store(store_and_server):
    return store_and_server[0]


@pytest.fixture(scope="module")
def server(store_and_server):
    return store_and_server[1]


@pytest.fixture(scope="module")
def chromium():
    with mu.browser() as b:
        yield b


@pytest.fixture(scope="module")
def shared_page(server, chromium):
    """One page for the module: its HTTP cache keeps the 4 MB UI bundle between tests (a fresh context parses it
    again, seconds on a busy CPU). Every opener reloads the app, so tests do not see each other's data."""
    with mu.ui_page(server.url, browser_=chromium) as page:
        yield page


@pytest.fixture()
def ui(shared_page):
    shared_page.clear_errors()
    mark = shared_page.rest.mark()
    yield shared_page
    errors = shared_page.unexpected_errors(since=mark)
    assert errors == [], errors


def test_server_answers_on_loopback(server):
    assert server.url.startswith("http://127.0.0.1:")
    assert server.startup_seconds < 120


def test_run_page_lists_metrics_and_hides_nan(ui, store):
    view = mu.open_run(ui, None, store["exp_id"], store["alpha"])
    mu.screenshot(ui, "mlflow-ui-run")
    shown = view.data["metrics_table"]
    assert shown["test/f1"] == "0.7" and "test/f1/female" in shown
    assert shown["test/positives/male"] == "7", "a subgroup count is on the run page"
    assert view.data["metrics"]["test/auc/male"] is None, "GraphQL GetRun returns NaN as null"
    assert "test/auc/male" not in shown and "test/auc/male" not in view.text, "and the run page hides it"
    assert view.rest("graphql:GetRun") and view.rest("model-versions/search")


def test_run_charts_line_bar_sections_search(ui, store):
    view = mu.open_run_charts(ui, None, store["exp_id"], store["alpha"], wait_keys=["epoch/val/f1"])
    mu.screenshot(ui, "mlflow-ui-run-charts")
    hist = view.data["history"]["epoch/val/f1"]
    assert [p["step"] for p in hist] == list(range(1, EPOCHS + 1)), "one point per epoch, as fetched by the chart"
    cards = {(c["section"], c["title"]): c for c in view.data["cards"]}
    assert cards[("epoch/val", "epoch/val/f1")]["type"] == "line"
    assert cards[("epoch/val", "epoch/val/f1")]["markers"] == EPOCHS
    assert cards[("test/f1", "test/f1/female")]["type"] == "bar", "only step 0: a bar chart"
    sections = {s["name"]: s["count"] for s in view.data["sections"]}
    assert sections["test/f1"] == 2 and sections["test/positives"] == 2, "section = key up to its last '/'"
    assert "test/auc" not in sections, "an all-NaN metric gets no chart on the run page"
    # the chart search box is a case-insensitive regex over the keys: "male" matches female, "/male$" does not
    titles = sorted(c["title"] for c in mu.search_charts(ui, "/male$")["cards"])
    assert titles == ["test/f1/male", "test/positives/male"], titles
    assert "test/f1/female" in [c["title"] for c in mu.search_charts(ui, "male")["cards"]]


def test_metric_page_fetches_every_point(ui, store):
    view = mu.open_metric_chart(ui, None, store["exp_id"], [store["alpha"], store["beta"]], "epoch/val/f1")
    mu.screenshot(ui, "mlflow-ui-metric")
    for run in ("alpha", "beta"):
        points = view.data["history"][store[run]]["epoch/val/f1"]
        assert len(points) == EPOCHS and len({p["step"] for p in points}) == EPOCHS
    assert any(line.startswith("alpha") and "(step=5)" in line for line in view.data["summary"])


def test_compare_shows_metric_for_both_runs(ui, store):
    view = mu.open_compare(ui, None, store["exp_id"], [store["alpha"], store["beta"]],
                           find_metrics=["test/f1/female", "test/auc/male"])
    mu.screenshot(ui, "mlflow-ui-compare")
    assert view.data["run_names"] == ["alpha", "beta"]
    assert view.data["metric_rows"]["test/f1/female"] == ["0.65", "0.75"]
    assert view.data["metric_rows"]["test/auc/male"] == ["NaN", "NaN"], "the compare page does show NaN"
    assert all("test/f1/female" in r["metrics"] for r in view.data["runs"].values())


def test_registered_model_shows_aliases_and_tag(ui, store):
    view = mu.open_registered_model(ui, None, REGISTERED)
    mu.screenshot(ui, "mlflow-ui-registered-model")
    assert view.data["aliases"] == {"champion": "1", "challenger": "2"}
    assert view.data["aliases_shown"] == {"1": ["champion"], "2": ["challenger"]}
    assert view.data["tags"] == {"synthetic_data": "true"} == view.data["tags_shown"]
    assert view.data["version_tags_shown"] == {"1": {"synthetic_data": "true"}, "2": {}}


def test_model_version_page(ui, store):
    view = mu.open_model_version(ui, None, REGISTERED, 1)
    assert view.data["aliases"] == ["champion"] and view.data["tags"] == {"synthetic_data": "true"}
    assert "champion" in view.text and "synthetic_data" in view.text
    assert view.rest(f"logged-models/{store['model_id']}"), "the version page looks up its logged model"


def test_logged_model_shows_linked_metrics(ui, store):
    view = mu.open_logged_model(ui, None, store["exp_id"], store["model_id"])
    mu.screenshot(ui, "mlflow-ui-logged-model")
    metrics = view.data["metrics"]
    assert metrics["test/f1"] == 0.7, "logged at step 0 before log_model: linked by log_model"
    assert metrics["test/f1_calibrated"] == 0.72, "logged with model_id="
    # mlflow.log_metric(s) without model_id links to the run's logged models *at the same step* (log_model's step,
    # 0 by default); MlflowClient.log_metric does not link
    assert metrics["late/step0"] == 1.0
    assert "late/step3" not in metrics and "late/client" not in metrics
    assert metrics["test/auc/male"] == 0.0, "NaN comes back as 0.0 for a logged model (and is shown as 0)"
    assert "test/f1" in [r[0] for r in view.data["metrics_table"]]
    listing = mu.open_experiment_models(ui, None, store["exp_id"])
    assert listing.data["models"][store["model_id"]]["metrics"]["test/f1"] == 0.7


def test_experiment_runs_chart_view(ui, store):
    view = mu.open_experiment_runs(ui, None, store["exp_id"], charts=True)
    mu.screenshot(ui, "mlflow-ui-runs-charts")
    assert {r["name"] for r in view.data["runs"].values()} == {"sweep", "alpha", "beta"}
    assert "alpha" in view.text and "beta" in view.text, "child runs are listed once their parent row is expanded"
    sections = {s["name"] for s in mu.search_charts(ui, "^epoch/val/f1$")["sections"]}
    assert sections == {"epoch/val"}
