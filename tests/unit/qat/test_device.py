"""Training devices (lowbit_deploy.qat.device): --device checks, the teacher's precision, the models' device
boundary, gradient checkpointing, device-independent checkpoints. CUDA runs are marked `gpu` and skip without one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lowbit_deploy.errors import UserError
from lowbit_deploy.qat.checkpoint import CHECKPOINT_DIRNAME, TRAIN_STATE_FILE, WEIGHTS_FILE, load_checkpoint
from lowbit_deploy.qat.device import attach_device_boundary, deterministic_kernels, resolve_device, teacher_dtype
from lowbit_deploy.qat.distributed import Distributed
from lowbit_deploy.qat.trainer import _prepare, train
from lowbit_deploy.recipes import parse_recipe

NO_CUDA = "no CUDA device on this machine (the CUDA training path runs where one is visible)"


def _checkpoint_tensors(run_dir):
    folder = run_dir / CHECKPOINT_DIRNAME
    return load_file(str(folder / WEIGHTS_FILE)), load_file(str(folder / TRAIN_STATE_FILE))


def _same(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("spec", ["cpu", "CPU", " cpu "])
def test_cpu_is_always_available(spec):
    assert resolve_device(spec) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_the_default_is_the_cpu_without_cuda_and_cuda_is_refused_with_the_fix():
    assert resolve_device(None) == torch.device("cpu")
    for spec in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(UserError, match="no CUDA device is available.*--device cpu"):
            resolve_device(spec)


@pytest.mark.parametrize("spec", ["banana", "mps", "meta", "cuda:x"])
def test_unknown_or_unsupported_devices_are_refused(spec):
    with pytest.raises(UserError, match="--device"):
        resolve_device(spec)


def test_cuda_indexes_and_torchrun_ranks_map_to_visible_gpus(monkeypatch):
    # The index logic alone, on a pretend machine with 2 GPUs (nothing runs on them).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(None) == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(UserError, match="only 2 CUDA device"):
        resolve_device("cuda:2")
    with pytest.raises(UserError, match="only 2 CUDA device"):
        resolve_device("cuda", local_rank=2)
    with pytest.raises(UserError, match="LOCAL_RANK"):
        resolve_device("cuda:1", local_rank=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_an_unavailable_device_is_refused_before_anything_is_written(tmp_path, tiny_model_dir, tiny_recipe_dict):
    with pytest.raises(UserError, match="no CUDA device"):
        train(parse_recipe(tiny_recipe_dict), tmp_path / "run", model_path=str(tiny_model_dir), progress=False,
              device="cuda")
    assert not (tmp_path / "run").exists()


def test_cuda_runs_use_deterministic_kernels_and_restore_the_settings():
    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
              torch.are_deterministic_algorithms_enabled())
    with deterministic_kernels(torch.device("cpu")):
        assert torch.are_deterministic_algorithms_enabled() == before[2]
    with deterministic_kernels(torch.device("cuda", 0)):  # flags only: nothing runs on a GPU here
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
            torch.are_deterministic_algorithms_enabled()) == before


@pytest.mark.parametrize("setting, device, expected", [
    ("auto", "cpu", torch.float32), ("auto", "cuda", torch.float16), ("bfloat16", "cpu", torch.bfloat16),
    ("float32", "cuda", torch.float32), ("float16", "cuda", torch.float16)])
def test_teacher_dtype(setting, device, expected):
    assert teacher_dtype(setting, torch.device(device)) == expected


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 0.0), (torch.bfloat16, 0.05)])
def test_the_boundary_takes_callers_tensors_and_hands_back_float32(tiny_unet, dtype, tolerance):
    sample, timesteps, states = torch.randn(2, 1, 8, 8), torch.tensor([10, 900]), torch.randn(2, 3, 16)
    with torch.no_grad():
        expected = tiny_unet(sample, timesteps, encoder_hidden_states=states).sample
        tiny_unet.to(dtype)
        boundary = attach_device_boundary(tiny_unet, torch.device("cpu"), dtype)
        output = tiny_unet(sample, timesteps, encoder_hidden_states=states)
        boundary.remove()
    assert output.sample.dtype == torch.float32 and type(output).__name__ == "UNet2DConditionOutput"
    assert (output.sample - expected).abs().max().item() <= tolerance * expected.abs().max().item()


def _student_gradients(recipe_dict, model_dir, tmp_path, checkpointing: bool) -> tuple[dict, int]:
    """The student's gradients of one distillation loss, and how many quantizers ran again during backward."""
    recipe_dict["train"]["gradient_checkpointing"] = checkpointing
    recipe = parse_recipe(recipe_dict)
    bundle, teacher, student, *_ = _prepare(recipe, str(model_dir), tmp_path, False, torch.device("cpu"),
                                            Distributed(), optimizer_steps=True)
    assert student.is_gradient_checkpointing == checkpointing
    generator = torch.Generator().manual_seed(0)
    size = student.config.sample_size
    shape = (2, student.config.in_channels, size, size)
    inputs = (torch.randn(shape, generator=generator), torch.tensor([951, 1]),
              torch.randn(2, 3, 16, generator=generator))
    with torch.no_grad():
        target = teacher(*inputs).sample
    calls: list[str] = []
    for name, module in student.named_modules():
        if name.endswith("_quantizer"):
            module.register_forward_hook(lambda *args, name=name: calls.append(name))
    loss = torch.nn.functional.mse_loss(student(*inputs).sample, target)
    forward_calls = len(calls)
    loss.backward()
    return ({name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None},
            len(calls) - forward_calls)


@pytest.mark.parametrize("recipe_fixture", ["tiny_recipe_dict", "tiny_efficientdm_recipe_dict"])
def test_gradient_checkpointing_gives_the_same_gradients(request, recipe_fixture, tiny_model_dir, tmp_path):
    """Weight fake-quant (BitsFusion W2) and per-step activation quantizers with LoRA (EfficientDM) survive the
    recomputation: the recomputed forward is the same float32 arithmetic, so the gradients are bit-identical."""
    recipe_dict = request.getfixturevalue(recipe_fixture)
    plain, rerun_without = _student_gradients(recipe_dict, tiny_model_dir, tmp_path / "a", False)
    recomputed, rerun_with = _student_gradients(recipe_dict, tiny_model_dir, tmp_path / "b", True)
    assert rerun_without == 0 and rerun_with > 20  # the blocks' quantizers really ran again in backward
    assert plain and plain.keys() == recomputed.keys()
    assert all(torch.equal(plain[name], recomputed[name]) for name in plain)


@pytest.mark.parametrize("overrides", [{}, {"teacher_dtype": "bfloat16", "gradient_checkpointing": True}])
def test_the_same_seed_gives_the_same_checkpoint_and_files_hold_cpu_tensors(tmp_path, tiny_model_dir,
                                                                            tiny_recipe_dict, overrides):
    tiny_recipe_dict["train"].update(overrides)
    recipe = parse_recipe(tiny_recipe_dict)
    for name in ("a", "b"):
        train(recipe, tmp_path / name, model_path=str(tiny_model_dir), progress=False, device="cpu")
    first, second = _checkpoint_tensors(tmp_path / "a"), _checkpoint_tensors(tmp_path / "b")
    assert _same(first[0], second[0]) and _same(first[1], second[1])
    assert all(t.device.type == "cpu" and t.dtype != torch.bfloat16 for t in first[0].values())


def test_a_bfloat16_teacher_changes_the_targets_not_the_student_precision(tmp_path, tiny_model_dir,
                                                                         tiny_recipe_dict):
    runs = {}
    for dtype in ("float32", "bfloat16"):
        tiny_recipe_dict["train"]["teacher_dtype"] = dtype
        train(parse_recipe(tiny_recipe_dict), tmp_path / dtype, model_path=str(tiny_model_dir), progress=False)
        runs[dtype] = _checkpoint_tensors(tmp_path / dtype)[0]
    assert not _same(runs["float32"], runs["bfloat16"])  # the targets differ, so the trained weights do
    assert {t.dtype for t in runs["bfloat16"].values()} == {t.dtype for t in runs["float32"].values()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("recipe_fixture", ["tiny_recipe_dict", "tiny_efficientdm_recipe_dict"])
def test_cuda_training_is_reproducible_resumes_and_loads_on_the_cpu(request, recipe_fixture, tmp_path,
                                                                   tiny_model_dir):
    recipe_dict = request.getfixturevalue(recipe_fixture)
    recipe_dict["train"]["checkpoint_every"] = 1
    recipe = parse_recipe(recipe_dict)
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    result = train(recipe, whole, model_path=str(tiny_model_dir), progress=False, device="cuda")
    again = tmp_path / "again"
    train(recipe, again, model_path=str(tiny_model_dir), progress=False, device="cuda")
    assert _same(_checkpoint_tensors(whole)[0], _checkpoint_tensors(again)[0])
    train(recipe, stopped, model_path=str(tiny_model_dir), progress=False, device="cuda", steps=1)
    train(recipe, stopped, model_path=str(tiny_model_dir), progress=False, device="cuda", resume=True)
    assert _same(_checkpoint_tensors(whole)[0], _checkpoint_tensors(stopped)[0])
    loaded = load_checkpoint(whole)
    assert next(loaded.unet.parameters()).device.type == "cpu" and result.steps > 0


def test_a_resume_may_switch_gradient_checkpointing_and_ends_bit_identical(tmp_path, tiny_model_dir,
                                                                          tiny_recipe_dict):
    plain = parse_recipe(tiny_recipe_dict)
    tiny_recipe_dict["train"]["gradient_checkpointing"] = True
    checkpointed = parse_recipe(tiny_recipe_dict)
    train(plain, tmp_path / "whole", model_path=str(tiny_model_dir), progress=False)
    train(plain, tmp_path / "switched", model_path=str(tiny_model_dir), progress=False, steps=1)
    train(checkpointed, tmp_path / "switched", model_path=str(tiny_model_dir), progress=False, resume=True)
    whole, switched = _checkpoint_tensors(tmp_path / "whole"), _checkpoint_tensors(tmp_path / "switched")
    assert _same(whole[0], switched[0]) and _same(whole[1], switched[1])
