"""Multi-process QAT under torchrun (data parallel): one process per device, one global batch split between them.

``torchrun --nproc_per_node N -m lowbit_deploy train ...`` starts N copies of the trainer with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment (docs/training-on-gpus.md). Each rank:

- builds the same run (same recipe, seed and plan; the student's starting weights are broadcast from rank 0 so
  they are identical even where initialisation is not bit-reproducible across devices);
- draws the whole global batch (``train.batch_size``) from the run's seeded CPU generator, exactly as a single
  process does, and trains on its contiguous slice of it: generators stay identical on every rank, so a resumed run
  replays the same draws and the global batch is the single-process one, sample for sample;
- averages the trainable parameters' gradients over the ranks before each optimizer step (all-reduce of flattened
  buckets, then divided by the world size). Each rank's loss is the mean over its equal slice, so the average of
  the ranks' gradients is the gradient of the global batch's mean loss -- the same optimizer step as one process,
  up to the order in which floating-point sums are taken.

Rank 0 alone writes checkpoints, train states and reports (atomically, as a single process does); the others wait
at a barrier until the files are complete. ``gloo`` is the backend on the CPU, ``nccl`` on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, Iterable

import torch
from torch import nn

from ..errors import UserError

_BUCKET_ELEMENTS = 1 << 25  # gradients all-reduced per 32M-element bucket: bounded extra memory, few messages


@dataclass(frozen=True)
class Launch:
    """What torchrun put in the environment (a single process: rank 0 of 1, no local rank)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int | None = None

    @property
    def parallel(self) -> bool:
        return self.world_size > 1


def launch_from_environment(environ: dict[str, str] | None = None) -> Launch:
    environ = os.environ if environ is None else environ
    try:
        world_size = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local_rank = int(environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them); start multi-process "
                        "training with `torchrun --nproc_per_node N -m lowbit_deploy train ...`") from None
    if world_size <= 1:
        return Launch()
    if not 0 <= rank < world_size:
        raise UserError(f"RANK={rank} is outside WORLD_SIZE={world_size}; start the processes with torchrun")
    return Launch(rank, world_size, local_rank)


def check_global_batch(batch_size: int, launch: Launch) -> None:
    if batch_size % launch.world_size:
        example = batch_size - batch_size % launch.world_size or launch.world_size
        raise UserError(f"train.batch_size {batch_size} (the global batch) does not split evenly between "
                        f"{launch.world_size} processes; use a multiple of {launch.world_size} (e.g. {example}) or "
                        f"another --nproc_per_node")


class Distributed:
    """A run's place among the processes; with one process every operation is a no-op."""

    def __init__(self, launch: Launch = Launch(), owns_group: bool = False) -> None:
        self.launch, self.owns_group = launch, owns_group

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    @property
    def writes(self) -> bool:
        """Whether this process writes the run's files (rank 0)."""
        return self.launch.rank == 0

    def barrier(self) -> None:
        if self.launch.parallel:
            torch.distributed.barrier()

    def local_slice(self, batch_size: int) -> slice:
        size = batch_size // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)

    def shard(self, inputs: Any, batch_size: int) -> Any:
        """This rank's slice of a step's inputs: every tensor whose first dimension is the global batch is cut
        along it, inside dataclasses, lists and dicts (the stages' inputs and trajectories)."""
        if not self.launch.parallel:
            return inputs
        return _sliced(inputs, batch_size, self.local_slice(batch_size))

    def average_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """Replace each gradient by its mean over the ranks (the ranks hold the same parameters in the same
        order, so the flattened buckets line up)."""
        if not self.launch.parallel:
            return
        gradients = [p.grad for p in parameters if p.grad is not None]
        for bucket in _buckets(gradients):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            torch.distributed.all_reduce(flat)
            flat /= self.world_size
            offset = 0
            for gradient in bucket:
                gradient.copy_(flat[offset:offset + gradient.numel()].view_as(gradient))
                offset += gradient.numel()

    def average_values(self, values: list[float | None]) -> list[float | None]:
        """The mean over the ranks of a step's loss values (None stays None: every rank has the same terms)."""
        if not self.launch.parallel:
            return values
        present = [index for index, value in enumerate(values) if value is not None]
        device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        total = torch.tensor([float(values[index]) for index in present], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(total)
        averaged = list(values)
        for index, value in zip(present, (total / self.world_size).tolist()):
            averaged[index] = value
        return averaged

    def broadcast_module(self, module: nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers."""
        if not self.launch.parallel:
            return
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                torch.distributed.broadcast(tensor.data, src=0)

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def start(launch: Launch, device: torch.device) -> Distributed:
    """Join the process group torchrun prepared (``nccl`` for CUDA, ``gloo`` for the CPU); a single process needs
    none. A group the caller already initialised is used as it is (and left open)."""
    if not launch.parallel:
        return Distributed()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if torch.distributed.is_initialized():
        return Distributed(launch, owns_group=False)
    if not torch.distributed.is_available():
        raise UserError("this torch build has no torch.distributed; train with one process (plain `lowbit-deploy "
                        "train`)")
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=launch.rank,
                                         world_size=launch.world_size,
                                         device_id=device if device.type == "cuda" else None)
    return Distributed(launch, owns_group=True)


def _sliced(value: Any, batch_size: int, part: slice) -> Any:
    if isinstance(value, torch.Tensor):
        return value[part] if value.dim() > 0 and value.shape[0] == batch_size else value
    if is_dataclass(value) and not isinstance(value, type):
        return replace(value, **{f.name: _sliced(getattr(value, f.name), batch_size, part)
                                 for f in fields(value) if f.init})
    if isinstance(value, list):
        return [_sliced(item, batch_size, part) for item in value]
    if isinstance(value, tuple):
        return tuple(_sliced(item, batch_size, part) for item in value)
    if isinstance(value, dict):
        return {key: _sliced(item, batch_size, part) for key, item in value.items()}
    return value


def _buckets(gradients: list[torch.Tensor]) -> Iterable[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for gradient in gradients:
        if bucket and (size + gradient.numel() > _BUCKET_ELEMENTS or gradient.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(gradient)
        size += gradient.numel()
    if bucket:
        yield bucket
