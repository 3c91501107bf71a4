import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from lowbit_deploy.errors import UserError
from lowbit_deploy.export.lowbit_ops import OP_DOMAIN, OP_TYPE
from lowbit_deploy.export.onnx_export import example_inputs, export_onnx
from lowbit_deploy.quant.apply import quantize_model, quantized_layers
from lowbit_deploy.recipes import parse_recipe


def _quantized(tiny_unet, recipe_dict, bits, grid):
    recipe_dict["quantize"]["layers"][-1].update(bits=bits, grid=grid)
    quantize_model(tiny_unet, parse_recipe(recipe_dict).quantize)
    return tiny_unet


@pytest.mark.parametrize(("bits", "grid"), [(1, "balanced"), (2, "balanced"), (2, "signed"), (3, "balanced"),
                                            (4, "signed")])
def test_exported_model_runs_in_onnxruntime_and_matches_torch(tmp_path, tiny_unet, tiny_recipe_dict, bits, grid):
    unet = _quantized(tiny_unet, tiny_recipe_dict, bits, grid)
    report = export_onnx(unet, tmp_path / "model.onnx")
    sample, timestep, states = example_inputs(unet, batch=3, seq_len=5)
    with torch.no_grad():
        expected = unet(sample, timestep, states).sample.numpy()
    session = ort.InferenceSession(report.onnx_path, providers=["CPUExecutionProvider"])
    actual = session.run(None, {"sample": sample.numpy(), "timestep": timestep.numpy(),
                                "encoder_hidden_states": states.numpy()})[0]
    np.testing.assert_allclose(actual, expected, atol=2e-5, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporary left behind


def test_every_quantized_weight_is_packed_behind_a_plugin_node(tmp_path, tiny_unet, tiny_recipe_dict):
    unet = _quantized(tiny_unet, tiny_recipe_dict, 2, "balanced")
    export_onnx(unet, tmp_path / "model.onnx")
    model = onnx.load(str(tmp_path / "model.onnx"))
    nodes = [node for node in model.graph.node if node.domain == OP_DOMAIN]
    assert len(nodes) == len(quantized_layers(unet))
    assert all(node.op_type == OP_TYPE for node in nodes)
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attributes["plugin_namespace"] == b"lowbit" and attributes["plugin_version"] == b"1"
    initializers = {init.name: init for init in model.graph.initializer}
    for name in quantized_layers(unet):
        assert f"unet.{name}.weight" not in initializers  # the float weight is gone ...
        packed = initializers[f"{name}.packed"]  # ... replaced by packed words and fp16 scales
        assert packed.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT32)
        assert initializers[f"{name}.scale"].data_type == onnx.TensorProto.FLOAT16
    assert [f.name for f in model.functions] == [OP_TYPE]
    assert any(imp.domain == OP_DOMAIN and imp.version == 1 for imp in model.opset_import)


def test_packed_weights_are_smaller_than_float16(tmp_path, tiny_unet, tiny_recipe_dict):
    unet = _quantized(tiny_unet, tiny_recipe_dict, 2, "balanced")
    report = export_onnx(unet, tmp_path / "model.onnx", fp16_reference_path=tmp_path / "model_fp16.onnx")
    assert report.onnx_bytes < report.fp16_onnx_bytes
    fp16_session = ort.InferenceSession(report.fp16_onnx_path, providers=["CPUExecutionProvider"])
    assert fp16_session.get_inputs()[0].type == "tensor(float16)"
    fp16_bytes = 2 * report.quantized_weights
    # Balanced 2-bit packs 13 codes per int32 word: 2.46 bit/weight plus 16-bit scales, ~6x below fp16.
    assert report.packed_weight_bytes < fp16_bytes / 5


def test_export_without_quantized_layers_is_refused(tmp_path, tiny_unet):
    with pytest.raises(UserError, match="no quantized layer"):
        export_onnx(tiny_unet, tmp_path / "model.onnx")
    assert not any(tmp_path.iterdir())
