"""A stock torch.distributed.pipelining language-model script in the style of PyTorch's pipelining tutorial:
a decoder Transformer (tok_embeddings, layers, norm, output) split by hand, ScheduleGPipe, torchtitan's loss.

    torchrun --nproc_per_node 2 tests/dist/pipelining_lm_gpipe.py --steps 8 --microbatches 4

Its PPLL twin, pipelining_lm_ppll.py, differs only in the schedule construction, the aux head (+ its optimizer)
and the first stage's target (tests/test_pipelining.py checks that the diff stays that small).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from pydoc_data.topics import topics

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

VOCAB, DIM, HEADS, LAYERS, SEQ = 256, 32, 2, 4, 16


class Block(nn.Module):
    """A pre-norm causal self-attention block."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(DIM, HEADS, 2 * DIM, dropout=0.0, batch_first=True, norm_first=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(h.shape[1])
        return self.layer(h, src_mask=mask, is_causal=True)


class Transformer(nn.Module):
    """The tutorial's model: parts set to None (or deleted layers) are skipped, so one class serves every stage."""

    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleDict({str(i): Block() for i in range(LAYERS)})
        self.norm = nn.LayerNorm(DIM)
        self.output = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens) if self.tok_embeddings else tokens
        for layer in self.layers.values():
            h = layer(h)
        h = self.norm(h) if self.norm else h
        return self.output(h).float() if self.output else h


def stage_modules(num_stages: int) -> list[nn.Module]:
    """The model split by hand into `num_stages` pieces (same weights on every rank)."""
    cuts = [round(i * LAYERS / num_stages) for i in range(num_stages + 1)]
    stages = []
    for k in range(num_stages):
        torch.manual_seed(0)
        model = Transformer()
        for i in range(LAYERS):
            if not cuts[k] <= i < cuts[k + 1]:
                del model.layers[str(i)]
        if k > 0:
            model.tok_embeddings = None
        if k < num_stages - 1:
            model.norm = None
            model.output = None
        stages.append(model)
    return stages


def loss_fn(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """torchtitan's cross_entropy_loss: next-token loss over every position (labels are already shifted)."""
    return F.cross_entropy(pred.flatten(0, 1).float(), labels.flatten(0, 1))


def batches(steps: int, batch: int, soft: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Byte tokens of Python's reference documentation (ships with CPython), inputs and next-token targets;
    with `soft`, label-smoothed target distributions (N, T, VOCAB) instead of token ids (N, T)."""
    text = "".join(topics[k] for k in sorted(topics)).encode("utf-8")
    data = torch.tensor(list(text[:steps * batch * (SEQ + 1)]), dtype=torch.int64).view(steps, batch, SEQ + 1)
    out = []
    for seq in data:
        x, y = seq[:, :-1], seq[:, 1:]
        if soft:
            y = F.one_hot(y, VOCAB).float() * 0.9 + 0.1 / VOCAB
        out.append((x, y))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--soft", action="store_true", help="soft (float) targets instead of token ids")
    parser.add_argument("--save", help="folder for this stage's trained weights")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)

    stage_mod = stage_modules(world)[rank]
    stage = PipelineStage(stage_mod, stage_index=rank, num_stages=world, device=torch.device("cpu"))
    optimizer = torch.optim.AdamW(stage_mod.parameters(), lr=3e-3)
    schedule = ScheduleGPipe(stage, n_microbatches=args.microbatches, loss_fn=loss_fn)

    for x, y in batches(args.steps, args.batch, args.soft):
        losses: list[torch.Tensor] = []
        if rank == 0:
            schedule.step(x)
        elif rank == world - 1:
            schedule.step(target=y, losses=losses)
        else:
            schedule.step()
        optimizer.step()
        optimizer.zero_grad()
        if losses:
            print(f"rank {rank} loss {torch.stack(losses).mean().item():.4f}", flush=True)

    x, y = batches(args.steps + 1, args.batch, args.soft)[-1]  # a held-out batch, forward only
    eval_losses: list[torch.Tensor] = []
    if rank == 0:
        schedule.eval(x)
    elif rank == world - 1:
        out = schedule.eval(target=y, losses=eval_losses)
        print(f"rank {rank} eval loss {torch.stack(eval_losses).mean().item():.4f} output {tuple(out.shape)}",
              flush=True)
    else:
        schedule.eval()

    if args.save:
        Path(args.save).mkdir(parents=True, exist_ok=True)
        state = {f"stage.{k}": v for k, v in stage_mod.state_dict().items()}
        aux = getattr(schedule, "aux_head", None)
        state.update({f"aux.{k}": v for k, v in (aux.state_dict() if aux is not None else {}).items()})
        save_file({k: v.contiguous() for k, v in state.items()}, str(Path(args.save) / f"stage{rank}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
