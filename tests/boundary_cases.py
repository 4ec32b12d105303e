"""Models whose stage boundaries carry several tensors, shared by tests/test_boundaries.py and its launched worker.

- `llama`: a tiny Llama (transformers' own decoder layers) whose boundary carries (hidden states, attention mask,
  position ids) as a tuple; its input is (token ids, attention mask) with right padding, so the mask matters.
- `cnn`: a small CNN on 8x8 digits whose boundary carries {features, skip map, int64 index} as a dict.

Every layer and aux head takes its inputs spread as arguments (a tuple positional, a dict keyword: torch modules,
the native runtimes, SchedulePPLL) or as one argument (DeepSpeed's layer convention), so one model serves every
engine. `reference(name, k)` is sequential local learning in this process; `stage_tensors` names a stage's tensors
by the model's layer index so every engine's result compares with it directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ppll_ext.core import LocalBlock
from ppll_ext.core.payload import Chain
from ppll_ext.runtime import SequentialRunner, StageStats

STEPS, MICRO, SIZE = 4, 2, 4
"""Mini-batches trained, micro-batches per mini-batch, micro-batch size."""
LR = 0.05
CUTS = {"llama": {2: [0, 2, 5], 3: [0, 2, 3, 5]}, "cnn": {2: [0, 2, 4], 3: [0, 1, 2, 4]}}
"""Start layers of each stage (and the layer count) per model and stage count."""
VOCAB, SEQ = 64, 12


def spread(args: tuple, kwargs: dict, names: tuple[str, ...]) -> tuple:
    """The layer's inputs by position, whether they came spread (torch) or as one tuple / dict (DeepSpeed)."""
    if kwargs:
        return tuple(kwargs[n] for n in names)
    if len(args) == 1 and isinstance(args[0], dict):
        return tuple(args[0][n] for n in names)
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        return tuple(args[0])
    return args


def _llama_config() -> Any:
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    config._attn_implementation = "sdpa"
    return config


class LlamaIn(nn.Module):
    """(ids, mask) -> (hidden states, mask, position ids)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, mask = spread(args, kwargs, ("ids", "mask"))
        pos = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1).contiguous()
        return self.embed(ids), mask, pos


class LlamaBlock(nn.Module):
    """One LlamaDecoderLayer under the causal mask combined with the padding mask, at the given positions."""

    def __init__(self, config: Any, index: int) -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        self.layer = LlamaDecoderLayer(config, index)
        self.rotary = LlamaRotaryEmbedding(config)

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, mask, pos = spread(args, kwargs, ("h", "mask", "pos"))
        t = h.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
        allowed = (causal & mask[:, None, None, :]).contiguous()
        out = self.layer(h, attention_mask=allowed, position_ids=pos, position_embeddings=self.rotary(h, pos))
        return out[0] if isinstance(out, tuple) else out, mask, pos


class LlamaOut(nn.Module):
    """Final norm and lm_head: the logits (N, T, vocab)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.norm = LlamaRMSNorm(config.hidden_size)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        h, _mask, _pos = spread(args, kwargs, ("h", "mask", "pos"))
        return self.head(self.norm(h))


def token_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per token; padded positions (-100) do not count."""
    return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)


class DigitsStem(nn.Module):
    """image -> {features, skip: a second feature map, index: int64 per sample}."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.skip = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(1, 8, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        index = (x.mean(dim=(1, 2, 3)) > x.mean()).long()
        return {"features": torch.relu(self.conv(x)), "skip": self.skip(x), "index": index}


class DigitsMid(nn.Module):
    """A convolution whose output adds the skip map; skip and index travel on."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        features, skip, index = spread(args, kwargs, ("features", "skip", "index"))
        return {"features": torch.relu(self.conv(features)) + skip, "skip": skip, "index": index}


class DigitsHead(nn.Module):
    """Pooled features (+ skip) to 10 classes, plus a learned bias per index value."""

    def __init__(self, with_skip: bool = False) -> None:
        super().__init__()
        self.with_skip = with_skip
        self.fc, self.bias = nn.Linear(8 * 4, 10), nn.Embedding(2, 10)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        features, skip, index = spread(args, kwargs, ("features", "skip", "index"))
        h = features + skip if self.with_skip else features
        return self.fc(nn.functional.adaptive_avg_pool2d(h, 2).flatten(1)) + self.bias(index)


class LlamaAux(nn.Module):
    """An aux head over (hidden states, mask, position ids): norm and a linear readout."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.head = nn.LayerNorm(32), nn.Linear(32, VOCAB)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        h, _mask, _pos = spread(args, kwargs, ("h", "mask", "pos"))
        return self.head(self.norm(h))


@dataclass
class Case:
    """A model of several-tensor boundaries: its layers, aux head per stage, loss and data."""

    layers: list[nn.Module]
    aux: Callable[[], nn.Module]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    batches: list[tuple[Any, torch.Tensor]]
    """STEPS mini-batches (inputs, targets); inputs a tensor or a tuple of tensors."""


def build(name: str) -> Case:
    """The model `name` with fixed initial weights and data (identical in every process)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    n = MICRO * SIZE
    if name == "llama":
        config = _llama_config()
        layers = [LlamaIn(config), *(LlamaBlock(config, i) for i in range(3)), LlamaOut(config)]
        batches = []
        for _ in range(STEPS):
            ids = torch.randint(0, VOCAB, (n, SEQ), generator=gen)
            lengths = torch.randint(SEQ // 2, SEQ + 1, (n,), generator=gen)
            mask = torch.arange(SEQ)[None, :] < lengths[:, None]
            y = torch.where(mask, torch.roll(ids, -1, dims=1), -100)
            batches.append(((ids, mask), y))
        return Case(layers, LlamaAux, token_loss, batches)
    if name == "cnn":
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
        y = torch.tensor(data.target, dtype=torch.int64)
        layers = [DigitsStem(), DigitsMid(), DigitsMid(), DigitsHead()]
        batches = [(x[i * n:(i + 1) * n], y[i * n:(i + 1) * n]) for i in range(STEPS)]
        return Case(layers, lambda: DigitsHead(with_skip=True), nn.functional.cross_entropy, batches)
    raise ValueError(name)


def blocks(name: str, k: int, stages: list[int] | None = None) -> list[LocalBlock]:
    """The local blocks of `name` cut into `k` stages (only `stages`, when given), SGD each."""
    case, cut = build(name), CUTS[name][k]
    out = []
    for s in range(k):
        torch.manual_seed(100 + s)
        aux = case.aux() if s < k - 1 else None
        if stages is not None and s not in stages:
            continue
        body = Chain(*case.layers[cut[s]:cut[s + 1]])
        params = [*body.parameters(), *(aux.parameters() if aux is not None else [])]
        out.append(LocalBlock(body, aux, case.loss, index=s, optimizer=torch.optim.SGD(params, lr=LR, momentum=0.9)))
    return out


def aux_heads(name: str, k: int) -> list[nn.Module]:
    """The aux heads `blocks` gives stages 0..k-2 (same seeds), for engines that take them apart."""
    case = build(name)
    heads = []
    for s in range(k - 1):
        torch.manual_seed(100 + s)
        heads.append(case.aux())
    return heads


def stage_tensors(name: str, k: int, block: LocalBlock) -> dict[str, torch.Tensor]:
    """A block's tensors named by the model's layer index ("3.layer.mlp..."), its aux head's as "aux.*"."""
    start = CUTS[name][k][block.index]
    out = {f"{start + int(key.split('.', 1)[0])}.{key.split('.', 1)[1]}": v.detach().clone()
           for key, v in block.body.state_dict().items()}
    if block.aux is not None:
        out.update({f"aux.{key}": v.detach().clone() for key, v in block.aux.state_dict().items()})
    return out


def reference(name: str, k: int) -> list[dict[str, torch.Tensor]]:
    """Sequential local learning in this process, one torch thread: every stage's tensors after STEPS steps."""
    bs = blocks(name, k)
    runner = SequentialRunner(bs, MICRO)
    stats = [StageStats(b.index) for b in bs]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for x, y in build(name).batches:
            runner.train_batch(x, y, stats)
    finally:
        torch.set_num_threads(threads)
    return [stage_tensors(name, k, b) for b in bs]
