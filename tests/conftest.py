"""Shared fixtures. Tests run on a CPU with no network; real faces are read from ../shared at test time."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _pytest.nodes import coerce_node_id
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

TEST_ENV = {"HF_HUB_OFFLINE": "1",  # never reach the hub from tests
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "TQDM_DISABLE": "1",
            "PYTHONWARNINGS": "ignore::UserWarning"}
_SAVED_ENV: dict[str, str | None] = {}


def pytest_configure(config) -> None:
    """The session's environment, set before collection imports anything (huggingface_hub reads its offline flag
    at import) and put back as it was when the session ends."""
    for k, v in TEST_ENV.items():
        _SAVED_ENV[k] = os.environ.get(k)
        os.environ.setdefault(k, v)


# Tests that share an expensive session fixture run on one xdist worker (`--dist loadgroup`, scripts/test.sh), so
# the fixture is built once: the PostgreSQL + `mlflow server` stack and the throwaway Slurm clusters on one, the demo
# sweep on another (it is not built twice, and two Slurm clusters never share the host's process table). Tests
# that use a module-scoped fixture stay with their module (`_module_group`).
_XDIST_GROUPS = (("services", {"pg_stack", "slurm", "cluster", "slurm_env"}), ("demo_sweep", {"demo_sweep"}))


def _module_group(item) -> str | None:
    """A test that uses a module-scoped fixture (a trained model, a served model, an `mlflow run`) runs on the
    worker that runs the rest of its module: spread over workers, each would build the fixture again."""
    info = getattr(item, "_fixtureinfo", None)
    defs = info.name2fixturedefs.values() if info is not None else ()
    if any(d and d[-1].scope == "module" for d in defs):
        return item.nodeid.split("::", 1)[0]
    return None


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        group = next((g for g, fixtures in _XDIST_GROUPS if names & fixtures), None) or _module_group(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
            if getattr(config.option, "loadgroup", False) and "@" not in item.nodeid:
                # what xdist 3.8 does for a marked test, which pytest 9 no longer sees (xdist sets `item._nodeid`;
                # pytest 9 keeps the id in `item._id`): the controller schedules by the `@group` suffix
                item._id = coerce_node_id(f"{item.nodeid}@{group}")


def pytest_unconfigure(config) -> None:
    for k, v in _SAVED_ENV.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _shared_candidates() -> list[Path]:
    env = os.environ.get("CUSHING_SHARED")
    cands = [Path(env)] if env else []
    return cands + [ROOT.parent / "shared", Path("/work/shared")]


def shared_root() -> Path:
    for c in _shared_candidates():
        if (c / "data" / "celeba-chubby" / "manifest.csv").exists():
            return c
    pytest.fail("the shared data folder (../shared/data/celeba-chubby) was not found; set CUSHING_SHARED=/path/to/shared")


def celeba_identities(celeba_dir: Path) -> pd.DataFrame:
    """The shared CelebA manifest, one photo per identity, in file order (the cohorts below draw from it)."""
    return pd.read_csv(celeba_dir / "manifest.csv").sort_values("image").drop_duplicates("subject_id")


def photo_cohort(celeba: pd.DataFrame, src: Path, out: Path, counts: dict, skip: set, prefix: str) -> set:
    """A folder of photos (symlinks to the shared data, never copies) and its manifest, as a reader would have them:
    `counts` photos per (sex, label), one per identity, none of the identities in `skip`; returns those used."""
    out.mkdir(parents=True)
    rows, used = [], set()
    for (sex, label), n in counts.items():
        pool = celeba[(celeba["sex"] == sex) & (celeba["label"] == label) & ~celeba["subject_id"].isin(skip)]
        for r in pool.head(n).itertuples():
            name = f"{prefix}_{len(rows) + 1:03d}.jpg"
            (out / name).symlink_to(src / r.image)
            rows.append({"image": name, "label": label, "sex": sex, "subject_id": f"{prefix.upper()}_{len(rows) + 1:03d}"})
            used.add(r.subject_id)
    pd.DataFrame(rows).to_csv(out / "manifest.csv", index=False)
    return used


def faceless(celeba: pd.DataFrame, src: Path, counts: dict, skip: set, work: Path) -> set:
    """The identities, among the first candidates `photo_cohort` would draw, whose photo gives no face crop (dlib
    finds no face in a few percent of these small photos): a cohort drawn without them passes the face stage, which
    stops on such a photo. Run through the face stage itself, into the session's face cache (CUSHING_HOME), so the
    cohort's own face stage later finds every crop there."""
    from cushing.faces.pipeline import extract_faces
    from cushing.faces.settings import FaceSettings

    pools = [celeba[(celeba["sex"] == sex) & (celeba["label"] == label) & ~celeba["subject_id"].isin(skip)].head(2 * n)
             for (sex, label), n in counts.items()]
    cand = pd.concat(pools)
    cand.assign(image=[str(src / p) for p in cand["image"]])[["image", "label", "sex", "subject_id"]].to_csv(
        work / "candidates.csv", index=False)
    report = extract_faces(work / "candidates.csv", work / "candidates", FaceSettings(), progress=False,
                           skip_bad_photos=True).report
    return set(cand.loc[(report["status"] != "ok").to_numpy(), "subject_id"])


@pytest.fixture(scope="session")
def celeba_dir() -> Path:
    return shared_root() / "data" / "celeba-chubby"


@pytest.fixture(scope="session")
def celeba_manifest(celeba_dir) -> pd.DataFrame:
    df = pd.read_csv(celeba_dir / "manifest.csv")
    df["image"] = [str(celeba_dir / p) for p in df["image"]]
    return df


@pytest.fixture(scope="session")
def cushing_home(tmp_path_factory) -> Path:
    """One CUSHING_HOME (demo cohort, caches) for the session, so the demo cohort is drawn once."""
    home = tmp_path_factory.mktemp("cushing-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CUSHING_HOME", str(home))
        yield home


@pytest.fixture(scope="session")
def demo_manifest(cushing_home) -> Path:
    from cushing.data.checks import resolve_data

    return resolve_data("demo")


@pytest.fixture()
def tracking(tmp_path, monkeypatch):
    """A fresh embedded MLflow store for one test; returns its URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory, demo_manifest) -> Path:
    """The demo cohort with its paper split, as a manifest in a tmp folder (absolute image paths)."""
    d = tmp_path_factory.mktemp("small-demo")
    df = pd.read_csv(demo_manifest)
    df["image"] = [str(demo_manifest.parent / p) for p in df["image"]]
    out = d / "manifest.csv"
    df.to_csv(out, index=False)
    return out


def copy_demo_images(demo_manifest: Path, dst: Path, n: int) -> list[Path]:
    """A few synthetic demo images copied into a test folder (never real faces)."""
    df = pd.read_csv(demo_manifest).head(n)
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for p in df["image"]:
        target = dst / Path(p).name
        shutil.copy(demo_manifest.parent / p, target)
        out.append(target)
    return out


@pytest.fixture(scope="session")
def pg_stack():
    """One real PostgreSQL + `mlflow server` (basic-auth) on loopback for the whole session."""
    from cushing.ops.stack import LocalStack

    s = LocalStack(workers=1).start()  # one uvicorn worker starts (and restarts) fastest on a small CPU
    yield s
    s.stop()


def fresh_database(pg_stack, name: str) -> str:
    """A new database on the session's PostgreSQL, owned by the stack's Optuna role; its storage URL (no password
    in it: libpq reads PGPASSFILE)."""
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=pg_stack.pg.port, dbname="postgres", user="postgres",
                            password=pg_stack.pg.superuser_password)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name} OWNER optuna")
    conn.close()
    return pg_stack.storage_for(name)


def running(pid: int) -> bool:
    """Still running: neither gone nor a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def foreground_job() -> None:
    """`preexec_fn` for a child that a test stops as a terminal's Ctrl-C would: its own process group (a foreground
    job) with SIGINT handled. pytest-xdist's workers ignore SIGINT, an ignored signal stays ignored across exec, and
    the CLI rightly leaves an inherited ignore alone (as a shell's background job expects)."""
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def env_vars(values: dict):
    """Set environment variables (and MLflow's cached tracking URI) for a block; restore afterwards."""
    import mlflow

    saved = {k: os.environ.get(k) for k in [*values, "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"]}
    os.environ.update(values)
    for k in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        if k not in values:
            os.environ.pop(k, None)
    mlflow.set_tracking_uri(values.get("MLFLOW_TRACKING_URI", mlflow.get_tracking_uri()))
    try:
        yield
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or None)


def mlflow_run(work: Path, env: dict, entry: str, *params: str, experiment: str = "cushing",
               timeout: int = 900) -> tuple[str, subprocess.CompletedProcess]:
    """`mlflow run <project> --env-manager local -e ENTRY -P ...` as a user types it; returns (the run id MLflow
    created, the finished process). Fails the test with the output's tail when the run fails."""
    import re

    cmd = ["mlflow", "run", str(ROOT), "--env-manager", "local", "--experiment-name", experiment, "-e", entry]
    for p in params:
        cmd += ["-P", p]
    r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"mlflow run -e {entry} failed:\n" + r.stdout[-3000:] + r.stderr[-4000:]
    found = re.search(r"Run \(ID '([0-9a-f]+)'\) succeeded", r.stdout + r.stderr)
    assert found, (r.stdout + r.stderr)[-2000:]
    return found.group(1), r


@pytest.fixture(scope="session")
def demo_sweep(tmp_path_factory, cushing_home):
    """The README's demo flow, once, through MLflow's own launcher on an embedded store: `mlflow run -e sweep`
    (projects/demo.yaml, two workers), `-e promote --allow-synthetic` twice (the second changes nothing) and
    `-e dashboard`, all with `''` for their other optional string parameters."""
    d = tmp_path_factory.mktemp("demo-sweep")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    for k in ("MLFLOW_RUN_ID", "CUSHING_OPTUNA_STORAGE", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        env.pop(k, None)
    project = str(ROOT / "projects" / "demo.yaml")
    kw = {"experiment": "cushing-demo"}
    sweep_id, sweep = mlflow_run(d, env, "sweep", f"project={project}", "workers=2", "storage=", "compile=", **kw)
    scope = [f"project={project}", "experiment=", "parent_run=", "storage="]
    promote_id, promote = mlflow_run(d, env, "promote", *scope, "allow_synthetic=true", "min_value=",
                                     "max_sex_gap=", **kw)
    again_id, again = mlflow_run(d, env, "promote", *scope, "allow_synthetic=true", **kw)
    dash_id, _ = mlflow_run(d, env, "dashboard", *scope, f"out={d / 'dashboard.html'}", **kw)
    return {"uri": uri, "dir": d, "stdout": sweep.stdout, "storage": f"sqlite:///{d / 'optuna.db'}", "env": env,
            "runs": {"sweep": sweep_id, "promote": promote_id, "promote_again": again_id, "dashboard": dash_id},
            "promote_stdout": promote.stdout + again.stdout}


def _chunk(t: bytes, d: bytes) -> bytes:
    return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)


def bomb_png(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def bad_set(celeba_dir, tmp_path_factory):
    """Every kind of bad input the stage must survive, built at test time from real photos (never committed)."""
    d = tmp_path_factory.mktemp("bad")
    faces = sorted((celeba_dir / "images").glob("*.jpg"))
    src = Image.open(faces[0]).convert("RGB")
    big = src.resize((356, 436), Image.BICUBIC)  # a comfortable size for the format variants
    raw = faces[0].read_bytes()
    expect = {}

    def put(name, data, reason):
        (d / name).write_bytes(data) if isinstance(data, bytes) else data.save(d / name)
        expect[name] = reason
    put("plain.jpg", raw, "ok")
    put("cmyk.jpg", big.convert("CMYK"), "ok")
    rgba = big.convert("RGBA")
    a = np.asarray(rgba).copy()
    a[:40, :, 3] = 0  # a transparent band: composited on white, not black
    put("rgba.png", Image.fromarray(a), "ok")
    put("palette.png", big.convert("P", palette=Image.ADAPTIVE, colors=256), "ok")
    put("gray.jpg", big.convert("L"), "ok")
    g16 = (np.asarray(big.convert("L")).astype(np.uint16) * 257)
    im16 = Image.fromarray(g16)
    assert im16.mode.startswith("I;16")
    put("gray16.png", im16, "ok")
    rotated = big.rotate(90, expand=True)  # stored sideways, EXIF says how to turn it back
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(d / "exif_rotated.jpg", exif=exif)
    expect["exif_rotated.jpg"] = "ok"
    put("empty.jpg", b"", "empty_file")
    put("text.jpg", b"notes from clinic, not a photo\n" * 20, "not_an_image")
    put("truncated.jpg", raw[: len(raw) // 2], "truncated")
    png = io.BytesIO()
    big.save(png, "PNG")
    broken = bytearray(png.getvalue())
    i = broken.index(b"IDAT")
    for k in range(i + 8, i + 300):
        broken[k] ^= 0x5A
    put("corrupt.png", bytes(broken), "corrupt")
    put("bomb.png", bomb_png(60000, 60000), "decompression_bomb")
    put("bomb_small_header.png", bomb_png(9000, 9000), "decompression_bomb")
    put("noface.png", Image.fromarray(np.tile(np.linspace(0, 255, 300, dtype=np.uint8), (300, 1))).convert("RGB"),
        "no_face")
    two = Image.new("RGB", (2 * 356, 436), "white")
    two.paste(big, (0, 0))
    two.paste(Image.open(faces[3]).convert("RGB").resize((356, 436)), (356, 0))
    put("two_faces.jpg", two, "multiple_faces")
    expect["missing.jpg"] = "file_not_found"
    rows = [{"image": n, "label": i % 2, "sex": "F", "subject_id": f"s{i}"} for i, n in enumerate(expect)]
    pd.DataFrame(rows).to_csv(d / "manifest.csv", index=False)
    return d, expect
