"""``load_model``: the embedded default or any local diffusers UNet checkpoint folder, safetensors only."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..signature import encoder_states_width

UNET_CONFIG = "config.json"
SCHEDULER_CONFIG = ("scheduler", "scheduler_config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# diffusers' weight file names: NAME[.VARIANT][-00001-of-00002].safetensors (variant before the shard suffix).
_WEIGHT_FILE = re.compile(r"^(?P<base>[^.]+?)(?:\.(?P<variant>[^.]+?))?(?:-\d+-of-\d+)?\.safetensors$")
WEIGHTS_NAME = "diffusion_pytorch_model"  # the only weights file name diffusers loads a UNet from
logger = logging.getLogger(__name__)
# SD1.5's training noise, for checkpoints that ship no scheduler folder.
SD15_DDPM_CONFIG = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def default_unet_config(cross_attention_dim: int = 64) -> dict:
    """The embedded default's UNet2DConditionModel: SD-like blocks at toy size (16x16x1 digits, ~2M params)."""
    return {
        "sample_size": 16,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": (32, 64, 64),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 1,
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }


def _fix_hint(folder: Path, variant: str | None) -> str:
    option = f", variant='{variant}'" if variant else ""
    return (f"convert it once with: python -c \"from diffusers import UNet2DConditionModel as U; "
            f"U.from_pretrained('{folder}', use_safetensors=False{option}).save_pretrained('{folder}_safetensors')\" "
            f"(only for a checkpoint you trust: pickle files can run code)")


def weight_variant(path: Path) -> str | None:
    """The variant in a safetensors file's name (``fp16`` for diffusion_pytorch_model.fp16.safetensors), or None."""
    match = _WEIGHT_FILE.match(path.name)
    return match.group("variant") if match else None


def _variant_fix(variants: list[str]) -> str:
    options = " or ".join(f"`--variant {name}`" for name in variants)
    return f"pass {options} (recipe key model.variant)"


def _resolve_unet_folder(root: Path, subfolder: str | None) -> tuple[Path, str | None]:
    if not root.exists():
        raise UserError(f"model folder {root} does not exist; pass a local diffusers checkpoint folder (with "
                        f"unet/config.json, or config.json + diffusion_pytorch_model.safetensors), or leave the "
                        f"model path out to use the embedded default")
    if not root.is_dir():
        raise UserError(f"model path {root} is a file; pass the checkpoint folder that holds it (diffusers layout "
                        f"with config.json), not a single weights file")
    if subfolder is None and (root / "unet" / UNET_CONFIG).is_file():
        subfolder = "unet"
    folder = root / subfolder if subfolder else root
    if not folder.is_dir():
        raise UserError(f"subfolder {subfolder!r} (recipe key model.subfolder) does not exist in {root}; set it to "
                        f"one of: {', '.join(sorted(p.name for p in root.iterdir() if p.is_dir())) or 'none'}")
    if not (folder / UNET_CONFIG).is_file():
        if subfolder is None and (root / "unet").is_dir():
            folder = root / "unet"  # SD's layout with the UNet's config missing: name the folder that lacks it
        holding = sorted(p.parent.name for p in root.glob(f"*/{UNET_CONFIG}")
                         if p.parent != folder and any(p.parent.glob("*.safetensors")))
        hint = (f"set `model.subfolder: {holding[0]}` in the recipe (subfolders with a UNet config: "
                f"{', '.join(holding)})" if holding else
                "set `model.subfolder: NAME` in the recipe to the folder that holds the UNet's config.json")
        raise UserError(f"{folder} has no {UNET_CONFIG}, so it is not a diffusers UNet folder; copy the "
                        f"config.json saved with these weights there, {hint}, or re-save the model with "
                        f"UNet2DConditionModel.save_pretrained")
    return folder, subfolder


def _check_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / UNET_CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{folder / UNET_CONFIG} is not readable JSON ({error}); re-export the checkpoint with "
                        f"save_pretrained") from error
    class_name = config.get("_class_name", "UNet2DConditionModel")
    if class_name != "UNet2DConditionModel":
        raise UserError(f"{folder / UNET_CONFIG} describes a {class_name}; lowbit-deploy quantizes "
                        f"UNet2DConditionModel checkpoints (SD1.x/2.x, SDXL, class-conditional): pass such a folder")
    from ..signature import added_conditions_for, check_output_channels

    check_output_channels(config)  # what it cannot deploy is refused now, before the weights are read
    added_conditions_for(config)
    return config


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    """The safetensors files of ``variant`` (None: the files without a variant) in ``folder``, or a UserError that
    names the files there and the option that selects them."""
    every = sorted(folder.glob("*.safetensors"))
    found = [path for path in every if (match := _WEIGHT_FILE.match(path.name)) and match.group("base") == WEIGHTS_NAME]
    chosen = [path for path in found if weight_variant(path) == variant]
    if chosen:
        return chosen
    expected = f"{WEIGHTS_NAME}{f'.{variant}' if variant else ''}.safetensors"
    if every and not found:
        raise UserError(f"{folder} has safetensors files ({', '.join(path.name for path in every)}) but none named "
                        f"{expected}, the name diffusers loads a UNet from; rename the weights file to {expected} "
                        f"or re-save the model with UNet2DConditionModel.save_pretrained")
    variants = sorted({name for name in map(weight_variant, found) if name is not None})
    if found:
        listed = ", ".join(path.name for path in found)
        if variant is None:
            raise UserError(f"{folder} holds only variant weight files ({listed}), no {expected}; "
                            f"{_variant_fix(variants)} to load them")
        others = [name for name in variants if name != variant]
        fix = "; ".join(([f"drop --variant (and model.variant) to load the files without a variant"]
                         if any(weight_variant(path) is None for path in found) else [])
                        + ([_variant_fix(others)] if others else []))
        raise UserError(f"{folder} has no weights of variant {variant!r} (expected {expected}; found: {listed}); {fix}")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(f"{folder} holds only pickle weights ({', '.join(pickles)}); lowbit-deploy loads "
                        f"safetensors only; {_fix_hint(folder, variant)}")
    raise UserError(f"{folder} has no weights (expected {expected} next to config.json); copy the weights there or "
                    f"re-save with save_pretrained")


def _check_weights(folder: Path, variant: str | None = None) -> dict[str, tuple[int, ...]]:
    from safetensors import SafetensorError, safe_open

    safetensors_files = _weight_files(folder, variant)
    shapes: dict[str, tuple[int, ...]] = {}
    for path in safetensors_files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except (SafetensorError, OSError, ValueError) as error:
            raise UserError(f"weights file {path} is corrupt or truncated ({error}); re-download or re-export "
                            f"the checkpoint with save_pretrained(safe_serialization=True)") from error
    return shapes


def _check_shapes(folder: Path, config: dict, stored: dict[str, tuple[int, ...]]) -> None:
    """Compare the weights' shapes with the model config.json describes before loading anything.

    diffusers reports a mismatch as one line per tensor and suggests ``ignore_mismatched_sizes=True``, which would
    initialise those layers randomly -- not something to quantize. Only tensors named in both are compared: diffusers
    renames some legacy keys while loading, and missing keys are caught after it."""
    import torch
    from diffusers import UNet2DConditionModel

    try:
        with torch.device("meta"):  # shapes only: nothing is allocated, also for SD-sized configs
            expected = {name: tuple(tensor.shape)
                        for name, tensor in UNet2DConditionModel.from_config(config).state_dict().items()}
    except Exception:  # noqa: BLE001 -- a config diffusers rejects is reported by from_pretrained below
        return
    mismatched = [name for name, shape in stored.items() if name in expected and expected[name] != shape]
    if mismatched:
        first = mismatched[0]
        raise UserError(f"the weights in {folder} do not fit its {UNET_CONFIG}: {len(mismatched)} tensors have other "
                        f"shapes (e.g. {first}: {list(stored[first])} in the weights, {list(expected[first])} by the "
                        f"config), so the config belongs to another model; put the config.json saved with these "
                        f"weights next to them (UNet2DConditionModel.save_pretrained writes both)")


def _load_unet(folder: Path, root: Path, subfolder: str | None, variant: str | None = None):
    import torch
    from diffusers import UNet2DConditionModel

    try:
        # torch_dtype float32: variant files (fp16, bf16) become the fp32 model the trainer distils from.
        unet, info = UNet2DConditionModel.from_pretrained(
            str(root), subfolder=subfolder, variant=variant, torch_dtype=torch.float32, local_files_only=True,
            use_safetensors=True, output_loading_info=True,
            low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
        # diffusers' message can run to one line per tensor and name loader options the CLI cannot pass.
        summary = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot load the UNet from {folder}: {summary}; check that config.json and the "
                        f"safetensors weights belong together (re-export with save_pretrained)") from None
    # diffusers only warns about missing weights and initialises them randomly; a silently random layer would
    # then be quantized and "validated" against itself.
    problems = {kind: info.get(kind) for kind in ("missing_keys", "mismatched_keys", "unexpected_keys")}
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        listed = "; ".join(f"{kind}: {', '.join(map(str, keys[:5]))}{' ...' if len(keys) > 5 else ''}"
                           for kind, keys in problems.items())
        raise UserError(f"the weights in {folder} do not match its config.json ({listed}); check that config.json "
                        f"and the safetensors weights belong together (re-export with save_pretrained)")
    return unet.float().eval().requires_grad_(False)


def _scheduler_config(root: Path) -> dict:
    path = root.joinpath(*SCHEDULER_CONFIG)
    if not path.is_file():
        return dict(SD15_DDPM_CONFIG)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is not readable JSON ({error}); fix or delete it (a DDPM SD1.5 schedule is then "
                        f"assumed)") from error


RANDOM_CONDITIONS_FIX = ("for real conditions use a checkpoint folder with text_encoder/ and tokenizer/ (CLIP, "
                         "SD1.x/2.x layout) and name a prompts file in the recipe (conditions.prompts_file, one prompt "
                         "per line)")


def _choose_condition(root: Path, config: dict, prompts_file: str | None, variant: str | None):
    """The condition source for the model in ``root``, its classifier (default layout only) and its report entry:
    the default's prompts, the checkpoint's CLIP over the recipe's prompts, or seeded random states (warned)."""
    from .classifier import DigitClassifier
    from .conditioning import PromptConditionSource, PromptEncoder, RandomConditionSource
    from .text_conditions import SDXL_DIRS, has_text_encoder, read_prompts, sdxl_text_embeds_dim, text_conditions

    # A folder laid out like the default (prompt_encoder/ beside unet/) keeps its prompts and its judge.
    if (root / "prompt_encoder" / "config.json").is_file():
        condition = PromptConditionSource(PromptEncoder.load(root / "prompt_encoder"))
        classifier_dir = root / "classifier"
        classifier = DigitClassifier.load(classifier_dir) if (classifier_dir / "config.json").is_file() else None
        report = {"kind": "prompts", "detail": "the embedded default's digit prompts"}
        if prompts_file:
            report["warning"] = (f"conditions.prompts_file ({prompts_file}) is not used: this model is conditioned "
                                 f"on its own digit prompts")
        return condition, classifier, report
    dim = encoder_states_width(config)
    pooled_dim = sdxl_text_embeds_dim(config)  # SDXL UNets also take the prompts' pooled text_embeds
    sdxl_layout = all((root / name).is_dir() for name in SDXL_DIRS)
    if prompts_file and has_text_encoder(root) and (pooled_dim is None or sdxl_layout):
        condition, report = text_conditions(root, prompts_file, dim, variant, pooled_dim)
        return condition, None, report
    if prompts_file:
        read_prompts(prompts_file)  # a bad prompts file is bad input even where it cannot be used
        reason = (f"{root} has no {SDXL_DIRS[0]}/ and {SDXL_DIRS[1]}/ for this SDXL UNet's pooled text_embeds"
                  if has_text_encoder(root) else f"{root} has no text_encoder/ and tokenizer/")
    else:
        reason = (f"the recipe names no prompts file for {root}'s text encoder (set conditions.prompts_file)"
                  if has_text_encoder(root) else f"{root} has no text encoder")
    warning = f"random conditions (seeded N(0, 1) cross-attention states): {reason}; {RANDOM_CONDITIONS_FIX}"
    logger.warning("%s", warning)
    return RandomConditionSource(dim=dim), None, {"kind": "random", "warning": warning}


def load_model_from(path: str | os.PathLike, subfolder: str | None, variant: str | None = None,
                    prompts_file: str | None = None, memory_check: Callable[[int], object] | None = None):
    """The body of ``models.load_model`` for an explicit folder (the default is just one such folder).
    ``memory_check`` gets the stored parameter count before anything loads (a stage's memory pre-flight)."""
    from . import ModelBundle

    root = Path(path).expanduser().resolve()
    folder, subfolder = _resolve_unet_folder(root, subfolder)
    config = _check_config(folder)
    stored = _check_weights(folder, variant)
    _check_shapes(folder, config, stored)
    if memory_check is not None:
        memory_check(sum(math.prod(shape) for shape in stored.values()))
    # Conditions first: a bad prompts file fails before the UNet loads, and the text encoder is gone before it does.
    condition, classifier, report = _choose_condition(root, config, prompts_file, variant)
    unet = _load_unet(folder, root, subfolder, variant)
    return ModelBundle(unet=unet, source=str(folder), condition=condition, classifier=classifier,
                       scheduler_config=_scheduler_config(root), condition_report=report)
