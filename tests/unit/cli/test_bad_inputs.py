"""Every bad input is a clean failure: exit status 2, one message naming the problem and the fix, no traceback, and
nothing in the touched directories changed (file tree, sizes and modification times before == after).

Cases that need a trained run share one module-scoped tiny run (trained and exported once), plus a second run with
another deployed signature whose model.onnx plays the foreign file. Shared runs are only read; a case that must
alter a run copies it first.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml
from click.testing import CliRunner
from tinymodels import TINY_RECIPE, make_tiny_unet

from lowbit_deploy.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@dataclass
class Shared:
    root: Path
    model: Path           # a tiny diffusers folder (unet/ subfolder)
    recipe: Path          # TINY_RECIPE as YAML
    run: Path             # trained + exported with `recipe` on `model`
    foreign_run: Path     # another signature (cached time features -> step_index)


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Shared:
    from lowbit_deploy.export.onnx_export import export_run
    from lowbit_deploy.qat.trainer import train
    from lowbit_deploy.recipes import parse_recipe

    root = tmp_path_factory.mktemp("bad-inputs")
    make_tiny_unet().save_pretrained(root / "model" / "unet")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    cached = copy.deepcopy(TINY_RECIPE)
    cached["schedule"] = {"num_steps": 3}
    cached["quantize"]["layers"][2:4] = [{"pattern": "time_embedding.*", "cache": True},
                                         {"pattern": "*.time_emb_proj", "cache": True}]
    cached["validate"]["sampling"].pop("num_steps")
    for data, name in ((TINY_RECIPE, "run"), (cached, "foreign")):
        train(parse_recipe(data), root / name, model_path=str(root / "model"), steps=1, progress=False)
        export_run(root / name)
    return Shared(root, root / "model", recipe, root / "run", root / "foreign")


@dataclass
class Case:
    """``setup(tmp, shared)`` prepares inputs under ``tmp`` and returns the command line; ``expect`` are regexes
    the output must match (the problem and the fix)."""

    id: str
    setup: Callable[[Path, Shared], list[str]]
    expect: tuple[str, ...]


def _recipe(tmp: Path, data, name="recipe.yaml") -> str:
    path = tmp / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def _edited(edit: Callable[[dict], None]) -> dict:
    data = copy.deepcopy(TINY_RECIPE)
    edit(data)
    return data


def _train(tmp, shared, recipe=None, out=None, *extra) -> list[str]:
    return ["train", recipe or str(shared.recipe), "--out", str(out or tmp / "run"), "--model", str(shared.model),
            "--no-progress", *extra]


def _model(tmp: Path, edit: Callable[[Path], None]) -> str:
    """A copy of a tiny diffusers folder changed by ``edit(unet_folder)``."""
    folder = tmp / "model"
    make_tiny_unet().save_pretrained(folder / "unet")
    edit(folder / "unet")
    return str(folder)


def _run_copy(tmp: Path, shared: Shared, edit: Callable[[Path], None]) -> str:
    run = tmp / "run"
    shutil.copytree(shared.run, run)
    edit(run)
    return str(run)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _mismatched_config(unet: Path) -> None:
    config = json.loads((unet / "config.json").read_text())
    config["block_out_channels"] = [8, 24]
    (unet / "config.json").write_text(json.dumps(config))


CASES = [
    # ---- the recipe ------------------------------------------------------------------------------------------
    Case("recipe-missing", lambda t, s: _train(t, s, str(t / "nope.yaml")),
         (r"recipe .*nope\.yaml does not exist", r"pass a YAML file")),
    Case("recipe-is-a-folder", lambda t, s: _train(t, s, str(t)), (r"is a directory",)),
    Case("recipe-invalid-yaml", lambda t, s: _train(t, s, _recipe(t, "version: [1\n")), (r"is not valid YAML",)),
    Case("recipe-not-a-mapping", lambda t, s: _train(t, s, _recipe(t, "- 1\n- 2\n")),
         (r"must be a YAML mapping with keys version, name",)),
    Case("recipe-unknown-top-level-key", lambda t, s: _train(t, s, _recipe(t, _edited(lambda d: d.update(tain=1)))),
         (r"tain: unknown key", r"remove it or fix its spelling")),
    Case("recipe-unknown-key-in-rule-numbered-from-1",
         lambda t, s: _train(t, s, _recipe(t, _edited(lambda d: d["quantize"]["layers"][0].update(bitz=3)))),
         (r"quantize\.layers \(rule 1\)\.bitz: unknown key", r"remove it or fix its spelling")),
    Case("recipe-bits-out-of-range",
         lambda t, s: _train(t, s, _recipe(t, _edited(lambda d: d["quantize"]["layers"][4].update(bits=9)))),
         (r"quantize\.layers \(rule 5\)\.bits: Input should be less than or equal to 8",)),
    Case("recipe-activation-bits-out-of-range",
         lambda t, s: _train(t, s, _recipe(t, _edited(lambda d: d["quantize"]["layers"][4].update(act_bits=9)))),
         (r"quantize\.layers \(rule 5\)\.act_bits: Input should be less than or equal to 8",)),
    Case("recipe-activation-bits-on-a-float-rule",
         lambda t, s: _train(t, s, _recipe(t, _edited(lambda d: d["quantize"]["layers"][2].update(act_bits=8)))),
         (r"\(rule 3\)", r"`act_bits` quantizes the input of a quantized layer; give `bits` too, or drop `act_bits`")),
    Case("recipe-lora-rank-larger-than-a-layer",
         lambda t, s: _train(t, s, _recipe(t, _edited(lambda d: d["train"].update(lora={"rank": 64})))),
         (r"train\.lora\.rank 64 is larger than layer .* allows \(at most \d+",
          r"Lower train\.lora\.rank to <= \d+ or add them to train\.lora\.exclude")),
    Case("recipe-guidance-on-a-distill-stage",
         lambda t, s: _train(t, s, _recipe(t, _edited(lambda d: d.update(train={"stages": [
             {"kind": "distill", "steps": 1, "guidance_scale": 3.0}]})))),
         (r"guidance_scale applies to `trajectory` stages only; remove it from this stage",)),
    Case("recipe-version-2", lambda t, s: _train(t, s, _recipe(t, _edited(lambda d: d.update(version=2)))),
         (r"set `version: 1`",)),
    Case("recipe-rule-with-bits-and-keep-float",
         lambda t, s: _train(t, s, _recipe(t, _edited(lambda d: d["quantize"]["layers"][0].update(keep_float=True)))),
         (r"\(rule 1\)", r"give exactly one of `bits`, `keep_float: true`, `cache: true`")),
    Case("recipe-matches-no-layer",
         lambda t, s: _train(t, s, _recipe(t, _edited(lambda d: d["quantize"].update(
             layers=[{"pattern": "nothing.*", "bits": 2}])))),
         (r"matched no quantizable layer",)),
    Case("recipe-stage-with-zero-steps",
         lambda t, s: _train(t, s, _recipe(t, _edited(lambda d: d.update(train={"stages": [
             {"kind": "distill", "steps": 0}]})))),
         (r"train\.stages \(item 1\)\.steps: Input should be greater than or equal to 1",)),
    Case("recipe-plan-file-missing",
         lambda t, s: _train(t, s, _recipe(t, _edited(lambda d: d.update(quantize={"plan": "missing-plan.json"})))),
         (r"quantization plan .*missing-plan\.json does not exist", r"lowbit-deploy analyze")),
    Case("recipe-subfolder-missing",
         lambda t, s: _train(t, s, _recipe(t, _edited(lambda d: d.update(model={"subfolder": "transformer"})))),
         (r"subfolder 'transformer' \(recipe key model\.subfolder\) does not exist", r"set it to one of: unet")),
    # ---- --out -----------------------------------------------------------------------------------------------
    Case("train-out-below-a-file", lambda t, s: (_write(t / "file", b"x"), _train(t, s, out=t / "file" / "run"))[1],
         (r"cannot create --out .*: .*file is a file, not a folder", r"choose an --out whose parent folders")),
    Case("train-out-is-a-file", lambda t, s: (_write(t / "file", b"x"), _train(t, s, out=t / "file"))[1],
         (r"is a file",)),
    Case("train-out-not-writable", lambda t, s: _train(t, s, out=Path("/sys/lowbit-deploy-run")),
         (r"cannot write --out /sys/lowbit-deploy-run: .*is not writable", r"choose a writable location")),
    Case("train-out-holds-a-checkpoint", lambda t, s: _train(t, s, out=s.run),
         (r"already holds a checkpoint", r"pass --resume to continue it, or choose a new --out")),
    Case("train-resume-without-checkpoint", lambda t, s: _train(t, s, None, t / "empty", "--resume"),
         (r"no quantized checkpoint at .*empty to resume", r"start without --resume")),
    Case("train-resume-with-another-recipe",
         lambda t, s: _train(t, s, _recipe(t, _edited(lambda d: d["quantize"]["layers"][4].update(bits=3))), s.run,
                             "--resume"),
         (r"recipe's quantize/train sections differ", r"resume with the recipe it was started with")),
    Case("train-resume-with-another-model",
         lambda t, s: _train(t, s, None, s.run, "--resume")[:4] + ["--model", _model(t, lambda u: None),
                                                                    "--resume"],
         (r"it distils .* not ", r"drop --model or pass the same folder")),
    Case("train-negative-steps", lambda t, s: _train(t, s, None, None, "--steps", "-1"),
         (r"Invalid value for '--steps'",)),
    Case("train-device-unsupported", lambda t, s: _train(t, s, None, None, "--device", "mps"),
         (r"--device 'mps': training runs on cpu or cuda devices", r"use cpu, cuda or cuda:N")),
    *([Case("train-device-cuda-without-a-gpu", lambda t, s: _train(t, s, None, None, "--device", "cuda"),
            (r"--device cuda: no CUDA device is available", r"use --device cpu"))]
      if not _cuda_available() else []),
    Case("run-out-below-a-file",
         lambda t, s: (_write(t / "file", b"x"), ["run", str(s.recipe), "--out", str(t / "file" / "run"),
                                                  "--no-build"])[1],
         (r"file is a file, not a folder", r"choose an --out")),
    Case("run-out-not-writable", lambda t, s: ["run", str(s.recipe), "--out", "/sys/lowbit-deploy-run", "--no-build"],
         (r"is not writable", r"choose a writable location")),
    Case("run-into-an-existing-run", lambda t, s: ["run", str(s.recipe), "--out", str(s.run), "--no-build"],
         (r"already holds a run", r"pass --resume to continue it from its last complete stage")),
    Case("run-resume-with-another-recipe",
         lambda t, s: ["run", _recipe(t, _edited(lambda d: d["quantize"]["layers"][4].update(bits=3))), "--out",
                       str(s.run), "--no-build", "--resume"],
         (r"differ", r"resume with the recipe it was started with")),
    Case("run-model-missing-into-a-new-folder",
         lambda t, s: ["run", str(s.recipe), "--out", str(t / "new" / "run"), "--no-build", "--model",
                       str(t / "no-model")],
         (r"model folder .*no-model does not exist", r"pass a local diffusers checkpoint folder")),
    # ---- --model ---------------------------------------------------------------------------------------------
    Case("model-missing", lambda t, s: _train(t, s)[:4] + ["--model", str(t / "no-model")],
         (r"model folder .*no-model does not exist", r"pass a local diffusers checkpoint folder")),
    Case("model-is-a-file", lambda t, s: (_write(t / "w.safetensors", b"x"),
                                          _train(t, s)[:4] + ["--model", str(t / "w.safetensors")])[1],
         (r"is a file; pass the checkpoint folder",)),
    Case("model-folder-without-config", lambda t, s: (os.mkdir(t / "empty-model"),
                                                      _train(t, s)[:4] + ["--model", str(t / "empty-model")])[1],
         (r"has no config\.json", r"`model\.subfolder: NAME` in the recipe")),
    Case("model-unet-config-missing",
         lambda t, s: _train(t, s)[:4] + ["--model", _model(t, lambda u: (u / "config.json").unlink())],
         (r"model/unet has no config\.json", r"model\.subfolder", r"save_pretrained")),
    Case("model-config-and-weights-mismatch",
         lambda t, s: _train(t, s)[:4] + ["--model", _model(t, _mismatched_config)],
         (r"do not fit its config\.json: \d+ tensors have other shapes",
          r"put the config\.json saved with these weights next to them")),
    Case("model-pickle-weights",
         lambda t, s: _train(t, s)[:4] + ["--model", _model(t, lambda u: (
             (u / "diffusion_pytorch_model.safetensors").rename(u / "diffusion_pytorch_model.bin")))],
         (r"holds only pickle weights", r"safetensors only", r"convert it once")),
    Case("model-corrupt-weights",
         lambda t, s: _train(t, s)[:4] + ["--model", _model(t, lambda u: (
             u / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage"))],
         (r"corrupt or truncated", r"re-download or re-export")),
    Case("model-no-weights",
         lambda t, s: _train(t, s)[:4] + ["--model", _model(t, lambda u: (
             u / "diffusion_pytorch_model.safetensors").unlink())],
         (r"has no weights", r"copy the weights there or re-save")),
    Case("model-is-a-vae",
         lambda t, s: _train(t, s)[:4] + ["--model", _model(t, lambda u: (u / "config.json").write_text(
             '{"_class_name": "AutoencoderKL"}'))],
         (r"describes a AutoencoderKL", r"pass such a folder")),
    Case("model-config-not-json",
         lambda t, s: _train(t, s)[:4] + ["--model", _model(t, lambda u: (u / "config.json").write_text("{"))],
         (r"is not readable JSON", r"re-export the checkpoint")),
    # ---- export / build / validate on a run directory --------------------------------------------------------
    Case("export-missing-run-dir", lambda t, s: ["export", str(t / "nothing")],
         (r"run directory .*nothing does not exist", r"run `lowbit-deploy train")),
    Case("export-run-dir-is-a-file", lambda t, s: (_write(t / "file", b"x"), ["export", str(t / "file")])[1],
         (r"is a file",)),
    Case("export-without-checkpoint", lambda t, s: (os.mkdir(t / "run"), ["export", str(t / "run")])[1],
         (r"no quantized checkpoint at", r"run `lowbit-deploy train RECIPE --out RUN_DIR` first")),
    Case("export-corrupt-checkpoint",
         lambda t, s: (_write(t / "run/checkpoint/quantized_unet.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"),
                       ["export", str(t / "run")])[1],
         (r"not a (readable safetensors file|lowbit-deploy quantized checkpoint)",)),
    Case("export-pickle-checkpoint",
         lambda t, s: (_write(t / "run/quantized_unet.pt", b"\x80\x04."), ["export", str(t / "run")])[1],
         (r"holds only pickle checkpoints", r"safetensors only")),
    Case("export-foreign-safetensors",
         lambda t, s: (_write(t / "run/checkpoint/quantized_unet.safetensors",
                              (s.model / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()),
                       ["export", str(t / "run")])[1],
         (r"not a lowbit-deploy quantized checkpoint of this version",)),
    Case("build-without-onnx", lambda t, s: ["build", _run_copy(t, s, lambda r: (r / "model.onnx").unlink())],
         (r"no ONNX model at .*model\.onnx", r"run `lowbit-deploy export")),
    Case("build-foreign-onnx",
         lambda t, s: ["build", _run_copy(t, s, lambda r: shutil.copy(s.foreign_run / "model.onnx", r / "model.onnx"))],
         (r"model\.onnx was exported from another model: its signature differs", r"time_input",
          r"run `lowbit-deploy export .*` to export this run's checkpoint again")),
    Case("validate-foreign-onnx",
         lambda t, s: ["validate", _run_copy(t, s, lambda r: shutil.copy(s.foreign_run / "model.onnx",
                                                                          r / "model.onnx"))],
         (r"exported from another model",)),
    Case("build-unreadable-onnx",
         lambda t, s: ["build", _run_copy(t, s, lambda r: (r / "model.onnx").write_bytes(b"not onnx"))],
         (r"is not a readable ONNX file", r"export it again")),
    Case("build-compute-capability-not-major-minor", lambda t, s: ["build", str(s.run), "--compute-capability", "89"],
         (r"compute capability '89' is not MAJOR\.MINOR, e\.g\. 8\.9",)),
    Case("build-unknown-plugin", lambda t, s: ["build", str(s.run), "--plugin", "rust"],
         (r"Invalid value for '--plugin'",)),
    Case("build-missing-run-dir", lambda t, s: ["build", str(t / "nothing")],
         (r"run directory .*nothing does not exist",)),
    Case("validate-invalid-option", lambda t, s: ["validate", str(s.run), "--sampling-steps", "0"],
         (r"num_steps",)),
]


def _snapshot(*folders: Path) -> dict[str, tuple]:
    """Every file and folder below ``folders``: kind, size and modification time."""
    state = {}
    for folder in folders:
        for path in [folder, *sorted(folder.rglob("*"))] if folder.exists() else []:
            info = path.lstat()
            state[str(path)] = ("dir",) if path.is_dir() else ("file", info.st_size, info.st_mtime_ns)
    return state


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40 and len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_a_clean_error_that_changes_nothing(case: Case, shared: Shared, tmp_path):
    if "not-writable" in case.id and (not os.path.isdir("/sys") or _sys_is_writable()):
        pytest.skip("needs /sys, a folder that refuses new entries (also to root)")
    args = case.setup(tmp_path, shared)
    before = _snapshot(tmp_path, shared.root)
    result = CliRunner().invoke(main, args)
    output = result.output
    assert result.exit_code == 2, output
    assert "Traceback" not in output and not isinstance(result.exception, (AssertionError, TypeError)), output
    assert len(re.findall(r"^error: ", output, re.M)) == 1, output  # one error line: the problem and the fix
    assert re.search(r"^FAILED \| Runtime: [\d.]+s \| Command: ", output, re.M), output  # the closing line
    for pattern in case.expect:
        assert re.search(pattern, output), (pattern, output)
    assert _snapshot(tmp_path, shared.root) == before, "the command changed files"


def _sys_is_writable() -> bool:
    try:
        (Path("/sys") / ".lowbit-deploy-probe").touch()
    except OSError:
        return False
    (Path("/sys") / ".lowbit-deploy-probe").unlink()
    return True


@pytest.mark.parametrize("command", ["export", "build", "train", "validate", "run"])
def test_a_run_directory_in_use_by_another_process_is_refused_with_its_pid(command, shared, tmp_path):
    from lowbit_deploy.run_dir import run_lock

    run = Path(_run_copy(tmp_path, shared, lambda r: None))
    args = {"export": ["export", str(run)], "build": ["build", str(run), "--plugin", "python"],
            "train": _train(tmp_path, shared, None, run, "--resume"), "validate": ["validate", str(run)],
            "run": ["run", str(shared.recipe), "--out", str(run), "--resume", "--no-build"]}[command]
    ready_read, ready_write = os.pipe()
    release_read, release_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: holds the lock until the parent closes the pipe
        try:
            os.close(release_write)
            with run_lock(run):
                os.write(ready_write, b"1")
                os.read(release_read, 1)
        finally:
            os._exit(0)
    os.close(release_read)
    try:
        assert os.read(ready_read, 1) == b"1"
        before = _snapshot(tmp_path)
        result = CliRunner().invoke(main, args)
    finally:
        os.close(release_write)
        os.waitpid(pid, 0)
    assert result.exit_code == 2, result.output
    assert re.search(rf"is in use by pid {pid} .*wait for it to finish", result.output), result.output
    assert "Traceback" not in result.output and _snapshot(tmp_path) == before
