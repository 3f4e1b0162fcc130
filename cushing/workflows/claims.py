"""Exactly-once claims that many processes and hosts can trust.

A sweep's configurations are claimed by inserting a row whose primary key is (study, key, attempt) into a small
table in the sweep's own database (the Optuna storage): the database's unique constraint lets exactly one
inserter win, on SQLite and on PostgreSQL alike, so any number of launchers and workers train each configuration
once. Checking the study and then starting a trial, two steps, cannot give that guarantee.
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
        with store_lock(url, "cushing-claims-schema"):
            self.meta.create_all(self.engine)

    @staticmethod
    def owner() -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    def claim(self, study: str, key: str, attempt: int = 0) -> bool:
        """True for exactly one caller per (study, key, attempt), whichever process or host it runs on."""
        import sqlalchemy as sa

        for wait in (0.2, 0.5, 1, 2, 4, 0):
            try:
                with self.engine.begin() as conn:
                    conn.execute(self.table.insert().values(study=study, key=key, attempt=int(attempt),
                                                            owner=self.owner(), claimed_at=time.time()))
                return True
            except sa.exc.IntegrityError:
                return False
            except sa.exc.OperationalError:  # SQLite busy beyond its timeout: try again, then give up loudly
                if not wait:
                    raise
                time.sleep(wait)
        return False

    def claimed(self, study: str) -> dict[tuple[str, int], str]:
        """(key, attempt) -> owner for every claim of a study."""
        with self.engine.connect() as conn:
            rows = conn.execute(self.table.select().where(self.table.c.study == study)).fetchall()
        return {(r.key, int(r.attempt)): r.owner for r in rows}

    def close(self) -> None:
        self.engine.dispose()
