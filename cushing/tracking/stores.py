"""The stores runs and studies live in: SQLite paths, PostgreSQL's driver, a lock serialising a fresh store's first
use across processes (two launchers starting at once otherwise race in MLflow's SQLite migration or Optuna's schema
creation on PostgreSQL), and a new SQLite store's schema copied from a template instead of migrated again.

Standard library only at import (`python cushing/tracking/stores.py seed URL` runs without the package's imports);
MLflow is imported only to make the schema template, once per MLflow version."""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["store_lock", "sqlalchemy_url", "sqlite_path", "seed_sqlite", "schema_template"]


def sqlite_path(url: str) -> Path | None:
    """The database file of a `sqlite:///` URL (None for other URLs or in-memory databases)."""
    if not url.startswith("sqlite:///") or url in ("sqlite:///", "sqlite:///:memory:"):
        return None
    return Path(url[len("sqlite:///"):])


def sqlalchemy_url(url: str) -> str:
    """postgresql:// (or postgres://) -> postgresql+psycopg2:// (the driver the project pins); others unchanged."""
    return re.sub(r"^postgres(ql)?://", "postgresql+psycopg2://", url)


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
    elif url.startswith(("postgresql", "postgres:")):
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
    else:
        yield


def seed_sqlite(url: str) -> bool:
    """Give a new embedded SQLite store its schema by copying a template made once per MLflow version, instead of
    replaying MLflow's schema migrations (about 60; 3 s on a 2-core CPU, more under load) in every fresh store:
    tests, benchmarks and a fresh clone's first run make many. What MLflow does on opening a store (checking the
    schema version, creating the Default experiment with this store's artifact root) still happens. Returns
    whether it copied; a no-op for an existing file, another kind of URL, or when no template can be made."""
    path = sqlite_path(url)
    if path is None or path.exists() or (template := schema_template()) is None:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.seed")
    shutil.copyfile(template, tmp)
    try:
        os.link(tmp, path)  # all at once, and never over a store another process created meanwhile
    except OSError:  # it did (FileExistsError), or no hard links here: MLflow migrates the store itself
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def schema_template() -> Path | None:
    """An empty, fully migrated MLflow SQLite store (no experiment yet), made with MLflow's own table creation and
    migrations on first use; keyed by MLflow's version and its migration scripts. None when it cannot be made."""
    key = _schema_key()
    if key is None:
        return None
    home = Path(os.environ.get("CUSHING_HOME", Path.home() / ".cache" / "cushing")).expanduser()
    template = home / "mlflow-schema" / f"{key}.db"
    if template.exists():
        return template
    with store_lock(f"sqlite:///{template}", "make"):
        if not template.exists():
            try:
                _make_template(template)
            except Exception as e:  # a changed MLflow internal: fresh stores are migrated as before
                print(f"note: no MLflow schema template ({type(e).__name__}: {e}); new stores migrate as usual",
                      file=sys.stderr)
                return None
    return template


def _schema_key() -> str | None:
    """mlflow-<version>-<hash of its migration script names>, found without importing MLflow."""
    from importlib import metadata, util

    try:
        spec, version = util.find_spec("mlflow"), metadata.version("mlflow")
    except (ImportError, ValueError, metadata.PackageNotFoundError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    versions = Path(list(spec.submodule_search_locations)[0]) / "store" / "db_migrations" / "versions"
    names = sorted(p.name for p in versions.glob("*.py")) if versions.is_dir() else []
    return f"mlflow-{version}-{hashlib.sha256(chr(10).join(names).encode()).hexdigest()[:12]}"


def _make_template(template: Path) -> None:
    """MLflow's own store made once on an empty file (tables, migrations, the Default experiment), then without that
    experiment: a copy's store makes it again on opening, with its own artifact root."""
    import sqlite3
    import tempfile
    from contextlib import closing

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    template.parent.mkdir(parents=True, exist_ok=True)
    tmp = template.with_name(f".{template.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as artifacts:
        SqlAlchemyStore(f"sqlite:///{tmp}", artifacts).engine.dispose()
    with closing(sqlite3.connect(tmp)) as db, db:
        db.execute("DELETE FROM experiments WHERE experiment_id = 0")
    os.replace(tmp, template)


if __name__ == "__main__":  # `python cushing/tracking/stores.py seed sqlite:///PATH` (scripts/quickstart.sh)
    if len(sys.argv) != 3 or sys.argv[1] != "seed":
        sys.exit("usage: stores.py seed sqlite:///PATH")
    seed_sqlite(sys.argv[2])
