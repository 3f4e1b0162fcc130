"""The stores runs and studies live in: which file a SQLite URL names, the driver a PostgreSQL URL needs, and a lock
that serialises the first use of a fresh store across processes (MLflow's SQLite schema migration, Optuna's schema
creation on PostgreSQL: two launchers starting at once otherwise race in them)."""
from __future__ import annotations

import fcntl
import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["store_lock", "sqlalchemy_url", "sqlite_path"]


def sqlite_path(url: str) -> Path | None:
    """The database file of a `sqlite:///` URL (None for other URLs or in-memory databases)."""
    if not url.startswith("sqlite:///") or url in ("sqlite:///", "sqlite:///:memory:"):
        return None
    return Path(url[len("sqlite:///"):])


def sqlalchemy_url(url: str) -> str:
    """postgresql:// -> postgresql+psycopg2:// (the driver the project pins); others unchanged."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix):]
    return url


@contextmanager
def store_lock(url: str, name: str) -> Iterator[None]:
    """Hold an exclusive lock named `name` on the store at `url` for the block (no-op for other schemes)."""
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f"{path.name}.{name}.lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return
    if url.startswith(("postgresql", "postgres:")):
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        engine = sqlalchemy.create_engine(sqlalchemy_url(url), poolclass=NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        finally:
            engine.dispose()
        return
    yield
