"""Layout and declared environments agree: pyproject pins == conda.yaml pins; MLproject == the typed config."""
from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
import tomllib

import pytest
import yaml

from cushing.config import TrainConfig
from tests.conftest import ROOT


def test_conda_yaml_declares_the_same_pins_as_pyproject():
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert sorted(pip) == sorted(pins)
    assert all("==" in p for p in pins), "every dependency is pinned exactly"
    assert "torch==2.14.1" in pins and "torchvision==0.29.1" in pins


def test_mlproject_main_parameters_are_the_train_config():
    mlp = yaml.safe_load((ROOT / "MLproject").read_text())
    assert mlp["conda_env"] == "conda.yaml"
    main = mlp["entry_points"]["main"]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(main["parameters"]) == fields
    for name in fields:
        assert f"--{name.replace('_', '-')} {{{name}}}" in main["command"], name
    for name, spec in main["parameters"].items():
        default = getattr(TrainConfig(), name)
        shown = "auto" if name == "freeze" and default is None else "" if default is None else default
        assert str(spec["default"]).lower() == str(shown).lower(), name


def test_layout():
    for p in ("cushing", "projects", "dashboards", "tests", "MLproject", "conda.yaml", "pyproject.toml",
              "README.md", ".ci/run", "docker-compose.yml", "deploy/k8s"):
        assert (ROOT / p).exists(), p
    for pkg in ("data", "faces", "model", "stats", "workflows", "tracking", "release", "ops", "cli", "data/audit",
                "workflows/sweeps", "workflows/cluster", "ops/stack"):
        doc = (ROOT / "cushing" / pkg / "__init__.py").read_text()
        assert doc.startswith('"""') and "Owns" in doc and "import" in doc, f"{pkg}: say what it owns and imports"
    for p in ():
        assert (ROOT / p).exists(), p


def test_readme_has_exactly_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- setup -->\s*```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert block, "README needs a fenced set-up block after <!-- setup -->"
    commands = [line for line in block.group(1).splitlines() if line.strip() and not line.strip().startswith("#")]
    assert commands == ["bash scripts/quickstart.sh", "bash scripts/test.sh"]
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


LAYERS = {  # subpackage -> the subpackages it may import (besides config and itself); README, Architecture
    "stats": set(),
    "data": {"stats"},
    "tracking": set(),
    "faces": {"data", "stats", "tracking"},
    "model": {"data", "stats"},
    "release": {"data", "faces", "model", "stats", "tracking"},
    "ops": set(),
    "workflows": {"data", "faces", "model", "release", "stats", "tracking", "ops"},
}


def _imports() -> dict[str, set[str]]:
    """Package-internal imports of every module, at any depth (module name -> imported module names)."""
    graph = {}
    for path in (ROOT / "cushing").rglob("*.py"):
        mod = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        text = path.read_text()
        graph[mod] = set(re.findall(r"^\s*from (cushing[\w.]*) import", text, re.M))
        graph[mod] |= {f"{m}.{n.strip()}" for m, names in re.findall(r"^\s*from (cushing[\w.]*) import (.+)$",
                                                                    text, re.M) for n in names.split(",")
                       if f"{m}.{n.strip()}".replace(".", "/") and (ROOT / f"{m}.{n.strip()}".replace(".", "/")
                                                                   ).with_suffix(".py").exists()}
    return graph


def test_subpackages_import_only_downward_and_without_cycles():
    graph = _imports()
    for mod, deps in graph.items():
        parts = mod.split(".")
        if len(parts) < 3 or parts[1] not in LAYERS:
            continue
        for dep in deps:
            dparts = dep.split(".")
            if len(dparts) > 1 and dparts[1] in LAYERS and dparts[1] != parts[1]:
                assert dparts[1] in LAYERS[parts[1]], f"{mod} imports {dep}: {parts[1]} may not import {dparts[1]}"
    seen, stack = set(), []

    def visit(m: str) -> None:
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in seen or m not in graph:
            return
        stack.append(m)
        for d in graph[m]:
            if d != m and not m.startswith(d + "."):  # a module importing its own package's __init__ names
                visit(d)
        stack.pop()
        seen.add(m)
    for m in graph:
        visit(m)


def test_the_bottom_layer_imports_nothing_above_it():
    """config and model_names sit below every subpackage but stats (the model names the configuration checks come
    from `cushing.model_names`, not from the backbone registry)."""
    graph = _imports()
    for mod in ("cushing.config", "cushing.model_names"):
        above = {d for d in graph[mod] if not d.startswith(("cushing.stats", "cushing.config", "cushing.model_names"))}
        assert not above, f"{mod} imports {sorted(above)}"


def test_package_inits_hold_their_docstring_and_re_exports_only():
    """Re-exports, or lazy ones (PEP 562: `_LAZY` names the submodule, `__getattr__` imports it on first use)."""
    for path in (ROOT / "cushing").rglob("__init__.py"):
        tree = ast.parse(path.read_text())
        rel = path.relative_to(ROOT)
        assert ast.get_docstring(tree), f"{rel}: say what the package owns and may import"
        for node in tree.body[1:]:
            names = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            assert isinstance(node, ast.ImportFrom) or names in (["__all__"], ["__version__"], ["_LAZY"]) or \
                getattr(node, "name", None) == "__getattr__", \
                f"{rel}:{node.lineno}: an __init__ holds its docstring and re-exports, nothing else"


def test_no_module_over_500_lines_and_no_function_over_60():
    """Rooms a reader can hold in their head: a module holds one job, a function fits on a screen."""
    for path in (ROOT / "cushing").rglob("*.py"):
        text = path.read_text()
        rel = path.relative_to(ROOT)
        assert len(text.splitlines()) <= 500, f"{rel}: {len(text.splitlines())} lines; split it by job"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                assert n <= 60, f"{rel}:{node.lineno} {node.name}: {n} lines; split it"


def test_package_imports_sit_at_module_level():
    """Inside functions only in the CLI (commands import what they run, so `cushing --help` stays fast)."""
    for path in (ROOT / "cushing").rglob("*.py"):
        if path.relative_to(ROOT / "cushing").parts[0] == "cli":
            continue
        inner = re.findall(r"^[ \t]+from cushing[\w.]* import .+$", path.read_text(), re.M)
        assert not inner, f"{path.relative_to(ROOT)}: {inner}"


LIGHT = ("cushing.cli", "cushing.config", "cushing.model_names", "cushing.stats.report", "cushing.stats.intervals",
         "cushing.data.manifest", "cushing.data.splits", "cushing.data.audit", "cushing.tracking", "cushing.ops.stack",
         "cushing.data.checks", "cushing.workflows.studies", "cushing.workflows.plan", "cushing.workflows.sweeps",
         "cushing.workflows.cohort_audit", "cushing.faces.settings",
         *(f"cushing.cli.{m}" for m in ("app", "stops", "options", "train", "bench", "cohort", "jobs", "promote",
                                         "studies", "dashboard", "pipeline", "stack")),
         *(f"cushing.data.audit.{m}" for m in ("settings", "hashing", "descriptors", "signatures", "pairing",
                                                "report", "evaluation")),
         *(f"cushing.tracking.{m}" for m in ("connection", "runs", "logger", "records", "queries", "liveness",
                                              "stores")),
         *(f"cushing.ops.stack.{m}" for m in ("local", "postgres", "server", "credentials", "processes")))


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_import_neither_torch_nor_mlflow(module):
    """README, Architecture: planning, auditing, reports and `cushing --help` start without the heavy stacks;
    only tracking/ and release/ import mlflow, tracking/ inside its functions."""
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'mlflow', 'optuna') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_only_tracking_and_release_import_mlflow():
    for path in (ROOT / "cushing").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if re.search(r"^\s*(import mlflow|from mlflow)", path.read_text(), re.M):
            assert rel.startswith(("cushing/tracking/", "cushing/release/")), rel


def test_cushing_help_imports_neither_pandas_nor_the_data_modules():
    """`cushing --help` (and every command's argument parsing) stays at the standard library, numpy and the
    configuration: the error types of the data modules are imported when an error is being handled."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "cushing", "--help"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and "usage: cushing" in out.stdout
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & {"pandas", "cushing.data.manifest", "cushing.data.splits", "torch", "mlflow"}
