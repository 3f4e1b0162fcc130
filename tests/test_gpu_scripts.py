"""The GPU checks stay runnable (issue 31). A GPU session is short and rare, so the suite runs its scripts first:
`scripts/gpu_run.sh` in both modes under CUSHING_GPU_DRY_RUN=1 (every command at CPU sizes, which includes
`scripts/gpu_checks.py --quick` and `scripts/gpu_sweep_timing.py` on the demo study), and every option, model name
and module the scripts use at their GPU sizes must still exist: a rename fails here, not on the device."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

SCRIPTS = ROOT / "scripts"
GPU_RUN = SCRIPTS / "gpu_run.sh"
MODES = {"sweep": {"sweep_timing", "bench_compile", "bench_run"}, "engine": {"bench_required", "checks", "bench_rest"}}
# the dry run as one invocation per check, all at once, so that two cores stay busy until the last one ends
GROUPS = tuple((mode, [name]) for mode, names in MODES.items() for name in sorted(names))
CHECKS = ("cuda_training", "gradcam_114", "sam_batched", "paper_protocol_run_with_mlflow")
STORES = ("mlruns", "mlflow.db", "optuna.db")  # what an MLflow run or a sweep leaves in its working directory


def _script(name: str):
    """A script under scripts/ as a module (its `main` does not run)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gpu_commands() -> dict[str, list[str]]:
    """What gpu_run.sh hands to `run` (`run LIMIT NAME CMD... [| filter]`), as written for the GPU, by NAME."""
    text = GPU_RUN.read_text().replace("\\\n", " ")
    cmds = {}
    for line in text.splitlines():
        words = shlex.split(line.split("|")[0], comments=True)
        if len(words) > 3 and words[0] == "run" and words[1].isdigit():
            cmds[words[2]] = words[3:]
    return cmds


def _status(out: Path, mode: str) -> dict[str, int]:
    lines = (out / f"status_{mode}.txt").read_text().split("\n")
    return {name: int(code) for name, code in (line.split() for line in lines if line)}


def _stores() -> dict:
    """What the clone holds of STORES: a folder's entries two levels down (runs), a file's modification time."""
    return {n: sorted(map(str, (ROOT / n).glob("*/*"))) if (ROOT / n).is_dir()
            else (ROOT / n).exists() and (ROOT / n).stat().st_mtime_ns for n in STORES}


def _rows(path: Path) -> list[dict]:
    rows = json.loads(path.read_text())["rows"]
    assert rows and not [r["note"] for r in rows if r["note"].startswith("error")], path
    return rows


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory, demo_manifest) -> dict:
    """gpu_run.sh under CUSHING_GPU_DRY_RUN=1, both modes in the invocations of GROUPS at once, each into its own
    $OUT (the dry run computes on one thread per process); the demo cohort is drawn beforehand, once. Returns each
    invocation's (mode, $OUT, output, exit code), each check's ($OUT, exit code), and what the clone held of STORES
    before and after."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "CUSHING_OPTUNA"))}
    env.update(CUSHING_GPU_DRY_RUN="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    before = _stores()
    procs = []
    for mode, names in GROUPS:
        out = tmp_path_factory.mktemp(f"gpu-{mode}")
        procs.append((mode, out, subprocess.Popen(["bash", str(GPU_RUN), mode, *names], cwd=ROOT,
                                                  env={**env, "OUT": str(out)}, stdout=subprocess.PIPE,
                                                  stderr=subprocess.STDOUT, text=True)))
    runs = [(mode, out, p.communicate(timeout=1500)[0], p.returncode) for mode, out, p in procs]
    checks = {name: (out, code) for mode, out, _, _ in runs for name, code in _status(out, mode).items()}
    return {"runs": runs, "checks": checks, "clone": (before, _stores())}


def _ran(dry_runs: dict, mode: str) -> None:
    """Every invocation of `mode` exited 0, and every check of it ran and exited 0."""
    failed = [log[-4000:] for m, _, log, code in dry_runs["runs"] if m == mode and code]
    assert not failed, failed
    codes = {name: code for name, (_, code) in dry_runs["checks"].items() if name in MODES[mode]}
    assert codes == dict.fromkeys(MODES[mode], 0)


def dry(test):
    """About two minutes on an idle 2-core machine; a CPU shared with other suites can take several times longer."""
    return pytest.mark.slow(pytest.mark.timeout(1800)(test))


@dry
def test_the_sweep_mode_runs_every_command_on_a_cpu(dry_runs):
    """The measured grid (the demo study, every configuration finished, the per-run metrics the script reads still
    logged), the compiled engine's bench and whole runs, each exiting 0, their JSON where the GPU run writes it."""
    _ran(dry_runs, "sweep")
    out = dry_runs["checks"]["sweep_timing"][0]
    assert _status(out, "sweep") == {"sweep_timing": 0}, "a named check runs alone"
    assert "dry run" in (out / "nvidia.txt").read_text() and "torch " in (out / "nvidia.txt").read_text()
    timing = json.loads((out / "sweep_timing_1ep_w2.json").read_text())
    demo = yaml.safe_load((ROOT / "projects" / "demo.yaml").read_text())
    assert (timing["study"], timing["img_size"], timing["exit_code"]) == ("projects/demo.yaml", 14, 0)
    assert timing["children_finished"] == len(demo["configurations"]) == 3, timing["stderr_tail"]
    for child in timing["children"]:
        assert None not in child.values() and child["train_s"] > 0, child
    assert timing["measured_wall_s"] > 0 and set(timing["full_estimate_s"]) == {"1", "2", "4"}
    out = dry_runs["checks"]["bench_compile"][0]
    (compiled,) = _rows(out / "bench_compile.json")
    assert (compiled["model"], compiled["compile"]) == ("resnet18", "reduce-overhead") and compiled["epoch_s"] > 0
    run = json.loads((dry_runs["checks"]["bench_run"][0] / "bench_run.json").read_text())
    assert (run["model"], run["img_size"], run["epochs"], len(run["runs"])) == ("resnet18", 14, 1, 1)
    assert len(run["mlflow_run"]["runs"]) == 1 and run["phases"]["in_process"]["training loop"] > 0


@dry
def test_the_engine_mode_runs_every_command_on_a_cpu(dry_runs):
    """The benches against the compute floor (fine-tuned and frozen) and every check of gpu_checks.py --quick,
    none of which recorded an error."""
    _ran(dry_runs, "engine")
    for name in ("bench_required", "bench_rest"):
        out = dry_runs["checks"][name][0]
        assert [(r["model"], r["frozen"]) for r in _rows(out / f"{name}.json")] == [("resnet18", False),
                                                                                  ("dinov2_s", True)]
    out = dry_runs["checks"]["checks"][0]
    checks = json.loads((out / "gpu_checks.json").read_text())
    assert not [c for c in CHECKS if "error" in checks[c]], {c: checks[c].get("error") for c in CHECKS}
    assert set(checks["cuda_training"]) == {"resnet18", "dinov2_s-frozen"}
    assert all(r["epochs"] == 1 and r["device"] == "cpu" for r in checks["cuda_training"].values())
    assert checks["gradcam_114"]["resnet18"]["shape"] == [5, 28, 28]
    assert checks["sam_batched"]["photos"] == 3 and 0 < checks["sam_batched"]["mean_mask_area"] < 1
    run = checks["paper_protocol_run_with_mlflow"]
    assert None not in run.values() and run["model_uri"].startswith("models:/"), run
    assert run["phases"]["training loop"] > 0


@dry
def test_the_dry_run_ran_every_command_the_gpu_runs(dry_runs):
    """The names the dry run reported are the commands written in gpu_run.sh, none left out; none of them logged
    into the clone's working directory (where gpu_run.sh runs)."""
    assert set(dry_runs["checks"]) == set(gpu_commands()) == set().union(*MODES.values())
    before, after = dry_runs["clone"]
    assert after == before


def test_every_option_model_and_module_the_gpu_scripts_name_still_exists(tmp_path):
    """At GPU sizes, without running anything: each `cushing` command parses with today's CLI and names models
    in the registry; each script's own options parse; the paper's grid loads as a sweep the way
    gpu_sweep_timing.py shortens it; gpu_checks.py's models are valid training configurations; every module and
    name the two scripts import is still there."""
    from cushing.cli.app import build_parser
    from cushing.config import TrainConfig
    from cushing.model_names import MODEL_NAMES
    from cushing.workflows.sweeps import load_for

    for name, words in gpu_commands().items():
        assert words[0] == "python3", (name, words)
        if words[1:3] == ["-m", "cushing"]:
            ns = build_parser().parse_args(words[3:])  # exits 2 on a renamed option or a mode not in its choices
            named = [m for m in f"{ns.models},{ns.frozen}".split(",") if m]
            assert set(named) <= set(MODEL_NAMES), (name, set(named) - set(MODEL_NAMES))
            continue
        script = _script(Path(words[1]).stem)
        ns = script.parse_args(words[2:])
        if hasattr(ns, "study"):
            short = script.shortened(ROOT / ns.study, ns.epochs, tmp_path / "short.yaml", ns.compile, ns.img_size)
            assert len(load_for(short, "sweep").configurations) == 23
    checks = _script("gpu_checks")
    for z in checks.SIZES.values():
        for model, freeze in [*z["train"], *((m, None) for m in z["cam"]), (z["run"], None)]:
            TrainConfig(model=model, freeze=freeze, pretrained=False)  # ConfigError names what is wrong
    for path in (SCRIPTS / "gpu_checks.py", SCRIPTS / "gpu_sweep_timing.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    importlib.import_module(alias.name)
            elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
                module = importlib.import_module(node.module)
                missing = [a.name for a in node.names if not hasattr(module, a.name)]
                assert not missing, f"{path.name}: {node.module} has no {missing}"


def test_gpu_run_refuses_an_unknown_mode_or_check_and_a_missing_out(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "CUSHING_GPU_DRY_RUN": "1"}
    r = subprocess.run(["bash", str(GPU_RUN), "sweeps"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "gpu_run.sh: unknown mode 'sweeps' (sweep or engine)"
    assert not list(tmp_path.iterdir()), "nothing ran"
    r = subprocess.run(["bash", str(GPU_RUN), "engine", "bench_run"], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.strip() == "gpu_run.sh: no check 'bench_run' in mode engine"
    assert _status(tmp_path, "engine") == {}, "nothing else ran"
    env.pop("OUT")
    r = subprocess.run(["bash", str(GPU_RUN), "engine"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "set OUT to the folder for the results" in r.stderr


def test_a_bench_whose_model_failed_exits_non_zero(tmp_path):
    """So the GPU run's status names it: the row says why, and the other models are still measured and written."""
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "cushing", "bench", "--models", "resnet_18", "--frozen", "",
                        "--epochs", "1", "--img-size", "14", "--device", "cpu", "--out", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1, (r.stdout, r.stderr[-2000:])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["model"] == "resnet_18" and row["note"].startswith("error") and "resnet_18" in row["note"]
