"""Sampling from a trained language model: the whole model, or early exit through a stage's aux head.

Local learning trains every stage's aux head to predict the next token from that stage's output, so
`exit_stage=k` decodes with only the layers of stages 0..k plus head k: cheaper, somewhat worse text,
for free. The model comes from the checkpoint's config.json and weights, read and verified by the checkpoint
loader (exported folders work too); aux heads are rebuilt from the recorded run config and their weights in
training_state/aux-heads.safetensors. Decoding recomputes the whole context every token (no key/value
cache): simple and exact, fast enough for the small models trained on a CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ppll_ext import checkpoint as ckpt
from ppll_ext.config import config_from_dict
from ppll_ext.core import build_stage_aux_head
from ppll_ext.data import Tokenizer
from ppll_ext.data.text import ByteTokenizer
from ppll_ext.errors import CheckpointError, ConfigError
from ppll_ext.models.hf import hf_layers, max_positions


@dataclass
class Generation:
    """A sampled continuation and how fast it came."""

    text: str
    """The prompt followed by the generated text."""
    new_tokens: int
    seconds: float
    route: str
    """Which layers and head produced it, for the report line."""

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second (prompt processing included)."""
        return self.new_tokens / max(self.seconds, 1e-9)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float) -> None:
    """ConfigError (one line naming the flag) for sampling arguments no sampler can use; checked before loading."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    if not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"--temperature {temperature} must be 0 (greedy) or a finite positive number")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"--top-k {top_k} must be at least 1")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise ConfigError(f"--top-p {top_p} must be in (0, 1] (1 = the whole vocabulary)")


def load_predictor(checkpoint: str | Path, exit_stage: int | None = None
                   ) -> tuple[Callable[[torch.Tensor], torch.Tensor], Tokenizer, int, str]:
    """(ids -> next-token logits of every position, tokenizer, context length, route) for a language-model
    checkpoint, through the whole model or through the layers and aux head of stage `exit_stage`. Every file is
    read through the checkpoint's verified loader (checksums, paths inside the folder, config and shapes checked)."""
    folder = ckpt.resolve(checkpoint)
    ckpt.warn_unverified(folder)
    if exit_stage is not None:  # checked before the model is loaded
        if not (folder / ckpt.TRAINER_STATE).is_file():
            raise CheckpointError(f"--exit-stage needs a training checkpoint (step-N/ with {ckpt.TRAINER_STATE} and "
                                  f"the aux heads); {str(folder)!r} is an export without them")
        state = ckpt.read_trainer_state(folder)
        boundaries = state["boundaries"]
        if boundaries is None:
            raise CheckpointError(f"--exit-stage needs the stage boundaries, and {str(folder / ckpt.TRAINER_STATE)!r} "
                                  f"records none (saved by SchedulePPLL); omit --exit-stage for the whole model")
        last = len(boundaries) - 2
        if not 0 <= exit_stage < last:
            raise ConfigError(f"--exit-stage {exit_stage}: this run has aux heads on stages 0..{last - 1} (stage "
                              f"{last} is the model's own output); omit --exit-stage for the whole model")
        cfg = config_from_dict(state["config"], str(folder / ckpt.TRAINER_STATE))
    model = ckpt.load_language_model(folder, warn=False)
    tokenizer = ckpt.load_saved_tokenizer(folder)
    layers = hf_layers(model)
    if exit_stage is None:
        route = f"the whole model ({len(layers)} layers)"
        predictor: nn.Module = nn.Sequential(*layers)
    else:
        if tokenizer is None and cfg.data.tokenizer != "byte":
            raise CheckpointError(f"{str(folder)!r} has no tokenizer.json, but its run read text with "
                                  f"data.tokenizer={cfg.data.tokenizer!r}; the checkpoint is incomplete: restore it")
        if boundaries[-1] != len(layers):
            raise CheckpointError(f"{str(folder / ckpt.TRAINER_STATE)!r}: 'boundaries' {boundaries} end at layer "
                                  f"{boundaries[-1]} but the model in config.json has {len(layers)} layers; the "
                                  f"checkpoint was edited: restore it")
        end = boundaries[exit_stage + 1]
        example = torch.zeros(1, 2, dtype=torch.long)
        head = build_stage_aux_head(layers, exit_stage, boundaries, cfg.local.aux, example,
                                    num_classes=model.config.vocab_size, hidden=cfg.local.aux_hidden,
                                    seed=cfg.train.seed, next_blocks=cfg.local.aux_next_blocks)
        prefix = f"stage{exit_stage}."
        weights = {n[len(prefix):]: t for n, t in ckpt.load_aux(folder).items() if n.startswith(prefix)}
        ckpt.check_against(weights, head.state_dict(), f"{ckpt.AUX} (stage {exit_stage})")
        head.load_state_dict(weights)
        predictor = nn.Sequential(*layers[:end], head)
        route = f"stage {exit_stage}'s aux head after layers 0..{end - 1} of {len(layers)}"
    predictor.eval()
    return predictor, tokenizer or ByteTokenizer(), max_positions(model.config), route


@torch.no_grad()
def generate(checkpoint: str | Path, prompt: str, *, max_new_tokens: int = 200, temperature: float = 0.8,
             top_k: int | None = 40, top_p: float = 1.0, exit_stage: int | None = None, seed: int = 0) -> Generation:
    """Sample `max_new_tokens` tokens after `prompt` (temperature 0 = greedy; top_k None = the whole vocabulary;
    top_p < 1 = nucleus sampling among the likeliest tokens whose probabilities sum to top_p)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    predictor, tokenizer, context, route = load_predictor(checkpoint, exit_stage)
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ConfigError("--prompt is empty: give at least one character to continue")
    gen = torch.Generator().manual_seed(seed)
    began = time.perf_counter()
    out = list(ids)
    for _ in range(max_new_tokens):
        logits = predictor(torch.tensor([out[-context:]]))[0, -1].float()
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.numel():
                cut = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < cut, -torch.inf)
            probs = torch.softmax(logits, -1)
            if top_p < 1:
                ranked, order = probs.sort(descending=True)
                drop = ranked.cumsum(0) - ranked >= top_p  # tokens after the nucleus (the first one always stays)
                probs = probs.scatter(0, order[drop], 0.0)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        out.append(nxt)
    seconds = time.perf_counter() - began
    return Generation(tokenizer.decode(out), max_new_tokens, seconds, route)
