"""Folders that came from elsewhere (checkpoints, tokenizer and model folders): what may be read from them.

A name read from a folder's own metadata (an index's weight_map, checksums.json, a DeepSpeed `latest` tag, a
tokenizer config's file entries) is data, not an instruction: it must name a file inside the folder, symlinks
included, or the reader refuses it. A Hugging Face folder that asks for code of its own (`auto_map`, or a
`model_type` / tokenizer class transformers does not ship) is refused before transformers is imported, so no
prompt is shown and no file of the folder is ever run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ppll_ext.errors import PPLLError, quote

CODE_KEYS = ("auto_map",)
"""Keys of config.json / tokenizer_config.json that make transformers import Python files shipped with the folder."""


def member(folder: str | Path, name: object, entry: str, error: type[PPLLError], *,
           follow_symlinks: bool = True) -> Path:
    """`folder / name` when `name` is a relative path that stays inside `folder`, else `error` naming `entry` (where
    the name was read). With `follow_symlinks` the file's real location must lie inside the folder's too."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise error(f"{entry}: {quote(name)} is not a file name inside {str(folder)!r}; the metadata was edited or is "
                    f"corrupt: restore the folder from a copy")
    root = Path(folder)
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise error(f"{entry} names {quote(name)}, a path outside {str(root)!r}; only files inside the folder are "
                    f"read: the metadata was edited or is hostile, restore the folder from a copy")
    path = root / name
    if follow_symlinks:
        real, top = os.path.realpath(path), os.path.realpath(root)
        if os.path.commonpath([real, top]) != top:
            raise error(f"{entry}: {str(path)!r} is a link to {real!r}, outside {str(root)!r}; only files inside "
                        f"the folder are read: replace the link with the file itself")
    return path


def outside(folder: str | Path, path: Path) -> bool:
    """Whether `path` (inside `folder` by name) is a symlink, or lies under one, that leads out of `folder`."""
    top = os.path.realpath(folder)
    return os.path.commonpath([os.path.realpath(path), top]) != top


def refuse_code(folder: str | Path, files: tuple[str, ...], what: str, error: type[PPLLError],
                allowed_types: tuple[str, ...] | None = None, key: str | None = None) -> None:
    """`error` (one line, naming the file and the key) when a JSON file of `folder` among `files` asks transformers
    for code that came with the folder: an `auto_map` entry, or a `model_type` outside `allowed_types` (config.json).
    Files that are absent are skipped."""
    for name in files:
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise error(f"{what}: {str(path)!r} is not valid JSON; restore it from a copy", key=key) from None
        if not isinstance(values, dict):
            raise error(f"{what}: {str(path)!r} is not a JSON object; restore it from a copy", key=key)
        for code_key in CODE_KEYS:
            if code_key in values:
                raise error(f"{what}: {str(path)!r} has {code_key!r}, which asks to run Python code shipped with "
                            f"the folder; ppll_ext never runs such code (trust_remote_code=False): use a folder "
                            f"of a model transformers ships", key=key)
        if name == "config.json" and allowed_types is not None and values.get("model_type") not in allowed_types:
            raise error(f"{what}: {str(path)!r} has model_type={quote(values.get('model_type'))}; ppll_ext loads only "
                        f"{', '.join(allowed_types)} models (no custom code is run)", key=key)
