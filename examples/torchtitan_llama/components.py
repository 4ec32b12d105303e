"""The torchtitan components the two trainers share, in torchtitan's form: its loss (cross entropy over flattened
logits) and the loss rescaled over micro-batches, the split of the model into stages by deleting the other
stages' modules (pipeline_module_split), optimizers over all model parts, a warm-up schedule and a byte-level
data loader over Python's bundled reference documentation (nothing to download).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pydoc_data.topics import topics

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage


def cross_entropy_loss(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """torchtitan's loss: cross entropy of (bs, seqlen, vocab) logits against (bs, seqlen) next-token labels."""
    return F.cross_entropy(pred.flatten(0, 1).float(), labels.flatten(0, 1))


def rescale_accumulated_loss(loss_fn: Callable[..., torch.Tensor], accumulation_steps: int) -> Callable:
    """The loss divided by the number of micro-batches (torchtitan's schedules then run with scale_grads=False)."""

    def rescaled(*args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        return loss_fn(*args, **kwargs) / accumulation_steps

    return rescaled


def generate_llm_fqn_per_model_part(num_stages: int, num_layers: int) -> list[list[str]]:
    """Module names of each stage: embeddings on the first, norm + output on the last, layers spread evenly
    (tok_embeddings and norm + output each count as one layer)."""
    total = num_layers + 2
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"{num_stages} stages do not fit {num_layers} layers; use 1 to {num_layers} stages")
    bounds = [round(k * total / num_stages) for k in range(num_stages + 1)]
    parts = []
    for k in range(num_stages):
        names = [f"layers.{i - 1}" for i in range(bounds[k], bounds[k + 1]) if 0 < i <= num_layers]
        parts.append((["tok_embeddings"] if k == 0 else []) + names + (["norm", "output"] if k == num_stages - 1
                                                                        else []))
    return parts


def pipeline_module_split(whole_model: nn.Module, pp_mesh: DeviceMesh, device: torch.device,
                          module_names_per_stage: list[list[str]]) -> tuple[list[PipelineStage], list[nn.Module]]:
    """This rank's stage: a copy of the whole model keeping only its modules (other layers deleted from the
    ModuleDict, other top-level modules set to None), wrapped in a PipelineStage of the pp mesh's group."""
    stage_idx, num_stages = pp_mesh.get_local_rank(), len(module_names_per_stage)
    keep = set(module_names_per_stage[stage_idx])
    model = copy.deepcopy(whole_model)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.ModuleDict):
            for key in list(child.keys()):
                if f"{name}.{key}" not in keep:
                    del child[key]
        elif name not in keep:
            setattr(model, name, None)
    stage = PipelineStage(model, stage_idx, num_stages, device, group=pp_mesh.get_group())
    return [stage], [model]


def build_optimizers(model_parts: list[nn.Module], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the parameters of every model part on this rank."""
    params = [p for part in model_parts for p in part.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def build_lr_schedulers(optimizers: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the base learning rate, then constant."""
    return torch.optim.lr_scheduler.LambdaLR(optimizers, lambda step: min(1.0, (step + 1) / (warmup_steps + 1)))


def build_dataloader(batch_size: int, seq_len: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled (input, label) batches of byte tokens, (bs, seqlen) each, labels shifted by one; every rank
    of the pipeline reads the same batches."""
    text = "".join(topics[k] for k in sorted(topics)).encode("utf-8")
    samples = len(text) // (seq_len + 1)
    data = torch.frombuffer(bytearray(text[: samples * (seq_len + 1)]), dtype=torch.uint8).long()
    data = data.view(samples, seq_len + 1)
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(samples, generator=generator)
        for start in range(0, samples - batch_size + 1, batch_size):
            batch = data[order[start:start + batch_size]]
            yield batch[:, :-1], batch[:, 1:]
