"""The documentation site: `mkdocs build --strict` (a broken link, a missing page or picture, a docstring that cannot
be rendered fails it), the reference pages generated from the code (every command, option, entry point, parameter
and module), and the built site served on 127.0.0.1 in headless Chromium: navigation, a screenshot that loads, the
search box and a search that finds a page, with no request leaving the machine."""
from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import html
import http.server
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

CHROMIUM = os.environ.get("CUSHING_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return out


def _text(page: Path) -> str:
    """The page's visible text: tags dropped, entities decoded, whitespace collapsed."""
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", page.read_text(), flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


# ------------------------------------------------------------------------------------------------ generated pages

def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {name: sub for a in parser._actions if isinstance(a, argparse._SubParsersAction)
            for name, sub in a.choices.items()}


def test_the_cli_page_lists_every_command_and_option(site):
    from cushing.cli import build_parser

    page = (site / "reference" / "cli" / "index.html").read_text()
    text = _text(site / "reference" / "cli" / "index.html")
    commands = _commands(build_parser())
    assert len(commands) >= 10
    for name, sub in commands.items():
        assert f'id="{name}"' in page, f"no section for `cushing {name}`"
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in text, f"cushing {name} {flag} missing from the CLI reference"


def test_the_mlproject_page_lists_every_entry_point_and_parameter(site):
    page = (site / "reference" / "mlproject" / "index.html").read_text()
    text = _text(site / "reference" / "mlproject" / "index.html")
    entry_points = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    for name, ep in entry_points.items():
        assert f'id="{name}"' in page, name
        for param in ep.get("parameters") or {}:
            assert param in text, f"{name}: -P {param} missing from the MLproject reference"


def _modules() -> dict[str, Path]:
    """Every module of the package, found independently of the docs' hook: {dotted name: file}."""
    found = {}
    for path in (ROOT / "cushing").rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        if path.name == "__main__.py" or not all((ROOT / Path(*rel.parts[:i]) / "__init__.py").exists()
                                                 for i in range(1, len(rel.parts))):
            continue
        found[".".join(rel.parts).removesuffix(".__init__")] = path
    return found


def test_every_module_has_an_api_page_rendered_from_its_docstring(site):
    modules = _modules()
    assert len(modules) > 40
    for name, path in modules.items():
        page = site / "reference" / "api" / Path(*name.split(".")) / "index.html"
        assert page.exists(), f"no API page for {name}"
        doc = ast.get_docstring(ast.parse(path.read_text()))
        if doc:  # its first words, as rendered (code spans lose their backticks; spacing around tags varies)
            words = " ".join(doc.replace("`", "").split()[:6])
            assert "".join(words.split()) in "".join(_text(page).split()), f"{name}: {words!r} not on its page"


def test_the_site_fetches_nothing_from_elsewhere(site):
    """Material pulls Google Fonts unless `theme.font` is false; no page links a script or stylesheet elsewhere."""
    for page in site.rglob("*.html"):
        text = page.read_text()
        assert "fonts.googleapis" not in text and "fonts.gstatic" not in text, page
        assert not re.search(r"<(script|link)\b[^>]*(src|href)=\"(https?:)?//", text), page
    assert (site / "search" / "search_index.json").stat().st_size > 10_000


def test_the_readme_is_a_short_front_door_whose_links_resolve():
    """At most 150 lines; every relative link (the docs pages, the screenshot) points at a file of the clone."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert len(local) >= 8 and "docs/assets/screenshots/mlflow-run.png" in local
    assert [link for link in local if not (ROOT / link).is_file()] == []
    assert "mkdocs serve" in text and "mkdocs build --strict" in text


# ------------------------------------------------------------------------------------------------ in a browser

class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def _serve(folder: Path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser_page(site):
    from playwright.sync_api import sync_playwright

    with _serve(site) as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        seen = {"requests": [], "errors": []}
        page.on("request", lambda r: seen["requests"].append(r.url))
        page.on("pageerror", lambda e: seen["errors"].append(str(e)))
        page.on("console", lambda m: seen["errors"].append(m.text) if m.type == "error" else None)
        try:
            yield page, base, seen
        finally:
            browser.close()


def _screenshot_loaded(page, name: str) -> bool:
    img = page.locator(f"img[src$='screenshots/{name}']").first
    img.scroll_into_view_if_needed()
    page.wait_for_function("(i) => i.complete", arg=img.element_handle(), timeout=15_000)
    return img.evaluate("i => i.naturalWidth > 0")


@pytest.mark.slow
@pytest.mark.chromium
def test_the_home_page_navigates_shows_a_screenshot_and_searches(browser_page):
    page, base, seen = browser_page
    page.goto(base + "/")
    tabs = [t.strip() for t in page.locator(".md-tabs__link").all_inner_texts()]
    for section in ("Tutorials", "How-to guides", "Reference", "Explanation"):
        assert section in tabs, tabs
    assert _screenshot_loaded(page, "mlflow-run.png")
    box = page.locator("input.md-search__input")
    box.click()
    box.press_sequentially("cohort audit", delay=50)  # the search reacts to key events, not to a filled value
    results = page.locator(".md-search-result__item")
    results.first.wait_for(timeout=20_000)
    assert results.count() > 0
    assert "audit" in page.locator(".md-search-result").inner_text().lower()
    assert seen["errors"] == [], seen["errors"]


@pytest.mark.slow
@pytest.mark.chromium
def test_the_tutorial_page_renders_in_the_navigation_with_its_screenshot(browser_page):
    page, base, seen = browser_page
    page.goto(base + "/tutorials/own-cohort/")
    assert page.locator("h1").first.inner_text().startswith("Your own cohort")
    active = page.locator(".md-nav__link--active").all_inner_texts()
    assert any("Your own cohort" in a for a in active), active
    assert page.locator(".md-tabs__item--active").inner_text().strip() == "Tutorials"
    assert _screenshot_loaded(page, "mlflow-compare.png")
    page.locator("a.md-footer__link--next").click()  # the footer leads on to the next tutorial
    page.wait_for_url(re.compile(r"/tutorials/paper-grid/"))
    assert seen["errors"] == [], seen["errors"]
    elsewhere = [u for u in seen["requests"] if not u.startswith((base, "data:", "blob:"))]
    assert elsewhere == [], f"requests that left the machine: {elsewhere}"
