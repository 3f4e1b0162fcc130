"""The sweep planner (`cushing sweep --plan`): the wall-time model and its table; workers per host."""
from __future__ import annotations

import pytest

from tests.conftest import ROOT


def test_wall_time_model_shares_the_gpu_and_overlaps_cpu_work():
    from cushing.workflows.plan import GPU_SHARING, Estimate, makespan

    a = Estimate(compile_s=0.0, gpu_s=10.0, overhead_s=5.0)
    assert makespan([a, a], 1) == pytest.approx(30.0)  # one worker: everything in sequence
    # two workers: both train at once at 1.5x the throughput of one, then finish on the CPU side by side
    assert makespan([a, a], 2) == pytest.approx(20.0 / GPU_SHARING[2] + 5.0)
    # a job in its CPU phase leaves the GPU to the other: 10 s alone, then 10 s of the second job's CPU work
    b = Estimate(compile_s=10.0, gpu_s=0.0, overhead_s=0.0)
    assert makespan([a, b], 2) == pytest.approx(15.0)
    assert makespan([], 3) == 0.0


def test_plan_reads_the_overhead_measured_by_bench_run(tmp_path, capsys):
    import json

    from cushing.cli import main
    from cushing.workflows.plan import overhead_from_bench

    path = tmp_path / "bench_run.json"
    path.write_text(json.dumps({"device": "cpu", "model": "resnet18", "img_size": 112, "phases": {"in_process": {
        "training loop": 10.0, "scoring (val, test)": 0.5, "model: MLflow log_model": 1.0, "Grad-CAM maps": 2.0,
        "artifact upload": 0.25, "other (not in a phase)": 0.5}}}))
    o = overhead_from_bench(path)
    assert o.worker_s == 4.25 and "bench run" in o.source
    assert main(["sweep", str(ROOT / "projects" / "paper.yaml"), "--plan", "--plan-from", str(path)]) == 0
    assert "per run outside the training loop: 4.2 s; measured by `cushing bench run`" in capsys.readouterr().out
    assert main(["sweep", str(ROOT / "projects" / "paper.yaml"), "--plan", "--plan-from", str(tmp_path / "no")]) == 2
    assert "not the JSON of `cushing bench run" in capsys.readouterr().err


def test_sweep_plan_prints_estimates_for_the_paper_grid(capsys):
    from cushing.cli import main
    from cushing.workflows.sweeps import plan_sweep

    table, wall = plan_sweep(ROOT / "projects" / "paper.yaml", [1, 2, 4])
    assert len(table) == 23
    # one worker: the sum of the configurations; more workers overlap one's CPU work with another's training
    assert wall[1] == pytest.approx(table["total_s"].sum())
    assert (table["other_s"] > 0).all()
    assert wall[4] < wall[2] < wall[1]
    frozen = table[table["configuration"].str.endswith("-frozen")]
    assert len(frozen) == 3 and (frozen["train_s"] < table["train_s"].median()).all()
    ctable, _ = plan_sweep(ROOT / "projects" / "paper.yaml", [1], compile="reduce-overhead")
    tuned = ~table["configuration"].str.endswith("-frozen")
    assert (ctable.loc[tuned, "train_s"] < table.loc[tuned, "train_s"]).all()
    assert (ctable.loc[tuned, "compile_s"] > 0).all() and (ctable.loc[~tuned, "compile_s"] == 0).all()
    assert main(["sweep", str(ROOT / "projects" / "paper.yaml"), "--plan", "--workers", "3"]) == 0
    out = capsys.readouterr().out
    assert "swin_l" in out and "--workers 3:" in out and "H200" in out
    with pytest.raises(SystemExit):
        main(["sweep", str(ROOT / "projects" / "paper.yaml"), "--plan", "--workers", "-2"])
    assert "at least 1 worker" in capsys.readouterr().err


def test_auto_workers_are_two_on_a_gpu_and_one_on_a_cpu():
    import torch

    from cushing.cli import build_parser
    from cushing.workflows.sweeps import auto_workers

    assert auto_workers() == (2 if torch.cuda.is_available() else 1)
    ns = build_parser().parse_args(["sweep", "projects/paper.yaml", "--workers", "auto"])
    assert ns.workers is None  # resolved by run_sweep with auto_workers()
    assert build_parser().parse_args(["sweep", "projects/paper.yaml", "--workers", "3"]).workers == 3
