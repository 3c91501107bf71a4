"""Multi-process QAT (lowbit_deploy.qat.distributed): torchrun's environment, the global batch split between ranks,
rank 0 as the only writer, and 2 gloo processes on the CPU matching one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lowbit_deploy.errors import UserError
from lowbit_deploy.qat.callbacks import CheckpointCallback
from lowbit_deploy.qat.checkpoint import CHECKPOINT_DIRNAME, TRAIN_STATE_FILE, WEIGHTS_FILE
from lowbit_deploy.qat.distributed import Distributed, Launch, check_global_batch, launch_from_environment
from lowbit_deploy.qat.objectives import NoisedBatch
from lowbit_deploy.qat.trainer import train
from lowbit_deploy.recipes import parse_recipe

ENTRY = Path(__file__).with_name("ddp_entry.py")
LR, STEPS, GLOBAL_BATCH = 1e-3, 4, 4


@pytest.mark.parametrize("environ, expected", [
    ({}, Launch()),
    ({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}, Launch()),
    ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}, Launch(3, 4, 1)),
])
def test_torchrun_environment(environ, expected):
    assert launch_from_environment(environ) == expected


@pytest.mark.parametrize("environ, message", [({"WORLD_SIZE": "two"}, "integers"),
                                              ({"WORLD_SIZE": "2", "RANK": "2"}, "outside")])
def test_a_broken_environment_is_refused(environ, message):
    with pytest.raises(UserError, match=message):
        launch_from_environment(environ)


def test_a_global_batch_that_does_not_split_is_refused_with_a_fix():
    check_global_batch(6, Launch(0, 3, 0))
    with pytest.raises(UserError, match="batch_size 6 .* 4 processes; use a multiple of 4 \\(e.g. 4\\)"):
        check_global_batch(6, Launch(0, 4, 0))


@dataclass
class _Trajectory:  # the shape of a trajectory stage's inputs, with added conditions (SDXL) as a dict
    latents: list
    timesteps: list
    conditions: torch.Tensor
    added: dict


def test_each_rank_takes_its_contiguous_slice_of_every_batch_tensor():
    batch = torch.arange(6.0)
    inputs = NoisedBatch(batch, batch + 10, batch + 20, torch.arange(6), torch.zeros(6, 3), torch.zeros(6) > 0)
    for rank, expected in enumerate(([0.0, 1.0], [2.0, 3.0], [4.0, 5.0])):
        part = Distributed(Launch(rank, 3, rank)).shard(inputs, 6)
        assert part.x0.tolist() == expected and part.noise.tolist() == [v + 10 for v in expected]
        assert part.timesteps.tolist() == [int(v) for v in expected] and part.conditions.shape == (2, 3)
    nested = _Trajectory([torch.arange(6.0), torch.arange(6.0)], [951, 1], torch.zeros(6, 5, 2),
                         {"time_ids": torch.arange(12.0).reshape(6, 2), "scale": torch.tensor(2.0)})
    part = Distributed(Launch(1, 2, 1)).shard(nested, 6)
    assert [t.tolist() for t in part.latents] == [[3.0, 4.0, 5.0]] * 2 and part.timesteps == [951, 1]
    assert part.conditions.shape == (3, 5, 2) and part.added["time_ids"].tolist() == [[6, 7], [8, 9], [10, 11]]
    assert part.added["scale"].item() == 2.0
    assert Distributed().shard(inputs, 6) is inputs  # one process: untouched


@pytest.mark.parametrize("rank, writes", [(0, True), (1, False)])
def test_only_rank_0_writes_and_every_rank_waits_for_the_files(tmp_path, monkeypatch, tiny_recipe_dict, rank,
                                                               writes):
    from types import SimpleNamespace

    barriers = []
    distributed = Distributed(Launch(rank, 2, rank))
    monkeypatch.setattr(distributed, "barrier", lambda: barriers.append(rank))
    saved = []
    monkeypatch.setattr("lowbit_deploy.qat.callbacks.save_train_state", lambda *args, **kw: saved.append("state"))
    monkeypatch.setattr("lowbit_deploy.qat.callbacks.save_checkpoint", lambda *args, **kw: saved.append("weights"))
    monkeypatch.setattr("lowbit_deploy.qat.callbacks.commit_train_state", lambda *args: saved.append("commit"))
    monkeypatch.setattr("lowbit_deploy.qat.callbacks.save_stage_seconds", lambda *args: saved.append("seconds"))
    history = SimpleNamespace(summary=lambda run: [])
    callback = CheckpointCallback(tmp_path, parse_recipe(tiny_recipe_dict), None, None, None, 1, history)
    run = SimpleNamespace(distributed=distributed, position=(0, 1), optimizer=None, step=1, generator=None,
                          student=None)
    path = callback.save(run)
    assert saved == (["state", "weights", "commit", "seconds"] if writes else [])
    assert barriers == [rank] and callback.saved_step == 1 and path == tmp_path / CHECKPOINT_DIRNAME / WEIGHTS_FILE


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """2 processes on the CPU (gloo), each a fresh interpreter started by torchrun (never forked from pytest)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ENTRY),
               "train", *args, "--device", "cpu", "--no-progress"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _tensors(run_dir: Path) -> tuple[dict, dict]:
    folder = run_dir / CHECKPOINT_DIRNAME
    return load_file(str(folder / WEIGHTS_FILE)), load_file(str(folder / TRAIN_STATE_FILE))


def _max_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max((first[k].double() - second[k].double()).abs().max().item() for k in first if first[k].numel())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process with the global batch of 4, and 2 gloo processes with 2 each stopped after 2 of 4 steps (a
    checkpoint) and resumed to the end -- the same recipe, seed and data."""
    from tinymodels import TINY_RECIPE, make_tiny_unet

    folder = tmp_path_factory.mktemp("ddp")
    make_tiny_unet().save_pretrained(folder / "model" / "unet")
    recipe = {**TINY_RECIPE, "train": {**TINY_RECIPE["train"], "steps": STEPS, "batch_size": GLOBAL_BATCH,
                                       "checkpoint_every": 2, "lr": LR}}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process (OMP_NUM_THREADS=1)
    try:
        train(parse_recipe(recipe), folder / "single", model_path=str(folder / "model"), progress=False,
              device="cpu")
    finally:
        torch.set_num_threads(threads)
    common = ("recipe.yaml", "--model", "model")
    _torchrun(*common, "--out", "ddp", "--steps", "2", cwd=folder)
    stopped = _tensors(folder / "ddp")
    resumed = _torchrun(*common, "--out", "ddp", "--resume", cwd=folder)
    return folder, stopped, resumed


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(runs):
    folder, _, _ = runs
    (single_weights, single_state), (ddp_weights, ddp_state) = _tensors(folder / "single"), _tensors(folder / "ddp")
    # Not bit-identical: one process takes the mean over 4 samples in one reduction and runs a batch-4 forward;
    # 2 ranks each take the mean over their 2 samples (other BLAS blocking at batch 2) and all-reduce the sums of
    # the gradients. The float32 rounding then differs in the last bits, and Adam, which divides each gradient by
    # its own running magnitude, turns a near-zero gradient's rounding noise into up to a whole step of size lr.
    # Measured (2-core CPU, torch 2.13): max |difference| 1.2e-5 = 1.2% of one step (lr 1e-3) over 4 steps, no
    # quantized code different. The tolerance is 10% of one step (8x margin); ranks that skip the gradient
    # averaging differ by 7.8e-3 (~2 * lr * steps) with 2787 of 57424 codes flipped, ~80x above it.
    assert _max_difference(single_weights, ddp_weights) <= 0.1 * LR
    assert _max_difference(single_state, ddp_state) <= 0.1 * LR
    report = json.loads((folder / "ddp" / "report.json").read_text())["train"]
    assert report["processes"] == 2 and report["steps"] == STEPS and report["device"] == "cpu"
    assert report["teacher_dtype"] == "float32"  # the auto setting on the CPU, named as the recipe names it


@pytest.mark.slow
def test_a_ddp_run_resumes_where_it_stopped(runs):
    folder, stopped, resumed = runs
    assert stopped[0].keys() == _tensors(folder / "ddp")[0].keys()
    assert _max_difference(stopped[0], _tensors(folder / "ddp")[0]) > 0.5 * LR  # the resumed run trained on
    assert resumed.stdout.count("checkpoint:") == 2  # both ranks finished (the CLI prints once per process)
    leftovers = [p.name for p in (folder / "ddp" / CHECKPOINT_DIRNAME).iterdir() if p.name.startswith(".")]
    assert not leftovers


@pytest.mark.slow
def test_an_efficientdm_trajectory_run_matches_one_process(tmp_path, tiny_model_dir, tiny_efficientdm_recipe_dict):
    """Calibration broadcast from rank 0, LoRA, per-step activation scales, and the teacher's trajectory (drawn for
    the global batch of 2 on each rank, the student's step split 1 + 1). Measured: max |difference| 1.0e-6 (an
    activation scale) at lr 1e-3, no code different; same tolerance and reason as above."""
    recipe = tiny_efficientdm_recipe_dict
    recipe["train"].update(stages=[{"kind": "trajectory", "steps": 4}], checkpoint_every=2)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    # One thread, as each torchrun process (OMP_NUM_THREADS=1): the conftest's autouse fixture sets it here.
    train(parse_recipe(recipe), tmp_path / "single", model_path=str(tiny_model_dir), progress=False, device="cpu")
    _torchrun("recipe.yaml", "--model", str(tiny_model_dir), "--out", "ddp", cwd=tmp_path)
    (single_weights, single_state), (ddp_weights, ddp_state) = _tensors(tmp_path / "single"), _tensors(tmp_path / "ddp")
    assert _max_difference(single_weights, ddp_weights) <= 0.1 * recipe["train"]["lr"]
    assert _max_difference(single_state, ddp_state) <= 0.1 * recipe["train"]["lr"]


@pytest.mark.parametrize("command", [["run", "recipe.yaml", "--out", "run"], ["export", "run"], ["validate", "run"]])
def test_commands_other_than_train_refuse_to_run_under_torchrun(tmp_path, command):
    from click.testing import CliRunner

    from lowbit_deploy.cli import main

    runner = CliRunner()
    with runner.isolated_filesystem(temp_dir=tmp_path) as folder:
        result = runner.invoke(main, command, env={"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
        assert result.exit_code == 2, result.output
        assert f"`lowbit-deploy {command[0]}` runs in one process" in result.output
        assert "only `train` runs under torchrun" in result.output and not any(Path(folder).iterdir())
