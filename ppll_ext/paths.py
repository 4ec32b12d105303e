"""Where ppll writes its outputs (run directories, trace files, plots, exports, JSON reports), checked before any work
and written safely: an output path must be absent, a regular file (or a folder where a folder is expected), never a
device, FIFO or socket (symlinks followed); files are written to a new temporary name beside the target and renamed
onto it, and a full disk is one error line instead of a traceback."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from ppll_ext.errors import ConfigError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
"""errno values of a full file system (or an exhausted quota)."""


def kind(mode: int) -> str:
    """What an `os.stat` mode is, for messages: "a file", "a directory", "a character device", "a FIFO" ..."""
    for test, name in ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def _existing(target: Path) -> Path:
    """`target` or its nearest ancestor that exists."""
    return next(p for p in (target, *target.parents) if p.exists())


def unwritable(folder: str | Path) -> str | None:
    """Why `folder` cannot be used or created for writing (it, or its nearest existing ancestor, is not a folder
    (a file, a device ...) or refuses a new entry), or None when it can. Symlinks are followed. A real probe:
    permissions, read-only mounts and pseudo file systems such as /proc all refuse it alike, even for root."""
    target = Path(folder).expanduser().resolve()
    existing = _existing(target)
    if not existing.is_dir():
        return f"{str(existing)!r} is {kind(existing.stat().st_mode)}"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".ppll-probe-", dir=existing))
    except OSError as exc:
        return f"{str(existing)!r} is not writable ({exc.strerror})"
    return None


def check_output_file(path: str | Path, label: str, *, key: str | None = None, example: str = "out.json") -> Path:
    """ConfigError (`label` names the path, `key` the setting) unless a file can be written at `path`: absent or a
    regular file, never a folder, device, FIFO or socket (a symlink counts as what it points to), in a folder that
    exists or can be created and is writable. Returns the path a write lands on (symlinks resolved)."""
    target = Path(path).expanduser().resolve()
    via = f" (the symlink {str(path)!r} points there)" if Path(path).expanduser().is_symlink() else ""
    if target.exists():
        mode = target.stat().st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError(f"{label} cannot be written: {str(target)!r} is a directory{via}; give a file path such "
                              f"as {str(target / example)!r}", key=key)
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{label} cannot be written: {str(target)!r} is {kind(mode)}{via}, which ppll never "
                              f"writes over; give a regular file or a new path", key=key)
    reason = unwritable(target.parent)
    if reason is not None:
        raise ConfigError(f"{label} cannot be written: {reason}; choose another path", key=key)
    return target


def is_no_space(exc: BaseException) -> bool:
    """Whether `exc` says the file system is full: an OSError with ENOSPC/EDQUOT, or an error of a library (such as
    safetensors) that carries the OS error only in its text."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in NO_SPACE
    text = str(exc)
    return any(f"os error {code})" in text for code in NO_SPACE) or "No space left on device" in text


def free_bytes(path: str | Path) -> int:
    """Free bytes (for this user) of the file system `path` lies on, or would be created on."""
    return shutil.disk_usage(_existing(Path(path).expanduser().absolute())).free


def size_text(n: float) -> str:
    """Bytes for messages: '812 B', '54.3 kB', '1.20 GB' (powers of 1000, as --max-shard-size takes them)."""
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= factor:
            return f"{n / factor:.3g} {unit}"
    return f"{int(n)} B"


def write_atomically(path: str | Path, write: Callable[[Path], object], label: str, *, key: str | None = None,
                     example: str = "out.json") -> Path:
    """Write the file at `path` as `write(tmp)` writes a new file `tmp` beside it, then rename `tmp` onto it: a reader
    sees the old file or the new one, never part of it, and only a regular file or a new name is replaced (checked as
    check_output_file does; a symlink stays a link, its target is replaced). On a full disk a ConfigError naming the
    folder; the temporary file never outlives a failure. Returns `path`."""
    target = check_output_file(path, label, key=key, example=example)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # a new file, with the umask's mode
        write(tmp)
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and is_no_space(exc):
            raise ConfigError(f"{label} cannot be written: no space left on the device of {str(target.parent)!r} "
                              f"({size_text(free_bytes(target.parent))} free); free space there or choose another "
                              f"path", key=key) from None
        raise
    return Path(path)
