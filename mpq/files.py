"""Files written whole or not at all (a leaf module: any layer may use it)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write via a temporary file in the same folder and ``os.replace``: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


OWNER_FILE = ".mpq-study"  # which study a shared output folder's subfolder belongs to


def owned_folder(base: str | Path, kind: str, owner: str) -> Path:
    """``base/kind`` for study ``owner`` (marked as its own on first use), or
    ``base/kind-<owner>`` when another study already owns ``base/kind``: two studies sharing an
    output folder never overwrite each other's exports or plots."""
    folder = Path(base) / kind
    mark = folder / OWNER_FILE
    if folder.exists() and any(folder.iterdir()):
        taken = mark.read_text().strip() if mark.is_file() else None
        if taken != owner:  # another study's, or from before the marks: left alone
            folder = Path(base) / f"{kind}-{owner}"
    write_atomic(folder / OWNER_FILE, owner + "\n")
    return folder
