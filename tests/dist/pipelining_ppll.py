"""The stock ScheduleGPipe script (pipelining_gpipe.py) converted to PPLL, one stage per rank.

    torchrun --nproc_per_node 2 tests/dist/pipelining_ppll.py --steps 12 --microbatches 4

Changed: the schedule line, an aux head per non-last stage, the optimizer's parameters.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from torch import nn
from torch.distributed.pipelining import PipelineStage

from ppll_ext.core import build_aux_head
from ppll_ext.pipelining import SchedulePPLL


def stage_modules(num_stages: int) -> list[nn.Module]:
    """A small CNN for 8x8 digits, cut into `num_stages` consecutive pieces (same weights on every rank)."""
    torch.manual_seed(0)
    layers = [
        nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
        nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()),
        nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()),
        nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10)),
    ]
    cuts = [round(i * len(layers) / num_stages) for i in range(num_stages + 1)]
    return [nn.Sequential(*layers[a:b]) for a, b in zip(cuts, cuts[1:])]


def aux_head(num_stages: int, rank: int) -> nn.Module | None:
    """A conv aux head sized by a dry forward of the stages up to this one (None on the last stage)."""
    if rank == num_stages - 1:
        return None
    h = torch.zeros(2, 1, 8, 8)
    with torch.no_grad():
        for mod in stage_modules(num_stages)[: rank + 1]:
            h = mod.eval()(h)
    torch.manual_seed(100 + rank)
    return build_aux_head("conv", h, 10, hidden=32)


def batches(steps: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first steps*batch digits, normalised, in a fixed order (every rank sees the same labels)."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    return [(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]) for i in range(steps)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--save", help="folder for this stage's trained weights")
    parser.add_argument("--ckpt", help="run directory for SchedulePPLL.save_checkpoint (after the last step)")
    parser.add_argument("--ckpt-at", type=int, default=0, help="also save a checkpoint after this many steps")
    parser.add_argument("--resume", help="checkpoint to resume from (SchedulePPLL.load_checkpoint); its steps are "
                        "skipped")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)

    stage_mod = stage_modules(world)[rank]
    stage = PipelineStage(stage_mod, stage_index=rank, num_stages=world, device=torch.device("cpu"))
    loss_fn = nn.CrossEntropyLoss()
    aux = aux_head(world, rank)
    params = list(stage_mod.parameters()) + (list(aux.parameters()) if aux is not None else [])
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    schedule = SchedulePPLL(stage, n_microbatches=args.microbatches, loss_fn=loss_fn, aux_head=aux,
                            optimizer=optimizer)

    cut = round(rank * 4 / world)
    names = checkpoint_names(cut)
    start = step = 0
    if args.resume:
        schedule.load_checkpoint(args.resume, names=names)
        start = schedule.block.steps
    for x, y in batches(args.steps, args.batch):
        step += 1
        if step <= start:
            continue
        losses: list[torch.Tensor] = []
        if rank == 0:
            schedule.step(x, target=y)
        elif rank == world - 1:
            schedule.step(target=y, losses=losses)
        else:
            schedule.step()
        optimizer.step()
        optimizer.zero_grad()
        if losses:
            print(f"rank {rank} loss {torch.stack(losses).mean().item():.4f}", flush=True)
        if args.ckpt and step in (args.ckpt_at, args.steps):
            schedule.save_checkpoint(args.ckpt, names=names, keep=3)

    x, y = batches(args.steps + 1, args.batch)[-1]  # a held-out batch, forward only
    eval_losses: list[torch.Tensor] = []
    if rank == 0:
        schedule.eval(x, target=y)
    elif rank == world - 1:
        schedule.eval(target=y, losses=eval_losses)
        print(f"rank {rank} eval loss {torch.stack(eval_losses).mean().item():.4f}", flush=True)
    else:
        schedule.eval()

    if args.save:
        Path(args.save).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in schedule_state(stage_mod, schedule).items()},
                  str(Path(args.save) / f"stage{rank}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


def checkpoint_names(cut: int) -> Callable[[str], str]:
    """Stage key "i.rest" -> "<cut + i>.rest", its name in nn.Sequential(*layers), the unsplit model."""

    def name(key: str) -> str:
        index, rest = key.split(".", 1)
        return f"{int(index) + cut}.{rest}"

    return name


def schedule_state(stage_mod: nn.Module, schedule: object) -> dict[str, torch.Tensor]:
    """The stage's trained tensors (and its aux head's, when the schedule has one)."""
    state = {f"stage.{k}": v for k, v in stage_mod.state_dict().items()}
    aux = getattr(getattr(schedule, "block", None), "aux", None)
    if aux is not None:
        state.update({f"aux.{k}": v for k, v in aux.state_dict().items()})
    return state


if __name__ == "__main__":
    main()
