"""The data set registry: each data.name to its loader (scikit-learn digits here, torchvision sets in vision.py,
image folders in imagefolder.py, text in text.py), the shapes a model needs, and subsets."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from pathlib import Path

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
    pixels, target = _digits_csv()
    images = torch.from_numpy(np.round(pixels.reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(target.astype(np.int64))
    train_idx, test_idx = _stratified_split(target, test_fraction=0.2, seed=0)
    mean, std = channel_stats(images[torch.from_numpy(train_idx)])
    idx = torch.from_numpy(train_idx if split == "train" else test_idx)
    return ArrayDataset(images[idx].contiguous(), labels[idx].contiguous(), list(DIGIT_CLASSES), mean, std, flip=False)


def _digits_csv() -> tuple[np.ndarray, np.ndarray]:
    """The digits' pixels (N, 64) and labels, read from the file scikit-learn's load_digits reads, without importing
    scikit-learn: that import costs each process (every stage of a run) about 1.6 s of CPU."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.name=digits reads the digits bundled with scikit-learn, which is not installed; "
                        "pip install scikit-learn", key="data.name")
    data = np.loadtxt(Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz", delimiter=",")
    return data[:, :-1], data[:, -1].astype(int)


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The train and test indices (in order) that scikit-learn's train_test_split(np.arange(len(labels)),
    test_size=test_fraction, random_state=seed, stratify=labels) gives: its StratifiedShuffleSplit draw, in numpy."""
    n_test = math.ceil(test_fraction * len(labels))
    n_train = len(labels) - n_test
    _, label_index, counts = np.unique(labels, return_inverse=True, return_counts=True)
    by_class = np.split(np.argsort(label_index, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    n_train_of = _approximate_mode(counts, n_train, rng)
    n_test_of = _approximate_mode(counts - n_train_of, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for members, k_train, k_test in zip(by_class, n_train_of, n_test_of, strict=True):
        shuffled = members.take(rng.permutation(len(members)), mode="clip")
        train.extend(shuffled[:k_train])
        test.extend(shuffled[k_train:k_train + k_test])
    return rng.permutation(train), rng.permutation(test)


def _approximate_mode(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Draws per class, summing to `draws`, proportional to `counts` (scikit-learn's _approximate_mode: the largest
    remainders get one more, ties broken by `rng`)."""
    continuous = counts / counts.sum() * draws
    floored = np.floor(continuous)
    need = int(draws - floored.sum())
    remainder = continuous - floored
    for value in np.sort(np.unique(remainder))[::-1] if need > 0 else []:
        (tied,) = np.where(remainder == value)
        now = min(len(tied), need)
        floored[rng.choice(tied, size=now, replace=False)] += 1
        need -= now
        if need == 0:
            break
    return floored.astype(int)
