"""A new embedded store seeded from the schema template is the store MLflow would have made itself."""
from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from cushing.tracking.stores import schema_template, seed_sqlite
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One CUSHING_HOME for the module: the schema template is made once (MLflow's migrations, seconds)."""
    return tmp_path_factory.mktemp("seed-home")


def _clauses(sql):
    """A CREATE statement's clauses in a fixed order: MLflow's batch migrations (table rebuilds in SQLite) emit a
    table's constraints in an order that varies from one process to the next (set iteration)."""
    return tuple(sorted(line.strip().rstrip(",") for line in (sql or "").splitlines()))


def _dump(path):
    with sqlite3.connect(path) as c:
        schema = sorted((t, n, tbl, _clauses(sql))
                        for t, n, tbl, sql in c.execute("select type, name, tbl_name, sql from sqlite_master"))
        version = list(c.execute("select version_num from alembic_version"))
        experiments = list(c.execute("select experiment_id, name, artifact_location, lifecycle_stage from experiments"))
    return schema, version, experiments


def test_a_seeded_store_equals_the_one_mlflow_migrates(tmp_path, monkeypatch, home):
    import mlflow

    monkeypatch.setenv("CUSHING_HOME", str(home))
    monkeypatch.chdir(tmp_path)  # the Default experiment's artifact root: ./mlruns of the working directory
    seeded, migrated = tmp_path / "seeded.db", tmp_path / "migrated.db"
    assert seed_sqlite(f"sqlite:///{seeded}") and schema_template().exists()
    assert not seed_sqlite(f"sqlite:///{seeded}"), "an existing store is left as it is"
    assert not seed_sqlite("http://127.0.0.1:5000") and not seed_sqlite("sqlite:///:memory:")
    for path in (seeded, migrated):
        mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()  # MLflow opens (and, for one, migrates) it
    a, b = _dump(seeded), _dump(migrated)
    assert a[0] == b[0] and len(a[0]) > 50, "same tables, indexes and constraints"
    assert a[1] == b[1], "same schema revision"
    assert a[2] == b[2] == [(0, "Default", str(tmp_path / "mlruns" / "0"), "active")]


def test_the_script_form_seeds_without_the_package(tmp_path, home):
    """quickstart.sh runs stores.py by path before `mlflow run`: standard library only, unless it must make
    the template."""
    env = {"CUSHING_HOME": str(home), "PATH": "/usr/bin:/bin"}
    db = tmp_path / "store" / "mlflow.db"
    r = subprocess.run([sys.executable, str(ROOT / "cushing" / "tracking" / "stores.py"), "seed", f"sqlite:///{db}"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert db.exists() and _dump(db)[1], "a migrated schema, no experiment yet"
    r = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "cushing" / "tracking" / "stores.py"), "seed",
                        f"sqlite:///{tmp_path / 'second.db'}"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and (tmp_path / "second.db").exists()
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & {"mlflow", "cushing", "pandas", "torch", "sqlalchemy"}, "the template exists: a copy"
