"""Text data for language models: tokenizers, the pydoc / text / tokens / hf_disk sources and their error messages."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ppll_ext.cli import main
from ppll_ext.data import DataConfig, load_dataset
from ppll_ext.data.text import (
    TEXT_SOURCES,
    ByteTokenizer,
    HFTokenizer,
    TokenDataset,
    load_text_split,
    load_tokenizer,
)
from ppll_ext.errors import ConfigError, DataError

BYTE = ByteTokenizer()
SENTENCES = ["the quick brown fox jumps over the lazy dog", "hello world, hello text", "pipelines learn locally"]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _bytes_of(*docs: str) -> list[int]:
    return list("".join(d + "\n\n" for d in docs).encode("utf-8"))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny byte-level BPE tokenizer with an <eos> token, trained here and saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    folder = tmp_path_factory.mktemp("hf_tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(str(folder))
    return folder


# --- tokenizers ------------------------------------------------------------------------------------------------------


def test_byte_tokenizer_round_trips_any_text() -> None:
    text = "héllo, wörld — 日本語 🙂\n\ttabs"
    assert BYTE.encode(text) == list(text.encode("utf-8"))
    assert BYTE.decode(BYTE.encode(text)) == text
    assert BYTE.decode([0xE6]) == "\ufffd"
    assert (BYTE.name, BYTE.vocab_size, BYTE.eos_id) == ("byte", 256, None)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def test_byte_tokenizer_saves_nothing(tmp_path: Path) -> None:
    assert BYTE.save(tmp_path) == [] and list(tmp_path.iterdir()) == []


def test_hf_tokenizer_encodes_decodes_and_saves(hf_folder: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = load_tokenizer(str(hf_folder))
    assert isinstance(tok, HFTokenizer) and tok.name == str(hf_folder)
    assert tok.vocab_size == 300 and tok.eos_id == 1
    text = "hello the quick fox"
    ids = tok.encode(text)
    assert ids and tok.eos_id not in ids and tok.decode(ids) == text
    files = tok.save(tmp_path / "saved")
    assert files and all(f.is_file() and f.parent == tmp_path / "saved" for f in files)
    assert AutoTokenizer.from_pretrained(str(tmp_path / "saved")).encode(text, add_special_tokens=False) == ids


def test_hf_tokenizer_from_tokenizer_json_alone(hf_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((hf_folder / "tokenizer.json").read_bytes())
    reference = load_tokenizer(str(hf_folder))
    for spec in (tmp_path, tmp_path / "tokenizer.json"):
        tok = load_tokenizer(str(spec))
        assert tok.vocab_size == reference.vocab_size and tok.eos_id is None
        assert tok.encode("hello world") == reference.encode("hello world")


def test_bad_tokenizer_specs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="set data.tokenizer to 'byte' or to such a folder") as err:
        load_tokenizer("gpt2")
    assert err.value.key == "data.tokenizer"
    with pytest.raises(DataError, match="folder without tokenizer.json.*set data.tokenizer"):
        load_tokenizer(str(tmp_path))
    _write(tmp_path / "broken" / "tokenizer.json", "{not json")
    with pytest.raises(DataError, match="cannot load the tokenizer.*set data.tokenizer"):
        load_tokenizer(str(tmp_path / "broken"))


# --- pydoc -----------------------------------------------------------------------------------------------------------


def test_pydoc_splits_are_deterministic_and_disjoint() -> None:
    from pydoc_data.topics import topics

    train = load_text_split("pydoc", "train", BYTE, 128)
    test = load_text_split("pydoc", "test", BYTE, 128)
    assert torch.equal(train.tokens, load_text_split("pydoc", "train", BYTE, 128).tokens)
    assert torch.equal(test.tokens, load_text_split("pydoc", "test", BYTE, 128).tokens)
    docs = [topics[k] for k in sorted(topics)]
    every = _bytes_of(*docs)
    assert len(train.tokens) + len(test.tokens) == len(every)
    val_docs = [d for i, d in enumerate(docs) if math.floor((i + 1) * 0.1) != math.floor(i * 0.1)]
    assert len(val_docs) == len(docs) // 10
    assert test.tokens.tolist() == _bytes_of(*val_docs)
    assert len(train) == len(train.tokens) // 128 > len(test) > 0
    assert train.vocab_size == 256 and train.tokens.dtype == torch.int64


def test_take_gives_separate_ids_and_targets() -> None:
    ds = load_text_split("pydoc", "train", BYTE, 64, subset=10)
    assert len(ds) == 10 and len(ds.tokens) == 640
    ids, targets = ds.take(torch.tensor([3, 0, 9]))
    assert ids.shape == targets.shape == (3, 64) and ids.dtype == targets.dtype == torch.int64
    assert torch.equal(ids, targets) and ids.data_ptr() != targets.data_ptr()
    assert torch.equal(ids[1], ds.tokens[:64]) and torch.equal(ids[0], ds.tokens[192:256])
    sliced, _ = ds.take(slice(2, 5))
    assert torch.equal(sliced, ds.tokens[128:320].view(3, 64))
    sliced[0, 0] = -1
    assert ds.tokens[128] != -1


# --- text ------------------------------------------------------------------------------------------------------------


def test_text_single_file_splits_the_token_stream(tmp_path: Path) -> None:
    text = "".join(f"line {i}\n" for i in range(100))
    path = _write(tmp_path / "book.txt", text)
    train = load_text_split("text", "train", BYTE, 16, root=str(path), val_fraction=0.25)
    test = load_text_split("text", "test", BYTE, 16, root=str(path), val_fraction=0.25)
    stream = _bytes_of(text)
    assert len(test.tokens) == math.ceil(len(stream) * 0.25)
    assert train.tokens.tolist() + test.tokens.tolist() == stream


def test_text_folder_with_nested_files(tmp_path: Path) -> None:
    docs = {f"d{i // 4}/sub/f{i}.txt": f"document number {i} " * 5 for i in range(10)}
    docs["a.md"], docs["z.rst"] = "markdown " * 10, "restructured " * 10
    for rel, text in docs.items():
        _write(tmp_path / rel, text)
    _write(tmp_path / "ignored.py", "print('not text')")
    ordered = [docs[k] for k in sorted(docs)]
    train = load_text_split("text", "train", BYTE, 8, root=str(tmp_path), val_fraction=0.25)
    test = load_text_split("text", "test", BYTE, 8, root=str(tmp_path), val_fraction=0.25)
    is_val = [math.floor((i + 1) / 4) != math.floor(i / 4) for i in range(len(ordered))]
    assert sum(is_val) == 3
    assert test.tokens.tolist() == _bytes_of(*[d for d, v in zip(ordered, is_val) if v])
    assert train.tokens.tolist() == _bytes_of(*[d for d, v in zip(ordered, is_val) if not v])


def test_text_folder_with_split_folders_and_files(tmp_path: Path) -> None:
    _write(tmp_path / "split" / "train" / "b.txt", "bbbb " * 10)
    _write(tmp_path / "split" / "train" / "a" / "a.txt", "aaaa " * 10)
    _write(tmp_path / "split" / "val" / "v.txt", "vvvv " * 10)
    train = load_text_split("text", "train", BYTE, 8, root=str(tmp_path / "split"))
    test = load_text_split("text", "test", BYTE, 8, root=str(tmp_path / "split"))
    assert train.tokens.tolist() == _bytes_of("aaaa " * 10, "bbbb " * 10)
    assert test.tokens.tolist() == _bytes_of("vvvv " * 10)
    _write(tmp_path / "files" / "train.txt", "train text " * 10)
    _write(tmp_path / "files" / "validation.txt", "validation text " * 10)
    test = load_text_split("text", "test", BYTE, 8, root=str(tmp_path / "files"))
    assert test.tokens.tolist() == _bytes_of("validation text " * 10)


def test_text_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs data.root: set data.root to a text file") as err:
        load_text_split("text", "train", BYTE, 8)
    assert err.value.key == "data.root"
    with pytest.raises(DataError, match="does not exist; set data.root"):
        load_text_split("text", "train", BYTE, 8, root=str(tmp_path / "missing"))
    with pytest.raises(DataError, match="no .txt, .md or .rst files under .*; set data.root"):
        load_text_split("text", "train", BYTE, 8, root=str(tmp_path))
    _write(tmp_path / "train" / "t.txt", "some text")
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match="no .txt, .md or .rst files under .*test'; put the test text there"):
        load_text_split("text", "train", BYTE, 8, root=str(tmp_path))
    _write(tmp_path / "short.txt", "tiny")
    with pytest.raises(DataError, match=r"test split has 2 tokens.*set a smaller data.seq_len or give more text"):
        load_text_split("text", "test", BYTE, 8, root=str(tmp_path / "short.txt"), val_fraction=0.3)


def test_latin1_is_refused_with_file_and_offset_and_read_with_data_encoding(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Non-UTF-8 text stops the run naming the file and the byte offset (it used to become U+FFFD, silently);
    data.encoding=latin-1 reads it as it is."""
    text = "café crème brûlée, naïve façade " * 4
    _write(tmp_path / "books" / "a.txt", "plain ascii text " * 8)
    latin = tmp_path / "books" / "b.txt"
    latin.write_bytes(text.encode("latin-1"))
    root = str(tmp_path / "books")
    with pytest.raises(DataError) as err:
        load_text_split("text", "train", BYTE, 8, root=root)
    assert str(err.value) == (f"{str(latin)!r} is not utf-8 text: byte 0xe9 at offset 3 does not decode; set "
                              f"data.encoding to the file's encoding (such as latin-1, cp1252 or utf-16), or to "
                              f"utf-8:replace to replace such bytes with U+FFFD")
    assert err.value.key == "data.encoding"
    cfg = DataConfig(name="text", root=str(latin), seq_len=8, val_fraction=0.5, encoding="latin-1")
    cfg.check()
    train, test = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    assert train.tokens.tolist() + test.tokens.tolist() == _bytes_of(text)

    rc = main(["train", "--runtime", "sequential", "--set", "model.name=gpt2", "--set", "data.name=text",
               "--set", f"data.root={root}", "--set", "data.seq_len=8"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"ppll: error: {str(latin)!r} is not utf-8 text: byte 0xe9 at offset 3")


def test_binary_files_are_refused_with_file_and_offset(tmp_path: Path) -> None:
    """NUL bytes or bytes that are not UTF-8 (a binary file named .txt) are refused, whatever the encoding; UTF-16
    text, NUL bytes and all, reads with data.encoding=utf-16, offsets counting its bytes."""
    png = tmp_path / "image.txt"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(DataError, match=r"image.txt' is not utf-8 text: byte 0x89 at offset 0 does not decode"):
        load_text_split("text", "train", BYTE, 8, root=str(png))
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"text before the NUL\x00 and after it")
    for encoding in ("utf-8", "latin-1"):
        with pytest.raises(DataError) as err:
            load_text_split("text", "train", BYTE, 8, root=str(nul), encoding=encoding)
        assert str(err.value).startswith(f"{str(nul)!r} holds a NUL byte at offset 19: binary data, not {encoding} "
                                         f"text; remove it from data.root")
        assert err.value.key == "data.root"

    wide = tmp_path / "wide.txt"
    wide.write_bytes("wide text, two bytes a character ".encode("utf-16"))
    with pytest.raises(DataError, match="byte 0xff at offset 0 does not decode"):
        load_text_split("text", "train", BYTE, 8, root=str(wide))
    tokens = load_text_split("text", "test", BYTE, 8, root=str(wide), encoding="utf-16", val_fraction=0.5).tokens
    assert bytes(tokens.tolist()).endswith(b"a character \n\n")
    wide.write_bytes("ab\0c".encode("utf-16"))  # BOM, a, b, then the NUL at byte 6
    with pytest.raises(DataError, match="holds a NUL byte at offset 6: binary data, not utf-16 text"):
        load_text_split("text", "train", BYTE, 8, root=str(wide), encoding="utf-16")


def test_replacement_is_an_opt_in_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """data.encoding=utf-8:replace turns each stretch of bytes that does not decode, and each NUL, into U+FFFD
    (as errors="replace" does), and logs how many there were and where the first one is (on each read)."""
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"ok \xe9t\xe9 \xff\xfe and \x00 \xef\xbf\xbd")  # the last is a U+FFFD of the text itself
    with caplog.at_level(logging.WARNING, logger="ppll_ext.data.text"):
        ds = load_text_split("text", "train", BYTE, 4, root=str(path), encoding="utf-8:replace", val_fraction=0.1)
    repl = "\ufffd"
    assert ds.tokens.tolist() + load_text_split("text", "test", BYTE, 4, root=str(path), encoding="utf-8:replace",
                                                val_fraction=0.1).tokens.tolist() == \
        _bytes_of(f"ok {repl}t{repl} {repl}{repl} and {repl} {repl}")
    assert [r.getMessage() for r in caplog.records] == 2 * [
        f"{path} is not all utf-8 text: U+FFFD replaces the bytes that do not decode, and NULs (5 replacements, the "
        f"first at byte offset 3)"]
    path.write_bytes(b"no decoding error, but a \x00 NUL")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ppll_ext.data.text"):
        load_text_split("text", "train", BYTE, 4, root=str(path), encoding="latin-1:replace")
    assert caplog.records[0].getMessage().endswith(" is not all latin-1 text: U+FFFD replaces the bytes that do not "
                                                   "decode, and NULs (1 replacements, the first at byte offset 25)")


@pytest.mark.parametrize("encoding", ["klingon", "base64", "rot13", "utf-8:ignore", "", "utf\0-8", "x" * 100_000])
def test_an_unknown_encoding_is_refused_up_front(encoding: str, tmp_path: Path) -> None:
    for call in (lambda: DataConfig(name="text", encoding=encoding).check(),
                 lambda: load_text_split("text", "train", BYTE, 8, root=str(tmp_path / "none"), encoding=encoding)):
        with pytest.raises(ConfigError, match=r"^data.encoding=.* is not a text encoding Python knows; set a codec "
                                              r"name such as utf-8, latin-1, cp1252 or utf-16, with :replace") as err:
            call()
        assert err.value.key == "data.encoding" and len(str(err.value)) < 400


def test_bad_arguments_are_rejected_before_loading(tmp_path: Path) -> None:
    cases = [(dict(source="wiki"), "data.name", "set data.name to one of pydoc, text, tokens, hf_disk"),
             (dict(split="val"), "split", "not one of train, test"),
             (dict(seq_len=0), "data.seq_len", "must be at least 1"),
             (dict(val_fraction=1.0), "data.val_fraction", "between 0 and 1"),
             (dict(subset=0), "data.train_subset", "at least 1 .or null")]
    for change, key, message in cases:
        args = {"source": "text", "split": "train", "tokenizer": BYTE, "seq_len": 8, "root": str(tmp_path / "no")}
        with pytest.raises(DataError, match=message) as err:
            load_text_split(**{**args, **change})
        assert err.value.key == key
    assert TEXT_SOURCES == ("pydoc", "text", "tokens", "hf_disk")


# --- tokens ----------------------------------------------------------------------------------------------------------


def test_tokens_bins_are_memory_mapped(tmp_path: Path) -> None:
    train_ids = np.arange(1000, dtype=np.uint16) % 256
    np.asarray(train_ids, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.asarray([7, 8, 9, 10, 11], dtype=np.uint16).tofile(tmp_path / "val.bin")
    train = load_text_split("tokens", "train", BYTE, 10, root=str(tmp_path))
    assert isinstance(train.tokens, np.memmap) and not train.tokens.flags.writeable
    assert len(train) == 100 and train.vocab_size == 256
    ids, targets = train.take(torch.tensor([0, 99, 5]))
    assert ids.dtype == torch.int64 and ids.shape == (3, 10)
    assert ids.tolist() == [train_ids[s:s + 10].tolist() for s in (0, 990, 50)]
    assert torch.equal(ids, targets) and ids.data_ptr() != targets.data_ptr()
    assert train.take(slice(1, 3))[0].tolist() == [train_ids[10:20].tolist(), train_ids[20:30].tolist()]
    assert len(load_text_split("tokens", "train", BYTE, 10, root=str(tmp_path), subset=7)) == 7
    test = load_text_split("tokens", "test", BYTE, 2, root=str(tmp_path))
    assert test.take(torch.tensor([1]))[0].tolist() == [[9, 10]]


def test_tokens_errors(tmp_path: Path) -> None:
    np.asarray([1, 2, 300, 4], dtype=np.uint16).tofile(tmp_path / "train.bin")
    with pytest.raises(DataError, match=r"train.bin' holds token id 300.*set data.tokenizer to the folder") as err:
        load_text_split("tokens", "train", BYTE, 2, root=str(tmp_path))
    assert err.value.key == "data.tokenizer"
    with pytest.raises(DataError, match="val.bin not found under .*; set data.root to the folder holding"):
        load_text_split("tokens", "test", BYTE, 2, root=str(tmp_path))
    (tmp_path / "val.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(DataError, match="has 3 bytes, not a whole number of uint16"):
        load_text_split("tokens", "test", BYTE, 1, root=str(tmp_path))
    (tmp_path / "val.bin").write_bytes(b"")
    with pytest.raises(DataError, match="test split has 0 tokens"):
        load_text_split("tokens", "test", BYTE, 1, root=str(tmp_path))


# --- hf_disk ---------------------------------------------------------------------------------------------------------


def test_hf_disk_dataset_and_dataset_dict(tmp_path: Path, hf_folder: Path) -> None:
    import datasets

    rows = [f"{SENTENCES[i % 3]} {i}" for i in range(20)]
    datasets.Dataset.from_dict({"text": rows, "n": list(range(20))}).save_to_disk(str(tmp_path / "single"))
    test = load_text_split("hf_disk", "test", BYTE, 8, root=str(tmp_path / "single"), val_fraction=0.2)
    assert test.tokens.tolist() == _bytes_of(rows[4], rows[9], rows[14], rows[19])

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": rows[:15]}),
                               "validation": datasets.Dataset.from_dict({"body": rows[15:]})})
    dd.save_to_disk(str(tmp_path / "dict"))
    tok = load_tokenizer(str(hf_folder))
    train = load_text_split("hf_disk", "train", tok, 4, root=str(tmp_path / "dict"), text_column="body")
    test = load_text_split("hf_disk", "test", tok, 4, root=str(tmp_path / "dict"), text_column="body")
    assert train.vocab_size == 300
    expected = [i for r in rows[15:] for i in [*tok.encode(r), tok.eos_id]]
    assert test.tokens.tolist() == expected
    assert len(train.tokens) == sum(len(tok.encode(r)) + 1 for r in rows[:15])

    with pytest.raises(DataError, match=r"no column 'content' \(columns: body\); set data.text_column") as err:
        load_text_split("hf_disk", "train", BYTE, 4, root=str(tmp_path / "dict"), text_column="content")
    assert err.value.key == "data.text_column"
    with pytest.raises(DataError, match="column 'n' .* not text; set data.text_column to a string column"):
        load_text_split("hf_disk", "train", BYTE, 4, root=str(tmp_path / "single"), text_column="n")
    datasets.DatasetDict({"train": dd["train"]}).save_to_disk(str(tmp_path / "train_only"))
    with pytest.raises(DataError, match="needs 'train' and one of 'validation', 'val', 'test'"):
        load_text_split("hf_disk", "test", BYTE, 4, root=str(tmp_path / "train_only"), text_column="body")
    with pytest.raises(DataError, match="no data set saved with save_to_disk.*set data.root"):
        load_text_split("hf_disk", "train", BYTE, 4, root=str(_write(tmp_path / "plain" / "a.txt", "text").parent))


def test_token_dataset_checks_its_fields() -> None:
    with pytest.raises(DataError, match="must be int64"):
        TokenDataset(torch.zeros(4, dtype=torch.int32), 2, 256)
    with pytest.raises(DataError, match="must be 1-D"):
        TokenDataset(torch.zeros(2, 2, dtype=torch.int64), 2, 256)
    assert len(TokenDataset(torch.zeros(9, dtype=torch.int64), 4, 256)) == 2


def test_hf_disk_without_datasets_names_the_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"pip install datasets \(or the ppll_ext\[text\] extra\)") as err:
        load_text_split("hf_disk", "train", BYTE, 4, root=str(tmp_path))
    assert err.value.key == "data.name"
