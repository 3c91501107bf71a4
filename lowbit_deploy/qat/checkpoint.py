"""Quantized-UNet checkpoints: safetensors only, self-describing, written atomically.

``<run>/checkpoint/quantized_unet.safetensors`` holds the student's full state dict (latent float weights, biases,
quantizer scales) and, as metadata, the realized quantization plan, the deployed signature, the UNet config, the
model source and the recipe. The model is rebuilt from the UNet config and the plan alone -- never by re-running
the recipe -- so a checkpoint always describes exactly the model it was trained as. ``train_state.safetensors``
beside it holds what ``--resume`` needs: optimizer moments, the global step and the stage position, the data
generator's state, and the per-stage loss history.

Crash safety: a save writes the train state first and the weights last, so the weights file is the commit point.
Before a new train state replaces the current one, the current one is kept as ``train_state.previous.safetensors``
(removed once the weights are written): a run killed at any instant leaves a train state whose step matches the
weights, which :func:`recover_train_state` puts back in place. A run killed before its first weights file exists has
no checkpoint (:func:`checkpoint_status` says "incomplete") and starts over. Files are written byte-reproducibly
(:func:`lowbit_deploy.io.write_safetensors_atomic`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..errors import UserError
from ..io import write_json_atomic, write_safetensors_atomic
from ..quant.apply import apply_plan
from ..quant.plan import QuantPlan
from ..recipes import Recipe, recipe_from_json
from ..signature import DeployedSignature

CHECKPOINT_FORMAT = "lowbit-deploy/quantized-unet/2"
CHECKPOINT_DIRNAME = "checkpoint"
WEIGHTS_FILE = "quantized_unet.safetensors"
TRAIN_STATE_FILE = "train_state.safetensors"
PREVIOUS_TRAIN_STATE_FILE = "train_state.previous.safetensors"
TIMES_FILE = "train_times.json"  # wall-clock seconds per stage: kept apart so the safetensors files are reproducible
_PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle"}


@dataclass
class QuantizedCheckpoint:
    unet: torch.nn.Module
    recipe: Recipe
    model_source: str | None
    step: int
    path: Path
    plan: QuantPlan
    signature: DeployedSignature

    @property
    def condition_seq_len(self) -> int:
        return self.signature.seq_len


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
        older = str(metadata.get("format", "")).startswith(CHECKPOINT_FORMAT.rsplit("/", 1)[0])
        fix = (" It was written by an older lowbit-deploy; re-run `lowbit-deploy train` to write it again."
               if older else "")
        raise UserError(f"{path} is a safetensors file but not a lowbit-deploy quantized checkpoint of this version "
                        f"(format {metadata.get('format')!r}, expected {CHECKPOINT_FORMAT!r}).{fix}")
    return metadata


def checkpoint_recipe(location: str | Path) -> Recipe:
    """The recipe a checkpoint was trained with, read from the file's header only (no weights loaded)."""
    path = checkpoint_file(location)
    return recipe_from_json(read_metadata(path)["recipe"])


def save_checkpoint(run_dir: Path, unet: torch.nn.Module, recipe: Recipe, model_source: str | None, step: int,
                    plan: QuantPlan, signature: DeployedSignature) -> Path:
    target = Path(run_dir) / CHECKPOINT_DIRNAME / WEIGHTS_FILE
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "recipe": recipe.to_json(),
        "unet_config": json.dumps(dict(unet.config), sort_keys=True),
        "model_source": model_source or "",
        "step": str(step),
        "plan": plan.to_json(),
        "signature": signature.to_json(),
    }
    write_safetensors_atomic(target, dict(unet.state_dict()), metadata)
    return target


def checkpoint_status(run_dir: str | Path) -> str:
    """"none" (no checkpoint folder), "incomplete" (a run killed before its first weights file was written: only
    train states or temporary files) or "complete"."""
    folder = Path(run_dir) / CHECKPOINT_DIRNAME
    if (folder / WEIGHTS_FILE).is_file():
        return "complete"
    return "incomplete" if folder.exists() else "none"


def clear_incomplete_checkpoint(run_dir: str | Path) -> None:
    """Remove what a run killed during its first save left (call under the run lock): it holds no weights."""
    folder = Path(run_dir) / CHECKPOINT_DIRNAME
    if checkpoint_status(run_dir) != "incomplete":
        return
    if not folder.is_dir():
        raise UserError(f"{folder} is a file; lowbit-deploy keeps its checkpoint folder there: move the file away")
    for path in folder.iterdir():
        if path.is_file() and (path.name.startswith(".") or path.name.startswith("train_state")):
            path.unlink()


def load_checkpoint(location: str | Path) -> QuantizedCheckpoint:
    from diffusers import UNet2DConditionModel

    path = checkpoint_file(location)
    metadata = read_metadata(path)
    recipe = recipe_from_json(metadata["recipe"])
    plan = QuantPlan.from_dict(json.loads(metadata["plan"]), f"the plan in {path}")
    signature = DeployedSignature.from_json(metadata["signature"])
    unet = UNet2DConditionModel.from_config(json.loads(metadata["unet_config"]))
    apply_plan(unet, plan, scale_init=None, step_timesteps=signature.step_timesteps)
    if recipe.train.lora is not None:
        from ..quant.lora import attach_lora

        attach_lora(unet, recipe.train.lora)  # factors are placeholders until the state dict is loaded over them
    try:
        _load_streamed(unet, path)
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path} could not be read ({error}); it may be truncated. Re-run training.") from None
    except RuntimeError as error:
        raise UserError(f"{path} does not match the model its metadata describes ({str(error)[:300]}). "
                        f"The file was edited or written by another tool; re-run training.") from None
    unet.eval()
    return QuantizedCheckpoint(unet, recipe, metadata["model_source"] or None, int(metadata["step"]), path, plan,
                               signature)


# safetensors maps the file: every page read stays resident (and counted in RSS) until the handle closes, so the
# file is reopened after this many bytes (an SDXL checkpoint otherwise maps 10 GB beside the 10 GB model).
MAPPED_BYTES_PER_OPEN = 2**29


def _load_streamed(module: torch.nn.Module, path: Path) -> None:
    """``module.load_state_dict(file, strict=True)`` one tensor at a time: the file's tensors never sit in memory
    all at once beside the model's (an SD1.5 UNet: 3.4 GB less at the peak of export and validate)."""
    expected = module.state_dict()
    with safe_open(str(path), framework="pt") as handle:
        stored = set(handle.keys())
    missing, unexpected = sorted(set(expected) - stored), sorted(stored - set(expected))
    if missing or unexpected:
        raise RuntimeError(f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    keys = iter(expected.items())
    with torch.no_grad():
        for batch in iter(lambda: _take_bytes(keys, MAPPED_BYTES_PER_OPEN), []):
            with safe_open(str(path), framework="pt") as handle:
                for key, target in batch:
                    tensor = handle.get_tensor(key)
                    if tensor.shape != target.shape:
                        raise RuntimeError(f"size mismatch for {key}: {tuple(tensor.shape)} in the file, "
                                           f"{tuple(target.shape)} in the model")
                    target.copy_(tensor)


def _take_bytes(items, limit: int) -> list[tuple[str, torch.Tensor]]:
    """The next (key, tensor) pairs of ``items`` up to ``limit`` bytes of tensors (at least one pair)."""
    batch, total = [], 0
    for key, tensor in items:
        batch.append((key, tensor))
        total += tensor.nbytes
        if total >= limit:
            break
    return batch


@dataclass
class TrainState:
    """What ``--resume`` needs besides the weights: where the run stands and its random and optimizer state."""

    step: int                       # global steps done
    stage: int | None               # index of the stage the next step belongs to (None: written before stages)
    stage_step: int | None          # steps of that stage already done (0: the stage starts with a fresh optimizer)
    optimizer_state: dict           # torch optimizer state_dict of the stage in progress
    generator_state: torch.Tensor
    history: list[dict]             # per-stage loss/time summaries so far (the train report)


def save_train_state(run_dir: Path, optimizer: torch.optim.Optimizer | None, step: int, generator: torch.Generator,
                     *, stage: int = 0, stage_step: int = 0, history: list[dict] | None = None) -> Path:
    target = Path(run_dir) / CHECKPOINT_DIRNAME / TRAIN_STATE_FILE
    optimizer_state = optimizer.state_dict() if optimizer is not None else {"state": {}, "param_groups": []}
    tensors: dict[str, torch.Tensor] = {"generator_state": generator.get_state()}
    for index, slots in optimizer_state["state"].items():
        for slot, value in slots.items():
            # The optimizer's own tensors, not copies: the writer streams them to the file one at a time (moving
            # each to the CPU), so saving adds no second set of moments to the run's memory.
            tensors[f"optimizer.{index}.{slot}"] = torch.as_tensor(value).detach()
    # Wall-clock seconds go to TIMES_FILE (save_stage_seconds): the same run must give the same bytes here.
    timeless = [{key: value for key, value in entry.items() if key != "seconds"} for entry in history or []]
    metadata = {"format": CHECKPOINT_FORMAT + "/train-state", "step": str(step), "stage": str(stage),
                "stage_step": str(stage_step), "param_groups": json.dumps(optimizer_state["param_groups"]),
                "history": json.dumps(timeless, sort_keys=True)}
    if target.is_file():
        # Keep the state that matches the weights on disk until the new weights are written (see the module doc).
        os.replace(target, target.with_name(PREVIOUS_TRAIN_STATE_FILE))
    write_safetensors_atomic(target, tensors, metadata)
    return target


def save_stage_seconds(run_dir: Path, history: list[dict]) -> None:
    """The per-stage seconds of ``history`` for the report of a resumed run (stale by one save after a crash)."""
    write_json_atomic(Path(run_dir) / CHECKPOINT_DIRNAME / TIMES_FILE,
                      {str(entry["index"]): entry.get("seconds", 0.0) for entry in history})


def _stage_seconds(run_dir: Path) -> dict[int, float]:
    try:
        return {int(k): float(v) for k, v in
                json.loads((Path(run_dir) / CHECKPOINT_DIRNAME / TIMES_FILE).read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}  # times are informative only: a missing or damaged file restarts them at 0


def commit_train_state(run_dir: Path) -> None:
    """After the weights are written: the previous train state no longer matches anything."""
    (Path(run_dir) / CHECKPOINT_DIRNAME / PREVIOUS_TRAIN_STATE_FILE).unlink(missing_ok=True)


def _train_state_step(path: Path) -> int | None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return int((handle.metadata() or {})["step"])
    except (SafetensorError, OSError, ValueError, KeyError):
        return None


def recover_train_state(run_dir: Path, checkpoint_step: int) -> None:
    """Put the train state matching the weights at ``checkpoint_step`` in place after a run killed while saving
    (call under the run lock): the current one if it matches, else the previous one."""
    folder = Path(run_dir) / CHECKPOINT_DIRNAME
    current, previous = folder / TRAIN_STATE_FILE, folder / PREVIOUS_TRAIN_STATE_FILE
    if previous.is_file() and _train_state_step(current) != checkpoint_step \
            and _train_state_step(previous) == checkpoint_step:
        os.replace(previous, current)
    previous.unlink(missing_ok=True)


def read_train_state(run_dir: Path) -> TrainState:
    path = Path(run_dir) / CHECKPOINT_DIRNAME / TRAIN_STATE_FILE
    if not path.is_file():
        raise UserError(f"cannot resume: {path} (the optimizer state) is missing, so the run cannot continue "
                        f"where it stopped; use the checkpoint as it is (`lowbit-deploy export`), or train into a "
                        f"new --out")
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
    optional = {key: int(metadata[key]) if key in metadata else None for key in ("stage", "stage_step")}
    seconds = _stage_seconds(run_dir)
    history = [{**entry, "seconds": seconds.get(entry["index"], 0.0)}
               for entry in json.loads(metadata.get("history", "[]"))]
    return TrainState(int(metadata["step"]), optional["stage"], optional["stage_step"],
                      {"state": state, "param_groups": json.loads(metadata["param_groups"])},
                      tensors["generator_state"], history)


def restore_optimizer(optimizer: torch.optim.Optimizer, state: TrainState, run_dir: Path) -> None:
    try:
        optimizer.load_state_dict(state.optimizer_state)
    except (ValueError, KeyError) as error:
        raise UserError(f"cannot resume {run_dir}: its optimizer state does not fit this trainer ({error}); it was "
                        f"written by another lowbit-deploy version. Train into a new --out") from None


def check_same_step(checkpoint_step: int, train_state_step: int, run_dir: Path) -> None:
    """The two files are written one after the other; a run killed in between leaves them at different steps."""
    if checkpoint_step != train_state_step:
        raise UserError(f"cannot resume {run_dir}: the checkpoint is at step {checkpoint_step} but the optimizer "
                        f"state at step {train_state_step} (the run was interrupted while saving). Resuming would "
                        f"repeat steps on updated weights; start a new --out, or use the checkpoint as it is")
