"""A training run killed at any instant -- inside a checkpoint save included -- is recovered by one command
(``train --resume``), and the result is byte-identical to a run that was never interrupted.

Each crash runs training in a forked child that ``os._exit``s just before its N-th file-system event (a write,
which is cut in half, an fsync, a rename or an unlink): no ``finally`` block or atexit handler runs, as with SIGKILL
or a power cut after the fsyncs. N sweeps every event of the run; the fast test keeps the points inside the saves
where a wrong order would lose the run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from crash_hooks import CRASHED, EventHooks, crash_in_child

from lowbit_deploy.qat.checkpoint import (
    CHECKPOINT_DIRNAME,
    PREVIOUS_TRAIN_STATE_FILE,
    TRAIN_STATE_FILE,
    WEIGHTS_FILE,
    checkpoint_status,
)
from lowbit_deploy.qat.trainer import train
from lowbit_deploy.recipes import parse_recipe

# Recovering a run stopped in its first save starts it over, and says so.
pytestmark = pytest.mark.filterwarnings("ignore:.*incomplete first checkpoint:UserWarning")


@pytest.fixture
def crash_recipe(tiny_recipe_dict):
    tiny_recipe_dict["train"].update(steps=2, checkpoint_every=1)  # two saves: one mid-run, one at the end
    return parse_recipe(tiny_recipe_dict)


def _train(recipe, model_dir, run_dir, **kwargs):
    return train(recipe, run_dir, model_path=str(model_dir), progress=False, **kwargs)


def _checkpoint_bytes(run_dir: Path) -> dict[str, bytes]:
    folder = run_dir / CHECKPOINT_DIRNAME
    return {name: (folder / name).read_bytes() for name in (WEIGHTS_FILE, TRAIN_STATE_FILE)}


def _crash(recipe, model_dir, run_dir: Path, crash_at: int) -> int:
    """Train in a forked child stopped before event ``crash_at``; returns the child's exit status."""
    return crash_in_child(lambda: _train(recipe, model_dir, run_dir), crash_at)


@pytest.fixture
def reference(tmp_path, tiny_model_dir, crash_recipe, monkeypatch):
    """An uninterrupted run's checkpoint bytes, and the list of its file-system events."""
    with monkeypatch.context() as patched:
        hooks = EventHooks(patched)
        _train(crash_recipe, tiny_model_dir, tmp_path / "reference")
    return _checkpoint_bytes(tmp_path / "reference"), hooks.events


def _recover_and_compare(recipe, model_dir, run_dir: Path, expected: dict[str, bytes], crash_at: int) -> None:
    assert checkpoint_status(run_dir) in ("incomplete", "complete"), crash_at
    _train(recipe, model_dir, run_dir, resume=True)
    assert _checkpoint_bytes(run_dir) == expected, f"the run recovered after event {crash_at} differs"
    leftovers = [p.name for p in (run_dir / CHECKPOINT_DIRNAME).iterdir()
                 if p.name.startswith(".") or p.name == PREVIOUS_TRAIN_STATE_FILE]
    assert not leftovers, (crash_at, leftovers)


def _critical_events(events: list[tuple[str, str]]) -> list[int]:
    """1-based event numbers inside the first and second checkpoint saves where the order of writes matters."""
    def first(kind, name_part, after=0):
        return next(i for i, (k, n) in enumerate(events, 1) if i > after and k == kind and name_part in n)

    first_state = first("write", f".{TRAIN_STATE_FILE}")                 # first save: train state half-written
    first_weights = first("write", f".{WEIGHTS_FILE}", first_state)       # ... train state done, weights half
    rotate = first("rename", PREVIOUS_TRAIN_STATE_FILE, first_weights)    # second save: before the rotation
    second_state_rename = first("rename", TRAIN_STATE_FILE, rotate)       # ... previous kept, new state not placed
    second_weights_rename = first("rename", WEIGHTS_FILE, second_state_rename)  # new state, old weights
    drop_previous = first("unlink", PREVIOUS_TRAIN_STATE_FILE, second_weights_rename)  # both new, previous kept
    return [first_state, first_weights, rotate, rotate + 1, second_state_rename, second_weights_rename,
            drop_previous]


def test_a_crash_inside_a_save_is_recovered_bit_identically(tmp_path, tiny_model_dir, crash_recipe, reference):
    expected, events = reference
    for crash_at in _critical_events(events):
        run_dir = tmp_path / f"crash-{crash_at}"
        assert _crash(crash_recipe, tiny_model_dir, run_dir, crash_at) == CRASHED, crash_at
        _recover_and_compare(crash_recipe, tiny_model_dir, run_dir, expected, crash_at)


def test_a_run_stopped_during_its_first_save_restarts_without_resume(tmp_path, tiny_model_dir, crash_recipe,
                                                                      reference):
    expected, events = reference
    crash_at = _critical_events(events)[1]  # train state written, weights half-written
    run_dir = tmp_path / "crashed"
    assert _crash(crash_recipe, tiny_model_dir, run_dir, crash_at) == CRASHED
    assert checkpoint_status(run_dir) == "incomplete"
    _train(crash_recipe, tiny_model_dir, run_dir)  # the same command again
    assert _checkpoint_bytes(run_dir) == expected


@pytest.mark.slow
def test_a_crash_at_every_file_system_event_is_recovered(tmp_path, tiny_model_dir, crash_recipe, reference):
    expected, events = reference
    assert len(events) > 20  # two checkpoint saves, the plan plot, the report
    for crash_at in range(1, len(events) + 1):
        run_dir = tmp_path / f"crash-{crash_at}"
        assert _crash(crash_recipe, tiny_model_dir, run_dir, crash_at) == CRASHED, (crash_at, events[crash_at - 1])
        _recover_and_compare(crash_recipe, tiny_model_dir, run_dir, expected, crash_at)
