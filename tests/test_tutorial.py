"""The own-cohort tutorial (docs/tutorials/own-cohort.md) runs as the page shows it.

Every fenced block marked ``<!-- test -->`` on the page runs in page order, in one bash session in an empty folder
(the reader's study folder), on a small real cohort built at test time from ../shared/data/celeba-chubby (photos
are symlinked, never copied). A block marked ``<!-- test: background -->`` is a server (`mlflow ui`, `mlflow models
serve`): it is started in its own session, the test waits until its port answers, and it is stopped at the end.
The only changes to the page's commands are in ``SUBSTITUTIONS`` (image size, epochs, bootstrap resamples, random
weights for an offline CPU) and the ports (free ones); a substitution that no longer matches the page fails.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ROOT, celeba_identities, faceless, photo_cohort

pytestmark = [pytest.mark.slow, pytest.mark.dlib]

PAGE = ROOT / "docs" / "tutorials" / "own-cohort.md"
BLOCK = re.compile(r"<!--\s*test(?::\s*(?P<kind>[\w-]+))?\s*-->\s*\n```(?:bash|sh)\n(?P<code>.*?)```", re.S)
SUBSTITUTIONS = [  # (what the page says, what the test runs): small and offline, nothing else
    (r"--epochs \d+", "--epochs 2"),
    (r"--img-size \d+", "--img-size 56"),  # 56: ResNet and DINOv2 (patches of 14) both take it
    (r"--bootstrap \d+", "--bootstrap 200"),
    (r"--pretrained true", "--pretrained false"),  # no network here: random weights
]
PORTS = ("5000", "5001")  # the page's ports, replaced by free ones
COHORT = {("F", 1): 10, ("M", 1): 10, ("F", 0): 20, ("M", 0): 20}  # 60 photos, one per CelebA identity
EXTERNAL = {("F", 1): 5, ("M", 1): 5, ("F", 0): 10, ("M", 0): 10}  # 30 other identities


def blocks(text: str) -> list[tuple[str, str]]:
    """The page's tested blocks, in order: (kind, code) with kind "" or "background"."""
    return [(m.group("kind") or "", m.group("code")) for m in BLOCK.finditer(text)]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def substitute(found: list[tuple[str, str]], ports: dict[str, int]) -> list[tuple[str, str]]:
    out, used = [], {p: 0 for p, _ in SUBSTITUTIONS} | {p: 0 for p in ports}
    for kind, code in found:
        for pattern, repl in SUBSTITUTIONS:
            code, n = re.subn(pattern, repl, code)
            used[pattern] += n
        for page_port, port in ports.items():
            code, n = re.subn(rf"\b{page_port}\b", str(port), code)
            used[page_port] += n
        out.append((kind, code))
    unused = [p for p, n in used.items() if n == 0]
    assert not unused, f"substitutions that match nothing on {PAGE.name} any more: {unused}"
    return out


def _script(steps: list[tuple[str, str]], ports: dict[str, int], folder: Path) -> str:
    """One bash session: the page's blocks in order; servers in their own session, waited for, stopped at exit."""
    lines = ["set -euo pipefail", "_groups=()",
             'stop_servers() { for g in "${_groups[@]}"; do kill -TERM -- "-$g" 2>/dev/null || true; done; }',
             "trap stop_servers EXIT"]
    port_of = {str(p) for p in ports.values()}
    for i, (kind, code) in enumerate(steps, 1):
        first = code.strip().splitlines()[0]
        # on a line of its own: a command's output may not end with a newline (curl's does not)
        lines.append("printf '\\n%s %s\\n' " + shlex.quote(f"=== block {i}: {first[:60]}") + ' "[t=${SECONDS}s]"')
        if kind == "background":
            port = next(p for p in re.findall(r"\b(\d{4,5})\b", code) if p in port_of)
            (folder / f"bg{i}.sh").write_text(code)
            lines += [f"setsid bash bg{i}.sh > bg{i}.log 2>&1 &", f"echo $! > bg{i}.pid", "_groups+=($!)",
                      f"for _ in $(seq 1 240); do curl -s -o /dev/null http://127.0.0.1:{port}/ && break;"
                      f" kill -0 $! 2>/dev/null || {{ cat bg{i}.log; exit 1; }}; sleep 0.5; done",
                      f"curl -s -o /dev/null http://127.0.0.1:{port}/ || {{ cat bg{i}.log; exit 1; }}",
                      f"echo 'ready: port {port}'"]
        elif kind:
            raise AssertionError(f"unknown block kind {kind!r} on {PAGE.name}")
        else:
            lines.append(code)
    lines.append('printf \'\\n[t=%ss]\\n=== done\\n\' "$SECONDS"')
    return "\n".join(lines) + "\n"


def _env(cushing_home: Path) -> dict:
    env = {**os.environ, "CUSHING_HOME": str(cushing_home), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID",
              "CUSHING_OPTUNA_STORAGE"):
        env.pop(k, None)
    return env


def _stop_leftovers(folder: Path) -> None:
    """The script's trap stops its servers; if the script itself was killed (timeout), stop them here."""
    for pid_file in folder.glob("bg*.pid"):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError, PermissionError):
            pass


def _block_output(stdout: str, marker: str) -> str:
    parts = re.split(r"^=== block \d+: ", stdout, flags=re.M)
    return next(p for p in parts if p.startswith(marker))


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory, celeba_dir, cushing_home):
    study = tmp_path_factory.mktemp("study")
    celeba = celeba_identities(celeba_dir)
    no_face = faceless(celeba, celeba_dir, COHORT, set(), tmp_path_factory.mktemp("candidates"))
    used = photo_cohort(celeba, celeba_dir, study / "photos", COHORT, no_face, "photo")  # the page's faces: no stop
    photo_cohort(celeba, celeba_dir, study / "external", EXTERNAL, used, "ext")
    ports = {p: _free_port() for p in PORTS}
    steps = substitute([b for b in blocks(PAGE.read_text()) if b[0] != "pipeline"], ports)
    (study / "tutorial.sh").write_text(_script(steps, ports, study))
    t0 = time.monotonic()
    try:
        r = subprocess.run(["bash", "tutorial.sh"], cwd=study, env=_env(cushing_home), capture_output=True,
                           text=True, timeout=900)
    finally:
        _stop_leftovers(study)
    assert r.returncode == 0, f"the tutorial failed:\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}"
    starts = re.findall(r"^=== block (\d+): .*\[t=(\d+)s\]$", r.stdout, re.M)
    print(f"tutorial: {len(steps)} blocks in {time.monotonic() - t0:.0f} s; block starts (s): "
          + ", ".join(f"{b}@{t}" for b, t in starts))
    return {"dir": study, "stdout": r.stdout, "stderr": r.stderr, "steps": steps}


def test_the_page_marks_every_command_block_for_the_test():
    """Every bash block of the tutorial is run by the test (a new unmarked command would not be)."""
    text = PAGE.read_text()
    all_bash = re.findall(r"```(?:bash|sh)\n", text)
    assert len(blocks(text)) == len(all_bash) >= 8
    # the one-command pipeline runs in tests/test_pipeline.py (on its own cohort), the steps it runs here
    assert [kind for kind, code in blocks(text) if "cushing pipeline" in code] == ["pipeline"]
    assert all("cushing pipeline" in code for kind, code in blocks(text) if kind == "pipeline")


def test_every_step_ran_and_the_servers_answered(tutorial):
    out = tutorial["stdout"]
    assert out.rstrip().endswith("=== done")
    assert out.count("ready: port") == sum(kind == "background" for kind, _ in tutorial["steps"]) == 2


def test_faces_and_audit_wrote_their_outputs(tutorial):
    d = tutorial["dir"]
    report = pd.read_csv(d / "faces" / "faces_report.csv")
    crops = pd.read_csv(d / "faces" / "manifest.csv")
    assert len(report) == sum(COHORT.values()) == len(crops), "a face in every photo: the page's command did not stop"
    assert (d / "audit" / "audit.csv").exists()


def test_two_runs_on_the_crops_a_champion_and_an_external_evaluation(tutorial):
    import mlflow

    from tests.conftest import env_vars

    with env_vars({"MLFLOW_TRACKING_URI": f"sqlite:///{tutorial['dir'] / 'mlflow.db'}"}):
        c = mlflow.MlflowClient()
        exp = c.get_experiment_by_name("cushing")
        runs = c.search_runs([exp.experiment_id])
        trained = {r.data.tags.get("model"): r for r in runs if "model_uri" in r.data.tags}
        champion = c.get_model_version_by_alias("cushing", "champion")
        external = [r for r in runs if any(k.startswith("external/") for k in r.data.metrics)]
    assert set(trained) == {"resnet18", "dinov2_s"}, sorted(trained)
    for r in trained.values():
        assert r.info.status == "FINISHED" and r.data.params["epochs"] == "2" and r.data.params["img_size"] == "56"
        assert r.data.tags.get("face_mask_source") == "landmark_hull", "trained on the face stage's crops"
    assert champion.run_id in {r.info.run_id for r in trained.values()}
    assert len(external) == 1 and external[0].data.metrics["external/n"] > 0
    assert external[0].data.tags["task"] == "external_validation"


def test_what_each_step_says_is_what_it_did(tutorial):
    out = tutorial["stdout"]
    faces = _block_output(out, "cushing faces")
    assert re.search(r"^face-stage run [0-9a-f]{32}: ", faces, re.M) and "audit logged" not in faces
    promote = _block_output(out, "cushing promote")
    assert promote.count("'cushing'") == 1, "promote names its experiment once"
    assert "already exists" not in tutorial["stderr"] and "Successfully registered model 'cushing'" in \
        tutorial["stderr"], "the first promote on a fresh store creates the registered model, and says so"
    evaluation = _block_output(out, "cushing evaluate")
    n = re.search(r"^  (\d+) of (\d+) photos excluded, not scored \((.+)\)$|^  all (\d+) photos scored$", evaluation,
                  re.M)
    assert n and int(n.group(2) or n.group(4)) == sum(EXTERNAL.values()), evaluation[:2000]


def test_the_served_champion_answered_the_photo(tutorial):
    out = _block_output(tutorial["stdout"], "printf")  # its first line is the marker, which quotes the command
    answer = json.loads(next(ln for ln in out.splitlines() if ln.startswith('{"predictions"')))
    (p,) = answer["predictions"]
    assert p["face_status"] == "ok" and p["label"] in (0, 1) and 0.0 <= p["probability"] <= 1.0


def test_the_dashboard_names_no_photo(tutorial):
    html = (tutorial["dir"] / "dashboard.html").read_text()
    assert "photo_0" not in html and ".jpg" not in html and "PHOTO_" not in html
