"""Study files: the shipped ones are valid, every mistake names its file and line, how a run executes is not
part of a study's identity."""
from __future__ import annotations

import pytest

from cushing.config import ConfigError
from cushing.workflows.studies import load_study
from tests.conftest import ROOT


def test_shipped_study_files_are_valid():
    paper = load_study(ROOT / "projects" / "paper.yaml")
    assert len(paper.configurations) == 23
    assert len({c.model for c in paper.configurations}) == 20
    unfrozen = [c for c in paper.configurations if c.model.startswith("dinov2") and c.freeze is False]
    assert len(unfrozen) == 3 and all(c.epochs == 200 and c.batch_size == 32 for c in paper.configurations)
    assert len(set(paper.labels)) == 23
    demo = load_study(ROOT / "projects" / "demo.yaml")
    assert len(demo.configurations) == 3 and demo.configurations[0].data == "demo"
    cpu = load_study(ROOT / "projects" / "demo_cpu.yaml")  # the benchmark's realistic CPU size of the demo
    assert len(cpu.configurations) == 3 and {c.img_size for c in cpu.configurations} == {112}
    assert len(set(cpu.labels)) == 3 and all(c.epochs > demo.configurations[0].epochs for c in cpu.configurations)
    tune = load_study(ROOT / "projects" / "tune_vit.yaml")
    assert {p.name for p in tune.space} >= {"lr", "weight_decay", "batch_size", "oversample", "aug_strength", "freeze"}
    assert tune.objective_metric == "val/f1" and tune.pruner["type"] == "median"


@pytest.mark.parametrize("text,needle", [
    ("name: x\nkind: sweep\nconfigurations:\n  - {model: resnet18, epochz: 3}\n", ":4:"),
    ("name: x\nkind: sweep\nconfigurations:\n  - {model: resnet18}\n  - {model: resnet9000}\n", "resnet9000"),
    ("name: x\nkind: sweep\nbogus: 1\nconfigurations:\n  - {model: resnet18}\n", ":3: unknown key 'bogus'"),
    ("name: x\nkind: tune\nbase: {model: vit_b_32}\nspace:\n  lr: {type: float, low: 0.1, high: 0.01}\n",
     ":5: lr: low (0.1) must be below high (0.01)"),
    ("name: x\nkind: tune\nspace:\n  lr: {type: float, low: 0.0, high: 0.1, log: true}\n", "log range needs low > 0"),
    ("name: x\nkind: tune\nspace:\n  momentum: {type: float, low: 0.5, high: 1.5}\n", "momentum: bound 1.5 is invalid"),
    ("name: x\nkind: tune\nspace:\n  nonsense: {type: int, low: 1, high: 2}\n", ":4: search parameter 'nonsense'"),
    ("name: x\nkind: tune\nobjective: {metric: test/f1}\nspace:\n  lr: {type: float, low: 0.01, high: 0.1}\n",
     "must be a validation metric"),
    ("name: x\nkind: sweep\nbase: {cv_folds: 5}\nconfigurations:\n  - {model: resnet18, seeds: 2}\n",
     ":5: cv_folds=5 and seeds=2: a study trains each configuration once"),
    ("name: x\nkind: tune\nobjective: {metric: val/loss}\nspace:\n  lr: {type: float, low: 0.01, high: 0.1}\n",
     ":3: val/loss is logged per epoch only"),
])
def test_bad_study_files_name_the_line(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_study(path)
    assert needle in str(e.value) and str(path) in str(e.value)


def test_compile_override_reaches_every_configuration_without_changing_the_study():
    from cushing.workflows.sweeps.storage import _study_name, load_for

    for name, kind in (("paper.yaml", "sweep"), ("tune_vit.yaml", "tune")):
        plain = load_for(ROOT / "projects" / name, kind)
        compiled = load_for(ROOT / "projects" / name, kind, compile="reduce-overhead")
        assert all(c.compile == "reduce-overhead" for c in compiled.configurations)
        assert compiled.base["compile"] == "reduce-overhead"
        assert compiled.config_for({}).compile == "reduce-overhead"  # tuning trials too
        assert [c.model for c in compiled.configurations] == [c.model for c in plain.configurations]
        assert _study_name(compiled) == _study_name(plain), "how a run executes is not what it trains: same study"
    edited = load_for(ROOT / "projects" / "paper.yaml", "sweep")
    import dataclasses
    other = dataclasses.replace(edited, configurations=(dataclasses.replace(edited.configurations[0], lr=0.5),
                                                        *edited.configurations[1:]))
    assert _study_name(other) != _study_name(edited), "what it trains is"
    with pytest.raises(ValueError, match="tune study; use `cushing tune`"):
        load_for(ROOT / "projects" / "tune_vit.yaml", "sweep")


