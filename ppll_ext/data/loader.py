"""Deterministic in-memory batches: same (seed, epoch, batch index) -> same batch, so training resumes exactly."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ppll_ext.data.datasets import ArrayDataset
from ppll_ext.data.text import TokenDataset
from ppll_ext.errors import ConfigError

_MASK64 = (1 << 64) - 1


def crop_padding(image_size: int) -> int:
    """Zero padding of the random crop: 4 pixels for 32 px and larger images, scaled down (round(H/8)) below."""
    return 4 if image_size >= 32 else round(image_size / 8)


def batch_seed(seed: int, epoch: int, batch_index: int) -> int:
    """A well-mixed 64-bit seed for one batch's augmentation, independent of any other batch's draws."""
    entropy = [seed & _MASK64, epoch & _MASK64, batch_index & _MASK64]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


class BatchLoader:
    """Batches from an ArrayDataset (x float32 normalised N x C x H x W, y int64 labels) or a TokenDataset (x and y
    int64 N x T token ids), without workers or global RNG.

    The epoch's order comes from (seed, epoch) and each batch's augmentation from (seed, epoch, batch index), so
    `iter_from(k)` reproduces batches k, k+1, ... of a full pass exactly. With `pin_memory` (training on a GPU)
    batches come in page-locked memory, so the first stage's copy to the device is asynchronous.
    """

    def __init__(self, ds: ArrayDataset | TokenDataset, batch_size: int, *, shuffle: bool, augment: bool, seed: int = 0,
                 drop_last: bool = False, pin_memory: bool = False) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be at least 1", key="batch_size")
        if drop_last and batch_size > len(ds):
            raise ConfigError(f"batch_size={batch_size} exceeds the {len(ds)} samples and drop_last is set, so there "
                              f"would be no batch; lower the batch size or use more data", key="batch_size")
        self.dataset = ds
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.pin_memory = pin_memory
        self.images = isinstance(ds, ArrayDataset)
        self.augment = augment and self.images
        if self.images:
            self.pad = crop_padding(ds.image_size) if augment else 0
            std = torch.tensor(ds.std, dtype=torch.float32).view(1, -1, 1, 1)
            mean = torch.tensor(ds.mean, dtype=torch.float32).view(1, -1, 1, 1)
            # x = (u8 / 255 - mean) / std folded into one multiply-add.
            self._scale = 1.0 / (255.0 * std)
            self._shift = -mean / std

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)

    def order(self) -> torch.Tensor | None:
        """The epoch's sample order (None = dataset order, when not shuffling)."""
        if not self.shuffle:
            return None
        gen = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(len(self.dataset), generator=gen)

    def iter_from(self, batch_index: int, stride: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the epoch's batches batch_index, batch_index + stride, ... (a data-parallel replica's share),
        identical to the same batches of a full pass."""
        if batch_index < 0:
            raise ConfigError(f"batch_index={batch_index} must be non-negative", key="batch_index")
        for x, y in self._batches(batch_index, stride):
            yield (x.pin_memory(), y.pin_memory()) if self.pin_memory else (x, y)

    def _batches(self, batch_index: int, stride: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.order()
        for i in range(batch_index, len(self), stride):
            lo, hi = i * self.batch_size, min((i + 1) * self.batch_size, len(self.dataset))
            index = slice(lo, hi) if order is None else order[lo:hi]
            if not self.images:
                yield self.dataset.take(index)
                continue
            x, y = self.dataset.images[index], self.dataset.labels[index]
            if self.augment:
                x = self._augment(x, torch.Generator().manual_seed(batch_seed(self.seed, self.epoch, i)))
            yield self._normalise(x), y.clone()

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Random crop of the zero-padded batch (one gather over all crop windows) and optional horizontal flip."""
        b, _, h, w = x.shape
        p = self.pad
        dy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=gen)
        flip = torch.rand(b, generator=gen) < 0.5
        # unfold views every h x w window of the padded images; sample i takes window (dy[i], dx[i]).
        windows = F.pad(x, (p, p, p, p)).unfold(2, h, 1).unfold(3, w, 1)
        out = windows[torch.arange(b), :, dy, dx]
        if self.dataset.flip:
            out[flip] = out[flip].flip(3)
        return out

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self._shift, x.to(torch.float32), self._scale).contiguous()
