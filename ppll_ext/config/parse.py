"""Reading a configuration: YAML files (safe tags only, size-bounded with aliases expanded) and `--set key=value`
overrides, each value coerced to its field's type with a ConfigError naming the key."""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from ppll_ext.config.schema import Config, check_choice, validate
from ppll_ext.errors import ConfigError, quote


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check/convert a YAML value to the field's annotated type; ConfigError if it cannot be."""
    origin = get_origin(hint)
    if origin is Literal:
        check_choice(value, get_args(hint), key)
        return value
    if origin is Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {quote(value)}", key=key)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {quote(value)}", key=key)
    if hint is float:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:  # a string too: YAML 1.1 reads 1e-3 (no dot) as one
                return float(value)
            except (ValueError, OverflowError):
                pass
        raise ConfigError(f"{key}: expected a number such as 0.1 or 1e-3, got {quote(value)}", key=key)
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, list):
            return ",".join(str(v) for v in value)
        raise ConfigError(f"{key}: expected a string, got {quote(value)}", key=key)
    return value


def _apply(section_obj: Any, values: dict[str, Any], prefix: str) -> None:
    """Set the (nested) `values` on `section_obj`, each coerced to its field's type; ConfigError with the key."""
    hints = get_type_hints(type(section_obj))
    names = [f.name for f in dataclasses.fields(section_obj)]
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            valid = ", ".join(prefix + n for n in names)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {valid}"
            raise ConfigError(f"unknown config key {quote(full)}{hint}", key=full)
        current = getattr(section_obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a mapping of keys, got {quote(value)}", key=full)
            _apply(current, value, f"{full}.")
        else:
            setattr(section_obj, key, _coerce(value, hints[key], full))


def parse_override(text: str) -> dict[str, Any]:
    """Turn 'a.b=value' into {'a': {'b': value}}, the value parsed as YAML (so 0.1, true, null work)."""
    if "=" not in text:
        raise ConfigError(f"--set {quote(text)}: expected key=value, e.g. --set train.epochs=1", key=text.strip())
    key, raw = text.split("=", 1)
    try:
        value = _yaml(raw, f"--set {quote(text)}", key.strip()) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {quote(text)}: value is not valid YAML ({exc.__class__.__name__})",
                          key=key.strip()) from None
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file (if any), then each `key=value` override; validated at the end (with
    train.device=cuda also needing a CUDA device on this machine)."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        where = f"config file {quote(str(p))}"
        try:
            data = _yaml(_read_text(p, where), where, "path") or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{where} is not valid YAML{line}; fix the syntax", key="path") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must hold a mapping of sections (model:, data:, ...)", key="path")
        _apply(cfg, data, "")
    for text in overrides:
        _apply(cfg, parse_override(text), "")
    validate(cfg)
    return cfg


YAML_LIMIT = 1_000_000
"""Most characters of keys and values (plus one per node) a config's YAML may hold with its aliases expanded: a
config needs a few kilobytes, while nested aliases (&a [x, x], &b [*a, *a], ...) multiply with every level, so
400 bytes of them expand to gigabytes."""


def _yaml(text: str, where: str, key: str) -> Any:
    """The YAML document `text` as Python values (YAML's safe tags only). yaml.YAMLError for bad syntax, ConfigError
    naming `where` for a document that expands past YAML_LIMIT through its aliases, nests too deeply or holds a
    value Python cannot build (an integer of thousands of digits, a date such as 2020-13-45)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
    except RecursionError:
        raise ConfigError(f"{where} nests too deeply for YAML to read; a config nests two levels", key=key) from None
    if node is None:
        return None
    _check_expansion(node, where, key)
    try:
        return loader.construct_document(node)
    except ValueError as exc:  # from int() or datetime() on a value that the YAML grammar accepts
        raise ConfigError(f"{where} holds a value that cannot be read ({exc}); fix it", key=key) from None


def _check_expansion(root: yaml.Node, where: str, key: str) -> None:
    """ConfigError as soon as the node tree, each alias counted as a copy of what it names, passes YAML_LIMIT, or an
    alias lies inside the node it names (it would never end). Each node is measured once, so this takes time in
    proportion to the text, not to the expansion."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise ConfigError(f"{where} has a YAML alias inside the node it names (&name ... *name), which never "
                              f"ends; write the value out", key=key)
        open_nodes.add(id(node))
        total = 1
        if isinstance(node, yaml.ScalarNode):
            total += len(node.value)
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else [n for pair in node.value for n in pair]
            for child in children:
                total += size(child)
                if total > YAML_LIMIT:
                    raise ConfigError(f"{where} holds more than {YAML_LIMIT:,} characters once its YAML aliases "
                                      f"(*name) are expanded; a config needs a few kilobytes: write it without "
                                      f"nested aliases", key=key)
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    size(root)


def _read_text(p: Path, where: str) -> str:
    """The text of the config file `p` (`where` names it); ConfigError (key "path") if it is missing, a directory or
    not UTF-8."""
    try:
        is_dir, is_file = p.is_dir(), p.is_file()
    except OSError as exc:  # such as a name too long for the file system
        raise ConfigError(f"{where} cannot be read ({exc.strerror}); pass a readable YAML file", key="path") from None
    if is_dir:
        found = ", ".join(sorted(x.name for x in p.iterdir() if x.suffix in (".yaml", ".yml") and x.is_file())[:10])
        holds = f", e.g. one of {found}" if found else f"; {quote(str(p))} holds no *.yaml file"
        raise ConfigError(f"{where} is a directory; pass a YAML file to --config{holds}", key="path")
    if not is_file:
        raise ConfigError(f"{where} does not exist; pass an existing YAML file to --config", key="path")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read ({exc.strerror}); pass a readable YAML file", key="path") from None
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark is fine
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{where} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}, line "
                          f"{line}); save it as UTF-8", key="path") from None


def config_from_dict(values: dict[str, Any], where: str) -> Config:
    """The Config a checkpoint's trainer state recorded (`Config.to_dict()`), checked; ConfigError naming `where`
    if it no longer loads."""
    cfg = Config()
    try:
        _apply(cfg, values, "")
        validate(cfg)
    except ConfigError as exc:
        raise ConfigError(f"the config recorded in {where} does not load: {exc}", key=exc.key) from None
    return cfg


