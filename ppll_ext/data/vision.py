"""torchvision's CIFAR-10, SVHN and STL-10 as uint8 tensors in memory.

torchvision checks the md5 of the official files, which rejects rebuilt copies and small test files. SVHN's .mat
files and STL-10's raw bytes run no code when read, so those subclasses only check that the files a split needs
exist. CIFAR-10's files are pickles, and unpickling runs code: only files with the official archive's md5 are read
(a rebuilt CIFAR-10 can be read as an image folder). Downloading stays torchvision's own code.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppll_ext.data.datasets import DIGIT_CLASSES, ArrayDataset, DataConfig, data_root
from ppll_ext.data.imagefolder import hexdigest, load_imagefolder, recent
from ppll_ext.errors import DataError

_STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def _torchvision_classes() -> dict[str, type]:
    """Subclasses of torchvision's CIFAR10 / SVHN / STL10 that find a split's files (imported lazily); CIFAR-10's
    pickles must still be the official files."""
    from torchvision.datasets import CIFAR10, STL10, SVHN

    class _CIFAR10(CIFAR10):
        @classmethod
        def official(cls, split: str) -> list[tuple[str, str]]:
            """(relative path, official md5) of each pickle the split unpickles, the meta file first."""
            files = cls.train_list if split == "train" else cls.test_list
            return [(os.path.join(cls.base_folder, name), md5)
                    for name, md5 in [(cls.meta["filename"], cls.meta["md5"]), *files]]

        @classmethod
        def required(cls, split: str) -> list[str]:
            return [name for name, _ in cls.official(split)]

        def _check_integrity(self) -> bool:
            # Only the split's own files (torchvision wants both splits'); False lets download=True replace them.
            files = self.official("train" if self.train else "test")
            return not _missing(self.root, [name for name, _ in files]) and _unofficial(self.root, files) is None

    class _SVHN(SVHN):
        @classmethod
        def required(cls, split: str) -> list[str]:
            return [cls.split_list[split][1]]

        def _check_integrity(self) -> bool:
            return not _missing(self.root, self.required(self.split))

    class _STL10(STL10):
        @classmethod
        def required(cls, split: str) -> list[str]:
            files = cls.train_list[:2] if split == "train" else cls.test_list
            return [os.path.join(cls.base_folder, name) for name, _ in files]

        def _check_integrity(self) -> bool:
            return not _missing(self.root, self.required(self.split))

    return {"cifar10": _CIFAR10, "svhn": _SVHN, "stl10": _STL10}


def _missing(root: str | Path, files: list[str]) -> list[str]:
    """The relative paths in `files` that are not files under root."""
    return [f for f in files if not os.path.isfile(os.path.join(root, f))]


# md5 by file version (device, inode, size, mtime, ctime): any write, replacement or utime gives a new key.
_MD5S: dict[tuple[int, int, int, int, int], str] = {}


def _md5(path: str) -> str:
    """The file's md5, hashed once per process per version of the file (a 170 MB CIFAR-10 split takes ~0.3 s)."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())  # the stat of the bytes that are hashed, not of whatever the path names later
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        digest = _MD5S.get(key) or hexdigest(f, "md5")
    if not recent(st):  # a just-changed file may change again under the same key: hash it again next time
        _MD5S[key] = digest
    return digest


def _unofficial(root: str | Path, files: list[tuple[str, str]]) -> tuple[str, str, str] | None:
    """The first of `files` (relative path, official md5) under root whose md5 differs: (path, md5, official md5)."""
    for name, official in files:
        path = os.path.join(root, name)
        digest = _md5(path)
        if digest != official:
            return path, digest, official
    return None


def _refuse_unofficial(root: Path, files: list[tuple[str, str]], title: str) -> None:
    """DataError naming the first file that is not the official archive's: unpickling it could run any code."""
    bad = _unofficial(root, files)
    if bad is not None:
        path, digest, official = bad
        raise DataError(f"{title} file {path!r} has md5 {digest}, not the official {title} archive member's "
                        f"{official}, so it is not unpickled (unpickling runs code); set data.download=true to fetch "
                        f"the official archive, or point data.root at a folder holding its files", key="data.root")


@dataclass(frozen=True)
class _TorchvisionSpec:
    """How to name, find and normalise one torchvision data set."""

    title: str
    expected: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool


_TORCHVISION: dict[str, _TorchvisionSpec] = {
    "cifar10": _TorchvisionSpec("CIFAR-10", "cifar-10-batches-py/", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                                flip=True),
    "svhn": _TorchvisionSpec("SVHN", "train_32x32.mat and test_32x32.mat", (0.4377, 0.4438, 0.4728),
                             (0.1980, 0.2010, 0.1970), flip=False),
    "stl10": _TorchvisionSpec("STL-10", "stl10_binary/", (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713),
                              flip=True),
}


def load_torchvision(cfg: DataConfig, split: str) -> ArrayDataset:
    """CIFAR-10, SVHN or STL-10 ('train' = labelled train split) through torchvision, as uint8 NCHW tensors."""
    spec = _TORCHVISION[cfg.name]
    root = data_root(cfg, spec.title, spec.expected)
    cls: Any = _torchvision_classes()[cfg.name]
    missing = _missing(root, cls.required(split))
    if missing and (root / "train").is_dir() and (root / "test").is_dir():
        # An image-folder copy of the same data set (such as a re-encoded CIFAR-10): its usual constants apply.
        return dataclasses.replace(load_imagefolder(cfg, split), mean=spec.mean, std=spec.std, flip=spec.flip)
    if missing and not cfg.download:
        raise DataError(f"{spec.title} not found under {str(root)!r} (expected {spec.expected}, missing {missing[0]}); "
                        f"set data.root to the folder holding it or set data.download=true", key="data.root")
    kwargs = {"train": split == "train"} if cfg.name == "cifar10" else {"split": split}
    try:
        if cfg.name == "cifar10" and not cfg.download:
            _refuse_unofficial(root, cls.official(split), spec.title)
        tv = cls(str(root), download=cfg.download, **kwargs)
    except DataError:
        raise
    except Exception as exc:
        fix = "check the network or put the files there by hand" if cfg.download else "replace them with intact copies"
        action = "download or read" if cfg.download else "read"
        raise DataError(f"could not {action} {spec.title} under {str(root)!r}: {exc}; {fix}", key="data.root") from exc
    if cfg.name == "cifar10":
        images = torch.from_numpy(np.ascontiguousarray(tv.data)).permute(0, 3, 1, 2)
        labels, classes = np.asarray(tv.targets), list(tv.classes)
    else:
        images = torch.from_numpy(np.ascontiguousarray(tv.data))
        labels = np.asarray(tv.labels)
        classes = list(getattr(tv, "classes", None) or (DIGIT_CLASSES if cfg.name == "svhn" else _STL10_CLASSES))
    return ArrayDataset(images.contiguous(), torch.from_numpy(labels.astype(np.int64)), classes, spec.mean, spec.std,
                        spec.flip)
