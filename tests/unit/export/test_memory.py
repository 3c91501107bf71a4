"""The memory pre-flight: a stage that will not fit is refused before it loads anything, naming the fix."""

import copy

import pytest
from click.testing import CliRunner

from lowbit_deploy.cli import main
from lowbit_deploy.errors import UserError
from lowbit_deploy.export import memory
from lowbit_deploy.export.memory import GIB, check_export_memory, check_validate_memory, checkpoint_parameters

SD15_PARAMETERS = 859_520_964
SDXL_PARAMETERS = 2_567_463_684


@pytest.fixture(scope="module")
def ptq_run(tmp_path_factory):
    from tinymodels import TINY_RECIPE

    from lowbit_deploy.qat.trainer import train
    from lowbit_deploy.recipes import parse_recipe

    data = copy.deepcopy(TINY_RECIPE)
    data["train"] = {"steps": 0, "batch_size": 2, "checkpoint_every": 1, "data": "gaussian"}
    data["export"] = {"export_fp16_reference": True}
    run = tmp_path_factory.mktemp("memory") / "run"
    train(parse_recipe(data), run, progress=False)
    return run


def test_parameters_are_counted_from_the_header(ptq_run):
    from lowbit_deploy.qat.checkpoint import checkpoint_file, load_checkpoint

    expected = sum(tensor.numel() for tensor in load_checkpoint(ptq_run).unet.state_dict().values())
    assert checkpoint_parameters(checkpoint_file(ptq_run)) == expected


@pytest.mark.parametrize("parameters, available_gib, fp16_reference, fits", [
    (SD15_PARAMETERS, 14, True, True),
    (SDXL_PARAMETERS, 22, False, True),
    (SDXL_PARAMETERS, 22, True, False),      # refused: drop the fp16 reference
    (SDXL_PARAMETERS, 8, False, False),      # refused: needs a larger machine
])
def test_export_is_refused_when_it_will_not_fit(parameters, available_gib, fp16_reference, fits):
    if fits:
        assert check_export_memory(parameters, fp16_reference, available_gib * GIB).fits
        return
    fix = "--no-fp16-reference" if fp16_reference else "at least"
    with pytest.raises(UserError, match=f"export.*needs about .* GiB; available now: {available_gib}.0 GiB.*{fix}"):
        check_export_memory(parameters, fp16_reference, available_gib * GIB)


def test_validate_is_refused_when_it_will_not_fit():
    assert check_validate_memory(SD15_PARAMETERS, 16 * GIB).fits
    with pytest.raises(UserError, match="validate of a 2,567M-parameter UNet needs about"):
        check_validate_memory(SDXL_PARAMETERS, 16 * GIB)


def test_export_refuses_before_writing_and_the_flag_drops_the_reference(ptq_run, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: GIB)  # below the fixed cost: nothing fits
    result = CliRunner().invoke(main, ["export", str(ptq_run)])
    assert result.exit_code == 2 and "needs about" in result.output and "at least" in result.output
    assert not (ptq_run / "model.onnx").exists()
    monkeypatch.undo()
    result = CliRunner().invoke(main, ["export", str(ptq_run), "--no-fp16-reference"])
    assert result.exit_code == 0, result.output
    assert (ptq_run / "model.onnx").is_file() and not (ptq_run / "model_fp16.onnx").exists()
    result = CliRunner().invoke(main, ["export", str(ptq_run)])  # the recipe's export_fp16_reference: true
    assert result.exit_code == 0, result.output
    assert (ptq_run / "model_fp16.onnx").is_file()


@pytest.mark.parametrize("optimizer_steps, on_cpu, available_gib, fits", [
    (True, True, 20, True),     # one CPU QAT step of SD1.5 measured 17.32 GiB
    (True, True, 16, False),
    (False, True, 10, True),    # PTQ of SD1.5 measured 7.32 GiB
    (False, True, 6, False),
    (True, False, 10, True),    # on a GPU, host memory holds the two models only
])
def test_train_is_refused_when_it_will_not_fit(optimizer_steps, on_cpu, available_gib, fits):
    available = available_gib * GIB
    if fits:
        assert memory.check_train_memory(SD15_PARAMETERS, optimizer_steps, on_cpu, available).fits
        return
    with pytest.raises(UserError, match="would be killed for memory part way") as error:
        memory.check_train_memory(SD15_PARAMETERS, optimizer_steps, on_cpu, available)
    # QAT that fits as PTQ names the GPU and the PTQ way out; a run whose models alone do not fit needs more memory.
    assert ("--device cuda" in str(error.value)) is (optimizer_steps and on_cpu)


def test_sdxl_qat_on_a_24_gb_cpu_is_refused_and_its_ptq_fits():
    with pytest.raises(UserError, match=r"QAT on the CPU of a 2,567M-parameter UNet needs about 49\.3 GiB.*--steps 0"):
        memory.check_train_memory(SDXL_PARAMETERS, True, True, 22 * GIB)
    assert memory.check_train_memory(SDXL_PARAMETERS, False, True, 22 * GIB).fits


def test_train_refuses_before_the_unet_loads(tiny_model_dir, tmp_path, monkeypatch):
    from tinymodels import TINY_RECIPE

    from lowbit_deploy.models import loading
    from lowbit_deploy.qat.trainer import train
    from lowbit_deploy.recipes import parse_recipe

    def never(*args, **kwargs):
        raise AssertionError("the UNet was loaded although the run cannot fit")

    monkeypatch.setattr(memory, "available_bytes", lambda: 64 * 2**20)
    monkeypatch.setattr(loading, "_load_unet", never)
    data = copy.deepcopy(TINY_RECIPE)
    data["train"] = {"steps": 2, "batch_size": 2, "checkpoint_every": 1, "data": "gaussian"}
    with pytest.raises(UserError, match="QAT on the CPU .* needs about .* available now: 0.1 GiB"):
        train(parse_recipe(data), tmp_path / "run", model_path=str(tiny_model_dir), progress=False, device="cpu")
    assert not (tmp_path / "run" / "checkpoint").exists() and not (tmp_path / "run" / "report.json").exists()
