"""Sampling from a trained language model: the whole model, or early exit through a stage's aux head.

Local learning trains every stage's aux head to predict the next token from that stage's output, so
`exit_stage=k` decodes with only the layers of stages 0..k plus head k: cheaper, somewhat worse text,
for free. The model comes from the checkpoint's config.json and weights (transformers' from_pretrained,
so exported folders work too); aux heads are rebuilt from the recorded run config and their weights in
training_state/aux-heads.safetensors. Decoding recomputes the whole context every token (no key/value
cache): simple and exact, fast enough for the small models trained on a CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ppll_ext import checkpoint as ckpt
from ppll_ext.config import config_from_dict
from ppll_ext.core import build_stage_aux_head
from ppll_ext.data import Tokenizer, load_tokenizer
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


def load_predictor(checkpoint: str | Path, exit_stage: int | None = None
                   ) -> tuple[Callable[[torch.Tensor], torch.Tensor], Tokenizer, int, str]:
    """(ids -> next-token logits of every position, tokenizer, context length, route) for a language-model
    checkpoint, through the whole model or through the layers and aux head of stage `exit_stage`."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    folder = ckpt.resolve(checkpoint)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{str(folder)!r} has no config.json: it is not a language-model checkpoint (ppll "
                              f"generate needs a run of model.name=gpt2 or llama, or its ppll export)")
    if exit_stage is not None:  # checked before the model is loaded
        if not (folder / ckpt.TRAINER_STATE).is_file():
            raise CheckpointError(f"--exit-stage needs a training checkpoint (step-N/ with {ckpt.TRAINER_STATE} and "
                                  f"the aux heads); {str(folder)!r} is an export without them")
        state = ckpt.read_json(folder / ckpt.TRAINER_STATE)
        boundaries = state["boundaries"]
        last = len(boundaries) - 2
        if not 0 <= exit_stage < last:
            raise ConfigError(f"--exit-stage {exit_stage}: this run has aux heads on stages 0..{last - 1} (stage "
                              f"{last} is the model's own output); omit --exit-stage for the whole model")
        cfg = config_from_dict(state["config"], str(folder / ckpt.TRAINER_STATE))
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, attn_implementation="sdpa",
                                                 dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(folder)) if (folder / "tokenizer.json").is_file() else None
    layers = hf_layers(model)
    if exit_stage is None:
        route = f"the whole model ({len(layers)} layers)"
        predictor: nn.Module = nn.Sequential(*layers)
    else:
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
        tokenizer = tokenizer or load_tokenizer(cfg.data.tokenizer)
    predictor.eval()
    return predictor, tokenizer or load_tokenizer("byte"), max_positions(model.config), route


@torch.no_grad()
def generate(checkpoint: str | Path, prompt: str, *, max_new_tokens: int = 200, temperature: float = 0.8,
             top_k: int | None = 40, exit_stage: int | None = None, seed: int = 0) -> Generation:
    """Sample `max_new_tokens` tokens after `prompt` (temperature 0 = greedy; top_k None = the whole vocabulary)."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    if temperature < 0:
        raise ConfigError(f"--temperature {temperature} must be 0 (greedy) or positive")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"--top-k {top_k} must be at least 1")
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
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        out.append(nxt)
    seconds = time.perf_counter() - began
    return Generation(tokenizer.decode(out), max_new_tokens, seconds, route)
