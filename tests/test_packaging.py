"""Layout and declared environments agree: pyproject pins == conda.yaml pins; MLproject == the typed config."""
from __future__ import annotations

import dataclasses
import re
import tomllib

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
              "README.md", ".ci/run", "docker-compose.yml"):
        assert (ROOT / p).exists(), p


def test_readme_has_exactly_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- setup -->\s*```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert block, "README needs a fenced set-up block after <!-- setup -->"
    commands = [line for line in block.group(1).splitlines() if line.strip() and not line.strip().startswith("#")]
    assert commands == ["bash scripts/quickstart.sh", "bash scripts/test.sh"]
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
