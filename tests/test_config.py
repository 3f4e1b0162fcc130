"""Typed configuration declared once: every key checked and coerced, every problem named, defaults printable."""
from __future__ import annotations

import subprocess
import sys

import pytest

from cushing.config import ConfigError, TrainConfig, load_yaml_with_lines, parse_bool, parse_ratios, resolve, \
    to_params


def test_strings_from_mlflow_run_are_coerced_to_the_declared_types():
    cfg = resolve(TrainConfig, {"epochs": "3", "lr": "0.01", "pretrained": "false", "freeze": "auto",
                                "prevalence": "", "weights": "", "subgroups": "sex,site"})
    assert cfg.epochs == 3 and cfg.lr == 0.01 and cfg.pretrained is False
    assert cfg.freeze is None and cfg.prevalence is None and cfg.weights is None
    assert cfg.subgroup_columns == ("sex", "site") and cfg.strata_columns == ("label", "sex")


def test_every_problem_is_named_at_once():
    with pytest.raises(ConfigError) as e:
        resolve(TrainConfig, {"epochz": 3, "split-seed": 1, "lr": "fast", "batch_size": 2.5})
    text = str(e.value)
    assert "unknown key 'epochz'" in text and "unknown key 'split-seed' (did you mean 'split_seed'?)" in text
    assert "lr: expected a number, got 'fast'" in text and "batch_size: expected an integer" in text
    with pytest.raises(ConfigError) as e:
        TrainConfig(model="resnet9000", epochs=0, momentum=1.5, audit="sometimes", resume="last-tuesday")
    text = str(e.value)
    for needle in ("model: unknown 'resnet9000'", "epochs: must be >= 1", "momentum: must be in [0, 1)",
                   "audit: off, warn or strict", "resume: a run id (32 characters) or true"):
        assert needle in text, needle


def test_select_metric_and_threshold_rules_are_checked():
    with pytest.raises(ConfigError, match="select_metric: must be a validation metric"):
        TrainConfig(select_metric="test/f1")
    with pytest.raises(ConfigError, match="threshold: "):
        TrainConfig(threshold="banana")
    assert TrainConfig(threshold="sensitivity:0.9").threshold == "sensitivity:0.9"


@pytest.mark.parametrize("text,value", [("true", True), ("1", True), ("Yes", True), ("off", False), ("0", False)])
def test_parse_bool(text, value):
    assert parse_bool(text) is value


def test_parse_bool_and_ratios_refuse_nonsense():
    with pytest.raises(ValueError, match="expected true/false"):
        parse_bool("maybe")
    assert parse_ratios("2:1:1") == (2.0, 1.0, 1.0) and parse_ratios("1,1,1") == (1.0, 1.0, 1.0)
    for bad in ("1:1", "0:1:1", "a:b:c", "1:-1:1"):
        with pytest.raises(ConfigError, match="split_ratios"):
            parse_ratios(bad)


@pytest.mark.parametrize("argv", [["faces", "--manifest", "m.csv", "--out", "o", "--allow-phi-artifacts", "maybe"],
                                  ["audit", "--manifest", "m.csv", "--allow-phi-artifacts", "maybe"],
                                  ["explain", "--run-id", "r", "--allow-phi-artifacts", "maybe"],
                                  ["promote", "--allow-synthetic", "maybe"]])
def test_a_word_that_is_not_a_boolean_is_refused_in_one_line(argv, tmp_path):
    """Every true/false option is parsed once, by the command line, in the words parse_bool takes."""
    r = subprocess.run([sys.executable, "-m", "cushing", *argv], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "true or false, got 'maybe'" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not list(tmp_path.iterdir())


def test_params_are_flat_strings_for_mlflow():
    p = to_params(TrainConfig(model="resnet18", pretrained=False))
    assert p["model"] == "resnet18" and p["pretrained"] == "false" and p["freeze"] == "auto" and p["weights"] == ""
    assert all(isinstance(v, str) for v in p.values()) and set(p) == set(TrainConfig.__dataclass_fields__)


def test_yaml_lines_are_recorded_for_error_messages(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: x\nbase:\n  epochs: 3\nconfigurations:\n  - {model: resnet18}\n")
    data, lines = load_yaml_with_lines(path)
    assert data["base"]["epochs"] == 3
    assert lines[("base", "epochs")] == 3 and lines[("configurations", 0)] == 5
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml_with_lines(path)
