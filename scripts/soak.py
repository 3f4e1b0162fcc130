"""The chaos soak: a sweep of tiny configurations on two workers, stopped at random moments (SIGTERM to its process
group, SIGKILL to its group, SIGKILL to one worker), relaunched after each stop, then run to the end. Then the
invariants: every configuration FINISHED exactly once, no MLflow run and no Optuna trial left RUNNING, and one more
launch trains nothing.

    bash scripts/soak.sh --minutes 30 [--seed N] [--configs 6] [--workers 2] [--dir DIR]

Runs in DIR (default: a new temporary folder) on the stores MLFLOW_TRACKING_URI and CUSHING_OPTUNA_STORAGE name,
else on embedded SQLite ones in DIR. The random generator is seeded and the seed printed: `--seed` replays a soak.
Exits 1 when an invariant fails. tests/faults/test_soak.py runs a short one on every CI run."""
from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STOPS = ("sigterm-group", "sigkill-group", "sigkill-worker")
TINY = {"data": "demo", "pretrained": False, "epochs": 1, "img_size": 16, "bootstrap": 0, "cam": False,
        "log_model": False, "audit": "off", "checkpoint_every": 0}


def study_file(folder: Path, name: str, configs: int) -> Path:
    import yaml

    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "kind": "sweep", "experiment": name, "base": TINY,
                                    "configurations": [{"model": "resnet18", "label": f"c{i}", "lr": 0.001 * (i + 1)}
                                                       for i in range(configs)]}))
    return path


def environment(folder: Path) -> dict[str, str]:
    env = {**os.environ, "CUSHING_HEARTBEAT_S": "1", "CUSHING_GRACE_S": "2", "CUSHING_RUN_HEARTBEAT_S": "1",
           "CUSHING_STOP_GRACE_S": "15", "PYTHONUNBUFFERED": "1"}
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
    env.setdefault("CUSHING_OPTUNA_STORAGE", f"sqlite:///{folder / 'optuna.db'}")
    env.pop("MLFLOW_RUN_ID", None)
    return env


def launch(study: Path, env: dict[str, str], log: Path, workers: int) -> subprocess.Popen:
    """`cushing sweep` as a job of its own (its own process group: a terminal's foreground job, a scheduler's)."""
    with open(log, "a") as out:
        return subprocess.Popen([sys.executable, "-m", "cushing", "sweep", str(study), "--workers", str(workers)],
                                cwd=study.parent, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def stop(proc: subprocess.Popen, kind: str, rng: random.Random) -> str:
    """Apply one stop; returns what was done."""
    if kind == "sigkill-worker":
        workers = children(proc.pid)
        if not workers:
            return "no worker to kill (the launch had ended)"
        victim = rng.choice(workers)
        os.kill(victim, signal.SIGKILL)
        return f"SIGKILL to worker {victim}"
    sig = signal.SIGTERM if kind == "sigterm-group" else signal.SIGKILL
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return "the launch had ended"
    return f"{sig.name} to the process group"


def _training(env: dict, name: str) -> bool:
    try:
        return any(t.state.name == "RUNNING" for t in _trials(env["CUSHING_OPTUNA_STORAGE"], name))
    except Exception:  # the storage is being created
        return False


def one_round(study: Path, env: dict, log: Path, workers: int, rng: random.Random, kind: str, name: str,
              say) -> None:
    """One launch, stopped at a random moment: a quarter of the time while it starts, else a few seconds after a
    configuration started training (so that stops land in training, finishing, telling and taking the next)."""
    proc = launch(study, env, log, workers)
    t0 = time.monotonic()
    early = rng.random() < 0.25
    while not early and proc.poll() is None and not _training(env, name) and time.monotonic() - t0 < 300:
        time.sleep(0.2)
    delay = rng.uniform(0.5, 4.0) if early else rng.uniform(0.0, 6.0)
    started = time.monotonic()
    while time.monotonic() - started < delay and proc.poll() is None:
        time.sleep(0.05)
    what = stop(proc, kind, rng) if proc.poll() is None else "none: the launch had ended"
    try:
        code = proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
    when = f"{time.monotonic() - t0:.1f} s after the launch" + ("" if early else ", once training")
    say(f"  {kind} {when}: {what}; the launch exited {code}")


def _trials(storage: str, name: str) -> list:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = [s for s in optuna.get_all_study_names(storage) if s.startswith(f"sweep:{name}:")]
    return optuna.load_study(study_name=names[0], storage=storage).get_trials(deepcopy=False) if names else []


def _runs(uri: str, experiment: str) -> list:
    import mlflow

    c = mlflow.MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], max_results=5000) if exp else []


def invariants(env: dict, name: str, labels: list[str]) -> list[str]:
    """What must hold once the sweep ran to the end: the problems found (none when all hold)."""
    runs = _runs(env["MLFLOW_TRACKING_URI"], name)
    finished = collections.Counter(r.data.tags["sweep_config"] for r in runs
                                   if r.data.tags.get("sweep_config") and r.info.status == "FINISHED")
    problems = [f"configuration {label} FINISHED {finished[label]} times" for label in labels if finished[label] != 1]
    problems += [f"MLflow run {r.info.run_id} ({r.data.tags.get('mlflow.runName')}) left RUNNING" for r in runs
                 if r.info.status == "RUNNING"]
    problems += [f"Optuna trial {t.number} ({t.user_attrs.get('label')}) left RUNNING"
                 for t in _trials(env["CUSHING_OPTUNA_STORAGE"], name) if t.state.name == "RUNNING"]
    return problems


def soak(folder: Path, *, seed: int, rounds: int | None = None, minutes: float | None = None, configs: int = 6,
         workers: int = 2, name: str = "soak", during=None, say=print) -> dict:
    """Stop rounds (all three kinds in turn, `rounds` of them or until `minutes` pass), then the sweep to the end
    and one more launch. `during(proc)`: something to do to the system while the final launch runs (restart the
    tracking server); what it returns, if callable, is called once that launch ended. Returns the report, with
    `problems` empty when every invariant held."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    study, env, log = study_file(folder, name, configs), environment(folder), folder / "soak.log"
    labels = [f"c{i}" for i in range(configs)]
    say(f"soak seed {seed}: {configs} configurations, {workers} workers, {folder}")
    t0, done = time.monotonic(), 0
    while (rounds is None or done < rounds) and (minutes is None or time.monotonic() - t0 < 60 * minutes):
        one_round(study, env, log, workers, rng, STOPS[done % len(STOPS)], name, say)
        done += 1
    final = launch(study, env, log, workers)
    settle = during(final) if during is not None else None
    final_code = final.wait(timeout=900)
    if callable(settle):
        settle()  # what `during` started is over before the checks
    before = len(_runs(env["MLFLOW_TRACKING_URI"], name)), len(_trials(env["CUSHING_OPTUNA_STORAGE"], name))
    again = subprocess.run([sys.executable, "-m", "cushing", "sweep", str(study), "--workers", str(workers)],
                           cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    after = len(_runs(env["MLFLOW_TRACKING_URI"], name)), len(_trials(env["CUSHING_OPTUNA_STORAGE"], name))
    problems = invariants(env, name, labels)
    if final_code != 0:
        problems.append(f"the launch run to the end exited {final_code} (see {log})")
    if again.returncode != 0 or after != before or "trained 0 here" not in again.stdout:
        problems.append(f"one more launch was not a no-op (exit {again.returncode}, runs and trials {before} -> "
                        f"{after}): {again.stdout[-500:]} {again.stderr[-1500:]}")
    report = {"seed": seed, "rounds": done, "seconds": time.monotonic() - t0, "problems": problems, "log": str(log)}
    say(f"soak seed {seed}: {done} stop rounds, {report['seconds']:.0f} s; "
        + ("every invariant held" if not problems else "FAILED:\n  " + "\n  ".join(problems)))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/soak.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="stop rounds for this long, then run to the end")
    p.add_argument("--seed", type=int, default=None, help="replay a soak (default: a new seed, printed)")
    p.add_argument("--configs", type=int, default=6)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dir", default=None, help="where the stores, study and log go (default: a new temp folder)")
    ns = p.parse_args(argv)
    seed = ns.seed if ns.seed is not None else random.SystemRandom().randrange(2**31)
    folder = Path(ns.dir) if ns.dir else Path(tempfile.mkdtemp(prefix="cushing-soak-"))
    report = soak(folder, seed=seed, minutes=ns.minutes, configs=ns.configs, workers=ns.workers)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
