"""Text for language-model training: tokenizers (bytes or a local Hugging Face one), splits as blocks of token ids."""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ppll_ext.errors import DataError, quote
from ppll_ext.folders import member, refuse_code

TEXT_SOURCES: tuple[str, ...] = ("pydoc", "text", "tokens", "hf_disk")
TEXT_SPLITS: tuple[str, ...] = ("train", "test")

logger = logging.getLogger(__name__)

_TEXT_SUFFIXES = (".txt", ".md", ".rst")
_VAL_NAMES = ("val", "validation", "test")
# Tokens read at a time when checking the ids of a .bin file: 32 MiB of uint16.
_CHECK_CHUNK = 1 << 24
REPLACE = ":replace"
"""Suffix of data.encoding that replaces the bytes that do not decode with U+FFFD (counted and logged)."""


class Tokenizer(Protocol):
    """What the text loader needs of a tokenizer: text <-> ids, the vocabulary size and files to reload it."""

    name: str
    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids."""
        ...

    def save(self, folder: Path) -> list[Path]:
        """Write the files that let the tokenizer be reloaded from `folder`; return their paths."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as token ids (256 of them): needs no files and round-trips any text."""

    name = "byte"
    vocab_size = 256
    eos_id: int | None = None

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text`."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """UTF-8 text of byte ids; invalid sequences (e.g. a block cut inside a character) become U+FFFD."""
        return bytes(ids).decode("utf-8", errors="replace")

    def save(self, folder: Path) -> list[Path]:
        """Nothing to write: "byte" names the tokenizer completely."""
        return []


class HFTokenizer:
    """A transformers fast tokenizer from a local folder holding tokenizer.json (or that file); never downloads."""

    def __init__(self, path: str | Path, confined: bool = False) -> None:
        """`confined`: the folder came with a checkpoint, so none of its files may be a link leading out of it."""
        path = Path(path).expanduser()
        folder = path.parent if path.is_file() else path
        tokenizer_file = path if path.is_file() else path / "tokenizer.json"
        check_tokenizer_folder(folder, confined)
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        try:
            if tokenizer_file.name == "tokenizer.json" and (folder / "tokenizer_config.json").is_file():
                self._tok: Any = AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                               trust_remote_code=False)
            else:
                self._tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))
        except Exception as err:
            raise DataError(f"cannot load the tokenizer in {str(path)!r} ({type(err).__name__}: {err}); set "
                            f"data.tokenizer to a folder written by a fast tokenizer's save_pretrained",
                            key="data.tokenizer") from err
        self.name = str(path)
        self.vocab_size = len(self._tok)
        self.eos_id: int | None = self._tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without the special tokens (BOS/EOS) the tokenizer may add by default."""
        return list(self._tok.encode(text, add_special_tokens=False, verbose=False))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids, special tokens included."""
        return str(self._tok.decode(list(ids), skip_special_tokens=False))

    def save(self, folder: Path) -> list[Path]:
        """save_pretrained into `folder`, so that transformers.AutoTokenizer.from_pretrained(folder) reloads it."""
        folder.mkdir(parents=True, exist_ok=True)
        return [Path(f) for f in self._tok.save_pretrained(str(folder)) if Path(f).is_file()]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
"""The files of a tokenizer folder transformers may read."""


def check_tokenizer_folder(folder: Path, confined: bool = False) -> None:
    """DataError (one line) when the tokenizer folder asks transformers to run code of its own (auto_map in
    tokenizer_config.json or config.json) or names a file outside itself in tokenizer_config.json (`*_file` entries,
    fast_tokenizer_files); with `confined` (a checkpoint's folder) also when one of its files is a link out of it."""
    where = f"data.tokenizer={str(folder)!r}"
    refuse_code(folder, ("tokenizer_config.json", "config.json"), where, DataError, key="data.tokenizer")
    config = folder / "tokenizer_config.json"
    values = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    for key, value in values.items():
        names = value if key == "fast_tokenizer_files" else [value] if key.endswith("_file") else []
        for name in names if isinstance(names, list) else [names]:
            if name is not None:
                member(folder, name, f"{str(config)!r} entry {key!r}", DataError, follow_symlinks=confined)
    if confined:
        for name in TOKENIZER_FILES:
            if (folder / name).exists() or (folder / name).is_symlink():
                member(folder, name, f"tokenizer file {name!r}", DataError)


def tokenizer_digest(spec: str) -> str:
    """sha256 of the tokenizer.json that defines a tokenizer's ids ("byte" for the byte tokenizer): a resumed run
    must read its text with the tokenizer its checkpoint was trained with, wherever that tokenizer lies now."""
    if spec == "byte":
        return "byte"
    path = Path(spec).expanduser()
    return hashlib.sha256((path if path.is_file() else path / "tokenizer.json").read_bytes()).hexdigest()


def load_tokenizer(spec: str, confined: bool = False) -> Tokenizer:
    """'byte' -> ByteTokenizer; a local folder with tokenizer.json (or a path to a tokenizer.json file) ->
    HFTokenizer; anything else DataError(key="data.tokenizer"). `confined`: the folder is a checkpoint's, whose files
    may not link out of it."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "tokenizer.json").is_file():
        raise DataError(f"data.tokenizer={quote(spec)} is a folder without tokenizer.json (only fast tokenizers load); "
                        f"set data.tokenizer to a folder written by a fast tokenizer's save_pretrained, or to 'byte'",
                        key="data.tokenizer")
    if not (path.is_dir() or (path.is_file() and path.suffix == ".json")):
        raise DataError(f"data.tokenizer={quote(spec)} is neither 'byte' nor a local folder holding tokenizer.json "
                        f"(nor a tokenizer.json file); set data.tokenizer to 'byte' or to such a folder",
                        key="data.tokenizer")
    return HFTokenizer(path, confined)


@dataclass
class TokenDataset:
    """A split as non-overlapping fixed-length blocks of token ids (the unit the batch loader shuffles)."""

    tokens: torch.Tensor | np.ndarray
    """1-D: an int64 tensor, or a read-only np.memmap of uint16 for .bin files."""
    seq_len: int
    """Tokens per block."""
    vocab_size: int
    """Number of token ids of the tokenizer (every id is below it)."""

    def __post_init__(self) -> None:
        if self.tokens.ndim != 1:
            raise DataError(f"tokens must be 1-D, got shape {tuple(self.tokens.shape)}", key="tokens")
        if isinstance(self.tokens, torch.Tensor) and self.tokens.dtype != torch.int64:
            raise DataError(f"a tokens tensor must be int64, got {self.tokens.dtype}", key="tokens")
        if self.seq_len < 1:
            raise DataError(f"seq_len={self.seq_len} must be at least 1", key="seq_len")

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def take(self, index: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks `index` (a 1-D int64 tensor of block numbers, or a slice of them) as (ids, targets): both
        (N, seq_len) int64, targets a separate copy of ids (the next-token shift happens inside the loss)."""
        idx = torch.arange(len(self))[index] if isinstance(index, slice) else index
        n = len(self) * self.seq_len
        if isinstance(self.tokens, torch.Tensor):
            ids = self.tokens[:n].reshape(-1, self.seq_len)[idx]
        else:
            # Fancy indexing a memmap reads only the chosen rows from the file.
            ids = torch.from_numpy(self.tokens[:n].reshape(-1, self.seq_len)[idx.numpy()].astype(np.int64))
        return ids, ids.clone()


def parse_encoding(spec: str) -> tuple[str, bool]:
    """data.encoding as (codec, replace): "latin-1" -> ("latin-1", False), "utf-8:replace" -> ("utf-8", True);
    DataError naming the key unless the codec is one Python decodes text with."""
    codec, replace = (spec[:-len(REPLACE)], True) if spec.endswith(REPLACE) else (spec, False)
    try:
        # bytes.decode refuses the codecs that do not make text (base64, rot13, ...) by this flag of CPython's.
        text_codec = getattr(codecs.lookup(codec), "_is_text_encoding", True)
    except (LookupError, ValueError):  # ValueError: a name holding a NUL
        text_codec = False
    if not text_codec:
        raise DataError(f"data.encoding={quote(spec)} is not a text encoding Python knows; set a codec name such as "
                        f"utf-8, latin-1, cp1252 or utf-16, with {REPLACE} to replace bytes that do not decode",
                        key="data.encoding")
    return codec, replace


def load_text_split(source: str, split: str, tokenizer: Tokenizer, seq_len: int, *, root: str | None = None,
                    val_fraction: float = 0.1, text_column: str = "text", subset: int | None = None,
                    encoding: str = "utf-8") -> TokenDataset:
    """Split "train" or "test" (test = the validation split) of a text source as blocks of seq_len token ids.

    subset: keep only the first N blocks. encoding: data.encoding, how source "text" decodes its files.
    """
    if source not in TEXT_SOURCES:
        raise DataError(f"data.name={source!r} is not a text source; set data.name to one of {', '.join(TEXT_SOURCES)}",
                        key="data.name")
    if split not in TEXT_SPLITS:
        raise DataError(f"split {split!r} is not one of {', '.join(TEXT_SPLITS)}", key="split")
    if seq_len < 1:
        raise DataError(f"data.seq_len={seq_len} must be at least 1", key="data.seq_len")
    if not 0 < val_fraction < 1:
        raise DataError(f"data.val_fraction={val_fraction} must be between 0 and 1 (exclusive), e.g. 0.1",
                        key="data.val_fraction")
    subset_key = f"data.{split}_subset"
    if subset is not None and subset < 1:
        raise DataError(f"{subset_key}={subset} must be at least 1 (or null for the whole split)", key=subset_key)
    codec = parse_encoding(encoding)

    if source == "tokens":
        tokens: torch.Tensor | np.ndarray = _load_bin(_root(source, root), split, tokenizer.vocab_size, seq_len,
                                                      subset)
    else:
        if source == "pydoc":
            splits = _pydoc_documents()
        elif source == "text":
            splits = _text_documents(_root(source, root), codec)
        else:
            splits = _hf_disk_documents(_root(source, root), text_column)
        # The decimal as written (0.29 is exactly 29/100), so that floor(n*f) is not off by one from rounding.
        tokens = _split_tokens(splits, split, tokenizer, Fraction(str(val_fraction)), source)
        _check_length(len(tokens), split, seq_len)
        if subset is not None:
            tokens = tokens[:subset * seq_len].clone()  # a copy, so the rest of the stream is freed
    return TokenDataset(tokens, seq_len, tokenizer.vocab_size)


# --- splitting and tokenising ----------------------------------------------------------------------------------------

# Documents of a source: ([train documents], [validation documents]) when the source has its own splits, or
# [documents] to be split by the document rule.
Documents = tuple[list[str], list[str]] | list[str]


def _split_tokens(docs: Documents, split: str, tokenizer: Tokenizer, frac: Fraction, source: str) -> torch.Tensor:
    """The token stream of `split`: the source's own split, else every document i with floor((i+1)f) != floor(if)
    goes to validation; if that leaves validation without documents, the last ceil(len*f) tokens of all are."""
    if isinstance(docs, tuple):
        chosen = docs[0] if split == "train" else docs[1]
    else:
        is_val = [math.floor((i + 1) * frac) != math.floor(i * frac) for i in range(len(docs))]
        # floor(n*f) < n documents go to validation, so only validation can be left without any.
        if not any(is_val):
            stream = _encode(docs, tokenizer)
            cut = len(stream) - math.ceil(len(stream) * frac)
            tokens = stream[:cut] if split == "train" else stream[cut:]
            logger.debug("%s %s: %d documents too few to split, so the last %s of their %d tokens are validation; "
                        "%s has %d tokens", source, split, len(docs), frac, len(stream), split, len(tokens))
            return tokens
        chosen = [d for d, v in zip(docs, is_val) if v == (split == "test")]
    tokens = _encode(chosen, tokenizer)
    logger.debug("%s %s: %d documents, %d tokens", source, split, len(chosen), len(tokens))
    return tokens


def _encode(docs: list[str], tokenizer: Tokenizer) -> torch.Tensor:
    """Documents encoded one by one and concatenated into one int64 stream, each followed by eos_id when the
    tokenizer has one, by "\\n\\n" for bytes, by nothing otherwise."""
    if isinstance(tokenizer, ByteTokenizer):
        data = "".join(d + "\n\n" for d in docs).encode("utf-8")
        return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64))
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    parts = [np.asarray(tokenizer.encode(d) + eos, dtype=np.int64) for d in docs]
    return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))


def _check_length(n_tokens: int, split: str, seq_len: int) -> None:
    """DataError when a split holds less than one block."""
    if n_tokens < seq_len:
        raise DataError(f"the {split} split has {n_tokens} tokens, fewer than one block of data.seq_len={seq_len}; "
                        f"set a smaller data.seq_len or give more text", key="data.seq_len")


def _root(source: str, root: str | None) -> Path:
    """data.root as an existing Path; DataError saying what it must hold when it is unset or missing."""
    expected = {"text": "a text file or a folder of .txt/.md/.rst files",
                "tokens": "the folder holding nanoGPT-style train.bin and val.bin",
                "hf_disk": "the folder a datasets save_to_disk wrote"}[source]
    if not root:
        raise DataError(f"data.name={source!r} needs data.root: set data.root to {expected}", key="data.root")
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"data.root={quote(str(path))} does not exist; set data.root to {expected}", key="data.root")
    return path


# --- sources ---------------------------------------------------------------------------------------------------------


def _pydoc_documents() -> list[str]:
    """The topics of Python's reference documentation that ship with CPython, in sorted key order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _read(path: Path, codec: tuple[str, bool]) -> str:
    """The text of `path` decoded with codec (name, replace). DataError naming the file and the byte offset of the
    first byte that does not decode or of the first NUL (binary data is not text), unless replace: then each becomes
    U+FFFD, counted and logged."""
    name, replace = codec
    raw = path.read_bytes()
    _REPLACED.count = 0
    try:
        text, first = raw.decode(name), None
    except UnicodeDecodeError as exc:
        if not replace:
            raise DataError(f"{quote(str(path))} is not {name} text: byte 0x{raw[exc.start]:02x} at offset "
                            f"{exc.start} does not decode; set data.encoding to the file's encoding (such as latin-1, "
                            f"cp1252 or utf-16), or to {name}{REPLACE} to replace such bytes with U+FFFD",
                            key="data.encoding") from None
        text, first = raw.decode(name, errors=_COUNTED_REPLACE), exc.start
    nul = text.find("\0")
    if nul >= 0:
        # Exact when no byte before the NUL was replaced (the text up to it encodes back to its bytes); when one
        # was, min() below takes that byte's offset.
        offset = len(text[:nul].encode(name, errors="replace"))
        if not replace:
            raise DataError(f"{quote(str(path))} holds a NUL byte at offset {offset}: binary data, not {name} text; "
                            f"remove it from data.root (set data.encoding=utf-16 if it is UTF-16 text, or "
                            f"{name}{REPLACE} to replace such bytes with U+FFFD)", key="data.root")
        first = offset if first is None else min(first, offset)
    if first is not None:
        count = _REPLACED.count + text.count("\0")
        text = text.replace("\0", "\ufffd")
        logger.warning("%s is not all %s text: U+FFFD replaces the bytes that do not decode, and NULs (%d "
                       "replacements, the first at byte offset %d)", path, name, count, first)
    return text


class _Replaced(threading.local):
    """How many times _replace_counted replaced bytes in this thread (since reset to 0)."""

    count = 0


_REPLACED = _Replaced()
_COUNTED_REPLACE = "ppll_ext.counted_replace"


def _replace_counted(exc: UnicodeError) -> tuple[str, int]:
    """Codec error handler _COUNTED_REPLACE: U+FFFD for the bytes that do not decode, as errors="replace", counted."""
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    _REPLACED.count += 1
    return "\ufffd", exc.end


codecs.register_error(_COUNTED_REPLACE, _replace_counted)


def _text_files(folder: Path) -> list[Path]:
    """*.txt, *.md and *.rst files under `folder` (recursively), sorted by relative path."""
    files = [p for p in folder.rglob("*") if p.suffix.lower() in _TEXT_SUFFIXES and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _text_documents(root: Path, codec: tuple[str, bool]) -> Documents:
    """A file, a folder with train/ and val/ (or validation/, test/) folders or train.txt and val.txt (...) files,
    or a folder of text files to split by the document rule; each file decoded with codec (name, replace)."""
    if root.is_file():
        return [_read(root, codec)]
    val_dir = next((root / n for n in _VAL_NAMES if (root / n).is_dir()), None)
    val_file = next((root / f"{n}.txt" for n in _VAL_NAMES if (root / f"{n}.txt").is_file()), None)
    if (root / "train").is_dir() and val_dir is not None:
        splits = {"train": _text_files(root / "train"), val_dir.name: _text_files(val_dir)}
        for name, files in splits.items():
            if not files:
                raise DataError(f"no .txt, .md or .rst files under {str(root / name)!r}; put the {name} text there",
                                key="data.root")
        return [_read(p, codec) for p in splits["train"]], [_read(p, codec) for p in splits[val_dir.name]]
    if (root / "train.txt").is_file() and val_file is not None:
        return [_read(root / "train.txt", codec)], [_read(val_file, codec)]
    files = _text_files(root)
    if not files:
        raise DataError(f"no .txt, .md or .rst files under {str(root)!r}; set data.root to a text file or a folder "
                        f"of them", key="data.root")
    return [_read(p, codec) for p in files]


def _load_bin(root: Path, split: str, vocab_size: int, seq_len: int, subset: int | None) -> np.ndarray:
    """root/train.bin or root/val.bin as a read-only uint16 memmap, cut to `subset` blocks, ids checked."""
    path = root / ("train.bin" if split == "train" else "val.bin")
    if not path.is_file():
        raise DataError(f"{path.name} not found under {str(root)!r}; set data.root to the folder holding "
                        f"nanoGPT-style train.bin and val.bin (uint16 token ids)", key="data.root")
    size = path.stat().st_size
    if size % 2:
        raise DataError(f"{str(path)!r} has {size} bytes, not a whole number of uint16 token ids; rewrite it with "
                        f"np.asarray(ids, dtype=np.uint16).tofile(path)", key="data.root")
    _check_length(size // 2, split, seq_len)
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    if subset is not None:
        tokens = tokens[:subset * seq_len]
    largest = max(int(tokens[i:i + _CHECK_CHUNK].max()) for i in range(0, len(tokens), _CHECK_CHUNK))
    if largest >= vocab_size:
        raise DataError(f"{str(path)!r} holds token id {largest}, but the tokenizer has only {vocab_size} ids; set "
                        f"data.tokenizer to the folder with the tokenizer.json that produced them",
                        key="data.tokenizer")
    logger.debug("tokens %s: %d tokens from %s", split, len(tokens), path)
    return tokens


def _hf_disk_documents(root: Path, text_column: str) -> Documents:
    """The `text_column` of a data set saved with save_to_disk: a DatasetDict's train and validation splits, or the
    rows of a single Dataset to split by the document rule."""
    try:
        import datasets
    except ImportError as err:
        raise DataError("data.name='hf_disk' needs the datasets package: pip install datasets (or the ppll_ext[text] "
                        "extra)", key="data.name") from err
    try:
        loaded = datasets.load_from_disk(str(root))
    except FileNotFoundError as err:
        raise DataError(f"{str(root)!r} holds no data set saved with save_to_disk ({err}); set data.root to the "
                        f"folder save_to_disk wrote", key="data.root") from err
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        val_name = next((n for n in ("validation", "val", "test") if n in loaded), None)
        if "train" not in loaded or val_name is None:
            raise DataError(f"the DatasetDict in {str(root)!r} has splits {names}; it needs 'train' and one of "
                            f"'validation', 'val', 'test' (or save a single Dataset to split by data.val_fraction)",
                            key="data.root")
        return _column(loaded["train"], text_column, root), _column(loaded[val_name], text_column, root)
    return _column(loaded, text_column, root)


def _column(ds: Any, text_column: str, root: Path) -> list[str]:
    """The strings of column `text_column`; DataError listing the columns when it is missing or not text."""
    if text_column not in ds.column_names:
        raise DataError(f"the data set in {str(root)!r} has no column {text_column!r} (columns: "
                        f"{', '.join(ds.column_names)}); set data.text_column to the column holding the text",
                        key="data.text_column")
    if getattr(ds.features[text_column], "dtype", None) not in ("string", "large_string"):
        raise DataError(f"column {text_column!r} of the data set in {str(root)!r} holds {ds.features[text_column]}, "
                        f"not text; set data.text_column to a string column (columns: {', '.join(ds.column_names)})",
                        key="data.text_column")
    return list(ds[text_column])
