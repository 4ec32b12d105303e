"""PPLL on DeepSpeed: `LocalPipelineModule` + `initialize`, a drop-in for `PipelineModule` + `deepspeed.initialize`.

    net = LocalPipelineModule(layers=[...], num_stages=K, loss_fn=ce, aux_heads="auto", example_input=x[:2])
    engine, optimizer, _, lr_scheduler = initialize(model=net, config="configs/deepspeed/ppll.json",
                                                    model_parameters=[p for p in net.parameters() if p.requires_grad])
    loss = engine.train_batch(data_iter)

Every stage but the last owns an auxiliary head, registered in the module so DeepSpeed's optimizer, bf16 and
checkpoints see it. `LocalTrainSchedule` has no gradient instructions: a stage loads (first stage) or receives
activations together with their labels, forwards, sends both on at once (early forwarding), backpropagates its
own loss through itself only, and after its micro-batches all-reduces gradients within its data-parallel group
(same stage, other replicas) and steps, clipping by its own gradient norm. Every instruction runs the stage's
`LocalBlock`, the code the native engine runs. Activations travel over `ppll_ext.transport` links (a small
header per message, so batch sizes may vary) on a process group of their own, so no stage ever waits for a later
one. Tested with DeepSpeed 0.19 (see `_ds.TESTED`).

On the CPU, DeepSpeed's comm op leaves a ~66 MB /dev/shm file per rank behind after every run; LocalPipelineModule
removes it once all ranks have mapped it, and `release_shm_buffer()` does the same for scripts that build only a
stock PipelineModule.
"""

from ppll_ext.core import build_stage_aux_head
from ppll_ext.deepspeed._ds import LayerSpec, PipeDataParallelTopology, release_shm_buffer
from ppll_ext.deepspeed.engine import (
    DeepSpeedUpdater,
    LocalBackwardPass,
    LocalPipelineEngine,
    LocalTrainSchedule,
    initialize,
)
from ppll_ext.deepspeed.module import LocalPipelineModule

__all__ = [
    "DeepSpeedUpdater",
    "LayerSpec",
    "LocalBackwardPass",
    "LocalPipelineEngine",
    "LocalPipelineModule",
    "LocalTrainSchedule",
    "PipeDataParallelTopology",
    "build_stage_aux_head",
    "initialize",
    "release_shm_buffer",
]
