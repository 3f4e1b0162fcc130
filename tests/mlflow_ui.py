"""A harness for tests that drive the real MLflow 3.17 UI in headless Chromium (Debian's, loopback only).

Three layers:

* :func:`mlflow_ui` starts ``mlflow server`` for a backend store on a free 127.0.0.1 port, waits for ``/health``
  and stops the whole process group afterwards (no stray uvicorn workers).
* :func:`browser` / :func:`ui_page` give a Playwright page (Debian's ``/usr/bin/chromium``; Playwright's own
  browser download is not needed) that records every JSON call the UI makes (``/ajax-api/...`` REST calls and
  ``/graphql`` queries) in :class:`RestRecorder`, and collects console errors.
* ``open_*`` functions navigate to one kind of page (hash routes of MLflow 3.17, see ``ROUTES``), wait until the
  page has fetched and shown what it needs, and return a :class:`PageView`: the visible text, the REST payloads
  the page fetched, and page-specific data parsed from both.

Typical use (``base=None`` in the openers means "the page's server")::

    from tests import mlflow_ui as mu

    with mu.mlflow_ui(uri) as server, mu.browser() as b, mu.ui_page(server.url, browser_=b) as ui:
        view = mu.open_run_charts(ui, None, exp_id, run_id, search="^epoch/val/f1$", wait_keys=["epoch/val/f1"])
        assert [p["step"] for p in view.data["history"]["epoch/val/f1"]] == [1, 2, 3]
        assert view.data["cards"][0]["type"] == "line"
        mu.screenshot(ui, "mlflow-ui-val-f1")        # test-artifacts/mlflow-ui-val-f1.png
        assert ui.unexpected_errors() == []

Assertions are most robust on the REST payloads the UI itself fetched (what the page was given to draw) plus a
plain "this text is on the page" check; DOM structure (CSS classes, Plotly layers) is used only where noted.
Known UI behaviours that shape the helpers (MLflow 3.17.2):

* The run page gets its data from GraphQL (``POST /graphql``, operation ``GetRun``), where a NaN metric comes back
  as ``value: null``; the page then hides it (overview table and charts). REST ``runs/search`` (experiment, compare
  pages) returns NaN as the string ``"NaN"`` and the compare page shows ``NaN``.
* Metric charts are rendered lazily: a chart card only mounts (and only fetches its history) when it is inside
  the viewport. Use a tall viewport (default 1600x2400) or the chart search box to bring a chart into view.
* The chart search box is a case-insensitive JavaScript regular expression over the metric key (an invalid regex
  filters nothing): ``male`` also matches ``female``; ``/male$`` does not.
* A metric gets a line chart if, in any displayed run, its latest value has ``step >= 1``; otherwise a bar chart.
  Section = the key up to its last ``/`` (``test/f1/female`` -> section ``test/f1``, heading ``female``); keys without
  ``/`` go to "Model metrics"; ``system/...`` to "System metrics".
* ``/ajax-api/2.0/mlflow/users/current`` answers 404 on every page of a server without auth: a harmless console
  error, filtered by :meth:`UIPage.unexpected_errors`.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from cushing.ops.stack import free_port

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("CUSHING_TEST_ARTIFACTS", ROOT / "test-artifacts"))
# The documentation's pictures (docs/assets/screenshots/NAME.png): the tests that check a page also keep the shot
# the docs show, so a changed page changes the picture. CUSHING_DOCS_SCREENSHOTS=other/folder moves them; an empty
# value keeps the tests from writing them.
DOCS_SHOTS = os.environ.get("CUSHING_DOCS_SCREENSHOTS", str(ROOT / "docs" / "assets" / "screenshots"))
DOCS_VIEWPORT = {"width": 1280, "height": 820}
CHROMIUM = os.environ.get("CUSHING_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1600, "height": 2400}

# localStorage keys of the 3.17 bundle (`${key}_v${version}`, JSON values): keep the MLflow Assistant side panel
# closed (it takes a third of the width and opens by itself on first load), the UI's telemetry off, and the
# sidebar in "Model training" mode (3.17 starts in "GenAI" mode, where the logged-models tab is "Agent versions"
# and a run page highlights "Evaluation runs").
_INIT_SCRIPT = """try {
  localStorage.setItem('mlflow.workflowType_v1', '"machine_learning"');
  localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
  localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
  localStorage.setItem('mlflow.settings.telemetry.enabled_v1', 'false');
  localStorage.setItem('mlflow.telemetry.info.alert.dismissed_v1', 'true');
} catch (e) {}"""

# Hash routes of the MLflow 3.17 UI (createHashRouter; from RoutePaths in the bundle's main.*.js).
ROUTES = {
    "experiment_runs": "#/experiments/{exp_id}/runs",                    # ?compareRunsMode=CHART for charts
    "run": "#/experiments/{exp_id}/runs/{run_id}",                       # overview tab
    "run_tab": "#/experiments/{exp_id}/runs/{run_id}/{tab}",             # model-metrics|system-metrics|artifacts|traces
    "run_direct": "#/runs/{run_id}",                                     # redirects to the run route (checked)
    "metric": "#/metric?runs=...&metric=...&experiments=...&plot_metric_keys=...",  # see metric_route()
    "compare_runs": "#/compare-runs?runs=[...]&experiments=[...]",       # see compare_route()
    "experiment_models": "#/experiments/{exp_id}/models",                # MLflow 3 logged models ("Models" tab)
    "logged_model": "#/experiments/{exp_id}/models/{model_id}",
    "logged_model_tab": "#/experiments/{exp_id}/models/{model_id}/{tab}",  # artifacts|traces
    "registered_models": "#/models",                                     # list: aliases, tags per model
    "registered_model": "#/models/{name}",
    "model_version": "#/models/{name}/versions/{version}",
}

# Console errors that are not failures: (substring of the message, substring of its source URL)
_BENIGN_ERRORS = (
    # no auth app: the UI asks for the current user on every page and gets a 404
    ("status of 404", "/ajax-api/2.0/mlflow/users/current"),
    # charts resizing while they mount; the browser reports it, nothing breaks
    ("ResizeObserver loop", ""),
)


class UIHarnessError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------------------------
# the server

@dataclass
class MlflowUI:
    """A running ``mlflow server``; ``url`` has no trailing slash. ``startup_seconds`` (from the start of the
    process until ``/health`` answered) is None until :meth:`wait_ready` has seen it up."""

    url: str
    port: int
    backend_store_uri: str
    proc: subprocess.Popen
    log: Path
    startup_seconds: float | None = None
    started_at: float = field(default_factory=time.monotonic)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 120.0) -> "MlflowUI":
        """Block until ``/health`` answers 200 (counting from the process start); raise with the log's tail if the
        process exits or ``timeout`` passes."""
        while self.startup_seconds is None:
            if self.proc.poll() is not None or time.monotonic() - self.started_at > timeout:
                raise UIHarnessError(f"mlflow server did not answer {self.url}/health within {timeout:.0f}s (exit code "
                                     f"{self.proc.poll()}); log {self.log}:\n{self.log_tail()}")
            if _health(self.url):
                self.startup_seconds = time.monotonic() - self.started_at
            else:
                time.sleep(0.25)
        return self


def _health(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the server's process group (uvicorn and its workers), then SIGKILL what is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    # the group may outlive its leader (workers); make sure nothing of it stays
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


@contextlib.contextmanager
def mlflow_ui(backend_store_uri: str, *, registry_store_uri: str | None = None, port: int = 0,
              timeout: float = 120.0, wait: bool = True, workdir: Path | None = None,
              extra_args: list[str] | None = None, env: dict[str, str] | None = None) -> Iterator[MlflowUI]:
    """Start ``mlflow server`` (the same app as ``mlflow ui``) on 127.0.0.1 for ``backend_store_uri``.

    One uvicorn worker, job execution off (otherwise 3.17 also starts a job runner with seven huey consumers and
    takes about twice as long to answer), telemetry off, artifacts proxied from a throwaway folder (only used by
    experiments created through the server; runs logged straight to the store keep their own artifact locations and
    are read from there). The process runs in its own session and its whole group is stopped on exit. The log is
    ``<workdir>/mlflow-ui.log``; its tail is in the error raised when the server does not come up.

    ``wait=False`` yields as soon as the process is started, so that a test can fill the store while the server
    boots (the store's schema must exist first: let the client create it before starting the server); call
    ``wait_ready()`` before opening pages.
    """
    own_dir = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="mlflow-ui-")) if own_dir else Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    log = wd / "mlflow-ui.log"
    penv = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true", "PYTHONUNBUFFERED": "1", **(env or {})}
    penv.pop("MLFLOW_TRACKING_URI", None)
    attempts = 1 if (port or not wait) else 3  # a probed free port can be taken before the server binds it: retry
    server = None
    try:
        for attempt in range(attempts):
            p = port or free_port()
            cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
                   "--host", "127.0.0.1", "--port", str(p), "--workers", "1",
                   "--artifacts-destination", str(wd / "mlartifacts"), *(extra_args or [])]
            if registry_store_uri:
                cmd += ["--registry-store-uri", registry_store_uri]
            with open(log, "ab") as fh:
                proc = subprocess.Popen(cmd, cwd=wd, env=penv, stdout=fh, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            server = MlflowUI(url=f"http://127.0.0.1:{p}", port=p, backend_store_uri=backend_store_uri, proc=proc,
                              log=log)
            if not wait:
                break
            try:
                server.wait_ready(timeout)
                break
            except UIHarnessError:
                _stop(proc)
                if attempt + 1 < attempts and "address already in use" in server.log_tail().lower():
                    continue
                raise
        yield server
    finally:
        if server is not None:
            _stop(server.proc)
        if own_dir:
            shutil.rmtree(wd, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# the browser and the REST recorder

@dataclass
class RestCall:
    """One JSON call the UI made. ``endpoint`` is the path without ``/ajax-api/2.0/mlflow/`` (or 3.0), e.g.
    ``runs/search``, ``metrics/get-history``, ``logged-models/m-123``; GraphQL calls are ``graphql:<operation>``."""

    method: str
    url: str
    path: str
    query: dict[str, list[str]]
    status: int
    request: Any
    body: Any
    t: float

    @property
    def endpoint(self) -> str:
        if self.path.endswith("/graphql"):
            op = self.request.get("operationName") if isinstance(self.request, dict) else None
            return f"graphql:{op}"
        m = re.search(r"/ajax-api/\d\.\d/mlflow/(.*)$", self.path)
        return m.group(1) if m else self.path.lstrip("/")

    def q(self, name: str) -> str | None:
        """The first value of a query parameter."""
        v = self.query.get(name)
        return v[0] if v else None


class RestRecorder:
    """Every JSON response of ``/ajax-api/...``, ``/graphql`` and ``/model-versions/...`` seen by a page."""

    def __init__(self) -> None:
        self.calls: list[RestCall] = []
        self.in_flight = 0
        self._t0 = time.monotonic()

    # page.on handlers
    def _on_request(self, req) -> None:
        if self._wanted(req.url):
            self.in_flight += 1

    def _on_request_done(self, req) -> None:
        if self._wanted(req.url):
            self.in_flight = max(0, self.in_flight - 1)

    def _on_response(self, resp) -> None:
        if not self._wanted(resp.url):
            return
        req = resp.request
        try:
            request = json.loads(req.post_data) if req.post_data else None
        except (ValueError, TypeError):
            request = req.post_data
        try:
            body = resp.json()
        except Exception:  # not JSON, or the page navigated away before the body could be read
            body = None
        u = urllib.parse.urlsplit(resp.url)
        self.calls.append(RestCall(method=req.method, url=resp.url, path=u.path, query=urllib.parse.parse_qs(u.query),
                                   status=resp.status, request=request, body=body, t=time.monotonic() - self._t0))

    @staticmethod
    def _wanted(url: str) -> bool:
        path = urllib.parse.urlsplit(url).path
        return "/ajax-api/" in path or path.endswith("/graphql") or path.startswith("/model-versions/")

    # queries
    def mark(self) -> int:
        """A position; ``find(..., since=mark)`` only looks at calls made after it."""
        return len(self.calls)

    def find(self, endpoint: str, where: Callable[[RestCall], bool] | None = None, since: int = 0) -> list[RestCall]:
        """Calls whose ``endpoint`` matches (exactly, or as an fnmatch pattern such as ``logged-models/*``)."""
        out = []
        for c in self.calls[since:]:
            ep = c.endpoint
            if (ep == endpoint or fnmatch.fnmatchcase(ep, endpoint)) and (where is None or where(c)):
                out.append(c)
        return out

    def last(self, endpoint: str, where: Callable[[RestCall], bool] | None = None, since: int = 0) -> RestCall | None:
        found = self.find(endpoint, where, since)
        return found[-1] if found else None

    def by_path(self, since: int = 0) -> dict[str, Any]:
        """URL path (with query string) -> parsed JSON body of the last such response."""
        out = {}
        for c in self.calls[since:]:
            u = urllib.parse.urlsplit(c.url)
            key = u.path + (f"?{u.query}" if u.query else "")
            if c.endpoint.startswith("graphql:"):
                key = f"{u.path}#{c.endpoint.split(':', 1)[1]}"
            out[key] = c.body
        return out

    def endpoints(self, since: int = 0) -> list[str]:
        return [f"{c.method} {c.endpoint}" for c in self.calls[since:]]


class UIPage:
    """A Playwright ``Page`` (every attribute not defined here is the page's own) plus ``rest`` (the recorder),
    ``console_errors`` and ``base`` (the server URL, for relative routes)."""

    def __init__(self, page, base: str | None) -> None:
        self.page = page
        self.base = base.rstrip("/") if base else None
        self.rest = RestRecorder()
        self.console_errors: list[str] = []
        page.on("request", self.rest._on_request)
        page.on("requestfinished", self.rest._on_request_done)
        page.on("requestfailed", self.rest._on_request_done)
        page.on("response", self.rest._on_response)
        self._console_sources: list[str] = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda e: self._add_error(f"pageerror: {e}", ""))

    def _on_console(self, msg) -> None:
        if msg.type == "error":
            try:
                url = (msg.location or {}).get("url") or ""
            except Exception:
                url = ""
            self._add_error(msg.text, url)

    def _add_error(self, text: str, url: str) -> None:
        self.console_errors.append(text)
        self._console_sources.append(url)

    def __getattr__(self, name):
        return getattr(self.page, name)

    def unexpected_errors(self, since: int = 0) -> list[str]:
        """Console errors and uncaught exceptions, less the known harmless ones (the 404 of ``users/current``,
        ResizeObserver loop notices), plus failed JSON calls (HTTP >= 400) recorded after ``since``."""
        bad = [c for c in self.rest.calls[since:] if c.status >= 400 and not c.endpoint.startswith("users/current")]
        sources = self._console_sources + [""] * (len(self.console_errors) - len(self._console_sources))
        console = [e for e, u in zip(self.console_errors, sources)
                   if not any(t in e and s in u for t, s in _BENIGN_ERRORS)]
        return console + [f"HTTP {c.status} {c.method} {c.endpoint}" for c in bad]

    def clear_errors(self) -> None:
        self.console_errors.clear()
        self._console_sources.clear()

    def goto(self, route: str, **kw):
        """Navigate to an absolute URL or to a route relative to ``base`` (``#/models/x`` or ``/#/models/x``)."""
        return self.page.goto(route_url(self.base, route) if not route.startswith("http") else route, **kw)


@contextlib.contextmanager
def browser(headless: bool = True) -> Iterator[Any]:
    """A Playwright Chromium browser (Debian's ``/usr/bin/chromium``), closed on exit."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise UIHarnessError(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=headless)
        try:
            yield b
        finally:
            b.close()


@contextlib.contextmanager
def ui_page(base: str | None = None, *, browser_=None, viewport: dict | None = None,
            default_timeout_ms: int = 30_000) -> Iterator[UIPage]:
    """A fresh browser context and page with the REST recorder attached. Pass ``browser_`` (from
    :func:`browser`) to share one Chromium between pages; otherwise one is started and closed here."""
    with contextlib.ExitStack() as stack:
        b = browser_ or stack.enter_context(browser())
        ctx = b.new_context(viewport=viewport or VIEWPORT, locale="en-US", timezone_id="UTC")
        stack.callback(ctx.close)
        ctx.add_init_script(_INIT_SCRIPT)
        ctx.set_default_timeout(default_timeout_ms)
        page = ctx.new_page()
        yield UIPage(page, base)


# ----------------------------------------------------------------------------------------------------------------
# waiting and screenshots

def route_url(base: str | None, route: str) -> str:
    if base is None:
        raise UIHarnessError("no base URL: pass the server URL to ui_page() or an absolute URL")
    route = route[1:] if route.startswith("/#") else route
    if not route.startswith("#"):
        route = "#" + (route if route.startswith("/") else "/" + route)
    return f"{base.rstrip('/')}/{route}"


def wait_for_text(page, text: str | re.Pattern, timeout: float = 30.0, in_selector: str = "body") -> None:
    """Wait until ``text`` (substring, or a compiled regex) is in the rendered text of ``in_selector``."""
    if isinstance(text, re.Pattern):
        expr = ("([s, src, fl]) => { const e = document.querySelector(s);"
                " return !!e && new RegExp(src, fl).test(e.innerText); }")
        arg = [in_selector, text.pattern, "i" if text.flags & re.I else ""]
    else:
        expr = "([s, t]) => { const e = document.querySelector(s); return !!e && e.innerText.includes(t); }"
        arg = [in_selector, text]
    try:
        _pw(page).wait_for_function(expr, arg=arg, timeout=timeout * 1000, polling=100)
    except Exception as e:
        raise UIHarnessError(f"text {text!r} did not appear within {timeout:.0f}s on {_pw(page).url}: {e}") from None


def wait_for_rest(ui: UIPage, endpoint: str, where: Callable[[RestCall], bool] | None = None, since: int = 0,
                  timeout: float = 30.0, ok_only: bool = True) -> RestCall:
    """Wait until the page has received a response for ``endpoint`` (see :meth:`RestRecorder.find`)."""
    deadline = time.monotonic() + timeout
    while True:
        found = ui.rest.find(endpoint, where, since)
        if ok_only:
            found = [c for c in found if c.status < 400]
        if found:
            return found[-1]
        if time.monotonic() > deadline:
            raise UIHarnessError(f"no {endpoint} response within {timeout:.0f}s on {ui.page.url}; saw "
                                 f"{ui.rest.endpoints(since)}")
        ui.page.wait_for_timeout(100)  # lets Playwright deliver events


def settle(ui: UIPage, quiet: float = 0.7, timeout: float = 20.0) -> None:
    """Wait until no recorded call is in flight and none arrived for ``quiet`` seconds. (``networkidle`` never
    comes on some 3.17 pages, so it is not used.)"""
    deadline = time.monotonic() + timeout
    n, since = len(ui.rest.calls), time.monotonic()
    while time.monotonic() < deadline:
        ui.page.wait_for_timeout(100)
        if len(ui.rest.calls) != n or ui.rest.in_flight:
            n, since = len(ui.rest.calls), time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def docs_screenshot(page, name: str, *, viewport: dict | None = None, wait_ms: int = 800) -> Path | None:
    """Save the documentation's picture ``docs/assets/screenshots/<name>.png`` (see ``DOCS_SHOTS``): the viewport
    only, at a reading size (``DOCS_VIEWPORT``), put back afterwards. Call it after the test's assertions, so a
    picture in the docs is always of a page that passed. Pages must show the synthetic demo cohort or aggregates
    only: never a real face or a file name."""
    if not DOCS_SHOTS:
        return None
    pw = _pw(page)
    folder = Path(DOCS_SHOTS)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name if name.endswith(".png") else f"{name}.png")
    size = pw.viewport_size
    pw.set_viewport_size(viewport or DOCS_VIEWPORT)
    try:
        pw.wait_for_timeout(wait_ms)  # the UI lays itself out again for the new width
        pw.screenshot(path=str(path))
    finally:
        if size:
            pw.set_viewport_size(size)
    return path


def screenshot(page, name: str, *, full: bool = True, max_height: int = 8000) -> Path:
    """Save ``test-artifacts/<name>.png``. The 3.17 layout scrolls inside a pane, so Playwright's ``full_page``
    sees only the viewport; with ``full`` the viewport is stretched to the tallest scroll pane for the shot.
    (:func:`docs_screenshot` keeps the documentation's copy.)"""
    pw = _pw(page)
    path = artifacts_dir() / (name if name.endswith(".png") else f"{name}.png")
    size = pw.viewport_size
    grow = 0
    if full and size:
        grow = pw.evaluate("""() => { let g = 0; for (const e of document.querySelectorAll('*')) {
            const s = getComputedStyle(e).overflowY;
            if ((s === 'auto' || s === 'scroll') && e.clientHeight > 200)
              g = Math.max(g, e.scrollHeight - e.clientHeight); }
            return g; }""")
    if grow > 0:
        pw.set_viewport_size({"width": size["width"], "height": min(max_height, size["height"] + int(grow))})
        pw.wait_for_timeout(500)
    try:
        pw.screenshot(path=str(path))
    finally:
        if grow > 0:
            pw.set_viewport_size(size)
    return path


def read_tables(page) -> list[list[list[str]]]:
    """Every ARIA table on the page as rows of cell texts (header row included). Good for the run page's
    Metrics/Parameters tables, the logged model's Metrics table, the registered model's tags and versions and the
    compare page's run/param/tag tables (not its metrics, which are a virtualised grid)."""
    return _pw(page).evaluate("""() => {
      const cellSel = '[role=cell], [role=columnheader], [role=gridcell], [role=rowheader], th, td';
      const tables = Array.from(document.querySelectorAll('[role=table], table'))
        .filter(t => !t.parentElement.closest('[role=table], table'));
      return tables.map(t => Array.from(t.querySelectorAll('[role=row], tr'))
        .map(r => Array.from(r.querySelectorAll(cellSel)).map(c => c.innerText.trim())));
    }""")


def table_with_header(page, first_header: str) -> list[list[str]] | None:
    """The table whose first row starts with ``first_header`` (e.g. "Metric"), without that header row."""
    for t in read_tables(page):
        if t and t[0] and t[0][0] == first_header:
            return t[1:]
    return None


def _pw(page):
    return page.page if isinstance(page, UIPage) else page


# ----------------------------------------------------------------------------------------------------------------
# page openers

@dataclass
class PageView:
    """What one page showed: ``text`` (``document.body.innerText`` once ready), ``calls`` (the JSON calls made
    since navigating), ``seconds`` (navigation until ready) and ``data`` (page-specific, see each opener)."""

    kind: str
    url: str
    text: str
    calls: list[RestCall]
    seconds: float
    data: dict = field(default_factory=dict)

    def rest(self, endpoint: str, where: Callable[[RestCall], bool] | None = None) -> list[RestCall]:
        return [c for c in self.calls if (c.endpoint == endpoint or fnmatch.fnmatchcase(c.endpoint, endpoint))
                and (where is None or where(c))]

    def shows(self, text: str) -> bool:
        return text in self.text


def _metrics_from(entries) -> dict[str, float | None]:
    """REST/GraphQL metric lists -> {key: value}; NaN ("NaN" in REST, null in GraphQL) -> None."""
    out = {}
    for m in entries or []:
        v = m.get("value")
        out[m["key"]] = None if v is None or v == "NaN" or (isinstance(v, float) and v != v) else float(v)
    return out


def _points(entries) -> list[dict]:
    return [{"step": int(m.get("step", 0)), "value": m.get("value"), "timestamp": int(m.get("timestamp", 0))}
            for m in entries or []]


def _open(ui: UIPage, route: str):
    """A full load of the app at ``route``: going through about:blank makes every page fetch its data again (a
    hash change inside the single-page app would reuse what an earlier page fetched, and record no calls)."""
    ui.page.goto("about:blank")
    mark = ui.rest.mark()
    t0 = time.monotonic()
    ui.goto(route)
    return mark, t0


def _finish(ui: UIPage, kind: str, mark: int, t0: float, data: dict, settle_s: float = 0.5) -> PageView:
    settle(ui, quiet=settle_s)
    return PageView(kind=kind, url=ui.page.url, text=ui.page.inner_text("body"), calls=ui.rest.calls[mark:],
                    seconds=time.monotonic() - t0, data=data)


def open_run(ui: UIPage, base: str | None, exp_id: str, run_id: str, timeout: float = 30.0) -> PageView:
    """The run page, Overview tab (``#/experiments/E/runs/R``).

    Calls: ``graphql:GetRun`` (the run: metrics as latest values, params, tags; NaN -> null), ``runs/search``
    (experiment runs, and children of this run), ``model-versions/search?filter=run_id='R'``,
    ``logged-models/search`` (the run's logged models, only if it has any).

    ``data``: ``metrics`` {key: latest value or None for NaN} from GetRun; ``metrics_table`` {key: shown text}
    and ``params_table`` from the page's "Metric"/"Parameter" tables (NaN metrics are absent there); ``tags``.
    """
    ui.base = base or ui.base
    mark, t0 = _open(ui, f"#/experiments/{exp_id}/runs/{run_id}")
    call = wait_for_rest(ui, "graphql:GetRun", lambda c: run_id in json.dumps(c.request), since=mark, timeout=timeout)
    run = ((call.body or {}).get("data") or {}).get("mlflowGetRun", {}).get("run") or {}
    rdata = run.get("data") or {}
    wait_for_text(ui, "Metrics (", timeout=timeout)
    metrics_rows = table_with_header(ui, "Metric") or []
    params_rows = table_with_header(ui, "Parameter") or []
    data = {"metrics": _metrics_from(rdata.get("metrics")),
            "steps": {m["key"]: int(m.get("step") or 0) for m in rdata.get("metrics") or []},
            "params": {p["key"]: p["value"] for p in rdata.get("params") or []},
            "tags": {t["key"]: t["value"] for t in rdata.get("tags") or []},
            "metrics_table": {r[0]: r[1] for r in metrics_rows if len(r) >= 2},
            "params_table": {r[0]: r[1] for r in params_rows if len(r) >= 2}}
    return _finish(ui, "run", mark, t0, data)


# scroll every scrollable pane: arg 0 = to the top; 1 = one viewport further (returns whether anything moved)
_SCROLL_PANES_JS = """(step) => { let moved = false;
  for (const e of document.querySelectorAll('*')) {
    const s = getComputedStyle(e).overflowY;
    if (!(s === 'auto' || s === 'scroll') || e.scrollHeight <= e.clientHeight + 2 || e.clientHeight < 200) continue;
    const before = e.scrollTop;
    e.scrollTop = step === 0 ? 0 : before + e.clientHeight * 0.8;
    if (e.scrollTop !== before && step !== 0) moved = true; }
  if (step !== 0 && !moved) {
    const b = window.scrollY; window.scrollBy(0, window.innerHeight * 0.8); moved = window.scrollY !== b; }
  return moved; }"""


def _section_cards(ui: UIPage) -> tuple[list[dict], list[dict]]:
    return ui.page.evaluate("""() => {
      const sections = [], cards = [];
      const grid = (h) => { let e = h; for (let i = 0; i < 8 && e; i++, e = e.parentElement) {
          const g = e.querySelector('[data-testid=draggable-chart-cards-grid]'); if (g) return g; } return null; };
      for (const h of document.querySelectorAll('[data-testid=experiment-view-compare-runs-section-header]')) {
        const m = h.innerText.replace(/\\s+/g, ' ').trim().match(/^(.*?)\\s*\\((\\d+)\\)/);
        if (m) sections.push({name: m[1].trim(), count: Number(m[2])});
      }
      for (const c of document.querySelectorAll('[data-testid=experiment-view-compare-runs-card]')) {
        const t = c.querySelector('h4[title], [title]');
        let sec = null, e = c;
        while (e && !sec) { e = e.parentElement; if (!e) break;
          const h = e.querySelector(':scope > * [data-testid=experiment-view-compare-runs-section-header]');
          if (h) sec = h.innerText.replace(/\\s+/g, ' ').trim().replace(/\\s*\\(\\d+\\).*$/, ''); }
        const bars = c.querySelectorAll('.barlayer .point').length;
        const lines = c.querySelectorAll('.scatterlayer .trace').length;
        cards.push({title: t ? (t.getAttribute('title') || t.innerText) : null, section: sec,
                    type: bars ? 'bar' : (lines ? 'line' : (c.querySelector('.js-plotly-plot') ? 'other' : 'empty')),
                    markers: c.querySelectorAll('.scatterlayer .points path').length, bars: bars,
                    text: c.innerText.replace(/\\s+/g, ' ').trim()});
      }
      return [sections, cards]; }""")


def _collect_cards(ui: UIPage, scroll: bool, timeout: float) -> tuple[list[dict], list[dict]]:
    """Sections and cards of a charts pane. Cards mount lazily (only inside the viewport): with ``scroll`` the pane
    is scrolled through once so that every card is drawn (and every line chart fetches its history)."""
    seen: dict[tuple, dict] = {}
    deadline = time.monotonic() + timeout
    if scroll:
        ui.page.evaluate(_SCROLL_PANES_JS, 0)
    drawing_since = None
    while time.monotonic() < deadline:
        ui.page.wait_for_timeout(250)
        sections, cards = _section_cards(ui)
        for c in cards:
            if c["type"] != "empty":
                seen[(c["section"], c["title"])] = c
        if not cards and ui.page.get_by_text("No metric charts").count():
            break
        if any(c["type"] == "empty" for c in cards):
            drawing_since = drawing_since or time.monotonic()
            if time.monotonic() - drawing_since < 5:
                continue  # still drawing
        drawing_since = None
        if not scroll or not ui.page.evaluate(_SCROLL_PANES_JS, 1):
            break
    sections, cards = _section_cards(ui)
    for c in cards:
        if c["type"] != "empty":
            seen[(c["section"], c["title"])] = c
    return sections, list(seen.values())


def open_run_charts(ui: UIPage, base: str | None, exp_id: str, run_id: str, search: str | None = None,
                    wait_keys: list[str] | None = None, scroll: bool | None = None, timeout: float = 60.0) -> PageView:
    """The run page's "Model metrics" tab (``#/experiments/E/runs/R/model-metrics``), optionally filtered with the
    chart search box (a case-insensitive regex over metric keys, e.g. ``^epoch/val/f1$`` or ``/male$``).

    Calls: ``graphql:GetRun`` (latest values: decide the chart type and the sections), then for every *line* chart
    that is inside the viewport ``metrics/get-history-bulk-interval?run_ids=R&metric_key=K&max_results=320`` (the
    points drawn; bar charts use the latest value and fetch nothing). The tab's "Auto-refresh" is on by default,
    so the page keeps polling (one reason ``networkidle`` is useless here).

    ``data``: ``sections`` [{name, count}] and ``cards`` [{title (the full metric key), section, type 'line'|'bar',
    markers (Plotly point markers drawn), bars, text}] from the DOM (the visible card title is the key's last
    segment; ``type`` comes from Plotly's bar/scatter layers); ``history`` {key: [{step, value, timestamp}]} from the
    bulk-interval calls for this run; ``latest`` {key: value or None for NaN} and ``latest_steps`` from GetRun.
    ``wait_keys``: metric keys whose history must have arrived before returning (defaults to none).
    ``scroll``: scroll the chart pane to the end so that every card mounts (and every line chart fetches); by
    default only without ``search``. It is slow with many metrics (a demo-sweep child run, ~180 charts: ~40 s on
    2 busy cores), so prefer a ``search`` that selects what the test needs.
    Change the filter afterwards without reloading with :func:`search_charts`.
    """
    ui.base = base or ui.base
    mark, t0 = _open(ui, f"#/experiments/{exp_id}/runs/{run_id}/model-metrics")
    call = wait_for_rest(ui, "graphql:GetRun", lambda c: run_id in json.dumps(c.request), since=mark, timeout=timeout)
    rdata = (((call.body or {}).get("data") or {}).get("mlflowGetRun", {}).get("run") or {}).get("data") or {}
    _set_chart_search(ui, search, timeout)
    for key in wait_keys or []:
        wait_for_rest(ui, "metrics/get-history-bulk-interval", lambda c, k=key: c.q("metric_key") == k, since=mark,
                      timeout=timeout)
    sections, cards = _collect_cards(ui, (not search) if scroll is None else scroll, timeout)
    view = _finish(ui, "run_charts", mark, t0, {})
    history: dict[str, list[dict]] = {}
    for c in view.rest("metrics/get-history-bulk-interval"):
        if run_id in c.query.get("run_ids", []):
            history[c.q("metric_key")] = _points([m for m in (c.body or {}).get("metrics", [])
                                                   if m.get("run_id", run_id) == run_id])
    view.data.update(sections=sections, cards=cards, history=history, latest=_metrics_from(rdata.get("metrics")),
                     latest_steps={m["key"]: int(m.get("step") or 0) for m in rdata.get("metrics") or []})
    return view


def _set_chart_search(ui: UIPage, search: str | None, timeout: float) -> None:
    box = ui.page.get_by_placeholder("Search metric charts")
    box.wait_for(timeout=timeout * 1000)
    # the UI keeps the chart state (search text included) per run in localStorage: always set the box
    if box.input_value() != (search or ""):
        box.fill(search or "")
        ui.page.wait_for_timeout(300)


def search_charts(ui: UIPage, search: str | None, scroll: bool = True, timeout: float = 30.0) -> dict:
    """On an open charts pane (run page's Model metrics tab, experiment chart view), type ``search`` into "Search
    metric charts" and return {"sections", "cards"} as :func:`open_run_charts` reads them."""
    _set_chart_search(ui, search, timeout)
    sections, cards = _collect_cards(ui, scroll, timeout)
    return {"sections": sections, "cards": cards}


def metric_route(exp_id: str, run_ids: list[str], metric_key: str, plot_keys: list[str] | None = None,
                 x_axis: str = "step") -> str:
    """``#/metric?...`` as the UI builds it (Routes.getMetricPageRoute). Every parameter is required: without
    ``plot_metric_keys`` etc. 3.17 shows "Error while loading metric page: "undefined" is not valid JSON"."""
    q = urllib.parse.quote
    return ("#/metric?runs=" + json.dumps(run_ids, separators=(",", ":"))
            + "&metric=" + q(json.dumps(metric_key), safe="")
            + "&experiments=" + json.dumps([exp_id], separators=(",", ":"))
            + "&plot_metric_keys=" + q(json.dumps(plot_keys or [metric_key]), safe="")
            + f"&plot_layout={{}}&x_axis={x_axis}&y_axis_scale=linear&line_smoothness=1&show_point=true"
            + "&deselected_curves=[]&last_linear_y_axis_range=[]")


def open_metric_chart(ui: UIPage, base: str | None, exp_id: str, run_ids: list[str] | str, metric_key: str,
                      plot_keys: list[str] | None = None, timeout: float = 30.0) -> PageView:
    """The metric page (``#/metric?...``, what "Plot chart" links on the compare page open).

    Calls: ``runs/get`` per run, ``experiments/get``, ``metrics/get-history?run_uuid=R&metric_key=K&max_results=25000``
    per run and key (the full history), and ``metrics/get-history-bulk-interval`` (sampled, max 320 points).

    ``data``: ``history`` {run_id: {key: [{step, value, timestamp}]}} from ``metrics/get-history``; ``summary``: the
    Latest/Min/Max table rows as shown (``alpha  0.75 (step=5) ...``).
    """
    ui.base = base or ui.base
    run_ids = [run_ids] if isinstance(run_ids, str) else list(run_ids)
    keys = plot_keys or [metric_key]
    mark, t0 = _open(ui, metric_route(exp_id, run_ids, metric_key, keys))
    for r in run_ids:
        for k in keys:
            wait_for_rest(ui, "metrics/get-history",
                          lambda c, r=r, k=k: c.q("run_uuid") == r and c.q("metric_key") == k,
                          since=mark, timeout=timeout)
    wait_for_text(ui, "Latest", timeout=timeout)
    view = _finish(ui, "metric", mark, t0, {})
    history: dict[str, dict[str, list[dict]]] = {}
    for c in view.rest("metrics/get-history"):
        history.setdefault(c.q("run_uuid"), {})[c.q("metric_key")] = _points((c.body or {}).get("metrics"))
    if "Error while loading metric page" in view.text:
        raise UIHarnessError(f"metric page failed: {view.text[:500]}")
    view.data.update(history=history, summary=[ln for ln in view.text.splitlines() if "(step=" in ln])
    return view


def compare_route(exp_id: str, run_ids: list[str]) -> str:
    return ("#/compare-runs?runs=" + json.dumps(run_ids, separators=(",", ":"))
            + "&experiments=" + json.dumps([exp_id], separators=(",", ":")))


def open_compare(ui: UIPage, base: str | None, exp_id: str, run_ids: list[str], find_metrics: list[str] = (),
                 timeout: float = 30.0) -> PageView:
    """The compare-runs page (``#/compare-runs?runs=[...]&experiments=[...]``).

    Calls: ``runs/search`` with ``filter: run_id IN (...)`` and ``run_view_type: ALL`` (latest metrics, params,
    tags of the runs; NaN as "NaN"), ``experiments/get``, ``artifacts/list`` per run.

    The Metrics section is a virtualised grid (react-virtualized, 300 px high, key and value grids kept in step by
    ScrollSync): only rows in view are in the DOM. For each key in ``find_metrics`` the grid is scrolled until the
    row with that exact key is rendered and its cells are read. A metric that one of the runs lacks is shown as
    ``NaN`` there too, exactly like a logged NaN: check ``runs`` to tell them apart.

    ``data``: ``runs`` {run_id: {"name", "metrics" {key: value|None}, "params", "tags"}} from runs/search;
    ``metric_rows`` {key: [cell text per run, in the page's column order]} for ``find_metrics``; ``run_names``
    (column order as shown).
    """
    ui.base = base or ui.base
    mark, t0 = _open(ui, compare_route(exp_id, run_ids))
    call = wait_for_rest(ui, "runs/search", lambda c: isinstance(c.request, dict)
                         and all(r in (c.request.get("filter") or "") for r in run_ids), since=mark, timeout=timeout)
    wait_for_text(ui, "Metrics", timeout=timeout)
    wait_for_text(ui, "Run details", timeout=timeout)
    runs = {}
    for r in (call.body or {}).get("runs", []):
        d = r.get("data") or {}
        runs[r["info"]["run_id"]] = {"name": r["info"].get("run_name"), "metrics": _metrics_from(d.get("metrics")),
                                     "params": {p["key"]: p["value"] for p in d.get("params") or []},
                                     "tags": {t["key"]: t["value"] for t in d.get("tags") or []}}
    rows = {}
    for key in find_metrics:
        rows[key] = compare_metric_row(ui, key, timeout=timeout)
    view = _finish(ui, "compare", mark, t0, {})
    names = next((r[1:] for t in read_tables(ui) for r in t if r and r[0] == "Run Name:"), [])
    view.data.update(runs=runs, metric_rows=rows, run_names=names)
    return view


def compare_metric_row(ui: UIPage, key: str, timeout: float = 15.0) -> list[str]:
    """Scroll the compare page's virtualised Metrics grid until the row of ``key`` is rendered; return its value
    cells (as shown, e.g. ``['0.65', '0.75']``). The key cell is ``a[title="Plot chart"]`` (a link to the metric
    page); the value cells are the cells of the neighbouring grid at the same ``top``."""
    js = """(key) => {
      const links = Array.from(document.querySelectorAll('a[title="Plot chart"]'));
      if (!links.length) return {found: false, moved: false};
      const gridOf = (e) => { while (e && e.getAttribute('role') !== 'grid') e = e.parentElement; return e; };
      const keyGrid = gridOf(links[0]);
      const grids = Array.from(document.querySelectorAll('[role=grid]'));
      const valGrid = grids[grids.indexOf(keyGrid) + 1];  // ScrollSync: the value grid scrolls, the key grid follows
      const a = links.find(l => l.innerText.trim() === key);
      if (!a) {
        if (!valGrid) return {found: false, moved: false};
        const before = valGrid.scrollTop;
        valGrid.scrollTop = before + Math.max(45, valGrid.clientHeight * 0.8);
        return {found: false, moved: valGrid.scrollTop !== before};
      }
      const top = a.parentElement.style.top;
      const cells = valGrid ? Array.from(valGrid.querySelectorAll('[role=rowgroup] > div')).filter(
          d => d.style.top === top) : [];
      cells.sort((x, y) => parseFloat(x.style.left) - parseFloat(y.style.left));
      return {found: true, values: cells.map(c => c.innerText.trim())};
    }"""
    deadline = time.monotonic() + timeout
    rewound = False
    while time.monotonic() < deadline:
        res = ui.page.evaluate(js, key)
        if res.get("found"):
            return res["values"]
        if not res.get("moved"):
            if rewound:
                break
            ui.page.evaluate("""() => { for (const g of document.querySelectorAll('[role=grid]')) g.scrollTop = 0; }""")
            rewound = True
        ui.page.wait_for_timeout(150)
    raise UIHarnessError(f"metric {key!r} not found in the compare page's Metrics grid")


def open_registered_model(ui: UIPage, base: str | None, name: str, timeout: float = 30.0) -> PageView:
    """The registered model page (``#/models/NAME``).

    Calls: ``registered-models/get?name=NAME`` (tags, aliases [{alias, version}], latest versions) and
    ``model-versions/search?filter=name='NAME'&max_results=25&order_by=creation_timestamp DESC`` (versions, their
    tags and aliases).

    ``data``: ``aliases`` {alias: version} and ``tags`` {key: value} from registered-models/get; ``versions``
    {version: {"tags", "run_id", "source"}} from model-versions/search (its "aliases" are always empty: the search
    does not return them); from the DOM: ``tags_shown`` {key: value} (the registered model's Tags table; the
    section is collapsed and empty when there are none), ``versions_table`` (rows as shown; aliases appear as
    "@ champion" with a no-break space), ``aliases_shown`` {version: [alias, ...]} and ``version_tags_shown``
    {version: {key: value}} (the Tags column of the versions table: *version* tags).
    """
    ui.base = base or ui.base
    mark, t0 = _open(ui, f"#/models/{urllib.parse.quote(name, safe='')}")
    rm = wait_for_rest(ui, "registered-models/get", lambda c: c.q("name") == name, since=mark, timeout=timeout)
    mv = wait_for_rest(ui, "model-versions/search", since=mark, timeout=timeout)
    wait_for_text(ui, "Versions", timeout=timeout)
    body = (rm.body or {}).get("registered_model", {})
    versions = {}
    for v in (mv.body or {}).get("model_versions", []):
        versions[v["version"]] = {"aliases": v.get("aliases", []),
                                  "tags": {t["key"]: t["value"] for t in v.get("tags", [])},
                                  "run_id": v.get("run_id"), "source": v.get("source")}
    view = _finish(ui, "registered_model", mark, t0, {})
    tables = read_tables(ui)
    # the Tags section is two tables: a header ("Name", "Value", "Actions") and the rows
    tags_shown = {r[0]: r[1] for t in tables for r in t if len(r) == 3 and r[0] and r[0] != "Name"}
    versions_table = next((t for t in tables if t and "Version" in t[0] and "Aliases" in t[0]), [])
    aliases_shown: dict[str, list[str]] = {}
    version_tags_shown: dict[str, dict[str, str]] = {}
    if versions_table:
        head = versions_table[0]
        vi, ai, ti = head.index("Version"), head.index("Aliases"), head.index("Tags") if "Tags" in head else None
        for r in versions_table[1:]:
            m = re.search(r"(\d+)", r[vi]) if len(r) > vi else None
            if not m:
                continue
            aliases_shown[m.group(1)] = re.findall(r"@\s*([^\s@]+)", r[ai].replace("\xa0", " ")) if len(r) > ai else []
            # a tag is rendered as "key" then ": value" (the cell shows "Add" when there is none)
            tags, key = {}, None
            for line in (r[ti].splitlines() if ti is not None and len(r) > ti else []):
                if line.startswith(":") and key is not None:
                    tags[key] = line[1:].strip()
                    key = None
                else:
                    key = line.strip()
            version_tags_shown[m.group(1)] = tags
    view.data.update(aliases={a["alias"]: a["version"] for a in body.get("aliases", [])},
                     tags={t["key"]: t["value"] for t in body.get("tags", [])}, versions=versions,
                     tags_shown=tags_shown, versions_table=versions_table, aliases_shown=aliases_shown,
                     version_tags_shown=version_tags_shown)
    return view


def open_model_version(ui: UIPage, base: str | None, name: str, version: str | int, timeout: float = 30.0) -> PageView:
    """A model version page (``#/models/NAME/versions/V``).

    Calls: ``model-versions/get?name=NAME&version=V`` (tags, aliases, source ``models:/m-...``, run_id),
    ``registered-models/get``, ``/model-versions/get-artifact?path=MLmodel`` (not JSON), ``runs/get`` of the source
    run, ``logged-models/m-...`` of the source logged model.

    ``data``: ``version`` (the model-versions/get body), ``aliases`` [..], ``tags`` {..}.
    """
    ui.base = base or ui.base
    mark, t0 = _open(ui, f"#/models/{urllib.parse.quote(name, safe='')}/versions/{version}")
    c = wait_for_rest(ui, "model-versions/get", lambda c: c.q("version") == str(version), since=mark, timeout=timeout)
    wait_for_text(ui, f"Version {version}", timeout=timeout)
    mvb = (c.body or {}).get("model_version", {})
    view = _finish(ui, "model_version", mark, t0, {})
    view.data.update(version=mvb, aliases=mvb.get("aliases", []),
                     tags={t["key"]: t["value"] for t in mvb.get("tags", [])})
    return view


def open_run_artifact(ui: UIPage, base: str | None, exp_id: str, run_id: str, path: str = "",
                      timeout: float = 30.0) -> PageView:
    """The run page's Artifacts tab opened on ``path`` (``#/experiments/E/runs/R/artifacts/PATH``, the route the UI
    links to an artifact; a folder is expanded, a file previewed: an image as ``<img>``).

    Calls: ``artifacts/list?run_uuid=R[&path=P]`` for the root and every folder the tree opens.

    ``data``: ``files`` [paths] and ``dirs`` [paths] from every artifacts/list call the page made for this run.
    """
    ui.base = base or ui.base
    route = f"#/experiments/{exp_id}/runs/{run_id}/artifacts" + (f"/{path}" if path else "")
    mark, t0 = _open(ui, route)
    folder = path if "." not in path.rsplit("/", 1)[-1] else path.rpartition("/")[0]
    wait_for_rest(ui, "artifacts/list", lambda c: (c.q("path") or "") == folder, since=mark, timeout=timeout)
    view = _finish(ui, "run_artifacts", mark, t0, {})
    files, dirs = [], []
    for c in view.rest("artifacts/list"):
        for f in (c.body or {}).get("files", []):
            (dirs if f.get("is_dir") else files).append(f["path"])
    view.data.update(files=sorted(set(files)), dirs=sorted(set(dirs)))
    return view


def open_logged_model(ui: UIPage, base: str | None, exp_id: str, model_id: str, timeout: float = 30.0) -> PageView:
    """The MLflow 3 logged model page (``#/experiments/E/models/m-...``).

    Calls: ``logged-models/m-...`` (GET: info, params, tags and the metrics *linked to the model*: each with
    key, value, step, run_id; NaN comes back as 0.0 and is shown as 0), ``runs/get`` of the source run,
    ``registered-models/search``.

    Linked metrics are those logged with ``model_id=`` (``mlflow.log_metric(s)(..., model_id=...)``) or, when the
    model is logged with ``mlflow.<flavor>.log_model`` inside a run, every run metric that already has a value at
    the model's step (``step=0`` by default) at that moment. Metrics logged later without ``model_id`` are not.

    ``data``: ``metrics`` {key: value} (the last linked value per key), ``metric_entries`` (all linked entries, a key
    can repeat), ``metrics_table`` [[metric, dataset, source run, value]] as shown.
    """
    ui.base = base or ui.base
    mark, t0 = _open(ui, f"#/experiments/{exp_id}/models/{model_id}")
    c = wait_for_rest(ui, f"logged-models/{model_id}", since=mark, timeout=timeout)
    wait_for_text(ui, "Metrics (", timeout=timeout)
    model = (c.body or {}).get("model", {})
    entries = (model.get("data") or {}).get("metrics") or []
    view = _finish(ui, "logged_model", mark, t0, {})
    view.data.update(model=model, metric_entries=entries, metrics=_metrics_from(entries),
                     metrics_table=table_with_header(ui, "Metric") or [])
    return view


def open_experiment_models(ui: UIPage, base: str | None, exp_id: str, timeout: float = 30.0) -> PageView:
    """The experiment's logged-models list (``#/experiments/E/models``; titled "Agent versions" in 3.17's GenAI
    mode, "Models" in the model-training mode that ``ui_page`` selects). Calls ``logged-models/search`` (POST,
    ``experiment_ids``); ``data``:
    ``models`` {model_id: {"name", "source_run_id", "metrics" {key: value}}}."""
    ui.base = base or ui.base
    mark, t0 = _open(ui, f"#/experiments/{exp_id}/models")
    c = wait_for_rest(ui, "logged-models/search", since=mark, timeout=timeout)
    models = {}
    for m in (c.body or {}).get("models", []):
        info = m.get("info", {})
        models[info.get("model_id")] = {"name": info.get("name"), "source_run_id": info.get("source_run_id"),
                                        "metrics": _metrics_from((m.get("data") or {}).get("metrics"))}
    if models:
        wait_for_text(ui, next(iter(models.values()))["name"] or "", timeout=timeout)
    view = _finish(ui, "experiment_models", mark, t0, {"models": models})
    return view


def open_experiment_runs(ui: UIPage, base: str | None, exp_id: str, charts: bool = False, expand: bool = True,
                         timeout: float = 30.0) -> PageView:
    """The experiment's runs page, table view (``#/experiments/E/runs``) or chart view (``?compareRunsMode=CHART``).

    Calls: ``runs/search`` (POST, ``max_results: 50``: the runs with latest metrics, params, tags),
    ``logged-models/search``, ``experiments/search-datasets``, ``graphql:MlflowGetExperimentQuery``.

    Child runs are collapsed under their parent by default (only the parent row shows, "N matching runs"); with
    ``expand`` every "+" expander is clicked. In the chart view only visible runs are charted.
    ``data``: ``runs`` {run_id: {"name", "parent", "metrics"}} from runs/search.
    """
    ui.base = base or ui.base
    route = f"#/experiments/{exp_id}/runs" + ("?compareRunsMode=CHART" if charts else "")
    mark, t0 = _open(ui, route)
    experiment_wide = (lambda c: isinstance(c.request, dict) and exp_id in c.request.get("experiment_ids", [])
                       and "parentRunId" not in (c.request.get("filter") or ""))
    wait_for_rest(ui, "runs/search", experiment_wide, since=mark, timeout=timeout)
    wait_for_text(ui, "matching run", timeout=timeout)
    runs = {}
    for c in ui.rest.find("runs/search", experiment_wide, since=mark):
        for r in (c.body or {}).get("runs", []):
            tags = {t["key"]: t["value"] for t in (r.get("data") or {}).get("tags", [])}
            runs[r["info"]["run_id"]] = {"name": r["info"].get("run_name"), "parent": tags.get("mlflow.parentRunId"),
                                         "metrics": _metrics_from((r.get("data") or {}).get("metrics"))}
    children = [rid for rid, r in runs.items() if r["parent"] in runs]
    if expand and children:
        # The expander is an icon button in the Run Name cell ("+" in a square while collapsed). The expanded state
        # is kept in localStorage, so a parent may already be open: poll for the child rows' links instead.
        plus = ui.page.locator("button[data-component-id*=runnamecellrenderer]:has(path[d^='M7.25 7.25V4.5'])")
        shown = "(ids) => ids.every(id => document.querySelector(`a[href$='/runs/${id}']`))"
        deadline = time.monotonic() + timeout
        while not ui.page.evaluate(shown, children):
            if time.monotonic() > deadline:
                raise UIHarnessError(f"child runs {children} not shown after expanding their parents")
            if plus.count():
                with contextlib.suppress(Exception):
                    plus.first.click(timeout=5000)
            ui.page.wait_for_timeout(200)
    view = _finish(ui, "experiment_runs_charts" if charts else "experiment_runs", mark, t0, {"runs": runs})
    return view
