"""The one-flip sampling floor of models with quantized activations (validate/flip_floor.py): the flip it makes is
one grid step of one quantized input, and validate's sampling gate follows it on a run that showed the false alarm."""

import copy
import json

import pytest
import torch

from lowbit_deploy.export.activation_ops import DeployedActivationQuantizer
from lowbit_deploy.validate.flip_floor import has_activation_quantizers, likeliest_flips, run_with_flips


@pytest.fixture(scope="module")
def activation_run(tmp_path_factory):
    """A tiny UNet saved as a user's folder, trained with TINY_EFFICIENTDM_RECIPE (per-step activation scales) and
    exported: the run whose sampling comparison flipped a rounding against a ~107 dB gate (docs/gates.md)."""
    from tinymodels import TINY_EFFICIENTDM_RECIPE, make_tiny_unet

    from lowbit_deploy.export.onnx_export import export_run
    from lowbit_deploy.qat.trainer import train
    from lowbit_deploy.recipes import parse_recipe

    root = tmp_path_factory.mktemp("one-flip")
    make_tiny_unet().save_pretrained(root / "model" / "unet")
    train(parse_recipe(copy.deepcopy(TINY_EFFICIENTDM_RECIPE)), root / "run", model_path=str(root / "model"),
          progress=False)
    export_run(root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def context(activation_run):
    from lowbit_deploy.validate.parity import prepare_validation

    return prepare_validation(activation_run, keep_trained=False)


def _quantizer_outputs(deployed, args, flips=()):
    outputs, handles = {}, []
    for name, module in deployed.named_modules():
        if isinstance(module, DeployedActivationQuantizer):
            handles.append(module.register_forward_hook(
                lambda _, __, out, name=name: outputs.setdefault(name, out.clone())))
    try:
        with torch.no_grad():
            final = run_with_flips(deployed, args, list(flips)) if flips else deployed(*args)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, final


def test_each_flip_moves_one_quantized_input_by_one_step_in_its_batch_item(context):
    deployed = context.deployed
    args = [context.inputs[0][name] for name in context.signature.input_names]
    flips = likeliest_flips(deployed, args)
    batch = args[0].shape[0]
    assert sorted(flip.position[0] for flip in flips) == list(range(batch))  # one per batch item
    for flip in flips:
        base, base_output = _quantizer_outputs(deployed, args)
        moved, moved_output = _quantizer_outputs(deployed, args, [flip])
        difference = moved[flip.quantizer] - base[flip.quantizer]
        assert torch.count_nonzero(difference) == 1
        ulps = 2 * torch.finfo(torch.float32).eps * (abs(float(base[flip.quantizer][flip.position])) + abs(flip.delta))
        assert float(difference[flip.position]) == pytest.approx(flip.delta, abs=ulps)  # one float32 addition
        module = dict(deployed.named_modules())[flip.quantizer]
        rows = module.context.index if module.per_step else torch.zeros(batch, dtype=torch.int64)
        assert abs(flip.delta) == pytest.approx(float(module.act_scale[rows[flip.position[0]]]), rel=1e-6)
        others = [item for item in range(batch) if item != flip.position[0]]
        assert torch.equal(moved_output[others], base_output[others])  # batch items stay independent


def test_weight_only_models_have_no_activation_flip(tiny_run):
    from lowbit_deploy.validate.parity import prepare_validation

    assert not has_activation_quantizers(prepare_validation(tiny_run, keep_trained=False).deployed)


def test_validate_gates_sampling_at_what_one_flip_per_image_gives(activation_run, tmp_path):
    from click.testing import CliRunner

    from lowbit_deploy.cli import main

    result = CliRunner().invoke(main, ["validate", str(activation_run)])
    assert result.exit_code == 0, result.output
    report = json.loads((activation_run / "report.json").read_text())["validate"]
    sampling, floor = report["sampling"], report["noise_floor"]["sqnr_db"]
    flip_gate = round(sampling["one_flip_psnr_db"] - 5.0, 1)
    assert sampling["min_psnr_db"] == flip_gate < floor - 30  # the one-flip floor is the lower one here
    assert "one activation rounding flip per image" in result.output
    # a sampling gate given on the command line is used as given: no one-flip sampling
    fixed = CliRunner().invoke(main, ["validate", str(activation_run), "--min-psnr-db", "200"])
    assert fixed.exit_code == 1
    sampling = json.loads((activation_run / "report.json").read_text())["validate"]["sampling"]
    assert sampling["min_psnr_db"] == 200 and "one_flip_psnr_db" not in sampling


def test_an_artifact_further_off_than_one_flip_fails_the_one_flip_gate(context, tmp_path):
    from lowbit_deploy.validate.flip_floor import one_flip_runner
    from lowbit_deploy.validate.parity import sampling_parity
    from lowbit_deploy.validate.sampling import module_runner

    recipe = context.checkpoint.recipe
    config = recipe.validate_.sampling.model_copy(update={"min_psnr_db": 1000.0})
    torch_runner = module_runner(context.deployed, context.signature)
    off = lambda feeds: torch_runner(feeds) * 0.9  # noqa: E731 -- a 10% gain error: far more than one flip
    steps = recipe.sampling_steps(config.num_steps)
    args = (context.bundle, context.signature, torch_runner)
    clean = sampling_parity(*args, torch_runner, config, steps, tmp_path / "a.png",
                            (one_flip_runner(context.deployed), 5.0))
    broken = sampling_parity(*args, off, config, steps, tmp_path / "b.png", (one_flip_runner(context.deployed), 5.0))
    assert clean["status"] == "passed" and clean["min_psnr_db"] == broken["min_psnr_db"] < 1000.0
    assert broken["status"] == "failed", broken


@pytest.mark.parametrize(("flip_psnr", "shown"), [(35.6871, "35.7 dB"), ("inf", "inf dB")])
def test_the_gates_line_shows_the_one_flip_psnr_finite_or_not(capsys, flip_psnr, shown):
    """A flip every later layer absorbs leaves the images equal: report.json keeps "inf", and the line still prints."""
    from lowbit_deploy.cli import _print_validation

    report = {"parity": [], "noise_floor": {"sqnr_db": 137.31}, "sampling": {"min_psnr_db": 30.7,
                                                                             "one_flip_psnr_db": flip_psnr},
              "gates": {"onnxruntime": {"min_sqnr_db": 127.3, "max_abs": 1.9e-6}, "per_layer_min_sqnr_db": 117.3}}
    _print_validation(report)
    assert f"sampling PSNR >= 30.7 dB (one activation rounding flip per image: {shown})" in capsys.readouterr().out
