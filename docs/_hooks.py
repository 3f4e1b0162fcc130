"""MkDocs hooks: the reference pages that are generated from the code when the site is built, so they cannot drift.

* ``reference/cli.md``: every ``cushing`` command and option, from ``cushing.cli.build_parser()`` (argparse);
  train options also get the comment that documents their field in ``cushing.config.TrainConfig``.
* ``reference/mlproject.md``: every MLproject entry point and parameter, from ``MLproject`` (YAML).
* ``reference/api/...``: one page per module of the ``cushing`` package, found by walking the package's folders
  (not a list kept by hand), rendered from its docstrings by mkdocstrings; the navigation gets one section per
  subpackage in place of the ``reference/api/index.md`` entry of ``mkdocs.yml``.

Pages are added as generated files (``File.generated``, MkDocs 1.6); nothing is written into ``docs/``.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import io
import os
import re
import sys
import tokenize
from pathlib import Path
from typing import Any, Iterator

import yaml
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "cushing"
API = "reference/api"
SKIP_MODULES = {"__main__"}  # `python -m cushing`: the CLI page documents it


# ------------------------------------------------------------------------------------------------ MkDocs events

def on_config(config):
    if str(ROOT) not in sys.path:  # `mkdocs` run without scripts/env.sh's PYTHONPATH still finds this clone
        sys.path.insert(0, str(ROOT))
    config.nav = _with_api_nav(config.nav or [])
    return config


def on_files(files, config):
    pages = {"reference/cli.md": cli_page(), "reference/mlproject.md": mlproject_page(), **api_pages()}
    for uri, text in pages.items():
        files.append(File.generated(config, uri, content=text))
    return files


# ------------------------------------------------------------------------------------------------ the Python API

def modules() -> list[str]:
    """Every module of the package (a package's own page is its ``__init__``), in folder order."""
    found = []
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        if not all((ROOT / Path(*rel.parts[:i]) / "__init__.py").exists() for i in range(1, len(rel.parts))):
            continue  # a script in a data folder (e.g. deploy/), not an importable module
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts[-1] in SKIP_MODULES:
            continue
        found.append(".".join(parts))
    return sorted(found, key=lambda m: (m.count(".") > 0, m.split(".")))


def _is_package(module: str) -> bool:
    return (ROOT / module.replace(".", "/") / "__init__.py").exists()


def _uri(module: str) -> str:
    path = module.replace(".", "/")
    return f"{API}/{path}/index.md" if _is_package(module) else f"{API}/{path}.md"


def _docstring(module: str) -> str:
    path = ROOT / (module.replace(".", "/") + ("/__init__.py" if _is_package(module) else ".py"))
    return ast.get_docstring(ast.parse(path.read_text())) or ""


def _summary(module: str) -> str:
    first = _docstring(module).split("\n\n")[0]
    return " ".join(first.split()).replace("|", "\\|")


def api_pages() -> dict[str, str]:
    pages = {f"{API}/index.md": _api_index()}
    for m in modules():
        kind = "package" if _is_package(m) else "module"
        text = f"# `{m}`\n\n<small>{kind} · generated from its docstrings</small>\n\n::: {m}\n"
        if _is_package(m):
            text += _children_table(m)
        pages[_uri(m)] = text
    return pages


def _children_table(pkg: str) -> str:
    kids = [m for m in modules() if m.rpartition(".")[0] == pkg]
    rows = [f"| [`{m.rpartition('.')[2]}`]({_rel(_uri(pkg), _uri(m))}) | {_summary(m)} |" for m in kids]
    return "\n".join(["", "## Modules", "", "| module | what it is |", "|---|---|", *rows, ""]) if rows else ""


def _api_index() -> str:
    rows = [f"| [`{m}`]({_rel(f'{API}/index.md', _uri(m))}) | {_summary(m)} |" for m in modules() if _is_package(m)]
    return "\n".join([
        "# Python API",
        "",
        "The package's modules, one page each, rendered from their docstrings when the site is built (the pages",
        "and this list come from walking the `cushing` package, so a new or moved module appears by itself).",
        "Each subpackage's own page says what it owns and what it may import: the layers are described in",
        "[Architecture](../../explanation/architecture.md).",
        "",
        "| package | what it owns |",
        "|---|---|",
        *rows,
        "",
    ])


def _rel(from_uri: str, to_uri: str) -> str:
    return os.path.relpath(to_uri, os.path.dirname(from_uri)).replace(os.sep, "/")


def _api_nav() -> list[Any]:
    """Nested navigation: one section per package, its own page first, then its modules and subpackages."""
    def section(pkg: str) -> list[Any]:
        items: list[Any] = [_uri(pkg)]
        for m in modules():
            if m.rpartition(".")[0] != pkg:
                continue
            name = m.rpartition(".")[2]
            items.append({name: section(m)} if _is_package(m) else {name: _uri(m)})
        return items
    return [f"{API}/index.md", {PACKAGE: section(PACKAGE)}]


def _with_api_nav(nav: list[Any]) -> list[Any]:
    """Replace the ``reference/api/index.md`` entry of the configured navigation by the generated tree."""
    out = []
    for item in nav:
        if isinstance(item, dict):
            (title, value), = item.items()
            if value == f"{API}/index.md":
                item = {title: _api_nav()}
            elif isinstance(value, list):
                item = {title: _with_api_nav(value)}
        out.append(item)
    return out


# ------------------------------------------------------------------------------------------------ the CLI

@contextlib.contextmanager
def _columns(n: int) -> Iterator[None]:
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(n)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser, str]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            out += [(name, sub, helps.get(name, "")) for name, sub in action.choices.items()]
    return out


def _field_notes() -> dict[str, str]:
    """The comment that documents each TrainConfig field (``lr: float = 1e-3  # ...``), by field name."""
    try:
        from cushing.config import TrainConfig
    except ImportError:  # the training options then show their argparse help alone
        return {}
    notes: dict[str, str] = {}
    line_field: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(TrainConfig)).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.start[0] not in line_field:
            line_field[tok.start[0]] = tok.string
        elif tok.type == tokenize.COMMENT and tok.start[0] in line_field:
            notes[line_field[tok.start[0]]] = tok.string.lstrip("# ").strip()
    return notes


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return "flag"
    if action.choices:
        return " \\| ".join(f"`{c}`" for c in action.choices)
    metavar = action.metavar or (action.dest if not action.option_strings else action.dest.upper())
    return f"`{_cell(metavar)}`"


def _expanded_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    return parser._get_formatter()._expand_help(action) if action.help else ""


def _default(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    said = re.match(r"default: (.*)", _expanded_help(parser, action))
    if said:  # train options parse to None ("not given") and say the configuration's default in their help
        return f"`{_cell(said.group(1))}`"
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or action.required:
        return "required" if action.required and action.option_strings else ""
    return f"`{_cell(action.default)}`"


def _help(parser: argparse.ArgumentParser, action: argparse.Action, notes: dict[str, str]) -> str:
    text = _expanded_help(parser, action)
    if text.startswith("default:"):  # shown in the default column
        text = ""
    return _cell("; ".join(t for t in (text, notes.get(action.dest, "")) if t))


def _options_table(parser: argparse.ArgumentParser, notes: dict[str, str]) -> list[str]:
    rows = ["| option | value | default | description |", "|---|---|---|---|"]
    for a in parser._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = ", ".join(f"`{s}`" for s in a.option_strings) or f"`{a.dest}` (positional)"
        rows.append(f"| {name} | {_value(a)} | {_default(parser, a)} | {_help(parser, a, notes)} |")
    return rows if len(rows) > 2 else []


def _entry_points_by_command() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, ep in _mlproject()["entry_points"].items():
        found = re.match(r"\s*python -m cushing ([\w-]+)", ep["command"])
        if found:
            out.setdefault(found.group(1), []).append(name)
    return out


def cli_page() -> str:
    from cushing.cli import build_parser

    with _columns(100):
        parser = build_parser()
        commands = _subcommands(parser)
        notes = _field_notes()
        by_command = _entry_points_by_command()
        lines = [
            "# Command line: `cushing`",
            "",
            "Generated from the argparse parser (`cushing.cli.build_parser()`) when this site is built, so every",
            "command and option below is the one the code accepts. `cushing COMMAND --help` prints the same.",
            "`cushing` is `python -m cushing` in the project's environment (`source scripts/env.sh`); every MLproject",
            "entry point runs one of these commands ([MLproject entry points](mlproject.md)).",
            "",
            "```text",
            parser.format_usage().strip(),
            "```",
            "",
            "| command | what it does |",
            "|---|---|",
            *[f"| [`{name}`](#{name}) | {_cell(help_)} |" for name, _, help_ in commands],
            "",
        ]
        for name, sub, help_ in commands:
            lines += _command_section(name, sub, help_, notes if name == "train" else {}, by_command.get(name, []))
    return "\n".join(lines)


def _command_section(name: str, sub: argparse.ArgumentParser, help_: str, notes: dict[str, str],
                     entry_points: list[str]) -> list[str]:
    lines = [f"## `cushing {name}` {{#{name}}}", "", _cell(sub.description or help_), ""]
    if entry_points:
        links = ", ".join(f"[`{e}`](mlproject.md#{e})" for e in entry_points)
        lines += [f"MLproject entry point{'s' if len(entry_points) > 1 else ''}: {links}.", ""]
    if notes:
        lines += ["Descriptions after the argparse help are the comments of the matching field of",
                  "`cushing.config.TrainConfig`, where every training option is declared once.", ""]
    lines += ["```text", sub.format_usage().strip(), "```", "", *_options_table(sub, notes), ""]
    return lines


# ------------------------------------------------------------------------------------------------ MLproject

def _mlproject() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "MLproject").read_text())


def _passed_as(command: str, param: str) -> str:
    found = re.search(r"(--[\w-]+) \{" + re.escape(param) + r"\}", command)
    if found:
        return f"`{found.group(1)}`"
    return "positional" if "{" + param + "}" in command else ""


def mlproject_page() -> str:
    project = _mlproject()
    eps = project["entry_points"]
    lines = [
        "# MLproject entry points",
        "",
        "Generated from the `MLproject` file when this site is built. Run an entry point from the clone with",
        "`mlflow run . --env-manager local --experiment-name cushing -e ENTRY -P NAME=VALUE ...` (users with conda",
        "can drop `--env-manager local`: `conda.yaml` declares the same pins as `pyproject.toml`). Each one runs a",
        "`cushing` command ([Command line](cli.md)) inside the run `mlflow run` created.",
        "",
        "MLflow passes an empty string parameter as the literal `''`; the commands read it as \"not given\".",
        "",
        "| entry point | runs | parameters |",
        "|---|---|---|",
    ]
    for name, ep in eps.items():
        cmd = re.match(r"\s*python -m cushing ([\w-]+)", ep["command"])
        runs = f"[`cushing {cmd.group(1)}`](cli.md#{cmd.group(1)})" if cmd else f"`{_cell(ep['command'])}`"
        lines.append(f"| [`{name}`](#{name}) | {runs} | {len(ep.get('parameters') or {})} |")
    lines.append("")
    for name, ep in eps.items():
        lines += _entry_point_section(name, ep)
    return "\n".join(lines)


def _wrap(command: str, width: int = 110) -> str:
    """The command over several lines, never between an option and its ``{parameter}``."""
    units: list[str] = []
    for token in command.split():
        if token.startswith("{") and units and units[-1].startswith("--"):
            units[-1] += " " + token
        else:
            units.append(token)
    lines = [""]
    for unit in units:
        if lines[-1] and len(lines[-1]) + 1 + len(unit) > width:
            lines.append("    ")
        lines[-1] += ("" if not lines[-1].strip() else " ") + unit
    return "\n".join(lines)


def _entry_point_section(name: str, ep: dict[str, Any]) -> list[str]:
    command = " ".join(ep["command"].split())
    shown = _wrap(command)
    lines = [f"## `{name}` {{#{name}}}", "", "```text", shown, "```", "",
             "| parameter | type | default | passed as |", "|---|---|---|---|"]
    for param, spec in (ep.get("parameters") or {}).items():
        spec = spec if isinstance(spec, dict) else {"type": spec}
        default = f"`{_cell(spec['default'])}`" if "default" in spec else "required"
        if default == "``":
            default = "`''` (empty)"
        lines.append(f"| `{param}` | {spec.get('type', 'string')} | {default} | {_passed_as(command, param)} |")
    return lines + [""]
