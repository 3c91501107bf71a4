"""Runtime fixtures: two runs of the embedded default model, quantized (no QAT steps) and exported, one with cached
time features (``step_index`` input) and one with a float ``timestep`` input -- ~5 s each on one CPU thread."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tinymodels import TINY_RECIPE

CACHED_STEPS = 3  # the schedule the cached run's time features are computed for


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The default model gains nothing from a second thread on a shared 2-core CPU; restore the setting after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _default_model_run(root: Path, cached: bool) -> Path:
    """train (0 steps: the alternating scale init is the whole quantization) -> export, on the embedded default."""
    from lowbit_deploy.export.onnx_export import export_run
    from lowbit_deploy.qat.trainer import train
    from lowbit_deploy.recipes import parse_recipe

    data = copy.deepcopy(TINY_RECIPE)
    data["name"] = "runtime-test-cached" if cached else "runtime-test-timestep"
    data["quantize"]["scale_init_iterations"] = 1
    data["train"] = {"steps": 0, "batch_size": 2, "checkpoint_every": 1, "data": "gaussian"}
    data["export"] = {"export_fp16_reference": False}
    data["validate"]["sampling"].pop("num_steps")
    if cached:
        data["schedule"] = {"num_steps": CACHED_STEPS}
        data["quantize"]["layers"][2:4] = [{"pattern": "time_embedding.*", "cache": True},
                                           {"pattern": "*.time_emb_proj", "cache": True}]
    torch.set_num_threads(1)
    train(parse_recipe(data), root, progress=False)
    export_run(root)
    return root


@pytest.fixture(scope="session")
def cached_run(tmp_path_factory) -> Path:
    return _default_model_run(tmp_path_factory.mktemp("runtime-cached") / "run", cached=True)


@pytest.fixture(scope="session")
def timestep_run(tmp_path_factory) -> Path:
    return _default_model_run(tmp_path_factory.mktemp("runtime-timestep") / "run", cached=False)


@pytest.fixture(scope="session")
def default_bundle():
    from lowbit_deploy.models import load_model

    return load_model(None)
