"""Data sets and the batch loader, on small files written here in the real on-disk formats."""

from __future__ import annotations

import hashlib
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ppll_ext.data import DATASET_NAMES, ArrayDataset, BatchLoader, DataConfig, imagefolder, load_dataset
from ppll_ext.errors import ConfigError, DataError

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _rng_images(seed: int, n: int, c: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, c, size, size), dtype=np.uint8)


# --- writers of the real formats -------------------------------------------------------------------------------------


def write_cifar10(root: Path, per_batch: int = 3, n_test: int = 4) -> tuple[np.ndarray, list, np.ndarray, list]:
    """cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta, as torchvision reads them."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_x, train_y = [], []
    for b in range(1, 6):
        x = _rng_images(b, per_batch, 3, 32)
        y = [(b + i) % 10 for i in range(per_batch)]
        with open(folder / f"data_batch_{b}", "wb") as f:
            pickle.dump({"batch_label": f"training batch {b} of 5", "data": x.reshape(per_batch, -1), "labels": y}, f)
        train_x.append(x)
        train_y += y
    test_x = _rng_images(9, n_test, 3, 32)
    test_y = [i % 10 for i in range(n_test)]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"batch_label": "testing batch 1 of 1", "data": test_x.reshape(n_test, -1), "labels": test_y}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return np.concatenate(train_x), train_y, test_x, test_y


def register_as_official(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Put the md5s of the files under root/cifar-10-batches-py in torchvision's table of the official archive's
    members, as if they were the real ones (which are not at hand): the md5 gate itself runs unchanged."""
    from torchvision.datasets import CIFAR10

    folder = root / "cifar-10-batches-py"

    def md5(name: str) -> str:
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    monkeypatch.setattr(CIFAR10, "train_list", [[name, md5(name)] for name, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[name, md5(name)] for name, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5(CIFAR10.meta["filename"])})


class CreatesMarker:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return Path.touch, (self.marker,)


def plant_payload(file: Path, marker: Path) -> None:
    """Replace `file` with a pickle that creates `marker` when loaded, padded to the same size (pickle ignores what
    follows its STOP opcode) and given back the same mtime: only its bytes and ctime tell it apart."""
    before = file.stat()
    payload = pickle.dumps({"label_names": CreatesMarker(marker), "data": CreatesMarker(marker)})
    assert len(payload) <= before.st_size
    file.write_bytes(payload.ljust(before.st_size, b"\0"))
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert file.stat().st_size == before.st_size and file.stat().st_mtime_ns == before.st_mtime_ns


def write_svhn(root: Path, split: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """<split>_32x32.mat with X as H x W x C x N and y as N x 1 in 1..10, where 10 stands for digit 0."""
    import scipy.io

    x = _rng_images(seed, n, 3, 32)
    digits = np.arange(n) % 10
    y = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(n, 1)
    root.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x.transpose(2, 3, 1, 0), "y": y})
    return x, digits


def write_stl10(root: Path, split: str, n: int, seed: int, class_names: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """stl10_binary/<split>_X.bin (column-major 3 x 96 x 96 per image) and <split>_y.bin (labels 1..10)."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    x = _rng_images(seed, n, 3, 96)
    labels = (np.arange(n) * 3) % 10
    (folder / f"{split}_X.bin").write_bytes(np.ascontiguousarray(x.transpose(0, 1, 3, 2)).tobytes())
    (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
    if class_names:
        names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
        (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    return x, labels


def write_image_tree(root: Path, split: str, per_class: dict[str, int], seed: int, size: int = 8) -> dict[str, list]:
    """<root>/<split>/<class>/<i>.png with random RGB pixels; returns the HWC arrays per class in file order."""
    rng = np.random.default_rng(seed)
    written: dict[str, list] = {}
    for cls, n in per_class.items():
        folder = root / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        written[cls] = []
        for i in range(n):
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / f"{i:03d}.png")
            written[cls].append(arr)
    return written


def _stack_chw(written: dict[str, list]) -> np.ndarray:
    return np.stack([a for cls in sorted(written) for a in written[cls]]).transpose(0, 3, 1, 2)


# --- digits ----------------------------------------------------------------------------------------------------------


def test_digits_split_shapes_and_stats():
    train = load_dataset(DataConfig(name="digits"), "train")
    test = load_dataset(DataConfig(name="digits"), "test")
    assert (len(train), len(test)) == (1437, 360)
    assert train.images.shape == (1437, 1, 8, 8) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and test.labels.dtype == torch.int64
    assert (train.in_channels, train.image_size, train.num_classes) == (1, 8, 10)
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    assert not train.flip
    assert test.mean == train.mean and test.std == train.std
    assert abs(train.mean[0] - train.images.double().mean().item() / 255) < 1e-9
    # Stratified: every class keeps about 20% of its samples for testing.
    counts = test.labels.bincount(minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37
    again = load_dataset(DataConfig(name="digits"), "test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)


def test_subsets_are_fixed_and_drawn_from_the_split():
    full = load_dataset(DataConfig(name="digits"), "train")
    cfg = DataConfig(name="digits", train_subset=100, test_subset=50)
    sub = load_dataset(cfg, "train")
    assert len(sub) == 100 and len(load_dataset(cfg, "test")) == 50
    assert torch.equal(sub.images, load_dataset(cfg, "train").images)
    assert sub.mean == full.mean
    flat = full.images.flatten(1)
    for img in sub.images.flatten(1)[:10]:
        assert (flat == img).all(dim=1).any()
    assert len(load_dataset(DataConfig(name="digits", train_subset=10**6), "train")) == 1437
    with pytest.raises(DataError, match="train_subset"):
        load_dataset(DataConfig(name="digits", train_subset=0), "train")


def test_unknown_name_and_split():
    with pytest.raises(DataError, match="cifar10") as info:
        load_dataset(DataConfig(name="mnist"), "train")
    assert all(name in str(info.value) for name in DATASET_NAMES)
    with pytest.raises(DataError, match="'val'"):
        load_dataset(DataConfig(name="digits"), "val")
    assert issubclass(DataError, ConfigError)


# --- torchvision formats ---------------------------------------------------------------------------------------------


def test_cifar10_files(tmp_path, monkeypatch):
    train_x, train_y, test_x, test_y = write_cifar10(tmp_path)
    register_as_official(monkeypatch, tmp_path)
    cfg = DataConfig(name="cifar10", root=str(tmp_path))
    train, test = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    assert train.images.shape == (15, 3, 32, 32) and train.images.dtype == torch.uint8 and train.images.is_contiguous()
    assert torch.equal(train.images, torch.from_numpy(train_x))
    assert train.labels.tolist() == train_y and train.labels.dtype == torch.int64
    assert torch.equal(test.images, torch.from_numpy(test_x)) and test.labels.tolist() == test_y
    assert train.classes == CIFAR_CLASSES and train.flip
    assert train.mean == (0.4914, 0.4822, 0.4465) and test.std == (0.2470, 0.2435, 0.2616)


def test_cifar10_missing_files_say_where_and_how(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(name="cifar10", root=str(missing)), "train")
    message = str(info.value)
    assert str(missing) in message and "cifar-10-batches-py" in message and "data.download=true" in message
    assert "\n" not in message
    with pytest.raises(DataError, match="data.root"):
        load_dataset(DataConfig(name="cifar10"), "train")
    write_cifar10(tmp_path)
    register_as_official(monkeypatch, tmp_path)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)), "train")
    assert len(load_dataset(DataConfig(name="cifar10", root=str(tmp_path)), "test")) == 4


def test_cifar10_corrupt_file_is_a_data_error(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    register_as_official(monkeypatch, tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="test_batch.* not the official CIFAR-10 archive member"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)), "test")
    # Even a file that passes the md5 check can fail to load: still one DataError.
    register_as_official(monkeypatch, tmp_path)
    with pytest.raises(DataError, match="could not read CIFAR-10"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)), "test")


def test_cifar10_crafted_pickle_is_refused_before_unpickling(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    for name in ("batches.meta", "test_batch"):  # room for a payload of the same size; pickle ignores the tail
        (folder / name).write_bytes((folder / name).read_bytes().ljust(4096, b"\0"))
    register_as_official(monkeypatch, tmp_path)
    time.sleep(imagefolder.RACY_NS / 1e9 + 0.1)  # older than a timestamp tick: the loader remembers their md5s
    cfg = DataConfig(name="cifar10", root=str(tmp_path))
    assert len(load_dataset(cfg, "test")) == 4
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(CreatesMarker(marker)))
    assert marker.exists()  # the payload does run code when unpickled
    marker.unlink()
    for name in ("batches.meta", "test_batch"):
        honest = (folder / name).read_bytes()
        plant_payload(folder / name, marker)
        with pytest.raises(DataError) as info:
            load_dataset(cfg, "test")
        message = str(info.value)
        assert not marker.exists()
        assert str(folder / name) in message and "not unpickled (unpickling runs code)" in message
        assert "data.download=true" in message and "data.root" in message and "\n" not in message
        (folder / name).write_bytes(honest)
    assert len(load_dataset(cfg, "test")) == 4
    monkeypatch.undo()  # torchvision's real table: the official archive's md5s
    with pytest.raises(DataError, match="5ff9c542aee3614f3951f8cda6e48888") as info:
        load_dataset(cfg, "train")
    assert str(folder / "batches.meta") in str(info.value)


def test_cifar10_crafted_meta_through_the_cli(tmp_path, capsys):
    """`ppll train` (python -m ppll_ext) in this process: a subprocess would only add torch's start-up time."""
    from ppll_ext.cli import main

    write_cifar10(tmp_path)
    marker = tmp_path / "marker"
    meta = tmp_path / "cifar-10-batches-py" / "batches.meta"
    meta.write_bytes(meta.read_bytes().ljust(4096, b"\0"))
    plant_payload(meta, marker)
    assert main(["train", "--set", "data.name=cifar10", "--set", f"data.root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ppll: error:") and "Traceback" not in err, err
    assert str(meta) in lines[0] and "not unpickled" in lines[0]
    assert not marker.exists()


def test_svhn_files(tmp_path):
    train_x, train_y = write_svhn(tmp_path, "train", 12, seed=1)
    test_x, test_y = write_svhn(tmp_path, "test", 5, seed=2)
    cfg = DataConfig(name="svhn", root=str(tmp_path))
    train, test = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    assert train.images.shape == (12, 3, 32, 32) and train.images.dtype == torch.uint8
    assert torch.equal(train.images, torch.from_numpy(train_x)) and torch.equal(test.images, torch.from_numpy(test_x))
    assert train.labels.tolist() == train_y.tolist() and 0 in train.labels.tolist()
    assert test.labels.tolist() == test_y.tolist()
    assert train.classes == [str(d) for d in range(10)] and not train.flip
    assert train.mean == (0.4377, 0.4438, 0.4728)
    with pytest.raises(DataError, match="SVHN not found") as info:
        load_dataset(DataConfig(name="svhn", root=str(tmp_path / "empty")), "test")
    assert str(tmp_path / "empty") in str(info.value)


def test_stl10_files(tmp_path):
    train_x, train_y = write_stl10(tmp_path, "train", 4, seed=3)
    test_x, test_y = write_stl10(tmp_path, "test", 3, seed=4)
    cfg = DataConfig(name="stl10", root=str(tmp_path))
    train, test = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    assert train.images.shape == (4, 3, 96, 96) and train.image_size == 96 and train.images.is_contiguous()
    assert torch.equal(train.images, torch.from_numpy(train_x)) and torch.equal(test.images, torch.from_numpy(test_x))
    assert train.labels.tolist() == train_y.tolist() and test.labels.tolist() == test_y.tolist()
    assert train.classes[7] == "monkey" and train.flip
    assert train.std == (0.2603, 0.2566, 0.2713)
    with pytest.raises(DataError, match="stl10_binary"):
        load_dataset(DataConfig(name="stl10", root=str(tmp_path / "empty")), "train")


def test_stl10_without_class_names_file(tmp_path):
    write_stl10(tmp_path, "test", 2, seed=5, class_names=False)
    test = load_dataset(DataConfig(name="stl10", root=str(tmp_path)), "test")
    assert test.num_classes == 10 and test.classes[0] == "airplane"


# --- image folders ---------------------------------------------------------------------------------------------------


def test_imagefolder_decodes_and_uses_train_stats(tmp_path, capsys):
    train_w = write_image_tree(tmp_path, "train", {"dog": 3, "cat": 4}, seed=0)
    test_w = write_image_tree(tmp_path, "test", {"dog": 2, "cat": 1}, seed=1)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path))
    train = load_dataset(cfg, "train")
    test = load_dataset(cfg, "test")
    assert "decoding" in capsys.readouterr().err
    assert train.classes == ["cat", "dog"] and train.flip
    assert train.images.shape == (7, 3, 8, 8) and train.images.dtype == torch.uint8
    assert torch.equal(train.images, torch.from_numpy(_stack_chw(train_w)))
    assert train.labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert torch.equal(test.images, torch.from_numpy(_stack_chw(test_w))) and test.labels.tolist() == [0, 1, 1]
    expected = _stack_chw(train_w).astype(np.float64) / 255
    np.testing.assert_allclose(train.mean, expected.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(train.std, expected.std(axis=(0, 2, 3)), rtol=1e-9)
    assert test.mean == train.mean and test.std == train.std


def test_imagefolder_cache_is_reused_and_invalidated(tmp_path, capsys):
    write_image_tree(tmp_path, "train", {"a": 2, "b": 2}, seed=0)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path))
    first = load_dataset(cfg, "train")
    assert "decoding" in capsys.readouterr().err
    caches = list((tmp_path / ".ppll_cache").glob("train-*.pt"))
    assert len(caches) == 1
    mtime = caches[0].stat().st_mtime_ns
    second = load_dataset(cfg, "train")
    assert "decoding" not in capsys.readouterr().err
    assert caches[0].stat().st_mtime_ns == mtime
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert first.mean == second.mean
    assert set(torch.load(caches[0], weights_only=True)) == {"images", "labels", "classes", "mean", "std"}

    Image.fromarray(np.full((8, 8, 3), 7, dtype=np.uint8)).save(tmp_path / "train" / "b" / "new.png")
    third = load_dataset(cfg, "train")
    assert "decoding" in capsys.readouterr().err
    assert len(third) == 5 and int(third.images[-1].max()) == 7
    now = list((tmp_path / ".ppll_cache").glob("train-*.pt"))
    assert len(now) == 1 and now[0] != caches[0]
    assert not list((tmp_path / ".ppll_cache").glob(".*tmp"))


def test_imagefolder_cache_notices_images_edited_in_place(tmp_path, capsys):
    written = write_image_tree(tmp_path, "train", {"a": 2, "b": 1}, seed=0)
    edited = tmp_path / "train" / "a" / "001.png"
    # Uncompressed PNGs of one shape have one size, so rewriting this one with other pixels keeps its size.
    Image.fromarray(written["a"][1]).save(edited, compress_level=0)
    size = edited.stat().st_size
    an_hour_ago = edited.stat().st_mtime_ns - 3600 * 10**9
    for file in (tmp_path / "train").rglob("*.png"):
        os.utime(file, ns=(an_hour_ago, an_hour_ago))
    cfg = DataConfig(name="imagefolder", root=str(tmp_path))
    assert torch.equal(load_dataset(cfg, "train").images, torch.from_numpy(_stack_chw(written)))
    assert "decoding" in capsys.readouterr().err
    load_dataset(cfg, "train")
    assert "decoding" not in capsys.readouterr().err  # nothing changed: the cache is used

    # Same size, another mtime; then same size and the very same mtime (a tool that keeps timestamps).
    for fill, mtime in ((11, an_hour_ago + 10**9), (222, an_hour_ago + 10**9)):
        written["a"][1] = np.full((8, 8, 3), fill, dtype=np.uint8)
        Image.fromarray(written["a"][1]).save(edited, compress_level=0)
        os.utime(edited, ns=(mtime, mtime))
        assert edited.stat().st_size == size and edited.stat().st_mtime_ns == mtime
        ds = load_dataset(cfg, "train")
        assert "decoding" in capsys.readouterr().err
        assert torch.equal(ds.images, torch.from_numpy(_stack_chw(written)))
        assert len(list((tmp_path / ".ppll_cache").glob("train-*.pt"))) == 1
    assert torch.equal(load_dataset(cfg, "train").images, torch.from_numpy(_stack_chw(written)))
    assert "decoding" not in capsys.readouterr().err


def test_imagefolder_cache_dir_and_jpeg(tmp_path):
    root = tmp_path / "tree"
    for split in ("train", "test"):
        folder = root / split / "only"
        folder.mkdir(parents=True)
        Image.fromarray(np.full((16, 16, 3), (200, 100, 50), dtype=np.uint8)).save(folder / "x.jpg", quality=95)
    cache = tmp_path / "cache"
    ds = load_dataset(DataConfig(name="imagefolder", root=str(root), cache_dir=str(cache)), "test")
    assert ds.images.shape == (1, 3, 16, 16)
    assert (ds.images[0].double().mean(dim=(1, 2)) - torch.tensor([200.0, 100.0, 50.0])).abs().max() < 3
    assert len(list(cache.glob("train-*.pt"))) == 1 and len(list(cache.glob("test-*.pt"))) == 1
    assert not (root / ".ppll_cache").exists()


def test_imagefolder_grayscale(tmp_path):
    for split in ("train", "test"):
        folder = tmp_path / split / "g"
        folder.mkdir(parents=True)
        Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), mode="L").save(folder / "0.png")
    ds = load_dataset(DataConfig(name="imagefolder", root=str(tmp_path)), "train")
    assert ds.images.shape == (1, 1, 8, 8) and ds.images.flatten().tolist() == list(range(64))


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(name="imagefolder", root=str(tmp_path / "absent")), "train")
    assert str(tmp_path / "absent") in str(info.value)
    write_image_tree(tmp_path, "train", {"a": 1}, seed=0)
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(name="imagefolder", root=str(tmp_path)), "test")
    assert str(tmp_path / "test") in str(info.value)
    Image.fromarray(np.zeros((9, 9, 3), dtype=np.uint8)).save(tmp_path / "train" / "a" / "big.png")
    with pytest.raises(DataError, match="one size"):
        load_dataset(DataConfig(name="imagefolder", root=str(tmp_path)), "train")
    with pytest.raises(DataError, match="data.root"):
        load_dataset(DataConfig(name="imagefolder"), "train")


# --- BatchLoader -----------------------------------------------------------------------------------------------------


def _indexed(n: int = 50, size: int = 32, flip: bool = True) -> ArrayDataset:
    """Random images whose label is their index, so a batch tells which samples it holds."""
    images = torch.from_numpy(_rng_images(7, n, 3, size))
    return ArrayDataset(images, torch.arange(n), [str(i) for i in range(n)], (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), flip)


def _batches(loader, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader.iter_from(start))


@pytest.fixture(scope="module")
def digits() -> ArrayDataset:
    return load_dataset(DataConfig(name="digits"), "train")


def test_loader_lengths_and_partial_batch(digits):
    loader = BatchLoader(digits, 100, shuffle=True, augment=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 15 and batches[-1][0].shape == (37, 1, 8, 8)
    assert sum(len(y) for _, y in batches) == 1437
    dropped = BatchLoader(digits, 100, shuffle=True, augment=True, drop_last=True)
    assert len(dropped) == len(list(dropped)) == 14
    x, y = batches[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (100, 1, 8, 8) and x.is_contiguous()
    with pytest.raises(ConfigError):
        BatchLoader(digits, 0, shuffle=False, augment=False)


def test_loader_normalises_in_dataset_order():
    ds = _indexed(10)
    (x, y), = list(BatchLoader(ds, 10, shuffle=False, augment=False))
    mean, std = torch.tensor(ds.mean).view(1, 3, 1, 1), torch.tensor(ds.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (ds.images.float() / 255 - mean) / std)
    assert y.tolist() == list(range(10))


def test_loader_deterministic_and_epochs_differ(digits):
    a = BatchLoader(digits, 64, shuffle=True, augment=True, seed=3)
    b = BatchLoader(digits, 64, shuffle=True, augment=True, seed=3)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    epoch0 = _batches(a)
    a.set_epoch(1)
    epoch1 = _batches(a)
    assert not torch.equal(epoch0[0][1], epoch1[0][1])
    a.set_epoch(0)
    assert all(torch.equal(x, x0) for (x, _), (x0, _) in zip(a, epoch0, strict=True))
    other_seed = BatchLoader(digits, 64, shuffle=True, augment=True, seed=4)
    assert not torch.equal(next(iter(other_seed))[1], epoch0[0][1])


def test_loader_each_epoch_is_a_permutation():
    ds = _indexed(53)
    loader = BatchLoader(ds, 8, shuffle=True, augment=True, seed=1)
    orders = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        seen = torch.cat([y for _, y in loader])
        assert sorted(seen.tolist()) == list(range(53))
        orders.append(seen.tolist())
    assert orders[0] != orders[1] != orders[2]
    gen = torch.Generator().manual_seed(1 * 100003 + 2)
    assert orders[2] == torch.randperm(53, generator=gen).tolist()


def test_loader_iter_from_resumes_exactly():
    ds = _indexed(50)
    loader = BatchLoader(ds, 8, shuffle=True, augment=True, seed=5)
    loader.set_epoch(2)
    full = _batches(loader)
    for k in (0, 3, 6, 7):
        resumed = BatchLoader(ds, 8, shuffle=True, augment=True, seed=5)
        resumed.set_epoch(2)
        tail = _batches(resumed, k)
        assert len(tail) == len(full) - k
        for (x, y), (xf, yf) in zip(tail, full[k:], strict=True):
            assert torch.equal(x, xf) and torch.equal(y, yf)
    assert _batches(loader, len(loader)) == []


def _crop_matches(image: torch.Tensor, out: torch.Tensor, pad: int) -> tuple[bool, bool]:
    """Whether `out` equals a zero-padded crop of `image`, and whether only its mirror image does."""
    padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
    h, w = image.shape[1:]
    crops = [padded[:, i:i + h, j:j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
    plain = any(torch.equal(c, out) for c in crops)
    mirrored = any(torch.equal(c.flip(2), out) for c in crops)
    return plain, mirrored and not plain


def _unnormalise(x: torch.Tensor, ds: ArrayDataset) -> torch.Tensor:
    mean, std = torch.tensor(ds.mean).view(1, -1, 1, 1), torch.tensor(ds.std).view(1, -1, 1, 1)
    return ((x * std + mean) * 255).round().to(torch.uint8)


def test_augmentation_is_padded_crop_and_flip():
    ds = _indexed(64, size=32, flip=True)
    x, y = next(iter(BatchLoader(ds, 64, shuffle=True, augment=True, seed=2)))
    assert x.shape == (64, 3, 32, 32)
    raw = _unnormalise(x, ds)
    results = [_crop_matches(ds.images[i], out, pad=4) for i, out in zip(y.tolist(), raw, strict=True)]
    assert all(plain or flipped for plain, flipped in results)
    n_flipped = sum(flipped for _, flipped in results)
    assert 16 <= n_flipped <= 48
    assert sum(not torch.equal(out, ds.images[i]) for i, out in zip(y.tolist(), raw, strict=True)) > 32


def test_no_flip_for_digits(digits):
    loader = BatchLoader(digits, 200, shuffle=True, augment=True, seed=0)
    assert loader.pad == 1
    x, y = next(iter(loader))
    raw = _unnormalise(x, digits)
    sample_ids = torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))[:200]
    for i, out in zip(sample_ids.tolist(), raw, strict=True):
        plain, _ = _crop_matches(digits.images[i], out, pad=1)
        assert plain


def test_loader_leaves_global_rng_alone(digits):
    state = torch.get_rng_state()
    list(BatchLoader(digits, 128, shuffle=True, augment=True, seed=1))
    assert torch.equal(state, torch.get_rng_state())


def test_svhn_name_on_an_image_folder_copy_uses_its_constants(tmp_path):
    written = write_image_tree(tmp_path, "train", {"0": 2, "1": 3}, seed=3)
    write_image_tree(tmp_path, "test", {"0": 1, "1": 1}, seed=4)
    ds = load_dataset(DataConfig(name="svhn", root=str(tmp_path)), "train")
    assert torch.equal(ds.images, torch.from_numpy(_stack_chw(written)))
    assert ds.mean == (0.4377, 0.4438, 0.4728) and not ds.flip
