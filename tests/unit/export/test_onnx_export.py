"""Export through the deployed-model contract: ORT == deployed torch, packed storage, signature and metadata."""

import numpy as np
import onnx
import pytest
import torch

from lowbit_deploy.errors import UserError
from lowbit_deploy.export.deployed import deploy_unet
from lowbit_deploy.export.handlers import ExportOptions
from lowbit_deploy.export.lowbit_ops import OP_DOMAIN, OP_TYPE
from lowbit_deploy.export.onnx_export import export_onnx
from lowbit_deploy.quant.apply import apply_plan, plan_for, quantized_layers
from lowbit_deploy.recipes import parse_recipe
from lowbit_deploy.runtime.ort import OrtRunner, read_signature
from lowbit_deploy.signature import TimeInput, deployed_signature
from lowbit_deploy.validate.sampling import module_runner

SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
             "clip_sample": False, "prediction_type": "epsilon"}
SEQ_LEN = 5


def _trained(unet, recipe_dict, bits=2, grid="balanced", cache=False):
    recipe_dict["quantize"]["layers"][-1].update(bits=bits, grid=grid)
    if cache:
        recipe_dict["quantize"]["layers"][2:4] = [{"pattern": "time_embedding.*", "cache": True},
                                                  {"pattern": "*.time_emb_proj", "cache": True}]
        recipe_dict["validate"]["sampling"].pop("num_steps")
        recipe_dict["schedule"] = {"num_steps": 4}
    recipe = parse_recipe(recipe_dict)
    plan = plan_for(unet, recipe.quantize)
    apply_plan(unet, plan)
    return unet, plan, deployed_signature(unet, SEQ_LEN, plan, SCHEDULER, recipe.schedule)


def _feeds(signature, batch=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return signature.random_feeds(batch, generator, torch.randn(batch, SEQ_LEN, signature.cross_attention_dim,
                                                                generator=generator))


# Every grid in the v2 bit stream (auto), and the v1 word formats, which stay readable and buildable.
@pytest.mark.parametrize(("bits", "grid", "packing"), [
    (1, "balanced", "auto"), (2, "balanced", "auto"), (2, "signed", "auto"), (3, "balanced", "auto"),
    (4, "signed", "auto"), (1, "balanced", "int8_words"), (2, "balanced", "int32_words"), (4, "signed", "int8_words"),
])
def test_onnxruntime_equals_the_deployed_torch_model(tmp_path, tiny_unet, tiny_recipe_dict, bits, grid, packing):
    unet, plan, signature = _trained(tiny_unet, tiny_recipe_dict, bits, grid)
    options = ExportOptions(packing=packing)
    deployed = deploy_unet(unet, plan, signature, options)
    report = export_onnx(unet, tmp_path / "model.onnx", plan=plan, signature=signature, options=options)
    feeds = _feeds(signature)
    with torch.no_grad():
        expected = module_runner(deployed, signature)(feeds).numpy()
    actual = OrtRunner(report.onnx_path)(feeds).numpy()
    # Same float32 math, different conv/matmul kernels: differences are a few float32 ulps of the outputs.
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)
    assert report.op_version == (2 if packing == "auto" else 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporary left behind


def test_every_quantized_weight_is_packed_behind_a_plugin_node(tmp_path, tiny_unet, tiny_recipe_dict):
    unet, plan, signature = _trained(tiny_unet, tiny_recipe_dict)
    names = list(quantized_layers(unet))
    export_onnx(unet, tmp_path / "model.onnx", plan=plan, signature=signature)
    model = onnx.load(str(tmp_path / "model.onnx"))
    nodes = [node for node in model.graph.node if node.domain == OP_DOMAIN]
    assert len(nodes) == len(names) == len(plan.quantized)
    assert all(node.op_type == OP_TYPE for node in nodes)
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attributes["plugin_namespace"] == b"lowbit" and attributes["plugin_version"] == b"2"
    initializers = {init.name: init for init in model.graph.initializer}
    for name in names:
        assert not any(key.startswith(f"unet.{name}.weight") or key.startswith(f"unet.{name}.parametrizations.weight")
                       for key in initializers)  # the float weight is gone ...
        assert initializers[f"unet.{name}.packed"].data_type == onnx.TensorProto.INT8  # ... packed words instead
        assert initializers[f"unet.{name}.scale"].data_type == onnx.TensorProto.FLOAT16
    # Every float parameter left is stored in fp16 (export.float_storage), none in fp32.
    assert not [key for key, init in initializers.items() if init.data_type == onnx.TensorProto.FLOAT]
    assert [f.name for f in model.functions] == [OP_TYPE]
    assert [imp.version for imp in model.opset_import if imp.domain == OP_DOMAIN] == [2]


def test_cached_time_features_take_a_step_index(tmp_path, tiny_unet, tiny_recipe_dict):
    unet, plan, signature = _trained(tiny_unet, tiny_recipe_dict, cache=True)
    assert signature.time_input is TimeInput.STEP_INDEX and signature.step_timesteps == (750, 500, 250, 0)
    report = export_onnx(unet, tmp_path / "model.onnx", plan=plan, signature=signature)
    model = onnx.load(str(tmp_path / "model.onnx"))
    inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert inputs == {"sample": onnx.TensorProto.FLOAT, "step_index": onnx.TensorProto.INT64,
                      "encoder_hidden_states": onnx.TensorProto.FLOAT}
    assert read_signature(report.onnx_path) == signature  # an app learns what index i means from the file
    initializers = {init.name for init in model.graph.initializer}
    assert not any("time_emb_proj.weight" in name or "time_embedding.linear" in name for name in initializers)
    assert report.cached_values == 4 * plan.cached_table_rows() > 0
    runner = OrtRunner(report.onnx_path)
    feeds = _feeds(signature)
    with torch.no_grad():
        expected = module_runner(deploy_unet(unet, plan, signature), signature)(feeds).numpy()
    np.testing.assert_allclose(runner(feeds).numpy(), expected, atol=1e-5, rtol=0)
    feeds["step_index"] = torch.tensor([0, 4, 1])
    with pytest.raises(UserError, match=r"step_index \[0, 4, 1\] is out of range.*0\.\.3"):
        runner(feeds)


def test_packed_weights_are_smaller_than_float16(tmp_path, tiny_unet, tiny_recipe_dict):
    unet, plan, signature = _trained(tiny_unet, tiny_recipe_dict)
    report = export_onnx(unet, tmp_path / "model.onnx", plan=plan, signature=signature,
                         fp16_reference_path=tmp_path / "model_fp16.onnx")
    assert report.onnx_bytes < report.fp16_onnx_bytes
    assert read_signature(report.fp16_onnx_path).input_names == signature.input_names
    # The v2 bit stream stores what BitsFusion counts (log2 L per weight) within 1%, padding included.
    counted = sum(layer.cost_bits * layer.weight_numel for layer in plan.quantized) / report.quantized_weights
    assert counted <= report.stored_bits_per_weight < 1.01 * counted
    assert report.packed_weight_bytes < 2 * report.quantized_weights / 5


def test_export_without_quantized_layers_is_refused(tmp_path, tiny_unet, tiny_recipe_dict):
    tiny_recipe_dict["quantize"]["layers"] = [{"pattern": "*", "keep_float": True}]
    with pytest.raises(UserError, match="matched no quantizable layer"):
        plan_for(tiny_unet, parse_recipe(tiny_recipe_dict).quantize)
    assert not any(tmp_path.iterdir())
