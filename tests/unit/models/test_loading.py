"""load_model: the embedded default, folder layouts, foreign checkpoints, and the user-facing errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit_deploy.errors import UserError
from lowbit_deploy.models import DEFAULT_MODEL_DIR, load_model
from lowbit_deploy.models.loading import SD15_DDPM_CONFIG


def test_import_is_cheap():
    code = ("import sys, lowbit_deploy.models; "
            "print(*(name in sys.modules for name in ('torch', 'diffusers', 'transformers')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False", "False"]


def test_default_model_loads_and_runs(default_bundle):
    unet = default_bundle.unet
    assert not unet.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in unet.parameters())
    assert default_bundle.source == str((DEFAULT_MODEL_DIR / "unet").resolve())
    assert default_bundle.condition.num_classes == 10
    assert default_bundle.classifier is not None
    assert default_bundle.scheduler_config["num_train_timesteps"] == 1000
    states = default_bundle.condition.for_labels([0, 3, 7, 9])
    latents = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        output = unet(latents, torch.tensor([0, 10, 500, 999]), encoder_hidden_states=states).sample
    assert output.shape == (4, 1, 16, 16)
    assert torch.isfinite(output).all()


def test_folder_copy_detects_unet_subfolder(default_copy, default_bundle):
    bundle = load_model(default_copy)
    assert bundle.source == str((default_copy / "unet").resolve())
    assert bundle.condition.num_classes == 10 and bundle.classifier is not None
    for (name, copied), original in zip(bundle.unet.state_dict().items(), default_bundle.unet.state_dict().values()):
        assert torch.equal(copied, original), name


def test_explicit_subfolder_argument(default_copy):
    renamed = default_copy / "denoiser"
    (default_copy / "unet").rename(renamed)
    bundle = load_model(str(default_copy), subfolder="denoiser")
    assert bundle.source == str(renamed.resolve())
    with pytest.raises(UserError, match=r"subfolder 'unet' \(recipe key model.subfolder\) does not exist"):
        load_model(default_copy, subfolder="unet")


def test_foreign_checkpoint_gets_random_conditions(foreign_checkpoint):
    bundle = load_model(foreign_checkpoint)
    condition = bundle.condition
    assert bundle.classifier is None and condition.num_classes is None
    assert (condition.seq_len, condition.dim) == (77, 8)
    assert bundle.scheduler_config == SD15_DDPM_CONFIG
    states, labels = condition.sample(3, torch.Generator().manual_seed(1))
    again, _ = condition.sample(3, torch.Generator().manual_seed(1))
    assert labels is None and states.shape == (3, 77, 8) and torch.equal(states, again)
    assert torch.equal(condition.null(2)[0], condition.null(1)[0])
    with pytest.raises(UserError, match="default model"):
        condition.for_labels([1])
    with torch.no_grad():
        output = bundle.unet(torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3]), encoder_hidden_states=states).sample
    assert output.shape == (3, 4, 8, 8)


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist.*local diffusers checkpoint folder"):
        load_model(tmp_path / "nowhere")


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json.*save_pretrained"):
        load_model(tmp_path / "empty")


def test_pickle_only_weights_are_refused(foreign_checkpoint):
    unet_dir = foreign_checkpoint / "unet"
    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    torch.save({"dummy": torch.zeros(1)}, unet_dir / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(UserError, match=r"safetensors only; convert") as raised:
        load_model(foreign_checkpoint)
    assert "diffusion_pytorch_model.bin" in str(raised.value)


def test_missing_weights(foreign_checkpoint):
    (foreign_checkpoint / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match="has no weights"):
        load_model(foreign_checkpoint)


def test_corrupt_safetensors(foreign_checkpoint):
    weights = foreign_checkpoint / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match="corrupt or truncated.*re-export"):
        load_model(foreign_checkpoint)


def test_garbage_safetensors_header(foreign_checkpoint):
    (foreign_checkpoint / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="corrupt"):
        load_model(foreign_checkpoint)


def test_weights_not_matching_config(foreign_checkpoint, default_copy):
    shutil.copy(default_copy / "unet" / "diffusion_pytorch_model.safetensors", foreign_checkpoint / "unet")
    with pytest.raises(UserError, match="do not fit its config.json") as caught:
        load_model(foreign_checkpoint)
    # One line naming one example and the fix, not diffusers' per-tensor dump and its loader option.
    message = str(caught.value)
    assert "\n" not in message and "ignore_mismatched_sizes" not in message
    assert "put the config.json saved with these weights next to them" in message


def test_not_a_conditional_unet(tmp_path: Path):
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(UserError, match="AutoencoderKL"):
        load_model(folder)


def test_missing_tensors_are_not_silently_initialised(foreign_checkpoint):
    from safetensors.torch import load_file, save_file

    weights = foreign_checkpoint / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state.pop("conv_in.weight")
    save_file(state, str(weights))
    with pytest.raises(UserError, match="missing_keys: conv_in.weight.*belong together"):
        load_model(foreign_checkpoint)


# Variant weight files: diffusion_pytorch_model.<variant>.safetensors, as save_pretrained(variant=...) writes them.
def _save_variant(unet, folder: Path, variant: str, **options) -> None:
    import copy

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[variant]
    copy.deepcopy(unet).to(dtype).save_pretrained(folder, variant=variant, safe_serialization=True, **options)


@pytest.fixture
def fp16_checkpoint(tmp_path: Path, make_foreign_unet) -> Path:
    """SD's layout with only fp16 variant weights in unet/ (as many hub checkpoints ship them)."""
    root = tmp_path / "fp16-only"
    _save_variant(make_foreign_unet(), root / "unet", "fp16")
    return root


def test_variant_only_folder_names_the_folder_files_and_option(fp16_checkpoint):
    with pytest.raises(UserError) as caught:
        load_model(fp16_checkpoint)
    message = str(caught.value)
    # The UNet's own folder (not the checkpoint root, as diffusers' message said), the files, and the fix.
    assert f"{(fp16_checkpoint / 'unet').resolve()} holds only variant weight files" in message
    assert "diffusion_pytorch_model.fp16.safetensors" in message
    assert "`--variant fp16`" in message and "model.variant" in message


@pytest.mark.parametrize("variant", ["fp16", "bf16"])
@pytest.mark.parametrize("layout", ["unet_subfolder", "bare_unet_folder"])
def test_variant_weights_load_as_float32(tmp_path, make_foreign_unet, variant, layout):
    from safetensors.torch import load_file

    root = tmp_path / "checkpoint"
    folder = root / "unet" if layout == "unet_subfolder" else root
    _save_variant(make_foreign_unet(), folder, variant)
    stored = load_file(str(folder / f"diffusion_pytorch_model.{variant}.safetensors"))
    bundle = load_model(root, variant=variant)
    assert bundle.source == str(folder.resolve())
    state = bundle.unet.state_dict()
    assert set(state) == set(stored)
    for name, tensor in state.items():
        assert tensor.dtype == torch.float32, name
        assert stored[name].dtype != torch.float32 and torch.equal(tensor, stored[name].float()), name
    with torch.no_grad():
        output = bundle.unet(torch.randn(2, 4, 8, 8), torch.tensor([1, 500]),
                             encoder_hidden_states=torch.randn(2, 77, 8)).sample
    assert output.dtype == torch.float32 and torch.isfinite(output).all()


def test_variant_selects_its_files_beside_plain_weights(foreign_checkpoint):
    """A folder with both: no variant loads the float32 file exactly, ``fp16`` the rounded one."""
    unet_dir = foreign_checkpoint / "unet"
    plain = load_model(foreign_checkpoint).unet
    _save_variant(plain, unet_dir, "fp16")
    again = load_model(foreign_checkpoint).unet
    rounded = load_model(foreign_checkpoint, variant="fp16").unet
    for (name, original), reloaded, half in zip(plain.state_dict().items(), again.state_dict().values(),
                                                rounded.state_dict().values()):
        assert torch.equal(reloaded, original), name
        assert torch.equal(half, original.half().float()), name
    assert any(not torch.equal(half, original) for half, original in zip(rounded.parameters(), plain.parameters()))


def test_missing_variant_lists_what_is_there(fp16_checkpoint, foreign_checkpoint):
    with pytest.raises(UserError, match=r"no weights of variant 'bf16' \(expected diffusion_pytorch_model.bf16."
                                         r"safetensors; found: diffusion_pytorch_model.fp16.safetensors\); pass "
                                         r"`--variant fp16`"):
        load_model(fp16_checkpoint, variant="bf16")
    with pytest.raises(UserError, match=r"no weights of variant 'fp16'.*found: diffusion_pytorch_model.safetensors"
                                        r"\); drop --variant"):
        load_model(foreign_checkpoint, variant="fp16")


def test_sharded_variant_loads(tmp_path, make_foreign_unet):
    unet = make_foreign_unet()
    root = tmp_path / "sharded"
    _save_variant(unet, root / "unet", "fp16", max_shard_size="20KB")
    shards = sorted(path.name for path in (root / "unet").glob("*.safetensors"))
    assert len(shards) > 1 and all(".fp16-" in name for name in shards)
    with pytest.raises(UserError, match="holds only variant weight files"):
        load_model(root)
    loaded = load_model(root, variant="fp16").unet
    for (name, original), tensor in zip(unet.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(tensor, original.half().float()), name


def test_variant_pickles_get_the_conversion_with_the_variant(fp16_checkpoint):
    unet_dir = fp16_checkpoint / "unet"
    (unet_dir / "diffusion_pytorch_model.fp16.safetensors").unlink()
    torch.save({"dummy": torch.zeros(1)}, unet_dir / "diffusion_pytorch_model.fp16.bin")
    with pytest.raises(UserError, match=r"only pickle weights \(diffusion_pytorch_model.fp16.bin\).*"
                                        r"use_safetensors=False, variant='fp16'"):
        load_model(fp16_checkpoint, variant="fp16")


@pytest.mark.parametrize("bad", ["fp 16", "../fp16", "fp16.x"])
def test_variant_name_is_checked(tiny_recipe_dict, bad):
    from lowbit_deploy.recipes import parse_recipe

    recipe = parse_recipe(tiny_recipe_dict)
    assert recipe.with_variant(None) is recipe and recipe.with_variant("fp16").model.variant == "fp16"
    with pytest.raises(UserError, match="model.variant"):
        recipe.with_variant(bad)


def test_variant_is_recorded_for_resume_and_validate(fp16_checkpoint, tiny_recipe_dict, tmp_path):
    """``--variant`` reaches the checkpoint's recipe: resume without it loads the same files, validate too, and
    another variant is refused."""
    from lowbit_deploy.qat.checkpoint import checkpoint_recipe
    from lowbit_deploy.qat.trainer import train
    from lowbit_deploy.recipes import parse_recipe
    from lowbit_deploy.validate.parity import prepare_validation

    tiny_recipe_dict["train"]["steps"] = 2
    recipe = parse_recipe(tiny_recipe_dict)
    run_dir = tmp_path / "run"
    train(recipe.with_variant("fp16"), run_dir, model_path=str(fp16_checkpoint), steps=1, progress=False)
    assert checkpoint_recipe(run_dir).model.variant == "fp16"
    result = train(recipe, run_dir, steps=2, resume=True, progress=False)
    assert result.steps == 2 and checkpoint_recipe(run_dir).model.variant == "fp16"
    with pytest.raises(UserError, match="the fp16 weight files, not variant bf16; pass --variant fp16"):
        train(recipe.with_variant("bf16"), run_dir, resume=True, progress=False)
    context = prepare_validation(run_dir)
    assert all(p.dtype == torch.float32 for p in context.bundle.unet.parameters())


def test_cli_variant_option(fp16_checkpoint, tiny_recipe_dict, tmp_path):
    """``--variant`` on the command line: without it a variant-only folder is a clean bad-input exit naming the
    option; with it the run trains and records the variant."""
    import yaml
    from click.testing import CliRunner

    from lowbit_deploy.cli import main
    from lowbit_deploy.qat.checkpoint import checkpoint_recipe

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict))
    common = ["train", str(recipe), "--model", str(fp16_checkpoint), "--steps", "0", "--no-progress"]
    refused = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "refused")])
    assert refused.exit_code == 2 and "`--variant fp16`" in refused.output and "Traceback" not in refused.output
    trained = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "run"), "--variant", "fp16"])
    assert trained.exit_code == 0, trained.output
    assert checkpoint_recipe(tmp_path / "run").model.variant == "fp16"
    bad = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "bad"), "--variant", "fp 16"])
    assert bad.exit_code == 2 and "model.variant" in bad.output


@pytest.mark.parametrize("name", ["unet.safetensors", "model.fp16.safetensors"])
def test_weights_under_another_name_are_named(foreign_checkpoint, name):
    """diffusers loads only diffusion_pytorch_model[.VARIANT].safetensors; another name is refused naming this folder
    (diffusers' own message names the checkpoint root) and the file."""
    unet_dir = foreign_checkpoint / "unet"
    (unet_dir / "diffusion_pytorch_model.safetensors").rename(unet_dir / name)
    with pytest.raises(UserError, match=rf"{unet_dir.resolve()} has safetensors files \({name}\) but none named "
                                        r"diffusion_pytorch_model.safetensors.*rename the weights file"):
        load_model(foreign_checkpoint)
