"""The data set registry: each data.name to its loader (scikit-learn digits here, torchvision sets in vision.py,
image folders in imagefolder.py, text in text.py), the shapes a model needs, and subsets."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ppll_ext.data.datasets import DATASET_NAMES, DIGIT_CLASSES, SPLITS, ArrayDataset, DataConfig, channel_stats
from ppll_ext.data.imagefolder import load_imagefolder
from ppll_ext.data.text import TokenDataset, load_text_split, load_tokenizer
from ppll_ext.data.vision import load_torchvision
from ppll_ext.errors import DataError

# Seed of the subset permutation: fixed so that a subset is the same whatever the training seed.
_SUBSET_SEED = 0

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
        "cifar10": load_torchvision,
        "svhn": load_torchvision,
        "stl10": load_torchvision,
        "imagefolder": load_imagefolder,
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


def _load_digits(cfg: DataConfig, split: str) -> ArrayDataset:
    """scikit-learn's bundled 8x8 digits (values 0..16 scaled to 0..255), split 80/20 stratified with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.from_numpy(np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.2, random_state=0, stratify=bunch.target)
    mean, std = channel_stats(images[torch.from_numpy(train_idx)])
    idx = torch.from_numpy(train_idx if split == "train" else test_idx)
    return ArrayDataset(images[idx].contiguous(), labels[idx].contiguous(), list(DIGIT_CLASSES), mean, std, flip=False)
