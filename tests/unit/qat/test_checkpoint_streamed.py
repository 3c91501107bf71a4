"""load_checkpoint reads the weights file one tensor at a time, with load_state_dict's strict checks."""

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lowbit_deploy.errors import UserError
from lowbit_deploy.qat.checkpoint import checkpoint_file, load_checkpoint


@pytest.fixture(scope="module")
def ptq_run(tmp_path_factory):
    from tinymodels import TINY_RECIPE

    from lowbit_deploy.qat.trainer import train
    from lowbit_deploy.recipes import parse_recipe

    data = copy.deepcopy(TINY_RECIPE)
    data["train"] = {"steps": 0, "batch_size": 2, "checkpoint_every": 1, "data": "gaussian"}
    run = tmp_path_factory.mktemp("streamed") / "run"
    train(parse_recipe(data), run, progress=False)
    return run


def _stored(path):
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


@pytest.mark.parametrize("mapped_bytes", [1, 10_000, None], ids=["one-tensor-per-open", "10kB-per-open", "default"])
def test_every_tensor_is_loaded_as_stored(ptq_run, monkeypatch, mapped_bytes):
    from lowbit_deploy.qat import checkpoint

    if mapped_bytes is not None:  # the file is reopened every mapped_bytes: no tensor is skipped or read twice
        monkeypatch.setattr(checkpoint, "MAPPED_BYTES_PER_OPEN", mapped_bytes)
    state, _ = _stored(checkpoint_file(ptq_run))
    loaded = load_checkpoint(ptq_run).unet.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[key], tensor) for key, tensor in state.items())


@pytest.mark.parametrize("edit, message", [
    (lambda state: state.pop(sorted(state)[0]), "missing keys"),
    (lambda state: state.update(extra=torch.zeros(1)), r"unexpected keys \['extra'\]"),
    (lambda state: state.update({"conv_in.bias": torch.zeros(3)}), r"size mismatch for conv_in\.bias"),
])
def test_a_file_that_does_not_match_its_model_is_refused(ptq_run, tmp_path, edit, message):
    state, metadata = _stored(checkpoint_file(ptq_run))
    edit(state)
    edited = tmp_path / "quantized_unet.safetensors"
    save_file(state, str(edited), metadata)
    with pytest.raises(UserError, match=f"does not match the model its metadata describes.*{message}"):
        load_checkpoint(edited)
