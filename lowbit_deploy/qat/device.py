"""Where training runs: the ``--device`` choice, the teacher's precision, and the models' device boundary.

Only the two UNets live on the device. Everything around them -- data, conditions, noise, timesteps, schedulers,
losses of the outputs, the teacher's trajectories -- stays on the CPU and is drawn from the run's CPU generator, so
a run's random draws do not depend on the device (CUDA's generators differ from the CPU's) and every caller of a
UNet works unchanged. A forward pre-hook moves a model's tensor inputs to its device (floating ones to its dtype);
a forward hook hands the outputs back on the callers' device in float32. The transfers are latent-sized (an SD1.5
batch of 4 moves ~1 MB each way), against a UNet forward of hundreds of GFLOPs.

The frozen teacher runs in float16 on CUDA by default (``train.teacher_dtype``): it only supplies targets, and
halving it frees memory for the student, whose fake-quantization math (scales, rounding, STE) stays float32.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import UserError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(spec: str | None, local_rank: int | None = None) -> torch.device:
    """The device ``--device`` names (None: CUDA when available, else the CPU), checked to exist now.

    Under torchrun (``local_rank`` given) ``cuda`` means this process's GPU, ``cuda:LOCAL_RANK``."""
    text = (spec or default_device()).strip().lower()
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UserError(f"--device {spec!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise UserError(f"--device {spec!r}: training runs on cpu or cuda devices; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA"
        raise UserError(f"--device {text}: no CUDA device is available (torch {torch.__version__} built {build}, "
                        f"{torch.cuda.device_count()} visible GPUs); use --device cpu, or install a CUDA build of "
                        f"torch on a machine with a GPU")
    if local_rank is not None:
        if device.index is not None:
            raise UserError(f"--device {text} under torchrun: each process takes the GPU of its LOCAL_RANK; pass "
                            f"--device cuda (and CUDA_VISIBLE_DEVICES to choose the GPUs)")
        device = torch.device("cuda", local_rank)
    index = 0 if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise UserError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                        f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); choose one of them")
    return torch.device("cuda", index)


def teacher_dtype(setting: str, device: torch.device) -> torch.dtype:
    """``train.teacher_dtype``: ``auto`` is float16 on CUDA and float32 on the CPU (where float16 is slow)."""
    if setting == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[setting]


def _convert(value: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    if isinstance(value, torch.Tensor):
        if dtype is not None and value.is_floating_point():
            return value.to(device=device, dtype=dtype)
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_convert(item, device, dtype) for item in value)
    if isinstance(value, dict):
        converted = {key: _convert(item, device, dtype) for key, item in value.items()}
        return type(value)(**converted) if type(value) is not dict else converted
    return value


def _first_tensor_device(args: tuple, kwargs: dict) -> torch.device | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return None


@dataclass
class DeviceBoundary:
    """The hooks that let CPU callers run a model placed on ``device`` in ``dtype`` (see the module doc)."""

    handles: tuple

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def attach_device_boundary(model: nn.Module, device: torch.device, dtype: torch.dtype) -> DeviceBoundary:
    callers: list[torch.device | None] = []

    def before(module, args, kwargs):
        callers.append(_first_tensor_device(args, kwargs))
        return _convert(args, device, dtype), _convert(kwargs, device, dtype)

    def after(module, args, kwargs, output):
        caller = callers.pop()
        return _convert(output, caller or device, torch.float32)

    return DeviceBoundary((model.register_forward_pre_hook(before, with_kwargs=True),
                           model.register_forward_hook(after, with_kwargs=True)))


def place_models(teacher: nn.Module, student: nn.Module, device: torch.device,
                 dtype_of_teacher: torch.dtype) -> None:
    """Move the frozen teacher (in ``dtype_of_teacher``) and the float32 student to ``device``; on the CPU in
    float32 nothing changes (no hooks: the models see their callers' tensors as before)."""
    if device.type == "cpu" and dtype_of_teacher == torch.float32:
        return
    teacher.to(device=device, dtype=dtype_of_teacher)
    student.to(device)
    attach_device_boundary(teacher, device, dtype_of_teacher)
    attach_device_boundary(student, device, torch.float32)


@contextlib.contextmanager
def deterministic_kernels(device: torch.device) -> Iterator[None]:
    """On CUDA, deterministic kernels for the ``with`` body (the previous settings are restored after): cuDNN's
    autotuner and its atomics-based convolution gradients, and cuBLAS's split reductions, otherwise make two runs
    with the same seed differ in the last bits. An op without a deterministic CUDA kernel warns instead of failing.
    Costs some speed; the CPU needs none of it."""
    if device.type != "cuda":
        yield
        return
    # cuBLAS reads this when its first handle is created (before any matmul of this process).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def enable_gradient_checkpointing(student: nn.Module) -> None:
    """Recompute the student's block activations during backward (diffusers' own checkpointing of each block)."""
    if not getattr(student, "_supports_gradient_checkpointing", False):
        raise UserError(f"train.gradient_checkpointing: {type(student).__name__} does not support gradient "
                        f"checkpointing; set it to false")
    student.enable_gradient_checkpointing()
