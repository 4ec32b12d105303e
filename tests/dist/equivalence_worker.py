"""Run under `torchrun --nproc_per_node K`: every equivalence case with the processes runtime.

Each rank writes its trained block (body + aux head) to OUT/<variant>-d<depth>/stage<k>.safetensors.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from equivalence_cases import DEPTHS, DEVICE, VARIANTS, case_config  # noqa: E402

from ppll_ext.train import run_training  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    stages = int(sys.argv[2])
    if DEVICE == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo")
    for variant in VARIANTS:
        for depth in DEPTHS:
            folder = out / f"{variant}-d{depth}"
            folder.mkdir(parents=True, exist_ok=True)

            def save(blocks, folder: Path = folder) -> None:
                for k, block in blocks.items():
                    state = {n: t.detach().cpu().contiguous() for n, t in block.state_dict().items()}
                    save_file(state, str(folder / f"stage{k}.safetensors"))

            run_training(case_config(variant, stages, "processes", depth), out=io.StringIO(), on_finish=save)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
