"""A tiny exported run shared by the validation tests: cached time layers (step index), v2 packing, 2 QAT steps."""

import copy

import pytest


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    from tinymodels import TINY_RECIPE, make_tiny_unet

    from lowbit_deploy.export.onnx_export import export_run
    from lowbit_deploy.qat.trainer import train
    from lowbit_deploy.recipes import parse_recipe

    root = tmp_path_factory.mktemp("validate-run")
    make_tiny_unet().save_pretrained(root / "model" / "unet")
    data = copy.deepcopy(TINY_RECIPE)
    data["schedule"] = {"num_steps": 3}
    data["quantize"]["layers"][2:4] = [{"pattern": "time_embedding.*", "cache": True},
                                       {"pattern": "*.time_emb_proj", "cache": True}]
    data["validate"]["sampling"].pop("num_steps")
    run = root / "run"
    train(parse_recipe(data), run, model_path=str(root / "model"), progress=False)
    export_run(run)
    return run
