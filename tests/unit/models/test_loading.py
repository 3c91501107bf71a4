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
    code = "import sys, lowbit_deploy.models; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


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
