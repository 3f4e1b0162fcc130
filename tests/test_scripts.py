"""The set-up scripts tell the truth: sourcing scripts/env.sh keeps the caller's `set -e`; a failed quickstart exits
non-zero without "Done"; the README's quickstart example runs as written (in a throwaway copy of the clone, so the
repository gets no mlflow.db); scripts/test.sh exits non-zero when a test fails; the main job installs no Debian
package."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

ENV_SH = ROOT / "scripts" / "env.sh"


def _bash(script: str, env: dict | None = None, cwd: Path = ROOT, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=env or dict(os.environ), capture_output=True,
                          text=True, timeout=timeout)


def _clean_env(**extra: str) -> dict:
    env = {**os.environ, **extra}
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID",
              "CUSHING_OPTUNA_STORAGE"):
        env.pop(k, None)
    return env


# ------------------------------------------------------------------------------------------------ scripts/env.sh

def test_sourcing_env_sh_keeps_the_callers_errexit():
    """A `set -e` script that sources env.sh still stops at its first failure (env.sh used to turn errexit off)."""
    r = _bash(f"set -e; source {ENV_SH}; false; echo carried-on")
    assert r.returncode != 0 and "carried-on" not in r.stdout, (r.returncode, r.stdout[-500:], r.stderr[-2000:])


def test_sourcing_env_sh_gives_back_the_callers_options_as_they_were():
    """Whatever the caller had on or off comes back: errexit kept off here, and env.sh's own nounset and pipefail
    do not leak into the caller."""
    r = _bash(f"set +e +u; set +o pipefail; source {ENV_SH}; false; echo carried-on; set -o")
    assert r.returncode == 0 and "carried-on" in r.stdout, r.stderr[-2000:]
    opts = dict(line.split() for line in r.stdout.splitlines() if len(line.split()) == 2)
    assert (opts["errexit"], opts["nounset"], opts["pipefail"]) == ("off", "off", "off")
    r = _bash(f"set -e; source {ENV_SH}; set -o")
    opts = dict(line.split() for line in r.stdout.splitlines() if len(line.split()) == 2)
    assert (opts["errexit"], opts["nounset"], opts["pipefail"]) == ("on", "off", "off"), r.stderr[-2000:]


def test_a_shell_that_already_sourced_env_sh_can_source_it_again():
    """With PYTHONPATH already this clone alone, env.sh's path filter selected nothing and, under its own pipefail
    and errexit, stopped the sourcing shell silently (an interactive terminal closed)."""
    r = _bash(f"set -e; source {ENV_SH}; source {ENV_SH}; echo sourced; echo \"$PYTHONPATH\"",
              env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.split() == ["sourced", str(ROOT)], (r.stdout, r.stderr[-2000:])


def test_the_main_job_installs_no_debian_package():
    """quickstart.sh and env.sh (what the main job runs) call no package manager; test.sh installs the tests'
    services through test-packages.sh, which asks for exactly those."""
    for name in ("quickstart.sh", "env.sh"):
        text = (ROOT / "scripts" / name).read_text()
        assert not re.search(r"^[^#]*\bapt(-get)?\b", text, re.M), f"scripts/{name} installs Debian packages"
    assert "test-packages.sh" in (ROOT / "scripts" / "test.sh").read_text()
    wanted = set(re.findall(r"need\+=\((\S+)\)", (ROOT / "scripts" / "test-packages.sh").read_text()))
    assert wanted == {"postgresql", "chromium", "slurm-wlm", "munge"}


def test_test_sh_exits_non_zero_when_a_test_fails(tmp_path):
    failing = tmp_path / "test_fails.py"
    failing.write_text("def test_fails():\n    assert 1 == 2\n")
    r = _bash(f"bash {ROOT / 'scripts' / 'test.sh'} {failing} -p no:cacheprovider",
              env={**os.environ, "CUSHING_TEST_WORKERS": "0", "CUSHING_SKIP_APT": "1"}, timeout=300)
    assert r.returncode == 1 and "1 failed" in r.stdout, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])


# ------------------------------------------------------------------------------------------------ quickstart.sh

@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The clone's files (tracked and not ignored) copied to a throwaway folder: the quickstart writes its
    embedded store (mlflow.db, mlruns/) into the clone it runs from."""
    dst = tmp_path_factory.mktemp("clone") / "cushing"
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file() and not rel.startswith("docs/assets/"):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def _readme_quickstart_example() -> list[str]:
    """The README's example of extra arguments: the one `bash scripts/quickstart.sh -P ...` line it shows."""
    lines = [ln.strip() for ln in (ROOT / "README.md").read_text().splitlines()
             if ln.strip().startswith("bash scripts/quickstart.sh -P")]
    assert len(lines) == 1, lines
    return lines[0].split()


@pytest.mark.slow
def test_a_failed_quickstart_exits_non_zero_without_done(clone, cushing_home):
    r = subprocess.run(["bash", "scripts/quickstart.sh", "-P", "model=not_a_backbone"], cwd=clone,
                       env=_clean_env(CUSHING_HOME=str(cushing_home)), capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert "Done." not in out and "quickstart: the run failed" in r.stderr, out[-3000:]
    assert "not_a_backbone" in out, "the argument replaced the script's own model, and training refused it"
    assert "Repeated parameter" not in out


@pytest.mark.slow
def test_the_readme_quickstart_example_runs_as_written(clone, cushing_home):
    """`bash scripts/quickstart.sh -P epochs=2 -P img_size=64` (read from the README): the caller's values replace
    the script's, the others stay, the run finishes and the script says where its results are."""
    import mlflow

    from tests.conftest import env_vars

    cmd = _readme_quickstart_example()
    r = subprocess.run(cmd, cwd=clone, env=_clean_env(CUSHING_HOME=str(cushing_home)), capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "Done. Results are in the tracking store" in r.stdout
    given = dict(a.split("=", 1) for a in cmd[cmd.index("-P"):] if "=" in a)
    with env_vars({"MLFLOW_TRACKING_URI": f"sqlite:///{clone / 'mlflow.db'}"}):
        c = mlflow.MlflowClient()
        runs = c.search_runs([c.get_experiment_by_name("cushing").experiment_id], order_by=["start_time DESC"])
    run = runs[0]  # this one; the failed quickstart of the test above may have left its FAILED run in the store
    assert run.info.status == "FINISHED"
    for name, value in given.items():
        assert run.data.params[name] == value, name
    assert run.data.params["model"] == "resnet18" and run.data.params["bootstrap"] == "500", "the script's others"
    assert (clone / "mlflow.db").exists(), "the embedded store of the clone the script ran from"
