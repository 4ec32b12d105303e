"""What a data set is: its names, its settings (DataConfig) and an image split held in memory (ArrayDataset),
with the helpers every image loader shares."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ppll_ext.data.text import TEXT_SOURCES, parse_encoding
from ppll_ext.errors import ConfigError, DataError, quote

IMAGE_DATASETS: tuple[str, ...] = ("digits", "cifar10", "svhn", "stl10", "imagefolder")

DATASET_NAMES: tuple[str, ...] = (*IMAGE_DATASETS, *TEXT_SOURCES)

SPLITS: tuple[str, ...] = ("train", "test")

# The type of data.name, built from DATASET_NAMES so that the config accepts exactly what load_dataset loads.
DatasetName = Literal.__getitem__(DATASET_NAMES)

DIGIT_CLASSES = [str(d) for d in range(10)]

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


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> Stats:
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


def data_root(cfg: DataConfig, title: str, expected: str) -> Path:
    """cfg.root as a Path; DataError saying what the folder must hold when it is not set."""
    if not cfg.root:
        raise DataError(f"{title} needs data.root: set data.root to the folder holding {expected}", key="data.root")
    return Path(cfg.root).expanduser()
