"""Memory of one pipeline stage, measured: bytes autograd saves for backward, parameters, gradients, optimizer
state (activation checkpointing of a stage's body, which training uses, is ppll_ext.core.recompute).

Local learning is sold on memory: a PPLL stage backpropagates right after its forward, so it holds the saved
activations of one micro-batch, where a 1F1B stage holds up to K micro-batches and GPipe all M. The pieces here
measure that on any device (no allocator statistics needed, so the CPU counts too):

- `SavedTensorMeter`: live and peak bytes of the tensors autograd saves for backward while it is active.
- `state_bytes` / `StateWatch`: parameters, gradients and optimizer state of a stage.
- `StageMemory`: one stage's figures together (what a benchmark reports).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

MiB = 1024 * 1024
"""Bytes in a mebibyte (the unit of the benchmark tables)."""

StorageKey = tuple[int, str] | tuple[str, int]


def storage_key(t: torch.Tensor) -> tuple[StorageKey, int]:
    """(key, bytes) of the storage behind `t`: views of one storage share a key and count its bytes once.

    The key is the storage's data pointer and device; a tensor without a plain storage (sparse, some subclasses)
    is keyed by its own identity and counted by its element bytes.
    """
    try:
        storage = t.untyped_storage()
        return (storage.data_ptr(), str(t.device)), storage.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return ("tensor", id(t)), t.numel() * t.element_size()


def unique_bytes(tensors: Iterable[torch.Tensor], exclude: set[StorageKey] | None = None) -> int:
    """Bytes of the distinct storages behind `tensors` (each storage once), leaving out the keys in `exclude`."""
    seen: dict[StorageKey, int] = {}
    for t in tensors:
        key, nbytes = storage_key(t)
        if exclude is None or key not in exclude:
            seen[key] = nbytes
    return sum(seen.values())


class _Packed:
    """What autograd keeps in place of a saved tensor while the meter is active: the tensor and a release call.

    Autograd drops it when the graph is freed (after backward, or when the graph is garbage); then the meter
    subtracts the storage's bytes if no other packed tensor still shares that storage.
    """

    __slots__ = ("_release", "tensor")

    def __init__(self, tensor: torch.Tensor, release: Callable[[], None]) -> None:
        self.tensor = tensor
        self._release = release

    def __del__(self) -> None:
        self._release()


class SavedTensorMeter:
    """Live and peak bytes of the tensors autograd saves for backward inside `with meter:` (torch's
    `saved_tensors_hooks`).

    Counted: every storage saved for backward (inputs of convolutions and matmuls, activation outputs, masks,
    BatchNorm statistics ...), each storage once however many views of it are saved, from the moment it is saved
    until autograd frees the graph holding it (normally at the end of backward). Not counted: parameters and views
    of them (pass the modules or parameters whose tensors are "parameters"; any `nn.Parameter` is left out too),
    tensors saved outside the `with` block, memory an op allocates and frees inside forward or backward, and
    anything held by other code than autograd (gradients, optimizer state, communication buffers).

    Hooks are thread-local in torch, so a meter counts the saves of the threads that entered it; one meter per
    stage thread is the intended use (the counters are locked anyway, since graphs may be freed elsewhere).
    Nested hooks: torch applies only the innermost `saved_tensors_hooks`. Under non-reentrant
    `torch.utils.checkpoint` (an inner hook) the region's saves are placeholders, not tensors, and are not seen
    here; what checkpoint does keep, the region's inputs, it saves before entering its hook, so they are counted.
    The activations it recomputes during backward live only inside that backward and are not counted: the meter
    measures what a stage holds between a forward and its backward, the part that grows with micro-batches in
    flight.

    On CUDA (`device`), `cuda_peak` is `torch.cuda.max_memory_allocated` since construction or `reset()`: every
    allocation on that device, not only this stage's saves.
    """

    def __init__(self, params: nn.Module | Iterable[torch.Tensor] | None = None,
                 device: torch.device | str | None = None) -> None:
        self._params = params
        self._lock = threading.Lock()
        self._refs: dict[StorageKey, list[int]] = {}  # key -> [packed count, bytes]
        self._local = threading.local()
        self.device = torch.device(device) if device is not None else None
        self.live = 0
        """Bytes saved for backward right now."""
        self.peak = 0
        """Most bytes saved for backward at any time since construction or `reset()`."""
        self._param_keys: set[StorageKey] = set()
        self.reset()

    def reset(self) -> None:
        """Start a new peak from the bytes live now (and reset the CUDA peak of `device`)."""
        with self._lock:
            self.peak = self.live
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    @property
    def cuda_peak(self) -> int | None:
        """torch.cuda.max_memory_allocated of `device` since the last reset; None off CUDA."""
        if self.device is None or self.device.type != "cuda":
            return None
        return int(torch.cuda.max_memory_allocated(self.device))

    def live_keys(self) -> set[StorageKey]:
        """Storage keys of the tensors saved right now (to leave them out of other tallies, e.g. send buffers)."""
        with self._lock:
            return set(self._refs)

    def _parameter_keys(self) -> set[StorageKey]:
        params = self._params.parameters() if isinstance(self._params, nn.Module) else (self._params or ())
        return {storage_key(p)[0] for p in params}

    def _pack(self, t: torch.Tensor) -> torch.Tensor | _Packed:
        if isinstance(t, nn.Parameter):
            return t
        key, nbytes = storage_key(t)
        if key in self._param_keys:
            return t
        with self._lock:
            ref = self._refs.get(key)
            if ref is None:
                self._refs[key] = [1, nbytes]
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            else:
                ref[0] += 1
        # Detached (same storage, no grad_fn): a saved output kept with its grad_fn would close a reference cycle
        # through the C++ graph that no garbage collector breaks, leaking any graph dropped without backward.
        return _Packed(t.detach(), lambda: self._release(key))

    def _release(self, key: StorageKey) -> None:
        with self._lock:
            ref = self._refs[key]
            ref[0] -= 1
            if ref[0] == 0:
                self.live -= ref[1]
                del self._refs[key]

    @staticmethod
    def _unpack(packed: torch.Tensor | _Packed) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _Packed) else packed

    def __enter__(self) -> SavedTensorMeter:
        """Count the saves of this thread from here on (may be entered again, also from other threads)."""
        self._param_keys = self._parameter_keys()  # cheap, and follows parameters replaced since the last entry
        hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        hooks.__enter__()
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        stack.append(hooks)
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop counting new saves of this thread; tensors already saved are released when their graph is freed."""
        self._local.stack.pop().__exit__(*exc)

    def wrap(self, fn: Callable[..., object]) -> Callable[..., object]:
        """`fn` run inside this meter (e.g. a block's train_step, so each stage thread counts its own saves)."""

        def metered(*args: object, **kwargs: object) -> object:
            with self:
                return fn(*args, **kwargs)

        return metered


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    def walk(value: object) -> Iterator[torch.Tensor]:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from walk(v)

    yield from walk(list(optimizer.state.values()))


def state_bytes(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes of `module`'s parameters, of their gradients allocated now, and of every tensor in `optimizer.state`
    (momentum, Adam moments, step counters), each storage once; buffers (BatchNorm statistics) are not included.

    Gradients exist from the first backward of a mini-batch until `zero_grad`; to see them full, call this right
    after `optimizer.step()` and before `zero_grad` (StateWatch does, from a step post-hook).
    """
    params = list(module.parameters())
    if optimizer is not None:
        known = {id(p) for p in params}
        params += [p for g in optimizer.param_groups for p in g["params"] if id(p) not in known]
    return {"parameters": unique_bytes(params),
            "gradients": unique_bytes(p.grad for p in params if p.grad is not None),
            "optimizer": unique_bytes(_optimizer_tensors(optimizer)) if optimizer is not None else 0}


class StateWatch:
    """The largest `state_bytes` of a stage seen right after each optimizer step (gradients still allocated,
    optimizer state already created), through the optimizer's step post-hook."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module, self.optimizer = module, optimizer
        self.peak = state_bytes(module, optimizer)
        """Per field, the most bytes seen (now, and after every step since)."""
        self._handle = optimizer.register_step_post_hook(lambda *_: self.sample())

    def sample(self) -> None:
        """Take the current state_bytes into the peaks."""
        now = state_bytes(self.module, self.optimizer)
        self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}

    def remove(self) -> None:
        """Stop watching (remove the hook)."""
        self._handle.remove()


@dataclass
class StageMemory:
    """One stage's memory in bytes: peak saved-for-backward, parameters, gradients, optimizer state, in-flight
    send/receive buffers, and on CUDA the device's peak allocation (None elsewhere).

    `total` adds the first five; each is its own peak, so the total is an upper bound of the simultaneous peak.
    """

    saved_peak: int
    parameters: int
    gradients: int
    optimizer: int
    buffers: int = 0
    cuda_peak: int | None = None

    @property
    def total(self) -> int:
        """saved_peak + parameters + gradients + optimizer + buffers."""
        return self.saved_peak + self.parameters + self.gradients + self.optimizer + self.buffers

    def to_dict(self) -> dict[str, int | None]:
        """The fields and the total (for JSON)."""
        return {**asdict(self), "total": self.total}

    @classmethod
    def measured(cls, meter: SavedTensorMeter, watch: StateWatch, buffers: int = 0) -> StageMemory:
        """The figures a meter and a state watch collected for one stage."""
        return cls(meter.peak, watch.peak["parameters"], watch.peak["gradients"], watch.peak["optimizer"], buffers,
                   meter.cuda_peak)
