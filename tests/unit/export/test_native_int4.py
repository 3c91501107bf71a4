"""Native INT4 export: layout units, then a tiny trained UNet with some layers exported as INT4 DequantizeLinear."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lowbit_deploy.errors import UserError
from lowbit_deploy.export.native_int4 import (CODES, NATIVE_INT4_OPSET, SCALE, _check_same_meaning_at_21,
                                              int4_initializer, linear_block_size)
from lowbit_deploy.quant.grids import GridKind
from lowbit_deploy.quant.plan import PLAN_FORMAT, PLAN_FORMAT_EXPORTS, LayerDecision, LayerRole, QuantPlan, WeightExport
from lowbit_deploy.recipes import parse_recipe

NATIVE = {"bits": 4, "grid": "signed", "export": "native_int4"}
# Conv layers (per-channel) and Linear layers (blocked): every attention projection of the tiny UNet has 16 inputs.
NATIVE_RULES = [{"pattern": "down_blocks.*.resnets.*.conv*", **NATIVE}, {"pattern": "*attn*.to_[qkv]", **NATIVE}]


# ---- layout ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("codes", "raw"), [
    ([-8, 7], bytes([0x78])),          # first code in the low nibble
    ([1, -1, 3], bytes([0xF1, 0x03])),  # odd count: the last byte's high nibble is padding
    ([0, 0, -8, -8], bytes([0x00, 0x88])),
])
def test_int4_initializer_packs_two_codes_per_byte_low_nibble_first(codes, raw):
    tensor = int4_initializer("w", np.array(codes, np.int8))
    assert tensor.data_type == TensorProto.INT4 and tensor.raw_data == raw
    assert numpy_helper.to_array(tensor).astype(np.int8).tolist() == codes


@pytest.mark.parametrize("value", [-9, 8])
def test_codes_outside_int4_are_refused(value):
    with pytest.raises(ValueError, match="do not fit INT4"):
        int4_initializer("w", np.array([0, value]))


@pytest.mark.parametrize(("in_features", "block"), [(16, 16), (48, 16), (96, 32), (320, 64), (640, 128),
                                                    (1280, 128)])
def test_linear_block_is_the_widest_that_divides_the_inputs(in_features, block):
    assert linear_block_size(in_features) == block


def test_linear_inputs_that_no_block_divides_are_a_clear_error():
    with pytest.raises(UserError, match="divisible by 16"):
        linear_block_size(24)


def test_opset_21_is_declared_only_over_ops_whose_meaning_did_not_change():
    def graph_of(op_type):
        node = helper.make_node(op_type, ["x", "s", "b"] if op_type == "GroupNormalization" else ["x"], ["y"],
                                **({"num_groups": 1} if op_type == "GroupNormalization" else {}))
        return helper.make_model(helper.make_graph([node], "g", [], []))

    _check_same_meaning_at_21(graph_of("Reshape"))  # Reshape-21 only adds types
    with pytest.raises(RuntimeError, match="GroupNormalization"):
        _check_same_meaning_at_21(graph_of("GroupNormalization"))


# ---- recipe and plan -------------------------------------------------------------------------------------------
def _decision(name="a.conv", layer_type="Conv2d", numel=64, out=4, grid=GridKind.SIGNED, bits=4,
              export=WeightExport.NATIVE_INT4, role=LayerRole.QUANTIZED):
    return LayerDecision(name, layer_type, numel, out, role, grid, bits, export)


def test_plan_round_trip_keeps_the_export_and_bumps_the_format_only_when_needed(tmp_path):
    native = QuantPlan((_decision(), _decision("b.proj", "Linear", 64, 4, export=WeightExport.PACKED)), 200)
    native.save(tmp_path / "native.json")
    assert QuantPlan.load(tmp_path / "native.json") == native
    data = json.loads((tmp_path / "native.json").read_text())
    assert data["format"] == PLAN_FORMAT_EXPORTS
    assert [layer.get("export") for layer in data["layers"]] == ["native_int4", None]
    assert native.exported_as(WeightExport.NATIVE_INT4) == native.layers[:1]

    packed = QuantPlan((_decision(export=WeightExport.PACKED),), 200)
    assert packed.to_dict()["format"] == PLAN_FORMAT and "export" not in packed.to_dict()["layers"][0]


def test_a_plan_file_written_before_exports_existed_still_loads_as_packed(tmp_path):
    layer = {"name": "conv", "layer_type": "Conv2d", "weight_numel": 36, "out_features": 4, "role": "quantized",
             "grid": "balanced", "bits": 2}
    (tmp_path / "plan.json").write_text(json.dumps({"format": PLAN_FORMAT, "source": "old", "total_params": 40,
                                                     "layers": [layer]}))
    assert QuantPlan.load(tmp_path / "plan.json").layers[0].export is WeightExport.PACKED


@pytest.mark.parametrize(("changes", "message"), [
    ({"grid": GridKind.BALANCED}, "not the balanced 4-bit grid"),
    ({"bits": 3}, "not the signed 3-bit grid"),
    ({"role": LayerRole.FLOAT, "grid": None, "bits": None}, "quantized layers only"),
    ({"layer_type": "Linear", "numel": 24 * 4}, "multiple of 16"),
])
def test_decisions_that_int4_cannot_store_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        _decision(**changes)


@pytest.mark.parametrize(("rule", "message"), [
    ({"bits": 4, "grid": "balanced"}, "not the balanced 4-bit grid"),
    ({"bits": 8, "grid": "signed"}, "not the signed 8-bit grid"),
    ({"bits": 2, "grid": "balanced"}, "not the balanced 2-bit grid"),
    ({"keep_float": True}, "quantized layers only"),
    ({"cache": True}, "quantized layers only"),
])
def test_bad_recipe_combinations_name_the_rule_from_one(tiny_recipe_dict, rule, message):
    tiny_recipe_dict["quantize"]["layers"].insert(1, {"pattern": "down*", "export": "native_int4", **rule})
    with pytest.raises(UserError, match=r"quantize\.layers \(rule 2\).*" + message):
        parse_recipe(tiny_recipe_dict)


def test_unknown_export_is_named(tiny_recipe_dict):
    tiny_recipe_dict["quantize"]["layers"][0]["export"] = "int4"
    with pytest.raises(UserError, match=r"quantize\.layers \(rule 1\)\.export"):
        parse_recipe(tiny_recipe_dict)


def test_rules_give_the_plan_its_exports_and_a_linear_too_narrow_for_blocks_names_the_rule(tiny_recipe_dict,
                                                                                            tiny_unet):
    from lowbit_deploy.quant.apply import plan_for

    tiny_recipe_dict["quantize"]["layers"][4:4] = NATIVE_RULES
    plan = plan_for(tiny_unet, parse_recipe(tiny_recipe_dict).quantize)
    native = {layer.name for layer in plan.exported_as(WeightExport.NATIVE_INT4)}
    # 5 down-block resnet convs (conv1, conv2 twice, one conv_shortcut) + q/k/v of self- and cross-attention in 4
    # transformer blocks (down 1, mid, up 0 twice).
    assert len(native) == 5 + 4 * 6
    assert {"down_blocks.0.resnets.0.conv1", "down_blocks.1.resnets.0.conv_shortcut",
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"} <= native
    assert not {"up_blocks.1.resnets.0.conv1", "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"} & native
    assert all(plan.decision(name).export is WeightExport.PACKED for name in ("conv_in", "conv_out"))
    # The narrowest Linear inputs of the tiny UNet: time_embedding.linear_1's 8 (no INT4 block fits).
    tiny_recipe_dict["quantize"]["layers"][2] = {"pattern": "time_embedding.*", **NATIVE}
    with pytest.raises(UserError, match=r"recipe rule 3 \('time_embedding\.\*'\).*multiple of 16"):
        plan_for(tiny_unet, parse_recipe(tiny_recipe_dict).quantize)


# ---- a tiny trained UNet with native INT4 layers ---------------------------------------------------------------
@pytest.fixture(scope="module")
def native_run(tmp_path_factory):
    from tinymodels import TINY_RECIPE, make_tiny_unet

    from lowbit_deploy.export.onnx_export import export_run
    from lowbit_deploy.qat.trainer import train

    root = tmp_path_factory.mktemp("native-int4")
    make_tiny_unet().save_pretrained(root / "model" / "unet")
    data = copy.deepcopy(TINY_RECIPE)
    data["quantize"]["layers"][4:4] = NATIVE_RULES
    run = root / "run"
    train(parse_recipe(data), run, model_path=str(root / "model"), progress=False)
    return run, export_run(run)


@pytest.fixture(scope="module")
def context(native_run):
    from lowbit_deploy.validate.parity import prepare_validation

    return prepare_validation(native_run[0])


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {tensor.name: tensor for tensor in model.graph.initializer}


def test_the_graph_holds_int4_dequantize_for_exactly_the_native_layers(native_run, context):
    run, _ = native_run
    model = onnx.load(str(run / "model.onnx"))
    plan = context.checkpoint.plan
    dequantized = {node.input[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
    native = {f"unet.{layer.name}.{CODES}" for layer in plan.exported_as(WeightExport.NATIVE_INT4)}
    assert len(native) == 29 and dequantized == native
    int4 = {name for name, tensor in _initializers(model).items() if tensor.data_type == TensorProto.INT4}
    assert int4 == native
    unpacked = {node.input[0] for node in model.graph.node if node.domain == "lowbit"}
    assert unpacked == {f"unet.{layer.name}.packed" for layer in plan.exported_as(WeightExport.PACKED)}
    assert {(imp.domain, imp.version) for imp in model.opset_import} == {("", NATIVE_INT4_OPSET), ("lowbit", 2)}


def test_conv_is_per_output_channel_and_linear_blocked_along_its_inputs_with_zero_point_0(native_run, context):
    run, _ = native_run
    model = onnx.load(str(run / "model.onnx"))
    initializers = _initializers(model)
    nodes = {node.input[0]: node for node in model.graph.node if node.op_type == "DequantizeLinear"}
    for layer in context.checkpoint.plan.exported_as(WeightExport.NATIVE_INT4):
        node = nodes[f"unet.{layer.name}.{CODES}"]
        attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
        scale = initializers[f"unet.{layer.name}.{SCALE}"]
        assert len(node.input) == 2  # no zero-point input: 0, the only one TensorRT takes
        assert scale.data_type == TensorProto.FLOAT
        in_features = layer.weight_numel // layer.out_features
        if layer.layer_type == "Conv2d":
            assert attributes == {"axis": 0} and list(scale.dims) == [layer.out_features]
        else:
            assert attributes == {"axis": 1, "block_size": 16}
            assert list(scale.dims) == [layer.out_features, in_features // 16]


def test_onnx_runtime_matches_the_deployed_model_within_the_gates_and_weights_exactly(native_run, context):
    from lowbit_deploy.validate.parity import check_onnx

    run, report = native_run
    outputs, weights = check_onnx(run / "model.onnx", context, context.checkpoint.recipe.validate_.gates)
    assert outputs.status == "passed", outputs.failures
    assert weights.status == "passed", weights.failures
    assert weights.details["decoded_layers_checked"] == report.lowbit_nodes + report.native_int4_layers == 29 + 44
    assert weights.details["initializers_unmatched"] == 0


def test_native_layers_decode_the_very_weight_the_packed_format_decodes(native_run, context):
    """Same trained layer, both exports: INT4 codes = the packed codes, decoded weights equal bit for bit."""
    from lowbit_deploy.export.handlers import packed_layer
    from lowbit_deploy.export.native_int4 import native_int4_layers
    from lowbit_deploy.quant.apply import quantized_layers

    trained = quantized_layers(context.checkpoint.unet)
    native = native_int4_layers(context.deployed.unet)
    assert len(native) == 29
    for name, module in native.items():
        packed = packed_layer(name, copy.deepcopy(trained[name]), "auto")
        assert module.weight_value.dtype == packed.weight_value.dtype == torch.float32
        assert module.weight_value.numpy().tobytes() == packed.weight_value.numpy().tobytes(), name
        assert module.int4_codes.dtype == torch.int8 and int(module.int4_codes.abs().max()) <= 8


def test_export_reports_the_int4_bytes_as_stored(native_run):
    run, report = native_run
    model = onnx.load(str(run / "model.onnx"))
    initializers = _initializers(model)
    codes = [tensor for name, tensor in initializers.items() if name.endswith(f".{CODES}")]
    weights = sum(int(np.prod(tensor.dims)) for tensor in codes)
    stored = sum((int(np.prod(tensor.dims)) + 1) // 2 for tensor in codes)  # two codes per byte
    stored += sum(4 * int(np.prod(initializers[tensor.name.replace(CODES, SCALE)].dims)) for tensor in codes)
    entry = json.loads((run / "report.json").read_text())["export"]
    assert entry["native_int4_layers"] == report.native_int4_layers == 29
    assert entry["native_int4_weights"] == weights and entry["native_int4_bytes"] == stored
    assert entry["native_int4_bytes_per_weight"] == pytest.approx(stored / weights)
    # 0.5 for the codes plus the float32 scales: 4/16 per weight for the tiny UNet's 16-wide blocks.
    assert 0.5 < entry["native_int4_bytes_per_weight"] < 0.8 and entry["onnx_opset"] == NATIVE_INT4_OPSET


@pytest.mark.parametrize("corruption", ["flipped code", "int8 codes"])
def test_a_corrupted_int4_initializer_fails_the_exact_weight_check(native_run, context, tmp_path, corruption):
    from lowbit_deploy.validate.weights import weight_parity

    run, _ = native_run
    model = onnx.load(str(run / "model.onnx"))
    victim = next(tensor for tensor in model.graph.initializer if tensor.name.endswith(f".{CODES}"))
    codes = numpy_helper.to_array(victim).astype(np.int8)
    if corruption == "flipped code":
        codes.reshape(-1)[3] = 7 if codes.reshape(-1)[3] != 7 else -8
        victim.CopyFrom(int4_initializer(victim.name, codes))
        expected = [f"initializer {victim.name}: 1 of", f"decoded weight of {victim.name}"]
    else:
        victim.CopyFrom(numpy_helper.from_array(codes, victim.name))
        expected = [f"initializer {victim.name} is INT8, not INT4"]
    onnx.save(model, str(tmp_path / "model.onnx"))
    result = weight_parity(tmp_path / "model.onnx", context.deployed)
    assert not result.passed
    for text in expected:
        assert any(failure.startswith(text) for failure in result.failures), (text, result.failures)


def test_a_model_with_every_quantized_layer_native_has_no_lowbit_op_and_still_validates(tmp_path):
    from tinymodels import TINY_RECIPE, make_tiny_unet

    from lowbit_deploy.export.onnx_export import export_run
    from lowbit_deploy.qat.trainer import train
    from lowbit_deploy.validate.parity import check_onnx, prepare_validation

    make_tiny_unet().save_pretrained(tmp_path / "model" / "unet")
    data = copy.deepcopy(TINY_RECIPE)
    data["train"]["steps"] = 1
    data["quantize"]["layers"] = [{"pattern": "conv_*", "keep_float": True},
                                  *data["quantize"]["layers"][2:4], {"pattern": "*", **NATIVE}]
    train(parse_recipe(data), tmp_path / "run", model_path=str(tmp_path / "model"), progress=False)
    report = export_run(tmp_path / "run")
    model = onnx.load(str(tmp_path / "run" / "model.onnx"))
    assert report.lowbit_nodes == report.op_version == 0 and report.quantized_weights == 0
    context = prepare_validation(tmp_path / "run")
    # Every Conv2d/Linear but conv_in/conv_out and the 4 time layers (float).
    assert report.native_int4_layers == len(context.checkpoint.plan.quantized) == 71 and not model.functions
    assert [(imp.domain, imp.version) for imp in model.opset_import] == [("", NATIVE_INT4_OPSET)]
    outputs, weights = check_onnx(tmp_path / "run" / "model.onnx", context, context.checkpoint.recipe.validate_.gates)
    assert (outputs.status, weights.status) == ("passed", "passed"), outputs.failures + weights.failures
    assert weights.details["decoded_layers_checked"] == 71
