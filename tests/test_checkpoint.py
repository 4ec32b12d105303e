"""Checkpoints: existing tools load them, resume is exact, bad files give CheckpointError, saves are atomic."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import procs
import pytest
import torch
import torch.distributed.checkpoint as dcp
from accelerate.utils import load_checkpoint_in_model
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import HuggingFaceStorageReader

from ppll_ext import checkpoint as ckpt
from ppll_ext.cli import main as cli_main
from ppll_ext.config import load_config
from ppll_ext.data import BatchLoader, load_dataset
from ppll_ext.errors import CheckpointError
from ppll_ext.models import build_model
from ppll_ext.train import run_training
from ppll_ext.train.job import resume_state

REPO = Path(__file__).resolve().parents[1]
SMALL = ["data.train_subset=320", "data.test_subset=200", "train.batch_size=32", "train.progress=false",
         "train.threads=1"]
MODELS = {
    "resnet8": ["model.name=resnet8", "model.width=8", "local.partition=uniform"],
    "resnet32": ["model.name=resnet32", "model.width=8", "local.partition=uniform"],
    "vit": ["model.name=vit", "model.patch_size=2", "model.depth=4", "model.hidden_dim=32", "model.heads=2",
            "model.mlp_dim=64", "local.aux=vit", "local.partition=uniform", "optim.name=adamw", "optim.lr=0.001"],
}


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


RESUME_PROCESSES = [*MODELS["resnet8"], *SMALL, "local.stages=2", "train.epochs=2"]
"""test_exact_resume_processes: stopped at step 7 and resumed, in the torchrun launch of 2 processes (with other
modules' cases)."""
T2 = procs.plan("torchrun", 2)
T2.add("ckpt_stop", "train", *sets(*RESUME_PROCESSES, "local.runtime=processes"), "--save-dir", "{root}/ckpt_b",
       *sets("train.stop_at_step=7"), module="ppll_ext")
T2.add("ckpt_resume", "train", *sets(*RESUME_PROCESSES, "local.runtime=processes"), "--save-dir", "{root}/ckpt_b",
       "--resume", "{root}/ckpt_b", module="ppll_ext")


def plain_accuracy(model: torch.nn.Module, cfg) -> float:
    ds = load_dataset(cfg.data, "test")
    loader = BatchLoader(ds, 500, shuffle=False, augment=False)
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return correct / len(ds)


@pytest.mark.parametrize(("name", "runtime"), [("resnet8", "processes"), ("vit", "threads")])
def test_k4_checkpoint_loads_into_the_plain_model(name: str, runtime: str, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """K = 4 stages write one shard each (4 processes, which `ppll train` called in this process spawns under
    torchrun; the ViT in 4 threads, the same writer) that load strict into the plain model with safetensors,
    accelerate and torch.distributed.checkpoint, giving the printed accuracy."""
    caplog.set_level(logging.INFO, logger="ppll_ext")
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the spawned processes import this tree's ppll_ext
    overrides = [*MODELS[name], *SMALL, "local.stages=4", "train.epochs=1"]
    rc = cli_main(["train", *sets(*overrides, f"local.runtime={runtime}"), "--save-dir", str(tmp_path / "run")])
    stdout, stderr = capfd.readouterr()  # what the stage processes printed too
    assert rc == 0, stderr[-3000:]
    printed = float([line for line in stdout.splitlines() if "test accuracy" in line][0].split()[2])
    folder = ckpt.resolve(tmp_path / "run")
    index = json.loads((folder / ckpt.INDEX).read_text())
    assert sorted(set(index["weight_map"].values())) == [ckpt.shard_name(k, 4) for k in range(4)]
    cfg = load_config(None, overrides)
    fresh = lambda: build_model(cfg.model, in_channels=1, image_size=8, num_classes=10).model  # noqa: E731

    merged = {}
    for shard in sorted(set(index["weight_map"].values())):
        merged.update(load_file(str(folder / shard)))
    model = fresh()
    model.load_state_dict(merged, strict=True)
    assert plain_accuracy(model, cfg) == pytest.approx(printed, abs=1e-4)

    via_accelerate = fresh()
    load_checkpoint_in_model(via_accelerate, str(folder))
    via_dcp = fresh()
    state = via_dcp.state_dict()
    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(folder)))
    via_dcp.load_state_dict(state)
    for other in (via_accelerate, via_dcp):
        for key, value in model.state_dict().items():
            assert torch.equal(other.state_dict()[key], value), key
    aux = load_file(str(folder / ckpt.AUX))
    assert {k.split(".")[0] for k in aux} == {"stage0", "stage1", "stage2"}
    if name == "resnet8":
        # Resume this K = 4 checkpoint with K = 2: re-partitioned, it continues from the saved weights.
        out = io.StringIO()
        summary = run_training(load_config(None, [*overrides, "local.stages=2", "local.runtime=sequential",
                                                  "train.epochs=2", f"train.resume={folder}"]), out=out)
        notes = [r.getMessage() for r in caplog.records if r.name.startswith("ppll_ext")]
        assert any("aux heads and optimizer states start fresh" in n for n in notes), notes
        assert "resuming at epoch 2 batch 0 (step 10)" in out.getvalue() and summary.boundaries[0] == 0
        assert len(summary.boundaries) == 3 and summary.stage_stats[-1].steps == 20


def _final(cfg_overrides: list[str]) -> dict[int, dict[str, torch.Tensor]]:
    got = {}
    run_training(load_config(None, cfg_overrides), out=io.StringIO(),
                 on_finish=lambda blocks: got.update({k: {n: t.clone() for n, t in b.state_dict().items()}
                                                      for k, b in blocks.items()}))
    return got


def test_exact_resume_sequential(tmp_path: Path) -> None:
    base = [*MODELS["resnet32"], *SMALL, "local.stages=2", "local.runtime=sequential", "train.epochs=2"]
    straight = _final(base)
    _final([*base, f"train.save_dir={tmp_path}", "train.stop_at_step=13"])
    assert ckpt.resolve(tmp_path).name == "step-000013"
    assert json.loads((tmp_path / "step-000013" / ckpt.TRAINER_STATE).read_text())["position"] == {
        "step": 13, "epoch": 1, "batch": 3}
    resumed = _final([*base, f"train.resume={tmp_path}"])
    for k in straight:
        for name, t in straight[k].items():
            assert torch.equal(resumed[k][name], t), (k, name)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items() if k != "rng.cpu"})
    return out


def test_exact_resume_processes(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Stopped and resumed under the processes runtime (2 stage processes under torchrun), the run ends
    bit-identical to an uninterrupted one (computed by sequential local learning in this process, which the
    processes runtime equals)."""
    _final([*RESUME_PROCESSES, "local.runtime=sequential", f"train.save_dir={tmp_path / 'a'}"])
    ran = T2.launch(tmp_path_factory)
    assert "stopped at step 7" in ran["ckpt_stop"].stdout
    assert "resuming at epoch 1 batch 7 (step 7)" in ran["ckpt_resume"].stdout
    a, b = _tensors(ckpt.resolve(tmp_path / "a")), _tensors(ckpt.resolve(ran.root / "ckpt_b"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    _final([*MODELS["resnet32"], *SMALL, "local.stages=2", "local.runtime=sequential", "train.epochs=1",
            f"train.save_dir={root}"])
    return ckpt.resolve(root)


def test_corrupt_truncated_missing_and_foreign_checkpoints(saved: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    def _resume_error(folder: Path, *extra: str) -> str:
        """`ppll train --resume folder` through the CLI's own code path in this process: one error line, exit 2."""
        rc = cli_main(["train", *sets(*MODELS["resnet32"], *SMALL, "local.stages=2", "local.runtime=sequential",
                                      "train.epochs=2", *extra), "--resume", str(folder)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("ppll: error:"), lines
        return lines[0]

    def copy(name: str) -> Path:
        return Path(shutil.copytree(saved, tmp_path / name))

    shard = ckpt.shard_name(1, 2)
    truncated = copy("truncated")
    data = (truncated / shard).read_bytes()
    (truncated / shard).write_bytes(data[: len(data) // 2])
    assert shard in _resume_error(truncated)

    corrupt = copy("corrupt")
    (corrupt / shard).write_bytes(b"\x00" * 64)
    assert shard in _resume_error(corrupt)

    missing = copy("missing")
    (missing / shard).unlink()
    assert f"{shard} is missing" in _resume_error(missing)

    no_index = copy("noindex")
    (no_index / ckpt.INDEX).unlink()
    assert "model.safetensors.index.json" in _resume_error(no_index)

    foreign = _resume_error(saved, "model.width=16")
    assert "'conv1.weight' has shape (8, 1, 3, 3), the model has (16, 1, 3, 3)" in foreign

    pickle_dir = tmp_path / "pickle"
    pickle_dir.mkdir()
    torch.save({"x": torch.ones(1)}, pickle_dir / "model.bin")
    assert "no model.safetensors.index.json" in _resume_error(pickle_dir)
    pickled_shard = copy("pickled")
    torch.save({"conv1.weight": torch.ones(1)}, pickled_shard / shard)
    assert shard in _resume_error(pickled_shard)
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.load_model_state(tmp_path / "nowhere")


def test_kill_while_saving_leaves_previous_checkpoint(tmp_path: Path) -> None:
    base = sets(*MODELS["resnet32"], *SMALL, "local.stages=2", "local.runtime=processes", "train.epochs=1")
    res = procs.run([*procs.torchrun_cmd(2), str(REPO / "tests" / "faults.py"), "1:8:kill-in-save", "train", *base,
                     "--save-dir", str(tmp_path), "--save-every", "4"])
    assert res.returncode != 0
    assert (tmp_path / "step-000008.tmp").is_dir() and not (tmp_path / "step-000008").exists()
    folder = ckpt.resolve(tmp_path)
    assert folder.name == "step-000004"
    state = ckpt.load_model_state(folder)
    cfg = load_config(None, [*MODELS["resnet32"]])
    build_model(cfg.model, in_channels=1, image_size=8, num_classes=10).model.load_state_dict(state, strict=True)


@pytest.mark.parametrize("max_size, files", [("5GB", ["model.safetensors", ckpt.STATE_DIR]), ("20KB", None)])
def test_export_consolidates(saved: Path, tmp_path: Path, max_size: str, files: list[str] | None,
                             capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["export", str(saved.parent), str(tmp_path / "out"), "--max-shard-size", max_size])
    assert rc == 0, capsys.readouterr().err
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    if files is not None:
        assert written == files
    else:
        assert "model.safetensors.index.json" in written and len(written) > 2
    assert set(ckpt.verify(tmp_path / "out").values()) == {"ok"}  # exports record their checksums too
    exported, original = ckpt.load_model_state(tmp_path / "out"), ckpt.load_model_state(saved)
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)


def test_threads_runtime_saves_the_same_checkpoint(saved: Path, tmp_path: Path) -> None:
    _final([*MODELS["resnet32"], *SMALL, "local.stages=2", "local.runtime=threads", "train.epochs=1",
            f"train.save_dir={tmp_path}"])
    a, b = _tensors(saved), _tensors(ckpt.resolve(tmp_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, list[str]]:
    """`ppll ...` through the CLI's own code path in this process: (exit code, stdout, stderr lines)."""
    capsys.readouterr()
    rc = cli_main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err.strip().splitlines()


def _one_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    rc, _, err = _cli(capsys, *args)
    assert rc == 2 and len(err) == 1 and err[0].startswith("ppll: error:"), (rc, err)
    return err[0]


def _resume(*extra: str) -> list[str]:
    """`ppll train` arguments that resume the `saved` checkpoint's run for a second epoch."""
    return ["train", *sets(*MODELS["resnet32"], *SMALL, "local.stages=2", "local.runtime=sequential",
                           "train.epochs=2", *extra)]


def test_checksums_catch_a_flipped_bit_and_ppll_verify_names_bad_files(saved: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A bit flipped in a shard's tensor data still parses as safetensors, but its sha256 (recorded at save time in
    training_state/checksums.json) differs: resume and export refuse it naming the file, and `ppll verify` lists
    every file of the checkpoint (or of each checkpoint of a run directory) as ok, bad, missing or unlisted."""
    sums = json.loads((saved / ckpt.CHECKSUMS).read_text())
    files = sorted(p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file())
    assert sorted(sums) == sorted(set(files) - {ckpt.CHECKSUMS})  # every file, the index included
    rc, out, err = _cli(capsys, "verify", str(saved.parent))
    assert rc == 0 and err == [] and out.splitlines() == [f"ok        {saved / name}" for name in sorted(sums)]

    flipped = Path(shutil.copytree(saved, tmp_path / "flipped"))
    shard = ckpt.shard_name(1, 2)
    data = bytearray((flipped / shard).read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's data, past the header
    (flipped / shard).write_bytes(bytes(data))
    assert load_file(str(flipped / shard)).keys() == load_file(str(saved / shard)).keys()  # no parse error
    with pytest.raises(CheckpointError, match=rf"{shard}' does not match its sha256 in {ckpt.CHECKSUMS}"):
        ckpt.load_model_state(flipped)
    assert f"{shard}' does not match its sha256" in _one_error(capsys, *_resume(), "--resume", str(flipped))
    assert f"{shard}' does not match its sha256" in _one_error(capsys, "export", str(flipped), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()

    (flipped / "notes.txt").write_text("added later")
    (flipped / ckpt.STATE_DIR / "stage-0.json").unlink()
    rc, out, err = _cli(capsys, "verify", str(flipped))
    assert rc == 2 and len(err) == 1, err
    lines = out.splitlines()
    assert f"bad       {flipped / shard}" in lines and f"unlisted  {flipped / 'notes.txt'}" in lines
    assert f"missing   {flipped / ckpt.STATE_DIR / 'stage-0.json'}" in lines
    assert f"ok        {flipped / ckpt.INDEX}" in lines
    assert err[0] == (f"ppll: error: 3 file(s) differ from {ckpt.CHECKSUMS}: bad {flipped / shard}, unlisted "
                      f"{flipped / 'notes.txt'}, missing {flipped / ckpt.STATE_DIR / 'stage-0.json'}; restore them "
                      f"from a copy, or resume from another checkpoint")

    older = Path(shutil.copytree(saved, tmp_path / "older"))
    (older / ckpt.CHECKSUMS).unlink()  # saved before checksums were recorded: loads, unverified, with a warning
    rc, out, err = _cli(capsys, "verify", str(older))
    assert rc == 0 and out == "" and err == [f"ppll: warning: checkpoint {older} has no {ckpt.CHECKSUMS} (saved by "
                                             f"an older ppll_ext): its files cannot be verified"]
    assert ckpt.load_model_state(older).keys() == ckpt.load_model_state(saved).keys()


def test_export_refuses_a_non_empty_folder_and_overwrite_replaces_it_whole(saved: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """An export into a folder holding an earlier sharded export is refused without --overwrite; with it, the folder
    holds the new export only (no old shard or index left to load), and a failed export changes nothing."""
    out = tmp_path / "out"
    assert _cli(capsys, "export", str(saved), str(out), "--max-shard-size", "20KB")[0] == 0
    sharded = sorted(p.name for p in out.iterdir())
    assert ckpt.INDEX in sharded and len(sharded) > 3
    refused = _one_error(capsys, "export", str(saved), str(out))
    assert refused == (f"ppll: error: output folder {str(out)!r} is not empty (it holds {sharded[0]!r} and "
                       f"{len(sharded) - 1} more); choose an empty folder, or replace it with overwrite=True (ppll "
                       f"export/import-deepspeed --overwrite)")
    assert sorted(p.name for p in out.iterdir()) == sharded

    foreign = Path(shutil.copytree(saved, tmp_path / "with-config"))
    (foreign / "config.json").write_text("{}")  # not written by the save: the export fails half-way
    assert "config.json' is not listed in" in _one_error(capsys, "export", str(foreign), str(out), "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == sharded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "with-config"]  # no temporary folder left

    assert _cli(capsys, "export", str(saved), str(out), "--overwrite")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == [ckpt.SINGLE, ckpt.STATE_DIR]
    exported, original = ckpt.load_model_state(out), ckpt.load_model_state(saved)
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "with-config"]


def test_resume_with_changed_settings_or_edited_state_is_one_line(saved: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A resumed run that changes a setting the saved position or the saved optimizer states depend on, or a
    checkpoint whose trainer or stage state was edited, fails before training with one line naming the file, the
    field and the fix (instead of AttributeError, KeyError or a shape error after loading)."""
    state = saved / ckpt.TRAINER_STATE
    for change, field, old in (("train.batch_size=16", "train.batch_size", "32"),
                               ("data.train_subset=160", "data.train_subset", "320"),
                               ("train.seed=1", "train.seed", "0"),
                               ("data.encoding=latin-1", "data.encoding", "'utf-8'"),
                               ("optim.name=adamw", "optim.name", "'sgd'")):
        new = change.split("=")[1]
        new = repr(new) if not new.isdigit() else new
        assert _one_error(capsys, *_resume(change), "--resume", str(saved)) == (
            f"ppll: error: {str(state)!r}: 'config.{field}' is {old} but this run has {field}={new}; "
            + ("the saved position (epoch, batch, step) counts batches of the saved data stream" if "optim" not in field
               else "the saved optimizer states were made with it")
            + f": resume with {field}={old}, or start a new run without train.resume (command line: --set {field}=...)")
    # another K starts fresh optimizers: another optimizer is then no conflict
    cfg = load_config(None, [*MODELS["resnet32"], *SMALL, "local.stages=3", "optim.name=adamw",
                             f"train.resume={saved}"])
    assert resume_state(cfg)[1]["position"]["step"] == 10

    def edited(name: str, edit: Callable[[Path], object], checksums: bool = True) -> Path:
        folder = Path(shutil.copytree(saved, tmp_path / name))
        edit(folder)
        if not checksums:
            (folder / ckpt.CHECKSUMS).unlink()
        return folder

    def rewrite(rel: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
        def edit(folder: Path) -> None:
            data = json.loads((folder / rel).read_text())
            change(data)
            (folder / rel).write_text(json.dumps(data))
        return edit

    def drop_rng(folder: Path) -> None:
        path = folder / ckpt.STATE_DIR / "stage-0.safetensors"
        save_file({k: v for k, v in load_file(str(path)).items() if k != "rng.cpu"}, str(path))

    cut = json.loads(state.read_text())["boundaries"]
    cases = [
        (edited("empty-state", lambda f: (f / ckpt.TRAINER_STATE).write_text("{}")),
         f"{ckpt.TRAINER_STATE}': 'position' is missing or not {{step, epoch, batch}} of integers >= 0; the file was "
         f"edited or is corrupt: restore it or resume from another checkpoint"),
        (edited("empty-stage", lambda f: (f / ckpt.STATE_DIR / "stage-1.json").write_text("{}")),
         "training_state/stage-1.json' does not match its sha256"),  # verified before it is parsed
        (edited("empty-stage-unverified", lambda f: (f / ckpt.STATE_DIR / "stage-1.json").write_text("{}"),
                checksums=False),
         "training_state/stage-1.json': 'steps' is missing or not an integer >= 0"),
        (edited("no-optimizer", rewrite(f"{ckpt.STATE_DIR}/stage-0.json", lambda d: d.pop("optimizer")),
                checksums=False),
         "training_state/stage-0.json': 'optimizer' is missing or not null or {param_groups, scalars}"),
        (edited("no-rng", drop_rng, checksums=False),
         "training_state/stage-0.safetensors': 'rng.cpu' is missing or not a uint8 RNG"),
        (edited("cut-past-the-model", rewrite(ckpt.TRAINER_STATE, lambda d: d.update(boundaries=[0, 7, 99]))),
         f"{ckpt.TRAINER_STATE}' does not match its sha256 in {ckpt.CHECKSUMS}"),
        (edited("cut-past-the-model-unverified", rewrite(ckpt.TRAINER_STATE, lambda d: d.update(boundaries=[0, 7, 99])),
                checksums=False),
         f"{ckpt.TRAINER_STATE}': 'boundaries' [0, 7, 99] end at layer 99 but this model has {cut[-1]} layers"),
        (edited("cut-moved-unverified", rewrite(ckpt.TRAINER_STATE, lambda d: d.update(boundaries=[0, cut[1] + 1,
                                                                                                    cut[-1]])),
                checksums=False),
         "cut-moved-unverified': the optimizer state in training_state/stage-0.safetensors does not fit stage 0's SGD"),
    ]
    for folder, needle in cases:
        rc, _, err = _cli(capsys, *_resume(), "--resume", str(folder))
        # an unverified checkpoint that gets as far as loading is announced
        loaded = folder.name.startswith(("cut-moved", "empty-stage-", "no-"))
        unverified = [f"ppll: warning: checkpoint {folder} has no {ckpt.CHECKSUMS} (saved by an older ppll_ext): its "
                      f"files cannot be verified"] if loaded else []
        assert rc == 2 and err[:-1] == unverified and err[-1].startswith("ppll: error:"), (folder.name, err)
        assert needle in err[-1] and str(folder) in err[-1], (folder.name, err)


def test_export_onto_a_full_disk_is_one_line_and_changes_nothing(saved: Path, tmpfs: Callable[..., Path],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """An export that needs more than its file system's free space is refused before it writes, with the numbers;
    one that runs out of space while writing (here: of inodes, after a few shards) is one line naming the folder and
    the fix, and the export it was to replace (--overwrite) stays as it was, with nothing left beside it."""
    state = ckpt.load_model_state(saved)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    small = tmpfs("small", "64k")
    refused = _one_error(capsys, "export", str(saved), str(small / "out"))
    numbers = re.fullmatch(rf"ppll: error: output '{small / 'out'}': its file system has 65.5 kB free but the files "
                           rf"take about (\d+) kB; free space there or choose another output folder", refused)
    assert numbers and nbytes < int(numbers.group(1)) * 1000 < nbytes * 1.1, refused
    assert list(small.iterdir()) == []

    few = tmpfs("few", "8m", inodes=8)
    out = few / "out"
    assert _cli(capsys, "export", str(saved), str(out))[0] == 0
    full = _one_error(capsys, "export", str(saved), str(out), "--max-shard-size", "20KB", "--overwrite")
    assert re.fullmatch(rf"ppll: error: no space left on the device of '{few}' while writing '{out}' \(about \d+ kB "
                        rf"needed, [\d.]+ MB free without the partial files, which are removed\); free space there or "
                        rf"choose another output folder", full), full
    assert sorted(p.name for p in few.iterdir()) == ["out"] and sorted(p.name for p in out.iterdir()) == [ckpt.SINGLE,
                                                                                                     ckpt.STATE_DIR]
    exported = ckpt.load_model_state(out)
    assert exported.keys() == state.keys() and all(torch.equal(exported[k], state[k]) for k in state)


def test_a_full_disk_in_a_stage_process_is_one_line_and_keeps_the_previous_checkpoint(
        tmpfs: Callable[..., Path]) -> None:
    """Processes runtime: the disk fills while stage 1 saves step 8 (after its shard); stage 0's writes may fail too.
    The stages meet once both are done writing: the run ends with exit code 2 and one line naming the run directory
    and the fix (no traceback, no lost-link lines); rank 0, which commits, discards step-000008.tmp; step 4 is intact
    and verified."""
    disk = tmpfs("disk", "4m")
    base = sets(*MODELS["resnet8"], *SMALL, "local.stages=2", "local.runtime=processes", "train.epochs=1")
    cmd = [sys.executable, "-m", "ppll_ext.runtime.torchrun", str(os.getpid()), "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "faults.py"), "1:8:full-in-save", "train", *base, "--save-dir", str(disk / "run"),
           "--save-every", "4"]
    res = procs.run(cmd)
    lines = res.stderr.splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    # stage 0 may still have been writing when stage 1 filled the disk: then its failure is the first
    assert re.fullmatch(rf"ppll: error: stage ([01]) \(rank \1\) failed: CheckpointError: no space left on the device "
                        rf"of '{disk / 'run'}' while saving step-000008 \(0 B free\): the latest complete checkpoint, "
                        rf"step-000004, is intact; free space there \(or choose another train\.save_dir\) and resume "
                        rf"from it", lines[0]), lines
    run = disk / "run"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("step-")) == ["step-000004"], list(run.iterdir())
    (run / "filler").unlink()
    assert set(ckpt.verify(run / "step-000004").values()) == {"ok"}
