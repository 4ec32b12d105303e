"""A torchtitan-style pipeline-parallel Llama trainer (the stock version: end-to-end backprop, Schedule1F1B).

    torchrun --nproc_per_node 2 examples/torchtitan_llama/train_stock.py --training.steps 20

The model is split per stage by deleting the other stages' modules (pipeline_module_split), the schedule class is
looked up by name (`parallelism.pipeline_parallel_schedule`, default "1F1B") with get_schedule_class, the loss is
torchtitan's cross entropy rescaled over the micro-batches, and the loop is torchtitan's train step. Its twin,
train_ppll.py, trains each stage on its own loss (docs/torchtitan.md lists every changed line).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist
from components import (
    build_dataloader,
    build_lr_schedulers,
    build_optimizers,
    cross_entropy_loss,
    generate_llm_fqn_per_model_part,
    pipeline_module_split,
    rescale_accumulated_loss,
)
from model import Transformer, TransformerModelArgs
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle, get_schedule_class


@dataclass
class Parallelism:
    """Pipeline settings (torchtitan's [parallelism] section)."""

    pipeline_parallel_schedule: str = "1F1B"
    pipeline_parallel_microbatch_size: int = 2


@dataclass
class Training:
    """Batch, sequence length and steps (torchtitan's [training] section)."""

    local_batch_size: int = 8
    seq_len: int = 64
    steps: int = 20
    seed: int = 0


@dataclass
class Optimizer:
    """AdamW settings and warm-up (torchtitan's [optimizer] / [lr_scheduler] sections)."""

    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 2


@dataclass
class JobConfig:
    """The job, settable as --section.field on the command line."""

    parallelism: Parallelism = field(default_factory=Parallelism)
    training: Training = field(default_factory=Training)
    optimizer: Optimizer = field(default_factory=Optimizer)


def parse_job_config() -> JobConfig:
    """JobConfig from --section.field value arguments."""
    job_config = JobConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for section in fields(job_config):
        for item in fields(getattr(job_config, section.name)):
            default = getattr(getattr(job_config, section.name), item.name)
            parser.add_argument(f"--{section.name}.{item.name}", type=type(default), default=default)
    for key, value in vars(parser.parse_args()).items():
        section, name = key.split(".")
        setattr(getattr(job_config, section), name, value)
    return job_config


def build_pipeline_schedule(job_config: JobConfig, stages: list[PipelineStage],
                            loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                            ) -> PipelineScheduleSingle | PipelineScheduleMulti:
    """The schedule class named by the config, over this rank's stages, with the loss rescaled per micro-batch."""
    schedule_class = get_schedule_class(job_config.parallelism.pipeline_parallel_schedule)
    looped_schedule = issubclass(schedule_class, PipelineScheduleMulti)
    n_microbatches = job_config.training.local_batch_size // job_config.parallelism.pipeline_parallel_microbatch_size
    return schedule_class(
        stages if looped_schedule else stages[0],
        n_microbatches=n_microbatches,
        loss_fn=rescale_accumulated_loss(loss_fn, n_microbatches),
        scale_grads=False,
    )


def main() -> None:
    """Build this rank's stage, its schedule and optimizer, and train for training.steps steps."""
    job_config = parse_job_config()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    device = torch.device("cpu")
    pp_mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("pp",))

    torch.manual_seed(job_config.training.seed)
    model_args = TransformerModelArgs(max_seq_len=job_config.training.seq_len)
    model = Transformer(model_args)
    model.init_weights()
    module_names_per_stage = generate_llm_fqn_per_model_part(pp_mesh.size(), model_args.n_layers)
    stages, model_parts = pipeline_module_split(model, pp_mesh, device, module_names_per_stage)
    pp_schedule = build_pipeline_schedule(job_config, stages, cross_entropy_loss)
    pp_has_first_stage = any(stage.is_first for stage in stages)
    pp_has_last_stage = any(stage.is_last for stage in stages)

    optimizers = build_optimizers(model_parts, job_config.optimizer.lr, job_config.optimizer.weight_decay)
    lr_schedulers = build_lr_schedulers(optimizers, job_config.optimizer.warmup_steps)
    data_iterator = build_dataloader(job_config.training.local_batch_size, job_config.training.seq_len,
                                     job_config.training.seed)

    for step in range(1, job_config.training.steps + 1):
        inputs, labels = next(data_iterator)
        optimizers.zero_grad()
        targets, losses = (labels, []) if pp_has_last_stage else (None, None)
        if pp_has_first_stage:
            pp_schedule.step(inputs, target=targets, losses=losses)
        else:
            pp_schedule.step(target=targets, losses=losses)
        optimizers.step()
        lr_schedulers.step()
        if pp_has_last_stage:
            print(f"step: {step:2d}  loss: {torch.sum(torch.stack(losses)).item():7.4f}", flush=True)

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
