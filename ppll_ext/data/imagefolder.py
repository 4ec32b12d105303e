"""Image folders (<root>/<split>/<class>/*.png|jpg) decoded once and cached as uint8 tensors, keyed by the file
tree so that any added, removed or edited image gives a new cache file; and the file fingerprints the cache key and
vision.py's md5 checks share."""

from __future__ import annotations

import hashlib
import os
import secrets
import time
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ppll_ext.data.datasets import ArrayDataset, DataConfig, channel_stats, data_root
from ppll_ext.errors import DataError

# Bump when the layout or the key of the image-folder cache files changes, so old files are never misread.
_CACHE_VERSION = "2"

# A file changed this recently (ns) may change again within one timestamp tick (up to 2 s, on FAT) without a new
# mtime: the image-folder cache key then holds its bytes' hash, and its md5 is not remembered.
RACY_NS = 2_000_000_000


def recent(st: os.stat_result) -> bool:
    """Changed so lately that it could change again without a new mtime or ctime (timestamps are coarse)."""
    return max(st.st_mtime_ns, st.st_ctime_ns) >= time.time_ns() - RACY_NS


def hexdigest(f: BinaryIO, algorithm: str) -> str:
    """Hex digest of the rest of an open file (a fingerprint compared with known files, as torchvision's md5 is)."""
    h = hashlib.new(algorithm, usedforsecurity=False)
    while block := f.read(1 << 20):
        h.update(block)
    return h.hexdigest()


def load_imagefolder(cfg: DataConfig, split: str) -> ArrayDataset:
    """<root>/<split>/<class>/*.png|jpg decoded once and cached as uint8 tensors; mean/std from the train split."""
    root = data_root(cfg, "imagefolder", "train/<class>/*.jpg and test/<class>/*.jpg")
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist; "
                        f"set data.root to the folder holding train/ and test/", key="data.root")
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else root / ".ppll_cache"
    data = _cached_split(root, split, cache_dir, prune=not cfg.cache_dir)
    if split == "train":
        stats = data["mean"], data["std"]
    else:
        train = _cached_split(root, "train", cache_dir, prune=not cfg.cache_dir, mmap=True)
        stats = train["mean"], train["std"]
        if list(train["classes"]) != list(data["classes"]):
            raise DataError(f"{str(root / 'train')!r} and {str(root / 'test')!r} have different class folders "
                            f"({train['classes']} vs {data['classes']}); give both splits the same classes")
    mean, std = (tuple(float(v) for v in t.tolist()) for t in stats)
    return ArrayDataset(data["images"], data["labels"], list(data["classes"]), mean, std, flip=True)


def _cached_split(root: Path, split: str, cache_dir: Path, *, prune: bool, mmap: bool = False) -> dict[str, Any]:
    """The decoded split from the cache, decoding and caching it first if the tree is new or changed."""
    from torchvision.datasets import ImageFolder

    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"image folder split {str(split_dir)!r} does not exist; "
                        f"data.root must hold train/<class>/ and test/<class>/ folders of images", key="data.root")
    try:
        folder = ImageFolder(str(split_dir))
    except OSError as exc:
        raise DataError(f"no images found in {str(split_dir)!r} ({exc}); expect {split}/<class>/*.jpg|png") from exc
    key = _tree_key(split_dir, folder.samples, folder.classes)
    path = cache_dir / f"{split}-{key}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True, mmap=mmap)
        except Exception as exc:
            warnings.warn(f"ignoring unreadable cache {str(path)!r} ({exc}); decoding again", stacklevel=2)
    images, labels = _decode(split_dir, folder.samples)
    mean, std = channel_stats(images)
    data = {"images": images, "labels": labels, "classes": list(folder.classes),
            "mean": torch.tensor(mean, dtype=torch.float64), "std": torch.tensor(std, dtype=torch.float64)}
    _write_cache(data, path, prune=prune)
    return data


def _tree_key(split_dir: Path, samples: list[tuple[str, int]], classes: list[str]) -> str:
    """Hash of the file list with each file's size, mtime and ctime (and the bytes of just-changed files): an added,
    removed or edited image, even one edited in place to the same size, gets a new cache file."""
    h = hashlib.sha256(f"ppll-imagefolder-v{_CACHE_VERSION}\n{classes!r}\n".encode())
    for file, label in samples:
        st = os.stat(file)
        content = ""
        if recent(st):
            with open(file, "rb") as f:
                content = hexdigest(f, "sha256")
        h.update(f"{os.path.relpath(file, split_dir)}\t{st.st_size}\t{st.st_mtime_ns}\t{st.st_ctime_ns}\t{label}"
                 f"\t{content}\n".encode())
    return h.hexdigest()[:20]


def _decode(split_dir: Path, samples: list[tuple[str, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image with PIL into one uint8 N x C x H x W tensor (grayscale if the first image is)."""
    from PIL import Image
    from tqdm import tqdm

    images: np.ndarray | None = None
    mode = "RGB"
    for i, (file, _) in enumerate(tqdm(samples, desc=f"decoding {split_dir}", unit="img", leave=False)):
        try:
            with Image.open(file) as im:
                if images is None:
                    mode = "L" if im.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
                arr = np.asarray(im.convert(mode))
        except OSError as exc:
            raise DataError(f"cannot decode image {file!r} ({exc}); remove or replace it") from exc
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if images is None:
            images = np.empty((len(samples), *arr.shape), dtype=np.uint8)
        elif arr.shape != images.shape[1:]:
            raise DataError(f"image {file!r} is {arr.shape[1]}x{arr.shape[0]} but {samples[0][0]!r} is "
                            f"{images.shape[2]}x{images.shape[1]}; all images of an image folder must have one size")
        images[i] = arr
    assert images is not None  # ImageFolder refuses empty trees
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


def _write_cache(data: dict[str, Any], path: Path, *, prune: bool) -> None:
    """Save atomically (temp file + os.replace); with prune, delete this split's stale caches beside it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A name unique to this process: several ranks may decode the same tree at once.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "xb") as f:
                torch.save(data, f)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:
        warnings.warn(f"could not write the decoded-image cache {str(path)!r} ({exc}); set data.cache_dir to a "
                      f"writable folder to avoid decoding again next time", stacklevel=3)
        return
    if prune:
        split = path.name.split("-", 1)[0]
        for old in path.parent.glob(f"{split}-*.pt"):
            if old != path:
                old.unlink(missing_ok=True)
