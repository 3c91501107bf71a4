"""Quantization-aware training: ``train()`` sets up a run (teacher, quantized student, plan, signature, stages,
resume state) and hands it to the loop.

Module map: stages.py (recipe -> resolved stages), step.py (one optimisation step), objectives.py (each stage's
loss), optimizer.py (AdamW parameter groups), loop.py (stages in order), callbacks.py (checkpoints, progress,
loss history), checkpoint.py (files), data.py (data sources), device.py (``--device``, the teacher's precision),
distributed.py (torchrun: one global batch split between processes).
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..analyze.plot import write_plan_plot
from ..errors import UserError
from ..io import remove_stale_temporaries, update_report
from ..quant.apply import apply_plan, plan_for
from ..quant.lora import attach_lora, freeze_all_but_lora_and_quantizers, trainable_fraction
from ..recipes import Recipe
from ..run_dir import check_output_dir, run_lock
from ..validate.sampling import schedule_timesteps
from .calibration import calibrate_activations
from .callbacks import CheckpointCallback, LossHistory, ProgressBar, TrainCallback
from .checkpoint import (
    CHECKPOINT_DIRNAME,
    TrainState,
    check_same_step,
    checkpoint_recipe,
    checkpoint_status,
    clear_incomplete_checkpoint,
    load_checkpoint,
    read_train_state,
    recover_train_state,
    restore_optimizer,
)
from .data import resolve_source
from .device import (
    deterministic_kernels,
    enable_gradient_checkpointing,
    place_models,
    resolve_device,
    teacher_dtype,
)
from .distributed import Distributed, check_global_batch, launch_from_environment, start
from .loop import TrainingRun, run_stages
from .stages import StagePlan, check_stage_data, resolve_stages


@dataclass
class TrainResult:
    checkpoint: str
    steps: int
    seconds: float
    first_loss: float | None
    last_loss: float | None
    average_bits: float
    quantized_layers: int
    losses: list[float] = field(default_factory=list)
    stages: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        data = asdict(self)
        data.pop("losses")
        return data


def _resolved(model_path: str | None) -> str | None:
    # Later stages load the teacher again, possibly from another working directory: keep an absolute path.
    return str(Path(model_path).expanduser().resolve()) if model_path else None


def _check_resume_matches(checkpoint, recipe: Recipe, model_path: str | None) -> None:
    # Gradient checkpointing changes memory and time, not the gradients: a resume may switch it.
    comparable = {"steps": recipe.train.steps, "gradient_checkpointing": recipe.train.gradient_checkpointing}
    if checkpoint.recipe.quantize != recipe.quantize or \
            checkpoint.recipe.train.model_copy(update=comparable) != recipe.train:
        raise UserError(f"cannot resume {checkpoint.path}: its recipe's quantize/train sections differ from "
                        f"{recipe.name!r}; resume with the recipe it was started with, or train into a new --out")
    if model_path is not None and model_path != checkpoint.model_source:
        teacher = checkpoint.model_source or "the embedded default"
        raise UserError(f"cannot resume {checkpoint.path}: it distils {teacher}, not {model_path}; drop --model or "
                        f"pass the same folder")
    recorded = checkpoint.recipe.model.variant
    if recipe.model.variant != recorded:
        fix = f"pass --variant {recorded}" if recorded else "drop --variant and model.variant"
        raise UserError(f"cannot resume {checkpoint.path}: it distils the {recorded or 'plain (no variant)'} weight "
                        f"files, not variant {recipe.model.variant}; {fix}")


def _prepare(recipe: Recipe, model_path: str | None, run_dir: Path, resume: bool, device: torch.device,
             distributed: Distributed, optimizer_steps: bool):
    from ..export.memory import check_train_memory
    from ..models import load_recipe_model

    checkpoint = None
    if resume:
        checkpoint = load_checkpoint(run_dir)
        _check_resume_matches(checkpoint, recipe, model_path)
        model_path = checkpoint.model_source
    # Before the UNet loads: a run that cannot fit in host memory is refused instead of killed part way.
    bundle = load_recipe_model(recipe, model_path, memory_check=lambda parameters: check_train_memory(
        parameters, optimizer_steps, device.type == "cpu"))
    teacher = bundle.unet.eval().requires_grad_(False)
    calibration: dict = {}
    if checkpoint is not None:
        student, plan, signature = checkpoint.unet, checkpoint.plan, checkpoint.signature
    else:
        from ..signature import deployed_signature

        student = copy.deepcopy(teacher)
        plan = plan_for(student, recipe.quantize, source=f"recipe {recipe.name}")
        signature = deployed_signature(student, bundle.condition.seq_len, plan, bundle.scheduler_config,
                                       recipe.schedule)
        apply_plan(student, plan, scale_init=recipe.quantize.scale_init,
                   iterations=recipe.quantize.scale_init_iterations, step_timesteps=signature.step_timesteps)
        if recipe.train.lora is not None:
            attach_lora(student, recipe.train.lora, generator_seed=recipe.train.seed)
    place_models(teacher, student, device, teacher_dtype(recipe.train.teacher_dtype, device))
    if checkpoint is None:
        calibration = calibrate_activations(student, teacher, bundle, recipe.schedule.num_steps,
                                            recipe.quantize.activations)
    distributed.broadcast_module(student)
    student.train().requires_grad_(True)
    if recipe.train.lora is not None:
        freeze_all_but_lora_and_quantizers(student)
    if recipe.train.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    return (bundle, teacher, student, plan, signature, model_path, checkpoint.step if checkpoint else 0,
            calibration)


def _resume_into(run: TrainingRun, state: TrainState, run_dir: Path) -> None:
    """Put ``run`` where the saved train state left it: step, generator, and the stage in progress's optimizer.

    The position comes from this invocation's stages, not the one recorded: a single-stage run stopped by
    ``--steps`` recorded the end of its shortened stage and continues inside the recipe's longer one, with its
    optimizer. (Staged recipes must match exactly, so both agree there.)
    """
    stage_index, stage_step = run.plan.position(state.step)
    run.step = state.step
    run.generator.set_state(state.generator_state)
    if stage_step > 0:
        stage = run.plan.stages[stage_index]
        run.stage, run.optimizer = stage, run.new_optimizer(stage)
        restore_optimizer(run.optimizer, state, run_dir)


def _check_run_dir(run_dir: Path, resume: bool) -> bool:
    """Refuse an unusable ``--out`` before anything is loaded; returns whether there is a checkpoint to resume.

    A run killed before its first checkpoint was complete left nothing to continue: plain ``train`` starts it over
    and so does ``--resume`` (with a warning), so one command recovers from a crash at any instant."""
    check_output_dir(run_dir)
    status = checkpoint_status(run_dir)
    if status == "complete" and not resume:
        raise UserError(f"{run_dir} already holds a checkpoint; pass --resume to continue it, or choose a new --out")
    if resume and status == "none":
        raise UserError(f"no quantized checkpoint at {run_dir} to resume (no {CHECKPOINT_DIRNAME}/ folder); start "
                        f"without --resume, or pass the --out of the run to continue")
    if resume and status == "incomplete":
        warnings.warn(f"{run_dir} holds only an incomplete first checkpoint (the run was stopped while writing it); "
                      f"training starts from step 0", stacklevel=3)
    return resume and status == "complete"


def train(recipe: Recipe, run_dir: str | Path, *, model_path: str | None = None, steps: int | None = None,
          resume: bool = False, progress: bool = True, device: str | None = None,
          callbacks: tuple[TrainCallback, ...] = ()) -> TrainResult:
    """Run QAT for ``recipe`` into ``run_dir``: the recipe's stages in order (checkpoint written atomically every
    ``checkpoint_every`` global steps and at the end).

    ``steps`` (``--steps``) replaces ``train.steps`` of a single-stage recipe and caps the total steps of a staged
    one; ``resume`` continues the checkpoint in ``run_dir`` bit-identically (also across stage boundaries).
    ``device`` (``--device``): cpu, cuda or cuda:N; None takes CUDA when available. Started by torchrun, the
    processes split each global batch (qat/distributed.py) and rank 0 writes the files.
    ``callbacks`` run after the built-in ones (loss history, checkpoints, progress bar).
    """
    config = recipe.train
    launch = launch_from_environment()
    run_device = resolve_device(device, launch.local_rank if launch.parallel else None)
    check_global_batch(config.batch_size, launch)
    stage_plan: StagePlan = resolve_stages(config, steps)
    run_dir = Path(run_dir)
    resume = _check_run_dir(run_dir, resume)
    if resume:  # the weight files the run started from, also when --variant is not repeated
        recipe = recipe.with_variant(recipe.model.variant or checkpoint_recipe(run_dir).model.variant)
    model_path = _resolved(model_path or recipe.model.path)
    if config.threads:
        torch.set_num_threads(config.threads)
    distributed = start(launch, run_device)
    try:
        with deterministic_kernels(run_device):
            return _train(recipe, run_dir, model_path, stage_plan, resume, run_device, distributed,
                          [ProgressBar(progress if distributed.writes else False), *callbacks])
    finally:
        distributed.close()


def _train(recipe: Recipe, run_dir: Path, model_path: str | None, stage_plan: StagePlan, resume: bool,
           device: torch.device, distributed: Distributed, callbacks: list[TrainCallback]) -> TrainResult:
    from diffusers import DDPMScheduler

    config = recipe.train
    torch.manual_seed(config.seed)
    bundle, teacher, student, plan, signature, model_path, checkpoint_step, calibration = _prepare(
        recipe, model_path, run_dir, resume, device, distributed, stage_plan.end_step > 0)
    check_stage_data(stage_plan, lambda source: resolve_source(source, bundle))
    run = TrainingRun(student, teacher, bundle, DDPMScheduler.from_config(bundle.scheduler_config),
                      torch.Generator().manual_seed(config.seed), stage_plan, config.batch_size, config.weight_decay,
                      schedule_timesteps=tuple(schedule_timesteps(bundle.scheduler_config,
                                                                  recipe.schedule.num_steps)),
                      seed=config.seed, lora=config.lora, distributed=distributed)
    # Rank 0 alone holds the run lock and writes; the other ranks read what it left once it says so (barriers).
    with run_lock(run_dir) if distributed.writes else contextlib.nullcontext():
        if distributed.writes:
            if checkpoint_status(run_dir) != ("complete" if resume else "none"):
                _check_run_dir(run_dir, resume)  # another process got here first: say what is there now
            clear_incomplete_checkpoint(run_dir)
            remove_stale_temporaries(run_dir / CHECKPOINT_DIRNAME)
            if resume:
                recover_train_state(run_dir, checkpoint_step)
        distributed.barrier()
        state = None
        if resume:
            state = read_train_state(run_dir)
            check_same_step(checkpoint_step, state.step, run_dir)
            _resume_into(run, state, run_dir)
        history = LossHistory(stage_plan, state.history if state else None)
        checkpoints = CheckpointCallback(run_dir, recipe, model_path, plan, signature, config.checkpoint_every,
                                         history, checkpoint_step if resume else None)
        started = time.perf_counter()
        run_stages(run, [history, checkpoints, *callbacks])
        losses = [step.total for step in history.losses]
        result = TrainResult(str(checkpoints.checkpoint), run.step, time.perf_counter() - started,
                             losses[0] if losses else None, losses[-1] if losses else None,
                             plan.average_bits(signature.num_steps), len(plan.quantized), losses, history.summary())
        if distributed.writes:
            plot = write_plan_plot(Path(run_dir) / "plan.png", plan, signature.num_steps)
            trainable, total = trainable_fraction(student)
            extra = {"conditions": bundle.condition_report, "trainable_parameters": trainable, "parameters": total,
                     "trainable_fraction": round(trainable / total, 6), "device": str(device),
                     "processes": distributed.world_size,
                     "teacher_dtype": str(next(teacher.parameters()).dtype).removeprefix("torch.")}
            if calibration:
                extra["activation_calibration"] = calibration
            update_report(run_dir, "train", {**result.summary(), "plan": plan.summary(signature.num_steps),
                                             "plan_png": str(plot), "signature": signature.to_dict(), **extra})
        distributed.barrier()
    return result
