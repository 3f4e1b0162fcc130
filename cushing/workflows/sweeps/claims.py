"""Exactly-once claims that many processes and hosts can trust.

A sweep's configurations are claimed by inserting a row whose primary key is (study, key, attempt) into a small
table in the sweep's own database (the Optuna storage): the database's unique constraint lets exactly one
inserter win, on SQLite and on PostgreSQL alike, so any number of launchers and workers train each configuration
once. Checking the study and then starting a trial, two steps, cannot give that guarantee.

A claim whose work could not be done (the sweep's parent run could not be created) is released (its row deleted)
by its owner, so the next launcher claims it again instead of waiting for work that will never come.
"""
from __future__ import annotations

import os
import socket
import time

from cushing.tracking.stores import sqlalchemy_url, sqlite_path, store_lock

__all__ = ["GridClaims"]


class GridClaims:
    """Exactly-once claims of (study, key, attempt) in the table `cushing_grid_claims` of a sweep's database."""

    TABLE = "cushing_grid_claims"

    def __init__(self, url: str):
        import sqlalchemy as sa

        url = sqlalchemy_url(url)
        kwargs = {"connect_args": {"timeout": 60}} if sqlite_path(url) else {"pool_pre_ping": True}
        self.engine = sa.create_engine(url, **kwargs)
        self.meta = sa.MetaData()
        self.table = sa.Table(
            self.TABLE, self.meta,
            sa.Column("study", sa.String(512), primary_key=True),
            sa.Column("key", sa.String(512), primary_key=True),
            sa.Column("attempt", sa.Integer, primary_key=True),
            sa.Column("owner", sa.String(256), nullable=False),
            sa.Column("claimed_at", sa.Float, nullable=False))
        try:
            with store_lock(url, "cushing-claims-schema"):
                self.meta.create_all(self.engine)
        except BaseException:
            self.engine.dispose()
            raise

    def __enter__(self) -> "GridClaims":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def owner() -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    def claim(self, study: str, key: str, attempt: int = 0) -> bool:
        """True for exactly one caller per (study, key, attempt), whichever process or host it runs on.

        An insert is retried after an OperationalError (SQLite busy beyond its timeout, a dropped PostgreSQL
        connection); when that error came after the insert had in fact committed, the retry meets its own row and
        still wins: the row is ours when it holds this process and the very time stamp this call wrote."""
        import sqlalchemy as sa

        owner, stamp, retried = self.owner(), time.time(), False
        for wait in (0.2, 0.5, 1, 2, 4, 0):
            try:
                with self.engine.begin() as conn:
                    conn.execute(self.table.insert().values(study=study, key=key, attempt=int(attempt),
                                                            owner=owner, claimed_at=stamp))
                return True
            except sa.exc.IntegrityError:
                return retried and self._holds(study, key, attempt, owner, stamp)
            except sa.exc.OperationalError:  # SQLite busy beyond its timeout: try again, then give up loudly
                if not wait:
                    raise
                retried = True
                time.sleep(wait)
        return False

    def _holds(self, study: str, key: str, attempt: int, owner: str, stamp: float) -> bool:
        """Whether the row of (study, key, attempt) is the one `owner` wrote at `stamp`."""
        row = self._row(study, key, attempt)
        return row is not None and row.owner == owner and float(row.claimed_at) == stamp

    def _row(self, study: str, key: str, attempt: int):
        t = self.table
        with self.engine.connect() as conn:
            return conn.execute(t.select().where((t.c.study == study) & (t.c.key == key)
                                                 & (t.c.attempt == int(attempt)))).first()

    def release(self, study: str, key: str, attempt: int = 0) -> bool:
        """Give a claim of this process back (delete its row), so that (study, key, attempt) can be claimed again;
        False when there was no such claim of this process."""
        t = self.table
        with self.engine.begin() as conn:
            n = conn.execute(t.delete().where((t.c.study == study) & (t.c.key == key)
                                              & (t.c.attempt == int(attempt)) & (t.c.owner == self.owner())))
        return bool(n.rowcount)

    def claimed(self, study: str) -> dict[tuple[str, int], str]:
        """(key, attempt) -> owner for every claim of a study."""
        return {k: owner for k, (owner, _) in self.claims(study).items()}

    def claims(self, study: str) -> dict[tuple[str, int], tuple[str, float]]:
        """(key, attempt) -> (owner, claimed_at as unix seconds) for every claim of a study."""
        with self.engine.connect() as conn:
            rows = conn.execute(self.table.select().where(self.table.c.study == study)).fetchall()
        return {(r.key, int(r.attempt)): (r.owner, float(r.claimed_at)) for r in rows}

    def latest(self, study: str, key: str) -> tuple[int, float] | None:
        """(attempt, claimed_at) of the highest attempt claimed for (study, key), None when none is."""
        t = self.table
        with self.engine.connect() as conn:
            row = conn.execute(t.select().where((t.c.study == study) & (t.c.key == key))
                               .order_by(t.c.attempt.desc()).limit(1)).first()
        return (int(row.attempt), float(row.claimed_at)) if row else None

    def close(self) -> None:
        self.engine.dispose()
