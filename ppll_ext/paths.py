"""Checks made before any work that a run can write where it was told (its run directory, its trace file)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def unwritable(folder: str | Path) -> str | None:
    """Why `folder` cannot be used or created for writing (it, or its nearest existing ancestor, is a file or refuses
    a new entry), or None when it can. A real probe: permissions, read-only mounts and pseudo file systems such as
    /proc all refuse it alike, even for root."""
    target = Path(folder).expanduser().absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        return f"{str(existing)!r} is a file"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".ppll-probe-", dir=existing))
    except OSError as exc:
        return f"{str(existing)!r} is not writable ({exc.strerror})"
    return None
