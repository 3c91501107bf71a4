"""Quantized-UNet checkpoints: safetensors only, self-describing, written atomically.

``<run>/checkpoint/quantized_unet.safetensors`` holds the student's full state dict (latent float weights, biases,
quantizer scales) and, as metadata, the recipe, the UNet config and the model source, so a checkpoint rebuilds its
model without the original folder. ``train_state.safetensors`` beside it holds what ``--resume`` needs: optimizer
moments, step, and the data generator's state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..io import atomic_path
from ..quant.apply import quantize_model
from ..recipes import Recipe, recipe_from_json

CHECKPOINT_FORMAT = "lowbit-deploy/quantized-unet/1"
CHECKPOINT_DIRNAME = "checkpoint"
WEIGHTS_FILE = "quantized_unet.safetensors"
TRAIN_STATE_FILE = "train_state.safetensors"
_PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle"}


@dataclass
class QuantizedCheckpoint:
    unet: torch.nn.Module
    recipe: Recipe
    model_source: str | None
    step: int
    path: Path
    condition_seq_len: int
    plan: dict  # QuantizationPlan.to_dict() as calibrated when training started


def checkpoint_file(location: str | Path) -> Path:
    """Resolve a run directory, a checkpoint directory or a file to the weights file, refusing pickles."""
    location = Path(location)
    candidates = [location / CHECKPOINT_DIRNAME / WEIGHTS_FILE, location / WEIGHTS_FILE, location]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        pickles = sorted(p.name for p in location.glob("**/*") if p.suffix in _PICKLE_SUFFIXES) \
            if location.is_dir() else []
        if pickles:
            raise UserError(f"{location} holds only pickle checkpoints ({', '.join(pickles[:3])}); lowbit-deploy "
                            f"loads safetensors only, because unpickling runs arbitrary code. Re-train or convert "
                            f"with safetensors.torch.save_file.")
        raise UserError(f"no quantized checkpoint at {location}: expected {candidates[0]}; "
                        f"run `lowbit-deploy train RECIPE --out RUN_DIR` first")
    if path.suffix in _PICKLE_SUFFIXES:
        raise UserError(f"{path} is a pickle checkpoint; lowbit-deploy loads safetensors only, because unpickling "
                        f"runs arbitrary code. Convert it with safetensors.torch.save_file.")
    return path


def read_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{path} is not a readable safetensors file ({error}); it may be truncated or corrupt. "
                        f"Re-run `lowbit-deploy train` to write it again.") from None
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is a safetensors file but not a lowbit-deploy quantized checkpoint "
                        f"(format {metadata.get('format')!r}, expected {CHECKPOINT_FORMAT!r})")
    return metadata


def save_checkpoint(run_dir: Path, unet: torch.nn.Module, recipe: Recipe, model_source: str | None, step: int,
                    plan: dict, condition_seq_len: int) -> Path:
    target = Path(run_dir) / CHECKPOINT_DIRNAME / WEIGHTS_FILE
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "recipe": recipe.to_json(),
        "unet_config": json.dumps(dict(unet.config)),
        "model_source": model_source or "",
        "step": str(step),
        "condition_seq_len": str(condition_seq_len),
        "plan": json.dumps(plan),
    }
    state = {name: tensor.detach().contiguous() for name, tensor in unet.state_dict().items()}
    with atomic_path(target) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return target


def load_checkpoint(location: str | Path) -> QuantizedCheckpoint:
    from diffusers import UNet2DConditionModel

    path = checkpoint_file(location)
    metadata = read_metadata(path)
    recipe = recipe_from_json(metadata["recipe"])
    unet = UNet2DConditionModel.from_config(json.loads(metadata["unet_config"]))
    quantize_model(unet, recipe.quantize, initialize=False)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path} could not be read ({error}); it may be truncated. Re-run training.") from None
    try:
        unet.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise UserError(f"{path} does not match the model its metadata describes ({str(error)[:300]}). "
                        f"The file was edited or written by another tool; re-run training.") from None
    unet.eval()
    return QuantizedCheckpoint(unet, recipe, metadata["model_source"] or None, int(metadata["step"]), path,
                               int(metadata["condition_seq_len"]), json.loads(metadata["plan"]))


def save_train_state(run_dir: Path, optimizer: torch.optim.Optimizer, step: int,
                     generator: torch.Generator) -> Path:
    target = Path(run_dir) / CHECKPOINT_DIRNAME / TRAIN_STATE_FILE
    optimizer_state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"generator_state": generator.get_state()}
    for index, slots in optimizer_state["state"].items():
        for slot, value in slots.items():
            tensors[f"optimizer.{index}.{slot}"] = torch.as_tensor(value).detach().clone()
    metadata = {"format": CHECKPOINT_FORMAT + "/train-state", "step": str(step),
                "param_groups": json.dumps(optimizer_state["param_groups"])}
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return target


def load_train_state(run_dir: Path, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> int:
    path = Path(run_dir) / CHECKPOINT_DIRNAME / TRAIN_STATE_FILE
    if not path.is_file():
        raise UserError(f"cannot resume: {path} is missing; start without --resume or pick the right --out")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise UserError(f"cannot resume: {path} is corrupt ({error}); start again without --resume") from None
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, slot = key.split(".", 2)
            state.setdefault(int(index), {})[slot] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
    generator.set_state(tensors["generator_state"])
    return int(metadata["step"])


def check_same_step(checkpoint_step: int, train_state_step: int, run_dir: Path) -> None:
    """The two files are written one after the other; a run killed in between leaves them at different steps."""
    if checkpoint_step != train_state_step:
        raise UserError(f"cannot resume {run_dir}: the checkpoint is at step {checkpoint_step} but the optimizer "
                        f"state at step {train_state_step} (the run was interrupted while saving). Resuming would "
                        f"repeat steps on updated weights; start a new --out, or use the checkpoint as it is")
