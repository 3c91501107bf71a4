"""Training-loop callbacks: checkpoints every ``checkpoint_every`` steps, the progress bar, the loss history.

A callback subclasses :class:`TrainCallback` and overrides the events it needs; the loop calls them in list order
(the history before the checkpoint, so a checkpoint's train state includes the step it was written at). Feature
hooks plug in the same way. Under torchrun only rank 0 writes files (:class:`CheckpointCallback`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..progress import show_progress
from .checkpoint import (
    CHECKPOINT_DIRNAME,
    WEIGHTS_FILE,
    commit_train_state,
    save_checkpoint,
    save_stage_seconds,
    save_train_state,
)
from .objectives import StepLosses

if TYPE_CHECKING:
    from .loop import TrainingRun
    from .stages import StagePlan


class TrainCallback:
    """No-op hooks; ``run.stage`` is the current stage and ``run.step`` the global steps done."""

    def on_train_begin(self, run: "TrainingRun") -> None: ...

    def on_stage_begin(self, run: "TrainingRun") -> None: ...

    def on_step_end(self, run: "TrainingRun", losses: StepLosses) -> None: ...

    def on_stage_end(self, run: "TrainingRun") -> None: ...

    def on_train_end(self, run: "TrainingRun") -> None: ...


def _first_last(entry: dict, name: str, value: float | None) -> None:
    if entry.get(f"first_{name}") is None:
        entry[f"first_{name}"] = value
    entry[f"last_{name}"] = value


class LossHistory(TrainCallback):
    """Every step's losses, and per stage: steps done, seconds, first/last total, prediction and feature loss.

    ``previous`` (the history saved with the train state) carries the summaries of a run being resumed, so the
    report of a resumed run still covers the whole stage.
    """

    def __init__(self, plan: "StagePlan", previous: list[dict] | None = None) -> None:
        saved = {entry["index"]: entry for entry in previous or []}
        self.entries = [dict(saved.get(stage.index) or self._entry(stage)) for stage in plan.stages]
        self.losses: list[StepLosses] = []
        self._stage_started: float | None = None

    @staticmethod
    def _entry(stage) -> dict:
        return {"index": stage.index, "stage": stage.label, "kind": stage.kind.value, "steps": stage.steps,
                "lr": stage.lr, "lr_schedule": stage.lr_schedule.value, "loss": stage.loss,
                "feature_weight": stage.feature_weight,
                "timestep_sampling": stage.timestep_sampling.value, "steps_done": 0, "seconds": 0.0}

    def on_stage_begin(self, run: "TrainingRun") -> None:
        self._stage_started = time.perf_counter()

    def on_step_end(self, run: "TrainingRun", losses: StepLosses) -> None:
        self.losses.append(losses)
        entry = self.entries[run.stage.index]
        entry["steps_done"] += 1
        _first_last(entry, "loss", losses.total)
        _first_last(entry, "prediction_loss", losses.prediction)
        if losses.feature is not None:
            _first_last(entry, "feature_loss", losses.feature)

    def on_stage_end(self, run: "TrainingRun") -> None:
        self.entries[run.stage.index]["seconds"] += time.perf_counter() - self._stage_started
        self._stage_started = None

    def summary(self, run: "TrainingRun | None" = None) -> list[dict]:
        """Per-stage summaries; with ``run``, the stage in progress includes its time so far."""
        entries = [dict(entry) for entry in self.entries]
        if run is not None and run.stage is not None and self._stage_started is not None:
            entries[run.stage.index]["seconds"] += time.perf_counter() - self._stage_started
        return entries


class CheckpointCallback(TrainCallback):
    """Writes the checkpoint and the train state every ``every`` global steps and at the end (atomically)."""

    def __init__(self, run_dir: Path, recipe, model_source: str | None, plan, signature, every: int,
                 history: LossHistory, saved_step: int | None = None) -> None:
        self.run_dir, self.recipe, self.model_source = Path(run_dir), recipe, model_source
        self.quant_plan, self.signature, self.every, self.history = plan, signature, every, history
        self.checkpoint: Path | None = None
        self.saved_step = saved_step  # the step of the checkpoint on disk (a resumed run's)

    def on_step_end(self, run: "TrainingRun", losses: StepLosses) -> None:
        if run.step % self.every == 0 and run.step < run.plan.end_step:
            self.save(run)

    def on_train_end(self, run: "TrainingRun") -> None:
        run.student.eval()
        if run.step == self.saved_step:
            # Resumed at its end (a run stopped after its last save): the files are complete; rewriting them
            # without the optimizer state that no step rebuilt would lose it.
            self.checkpoint = self.run_dir / CHECKPOINT_DIRNAME / WEIGHTS_FILE
            return
        self.checkpoint = self.save(run)

    def save(self, run: "TrainingRun") -> Path:
        # Under torchrun every rank holds the same weights and optimizer state: rank 0 writes, the others wait
        # until the files are complete (a rank that went on could be resumed from a checkpoint it never saw).
        if run.distributed.writes:
            stage, stage_step = run.position
            # Train state first, weights last: the weights file commits the pair (see qat/checkpoint.py).
            history = self.history.summary(run)
            save_train_state(self.run_dir, run.optimizer, run.step, run.generator, stage=stage,
                             stage_step=stage_step, history=history)
            save_checkpoint(self.run_dir, run.student, self.recipe, self.model_source, run.step, self.quant_plan,
                            self.signature)
            commit_train_state(self.run_dir)
            save_stage_seconds(self.run_dir, history)
        run.distributed.barrier()
        self.saved_step = run.step
        return self.run_dir / CHECKPOINT_DIRNAME / WEIGHTS_FILE


class ProgressBar(TrainCallback):
    def __init__(self, enabled: bool | None) -> None:  # None: only on a terminal (progress.show_progress)
        self.enabled, self.bar = enabled, None

    def on_train_begin(self, run: "TrainingRun") -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=run.plan.end_step, initial=min(run.step, run.plan.end_step), desc="QAT",
                        disable=not show_progress(self.enabled))

    def on_stage_begin(self, run: "TrainingRun") -> None:
        self.bar.set_description(f"QAT {run.stage.label}")

    def on_step_end(self, run: "TrainingRun", losses: StepLosses) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{losses.total:.5f}")

    def on_train_end(self, run: "TrainingRun") -> None:
        self.bar.close()
