"""Data sets: images as in-memory uint8 tensors (scikit-learn digits, torchvision's CIFAR-10 / SVHN / STL-10, image
folders) and text as fixed-length blocks of token ids (ppll_ext.data.text)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import torch

from ppll_ext.data.text import TEXT_SOURCES, TokenDataset, load_text_split, load_tokenizer, parse_encoding
from ppll_ext.errors import ConfigError, DataError, quote

IMAGE_DATASETS: tuple[str, ...] = ("digits", "cifar10", "svhn", "stl10", "imagefolder")
DATASET_NAMES: tuple[str, ...] = (*IMAGE_DATASETS, *TEXT_SOURCES)
SPLITS: tuple[str, ...] = ("train", "test")
# The type of data.name, built from DATASET_NAMES so that the config accepts exactly what load_dataset loads.
DatasetName = Literal.__getitem__(DATASET_NAMES)

# Seed of the subset permutation: fixed so that a subset is the same whatever the training seed.
_SUBSET_SEED = 0
# Bump when the layout or the key of the image-folder cache files changes, so old files are never misread.
_CACHE_VERSION = "2"
# A file changed this recently (ns) may change again within one timestamp tick (up to 2 s, on FAT) without a new
# mtime: the image-folder cache key then holds its bytes' hash, and its md5 is not remembered.
_RACY_NS = 2_000_000_000

_STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
_DIGIT_CLASSES = [str(d) for d in range(10)]

Stats = tuple[tuple[float, ...], tuple[float, ...]]


@dataclass
class DataConfig:
    """Where the images or the text come from, how images are augmented and text is tokenised."""

    name: DatasetName = "digits"
    """Data set: digits (scikit-learn's bundled 8x8 digits) | cifar10 | svhn | stl10 | imagefolder (images), or text
    for language models: pydoc (Python's reference documentation, shipped with CPython) | text (a text file or
    folder) | tokens (nanoGPT train.bin/val.bin of uint16 ids) | hf_disk (a datasets set saved with save_to_disk)."""
    root: str | None = None
    """Folder (or file, for text) of the data set (imagefolder: the folder holding train/ and test/). Not used by
    digits and pydoc."""
    download: bool = False
    """Let torchvision download a missing data set into root (never done silently)."""
    cache_dir: str | None = None
    """Where decoded image-folder trees are cached as uint8 tensors (default: <root>/.ppll_cache)."""
    train_subset: int | None = None
    """Use only the first N training images (after a seeded shuffle) or text blocks; None = all."""
    test_subset: int | None = None
    """Use only the first N test images or validation text blocks; None = all."""
    augment: bool = True
    """Random crop with padding (and horizontal flip where the data set allows it) on training batches (images)."""
    tokenizer: str = "byte"
    """Text: byte (UTF-8 bytes, 256 ids, needs no file) or a local folder holding a Hugging Face tokenizer.json."""
    seq_len: int = 128
    """Text: tokens per sample (the text is cut into blocks of this length)."""
    val_fraction: float = 0.1
    """Text without its own validation split: the share of documents (or of tokens) held out for validation."""
    text_column: str = "text"
    """hf_disk: the column holding the text."""
    encoding: str = "utf-8"
    """text: the encoding of the files (a Python codec name: utf-8, latin-1, cp1252, utf-16, ...). A byte that does
    not decode, or a NUL (binary data), stops the run naming the file and the byte offset, unless the name ends in
    :replace (utf-8:replace): then each becomes U+FFFD, counted and logged."""

    @property
    def is_text(self) -> bool:
        """A text source (for language models) rather than images."""
        return self.name in TEXT_SOURCES

    def check(self) -> None:
        """Reject a data section that cannot work (ConfigError with the data.* key), before anything is loaded."""
        if self.name not in DATASET_NAMES:
            raise ConfigError(f"data.name={quote(self.name)} is not one of {', '.join(DATASET_NAMES)}", key="data.name")
        for field, value in (("train_subset", self.train_subset), ("test_subset", self.test_subset)):
            if value is not None and value < 1:
                raise ConfigError(f"data.{field}={quote(value)} must be at least 1 (or null for the whole split)",
                                  key=f"data.{field}")
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len={quote(self.seq_len)} must be at least 2 (a token and the one after it)",
                              key="data.seq_len")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be between 0 and 1", key="data.val_fraction")
        parse_encoding(self.encoding)


@dataclass
class ArrayDataset:
    """A whole split in memory: uint8 N x C x H x W images, int64 labels and the normalisation constants."""

    images: torch.Tensor
    """uint8, N x C x H x W, contiguous."""
    labels: torch.Tensor
    """int64, N."""
    classes: list[str]
    """Class names; label i is classes[i]."""
    mean: tuple[float, ...]
    """Per-channel mean in [0, 1] units (of the training split)."""
    std: tuple[float, ...]
    """Per-channel standard deviation in [0, 1] units (of the training split)."""
    flip: bool
    """Whether horizontal flips preserve the labels (not for digits or house numbers)."""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"images must be a uint8 N x C x H x W tensor, got {self.images.dtype} "
                            f"{tuple(self.images.shape)}", key="images")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise DataError(f"labels must be an int64 tensor of length {self.images.shape[0]}, got "
                            f"{self.labels.dtype} {tuple(self.labels.shape)}", key="labels")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise DataError(f"mean/std need one value per channel ({self.in_channels}), got {self.mean} / {self.std}",
                            key="mean" if len(self.mean) != self.in_channels else "std")
        self.images = self.images.contiguous()

    @property
    def in_channels(self) -> int:
        """C, the number of image channels."""
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        """Side of the (square) images; the models assume square inputs."""
        h, w = int(self.images.shape[2]), int(self.images.shape[3])
        if h != w:
            raise DataError(f"images are {h}x{w}; the models need square images")
        return h

    @property
    def num_classes(self) -> int:
        """Number of classes (length of `classes`)."""
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.images.shape[0])


KNOWN_SHAPES = {"digits": (1, 8, 10), "cifar10": (3, 32, 10), "svhn": (3, 32, 10), "stl10": (3, 96, 10)}
Dataset = ArrayDataset | TokenDataset


def shape_of(ds: Dataset) -> dict[str, int]:
    """The data's share of the model's shape, as build_model's keyword arguments."""
    if isinstance(ds, TokenDataset):
        return {"num_classes": ds.vocab_size, "seq_len": ds.seq_len}
    return {"in_channels": ds.in_channels, "image_size": ds.image_size, "num_classes": ds.num_classes}


def dataset_shape(cfg: DataConfig) -> dict[str, int]:
    """shape_of the data set without loading it where possible: known image sets and text (the tokenizer's
    vocabulary); image folders are loaded."""
    if cfg.is_text:
        return {"num_classes": load_tokenizer(cfg.tokenizer).vocab_size, "seq_len": cfg.seq_len}
    if cfg.name in KNOWN_SHAPES:
        channels, side, classes = KNOWN_SHAPES[cfg.name]
        return {"in_channels": channels, "image_size": side, "num_classes": classes}
    return shape_of(load_dataset(cfg, "test"))


def load_dataset(cfg: DataConfig, split: str) -> Dataset:
    """Load split "train" or "test" (for text: validation) of `cfg.name`, optionally cut to a subset."""
    if split not in SPLITS:
        raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}", key="split")
    subset = cfg.train_subset if split == "train" else cfg.test_subset
    if cfg.is_text:
        return load_text_split(cfg.name, split, load_tokenizer(cfg.tokenizer), cfg.seq_len, root=cfg.root,
                               val_fraction=cfg.val_fraction, text_column=cfg.text_column, subset=subset,
                               encoding=cfg.encoding)
    loaders: dict[str, Callable[[DataConfig, str], ArrayDataset]] = {
        "digits": _load_digits,
        "cifar10": _load_torchvision,
        "svhn": _load_torchvision,
        "stl10": _load_torchvision,
        "imagefolder": _load_imagefolder,
    }
    if cfg.name not in loaders:
        raise DataError(f"data.name={cfg.name!r} is not one of {', '.join(DATASET_NAMES)}", key="data.name")
    ds = loaders[cfg.name](cfg, split)
    return _subset(ds, subset, f"data.{split}_subset")


def _subset(ds: ArrayDataset, n: int | None, key: str) -> ArrayDataset:
    """The first n samples after a permutation with a fixed seed (the whole set if n is None or >= len)."""
    if n is None or n >= len(ds):
        return ds
    if n < 1:
        raise DataError(f"{key}={n} must be at least 1 (or null for the whole split)", key=key)
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(_SUBSET_SEED))[:n]
    return ArrayDataset(ds.images[perm].contiguous(), ds.labels[perm].contiguous(), ds.classes, ds.mean, ds.std,
                        ds.flip)


def _channel_stats(images: torch.Tensor, chunk: int = 4096) -> Stats:
    """Exact per-channel mean and (population) std of uint8 images, in [0, 1] units, without a float copy of all."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.int64)
    squares = torch.zeros(c, dtype=torch.int64)
    for start in range(0, images.shape[0], chunk):
        part = images[start:start + chunk].to(torch.int64)
        total += part.sum(dim=(0, 2, 3))
        squares += (part * part).sum(dim=(0, 2, 3))
    count = images.numel() // c
    mean = total.double() / count
    std = (squares.double() / count - mean * mean).clamp_min(0).sqrt()
    return tuple((mean / 255).tolist()), tuple((std / 255).tolist())


def _root(cfg: DataConfig, title: str, expected: str) -> Path:
    """cfg.root as a Path; DataError saying what the folder must hold when it is not set."""
    if not cfg.root:
        raise DataError(f"{title} needs data.root: set data.root to the folder holding {expected}", key="data.root")
    return Path(cfg.root).expanduser()


# --- scikit-learn digits ---------------------------------------------------------------------------------------------


def _load_digits(cfg: DataConfig, split: str) -> ArrayDataset:
    """scikit-learn's bundled 8x8 digits (values 0..16 scaled to 0..255), split 80/20 stratified with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.from_numpy(np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.2, random_state=0, stratify=bunch.target)
    mean, std = _channel_stats(images[torch.from_numpy(train_idx)])
    idx = torch.from_numpy(train_idx if split == "train" else test_idx)
    return ArrayDataset(images[idx].contiguous(), labels[idx].contiguous(), list(_DIGIT_CLASSES), mean, std, flip=False)


# --- torchvision data sets -------------------------------------------------------------------------------------------
# torchvision checks the md5 of the official files, which rejects rebuilt copies and small test files. SVHN's .mat
# files and STL-10's raw bytes run no code when read, so those subclasses only check that the files a split needs
# exist. CIFAR-10's files are pickles, and unpickling runs code: only files with the official archive's md5 are read
# (a rebuilt CIFAR-10 can be read as an image folder). Downloading stays torchvision's own code.


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
        digest = _MD5S.get(key) or _hexdigest(f, "md5")
    if not _recent(st):  # a just-changed file may change again under the same key: hash it again next time
        _MD5S[key] = digest
    return digest


def _recent(st: os.stat_result) -> bool:
    """Changed so lately that it could change again without a new mtime or ctime (timestamps are coarse)."""
    return max(st.st_mtime_ns, st.st_ctime_ns) >= time.time_ns() - _RACY_NS


def _hexdigest(f: BinaryIO, algorithm: str) -> str:
    """Hex digest of the rest of an open file (a fingerprint compared with known files, as torchvision's md5 is)."""
    h = hashlib.new(algorithm, usedforsecurity=False)
    while block := f.read(1 << 20):
        h.update(block)
    return h.hexdigest()


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


def _load_torchvision(cfg: DataConfig, split: str) -> ArrayDataset:
    """CIFAR-10, SVHN or STL-10 ('train' = labelled train split) through torchvision, as uint8 NCHW tensors."""
    spec = _TORCHVISION[cfg.name]
    root = _root(cfg, spec.title, spec.expected)
    cls: Any = _torchvision_classes()[cfg.name]
    missing = _missing(root, cls.required(split))
    if missing and (root / "train").is_dir() and (root / "test").is_dir():
        # An image-folder copy of the same data set (such as a re-encoded CIFAR-10): its usual constants apply.
        return dataclasses.replace(_load_imagefolder(cfg, split), mean=spec.mean, std=spec.std, flip=spec.flip)
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
        classes = list(getattr(tv, "classes", None) or (_DIGIT_CLASSES if cfg.name == "svhn" else _STL10_CLASSES))
    return ArrayDataset(images.contiguous(), torch.from_numpy(labels.astype(np.int64)), classes, spec.mean, spec.std,
                        spec.flip)


# --- image folders ---------------------------------------------------------------------------------------------------


def _load_imagefolder(cfg: DataConfig, split: str) -> ArrayDataset:
    """<root>/<split>/<class>/*.png|jpg decoded once and cached as uint8 tensors; mean/std from the train split."""
    root = _root(cfg, "imagefolder", "train/<class>/*.jpg and test/<class>/*.jpg")
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
    mean, std = _channel_stats(images)
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
        if _recent(st):
            with open(file, "rb") as f:
                content = _hexdigest(f, "sha256")
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
