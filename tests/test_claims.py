"""Exactly-once claims (cushing/workflows/sweeps/claims.py) on a real SQLite file and a real PostgreSQL database: one winner
per (study, key, attempt) across processes, release by the owner only, the latest attempt, and a retried insert that
recognises its own committed row."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from cushing.workflows.sweeps.claims import GridClaims
from tests.conftest import ROOT


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=[pytest.mark.postgres, pytest.mark.slow])])
def store(request, tmp_path, monkeypatch) -> str:
    """A claims database: a SQLite file, or a fresh PostgreSQL database of the session's stack (its password
    reaches libpq through the stack's environment, PGPASSFILE, in this process and those it starts)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'claims.db'}"
    import psycopg2

    pg = request.getfixturevalue("pg_stack")
    name = f"claims_{tmp_path.name.lower().replace('-', '_')}"[:60]
    conn = psycopg2.connect(host="127.0.0.1", port=pg.pg.port, dbname="postgres", user="postgres",
                            password=pg.pg.superuser_password)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name}")
        cur.execute(f"CREATE DATABASE {name} OWNER optuna")
    conn.close()
    for k, v in pg.env().items():
        monkeypatch.setenv(k, v)
    return pg.storage_for(name)


def _in_other_process(store: str, code: str) -> str:
    """Run `code` with `c` = GridClaims(store) in a fresh Python process (another owner); its printed output."""
    prog = f"from cushing.workflows.sweeps.claims import GridClaims\nc = GridClaims({store!r})\n{code}\nc.close()\n"
    r = subprocess.run([sys.executable, "-c", prog], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip()


def test_one_claimant_wins_and_only_the_owner_releases(store):
    with GridClaims(store) as c:
        assert c.claim("s", "a", 0)
        assert not c.claim("s", "a", 0), "a second claim of the same (study, key, attempt) loses"
        assert _in_other_process(store, "print(c.claim('s', 'a', 0), c.release('s', 'a', 0))") == "False False", \
            "another process neither wins the claim nor can release it"
        assert c.claimed("s") == {("a", 0): GridClaims.owner()}
        assert c.release("s", "a", 0)
        assert c.claimed("s") == {}
        assert _in_other_process(store, "print(c.claim('s', 'a', 0))") == "True", "a released claim is claimed again"
        assert not c.claim("s", "a", 0)
        assert not c.release("s", "a", 0), "this process no longer owns it"


def test_latest_is_the_highest_attempt_with_its_time(store):
    with GridClaims(store) as c:
        assert c.latest("s", "k") is None
        before = time.time()
        assert c.claim("s", "k", 0) and c.claim("s", "k", 2) and c.claim("s", "other", 5)
        attempt, at = c.latest("s", "k")
        assert attempt == 2 and before - 1 <= at <= time.time() + 1
        assert set(c.claims("s")) == {("k", 0), ("k", 2), ("other", 5)}


def test_a_retried_insert_recognises_its_own_committed_row_only(store):
    """After an OperationalError whose insert had in fact committed (a connection lost after COMMIT), the retry meets
    a duplicate key: the claim is still this call's when the row holds its owner and its exact time stamp."""
    with GridClaims(store) as c:
        stamp = time.time()
        with c.engine.begin() as conn:  # what the first, "failed" try left behind
            conn.execute(c.table.insert().values(study="s", key="k", attempt=0, owner=c.owner(), claimed_at=stamp))
        assert c._holds("s", "k", 0, c.owner(), stamp)
        assert not c._holds("s", "k", 0, c.owner(), stamp + 1e-3), "the same process's row from another call"
        assert not c._holds("s", "k", 0, "otherhost:1", stamp), "another owner's row"
        assert not c._holds("s", "k", 1, c.owner(), stamp), "no row at all"
