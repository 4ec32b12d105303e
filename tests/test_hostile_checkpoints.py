"""Hostile checkpoints and folders: no code that came with a folder runs, nothing outside a checkpoint is read,
`ppll generate` reads through the verified loader, interrupted saves are never deleted by a resume, and a resume
with another tokenizer is refused. Each case is a real folder on disk read by the real CLI (in this process, so
transformers' "run the custom code? [y/N]" prompt would read the "y" the tests put on stdin)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
from pathlib import Path

import pytest

from ppll_ext import checkpoint as ckpt
from ppll_ext.cli import main as cli_main
from ppll_ext.errors import CheckpointError

TINY = ["model.name=gpt2", "model.depth=2", "model.hidden_dim=32", "model.heads=2", "model.mlp_dim=64",
        "data.name=pydoc", "data.seq_len=32", "data.train_subset=128", "data.test_subset=16", "train.batch_size=16",
        "train.eval_batch_size=8", "train.epochs=1", "train.progress=false", "optim.name=adamw", "optim.lr=0.01",
        "optim.schedule=constant", "local.partition=uniform", "local.stages=2", "local.runtime=sequential",
        "local.aux=lm"]
EVIL = "from pathlib import Path\nPath(__file__).with_name('MARKER').write_text('ran')\n"
"""A Python file shipped with a hostile folder: importing it leaves MARKER beside it."""


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A K = 2 byte-level GPT-2 run (sequential runtime, 8 steps) saved to a run folder."""
    root = tmp_path_factory.mktemp("lmrun")
    assert cli_main(["train", *sets(*TINY, f"train.save_dir={root}")]) == 0
    return root


@pytest.fixture()
def said(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """`ppll ARGS` in this process with "y" waiting on stdin: (exit code, stderr lines)."""
    def call(*args: str) -> tuple[int, list[str]]:
        monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 4))
        capsys.readouterr()
        rc = cli_main(list(args))
        return rc, capsys.readouterr().err.strip().splitlines()
    return call


def one_error(result: tuple[int, list[str]], *needles: str, warned: bool = False) -> str:
    """The single `ppll: error:` line of a refused command (after the unverified-checkpoint warning if `warned`)."""
    rc, err = result
    assert rc == 2 and len(err) == 1 + warned and err[-1].startswith("ppll: error:"), err
    assert not warned or "cannot be verified" in err[0], err
    assert all(n in err[-1] for n in needles), (needles, err[-1])
    return err[-1]


def copy(run: Path, dest: Path, checksums: bool = True) -> Path:
    """A copy of the run's checkpoint, without its checksums when `checksums` is False (so the content checks, not
    the sha256 comparison, are what refuse an edit)."""
    folder = Path(shutil.copytree(ckpt.resolve(run), dest))
    if not checksums:
        (folder / ckpt.CHECKSUMS).unlink()
    return folder


def edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_folders_asking_for_custom_code_are_refused_without_a_prompt(run: Path, tmp_path: Path, said) -> None:
    """A checkpoint whose config.json has auto_map (and a model_type transformers does not know), and a data.tokenizer
    folder whose tokenizer_config.json has one: one line, exit 2, and the folder's Python file never ran although
    "y" was waiting on stdin for transformers' prompt."""
    folder = copy(run, tmp_path / "model", checksums=False)
    edit_json(folder / "config.json", model_type="evil-gpt",
              auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                        "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (folder / name).write_text(EVIL)
    one_error(said("generate", str(folder), "--prompt", "x", "--max-new-tokens", "1"), "'auto_map'",
              "never runs such code", warned=True)
    assert not (folder / "MARKER").exists()

    tok = tmp_path / "tok"
    tok.mkdir()
    from tokenizers import Tokenizer, models, pre_tokenizers

    plain = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    plain.save(str(tok / "tokenizer.json"))
    (tok / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    (tok / "tokenization_evil.py").write_text(EVIL)
    one_error(said("train", *sets(*TINY, f"data.tokenizer={tok}")), "tokenizer_config.json", "'auto_map'",
              "--set data.tokenizer=")
    assert not (tok / "MARKER").exists()
    (tok / "tokenizer_config.json").write_text(json.dumps({"tokenizer_file": "/etc/hostname"}))
    one_error(said("train", *sets(*TINY, f"data.tokenizer={tok}")), "'tokenizer_file'", "'/etc/hostname'",
              "outside")


@pytest.mark.parametrize("where", ["../outside.safetensors", "absolute", "symlink"])
def test_paths_outside_the_checkpoint_are_refused_by_export_resume_and_generate(run: Path, tmp_path: Path, said,
                                                                                where: str) -> None:
    """An index whose weight_map names a file outside the checkpoint (relative, absolute, or a shard that is a link
    out of it) is refused by `ppll export`, `--resume` and `ppll generate`, naming the entry; without checksums.json
    each of them also warns that the checkpoint cannot be verified."""
    folder = copy(run, tmp_path / "ckpt", checksums=False)
    shard = ckpt.shard_name(1, 2)
    outside = tmp_path / "outside.safetensors"
    shutil.move(folder / shard, outside)
    if where == "symlink":
        (folder / shard).symlink_to(outside)
        needle = "is a link to"
    else:
        name = str(outside) if where == "absolute" else where
        index = json.loads((folder / ckpt.INDEX).read_text())
        index["weight_map"] = {k: name if v == shard else v for k, v in index["weight_map"].items()}
        (folder / ckpt.INDEX).write_text(json.dumps(index))
        needle = f"weight_map entry names {name!r}, a path outside"
    one_error(said("export", str(folder), str(tmp_path / "out")), needle, warned=True)
    assert not (tmp_path / "out").exists()
    one_error(said("train", *sets(*TINY, "train.epochs=2"), "--resume", str(folder)), needle, warned=True)
    one_error(said("generate", str(folder), "--prompt", "x", "--max-new-tokens", "1"), needle, warned=True)
    if where == "symlink":  # listed in checksums.json, but a link out: never read, and `ppll verify` says so
        listed = copy(run, tmp_path / "listed")
        (listed / shard).unlink()
        (listed / shard).symlink_to(outside)
        assert ckpt.verify(listed)[shard] == "outside"
        one_error(said("verify", str(listed)), f"outside {listed / shard}")


def test_a_deepspeed_latest_tag_leading_out_of_its_folder_is_refused(tmp_path: Path) -> None:
    """`ppll import-deepspeed` follows the `latest` file of a save_checkpoint folder only to a tag folder inside it."""
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "layer_00-model_states.pt").write_bytes(b"")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "latest").write_text("../other\n")
    with pytest.raises(CheckpointError, match="names '../other', a path outside"):
        ckpt.deepspeed_folder(tmp_path / "ds")


def test_generate_reads_only_verified_files_and_checks_its_arguments(run: Path, tmp_path: Path, said) -> None:
    """`ppll generate` refuses, in one line and before sampling, a shard or config.json edited after the save (as
    `ppll verify` does), hostile sampling arguments (checked before the checkpoint is even looked at), and the
    malformed files that used to give tracebacks: an index without weight_map, a 2^60 header length, a broken
    config.json, `boundaries: null` with --exit-stage."""
    gen = ("generate", "--prompt", "x", "--max-new-tokens", "2")
    assert said(gen[0], str(run), *gen[1:], "--top-p", "0.9")[0] == 0
    nowhere = str(tmp_path / "nowhere")
    for flag, value in (("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-1"),
                        ("--top-k", "0"), ("--top-p", "0"), ("--top-p", "1.5"), ("--top-p", "nan")):
        one_error(said(gen[0], nowhere, *gen[1:], flag, value), f"{flag} {float(value) if 'p' in flag else value}"
                  if flag != "--top-k" else "--top-k 0")

    shard = ckpt.shard_name(0, 2)
    tampered = copy(run, tmp_path / "tampered")
    data = bytearray((tampered / shard).read_bytes())
    data[-1] ^= 1
    (tampered / shard).write_bytes(bytes(data))
    one_error(said(gen[0], str(tampered), *gen[1:]), f"{shard}' does not match its sha256")
    reconfigured = copy(run, tmp_path / "reconfigured")
    edit_json(reconfigured / "config.json", n_layer=1)
    one_error(said(gen[0], str(reconfigured), *gen[1:]), "config.json' does not match its sha256")

    no_map = copy(run, tmp_path / "no-map", checksums=False)
    (no_map / ckpt.INDEX).write_text(json.dumps({"metadata": {}}))
    one_error(said(gen[0], str(no_map), *gen[1:]), "has no weight_map", warned=True)
    huge = copy(run, tmp_path / "huge-header", checksums=False)
    (huge / shard).write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    one_error(said(gen[0], str(huge), *gen[1:]), f"{shard}' is not a readable safetensors file", warned=True)
    broken = copy(run, tmp_path / "broken-config", checksums=False)
    (broken / "config.json").write_text('{"model_type": "gpt2", ')
    one_error(said(gen[0], str(broken), *gen[1:]), "config.json' is not valid JSON", warned=True)
    no_cut = copy(run, tmp_path / "no-cut", checksums=False)
    edit_json(no_cut / ckpt.TRAINER_STATE, boundaries=None)
    one_error(said(gen[0], str(no_cut), *gen[1:], "--exit-stage", "0"), "records none", warned=True)


def test_an_interrupted_save_named_by_resume_is_refused_never_deleted(run: Path, tmp_path: Path, said) -> None:
    """`--resume runs/a/step-N.tmp --save-dir runs/a` on a complete step-N.tmp (killed between the index write and
    the rename) is refused in one line and the folder stays; a later run that takes the folder's lock completes the
    rename (every file verified), so nothing saved is lost, while an incomplete step-M.tmp is removed."""
    root = tmp_path / "a"
    root.mkdir()
    step = ckpt.resolve(run)
    pending = Path(shutil.copytree(step, root / f"{step.name}.tmp"))
    one_error(said("train", *sets(*TINY, "train.epochs=2"), "--resume", str(pending), "--save-dir", str(root)),
              "interrupted before it was renamed", "rename it to")
    assert set(ckpt.verify(pending).values()) == {"ok"}
    half = Path(shutil.copytree(step, root / "step-000004.tmp"))
    (half / ckpt.INDEX).unlink()
    ckpt.lock_run(root).release()
    assert sorted(p.name for p in root.iterdir()) == [step.name]
    assert set(ckpt.verify(root / step.name).values()) == {"ok"}


def test_resume_with_another_tokenizer_of_the_same_size_is_refused(run: Path, tmp_path: Path, said) -> None:
    """A byte-level run resumed with a tokenizer of 256 ids (a byte-level BPE without merges, whose ids are not the
    bytes) is refused, naming data.tokenizer; a re-hashed trainer state whose position lies beyond its epoch too."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    bpe = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(str(tmp_path / "tok"))
    one_error(said("train", *sets(*TINY, "train.epochs=2", f"data.tokenizer={tmp_path / 'tok'}"),
                   "--resume", str(run)), "data.tokenizer", "not the data.tokenizer the checkpoint was trained with")

    for step, epoch, batch in ((3, 0, 50), (8, 9, 0)):  # a batch beyond the epoch; an epoch beyond the run
        beyond = copy(run, tmp_path / f"beyond-{epoch}")
        edit_json(beyond / ckpt.TRAINER_STATE, position={"step": step, "epoch": epoch, "batch": batch})
        sums = json.loads((beyond / ckpt.CHECKSUMS).read_text())
        sums[ckpt.TRAINER_STATE] = hashlib.sha256((beyond / ckpt.TRAINER_STATE).read_bytes()).hexdigest()
        (beyond / ckpt.CHECKSUMS).write_text(json.dumps(sums))
        one_error(said("train", *sets(*TINY, "train.epochs=2"), "--resume", str(beyond)),
                  f"position (step {step}, epoch {epoch}, batch {batch}) is not a point of this data stream")
