"""Files and folders only this account can read: those that hold faces or what is derived from them (crops, face
descriptors, the audit's pairs and review page: protected health information) and the local stack's secrets. A
host may have other accounts, and the umask (often 022) would leave them readable by all. Imports nothing of the
package (the bottom layer, beside `phases` and `stops`)."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["PRIVATE_DIR_MODE", "PRIVATE_FILE_MODE", "private_dir", "write_private"]

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def private_dir(path: str | os.PathLike, *, narrow: bool = False) -> Path:
    """Create `path` as a folder only this account can enter (missing parents as the umask says) and return it. One
    already there keeps its mode, unless `narrow` (cushing's own, such as its caches) and this account owns it: then
    it becomes 0700."""
    p = Path(path)
    p.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)  # the mode applies only to a folder made here
    if narrow and p.stat().st_mode & 0o077 and p.stat().st_uid == os.geteuid():
        p.chmod(PRIVATE_DIR_MODE)
    return p


def write_private(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to a file only this account can read: created 0600, narrowed to it if it was there."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
    os.fchmod(fd, PRIVATE_FILE_MODE)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)
