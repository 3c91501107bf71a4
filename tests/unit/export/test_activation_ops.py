"""Quantized activations in the deployed graph: the ONNX function and standard Q/DQ are bit-exact with the op's
reference, the deployed torch model equals the trained one (LoRA merged, per-step tables by step index), and a step
index beyond the table is a clear error."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from lowbit_deploy.errors import UserError
from lowbit_deploy.export.activation_ops import ACTIVATION_OP_TYPE, make_activation_function
from lowbit_deploy.export.deployed import deploy_unet
from lowbit_deploy.export.handlers import ExportOptions
from lowbit_deploy.export.lowbit_ops import OP_DOMAIN
from lowbit_deploy.export.onnx_export import export_onnx
from lowbit_deploy.quant.activation import activation_quantizers
from lowbit_deploy.quant.activation_grid import ActivationGrid, quantize_dequantize_numpy
from lowbit_deploy.quant.apply import apply_plan, plan_for, quantized_layers
from lowbit_deploy.quant.lora import attach_lora
from lowbit_deploy.recipes import parse_recipe
from lowbit_deploy.runtime.ort import OrtRunner
from lowbit_deploy.signature import TimeInput, deployed_signature
from lowbit_deploy.validate.sampling import schedule_timesteps

SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
             "clip_sample": False, "prediction_type": "epsilon"}
SEQ_LEN = 5
GRIDS = [ActivationGrid(4), ActivationGrid(8), ActivationGrid(8, symmetric=False), ActivationGrid(4, symmetric=False)]


def _function_model(grid: ActivationGrid, steps: int, shape: tuple[int, ...]) -> onnx.ModelProto:
    inputs = ["x", "scale", "step_index"] + ([] if grid.symmetric else ["zero_point"])
    node = helper.make_node(ACTIVATION_OP_TYPE, inputs, ["y"], domain=OP_DOMAIN, qmin=grid.qmin, qmax=grid.qmax)
    dims = ["batch", *shape[1:]]
    values = [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims),
              helper.make_tensor_value_info("scale", TensorProto.FLOAT, [steps]),
              helper.make_tensor_value_info("step_index", TensorProto.INT64, ["batch"])]
    if not grid.symmetric:
        values.append(helper.make_tensor_value_info("zero_point", TensorProto.FLOAT, [steps]))
    graph = helper.make_graph([node], "qdq", values, [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(OP_DOMAIN, 1)],
                              functions=[make_activation_function(17, not grid.symmetric)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: g.describe())
@pytest.mark.parametrize("steps", [1, 20])
@pytest.mark.parametrize("shape", [(3, 11), (2, 4, 9), (4, 3, 5, 5)])
def test_the_onnx_function_is_bit_exact_with_the_reference(grid, steps, shape):
    rng = np.random.default_rng(steps + len(shape))
    x = (rng.standard_normal(shape) * 4).astype(np.float32)
    scale = rng.uniform(0.01, 0.5, steps).astype(np.float32)
    index = rng.integers(0, steps, shape[0])
    x.reshape(shape[0], -1)[0, :6] = (np.arange(-3, 3) + 0.5).astype(np.float32) * scale[index[0]]  # exact ties
    feeds = {"x": x, "scale": scale, "step_index": index}
    zero = None
    if not grid.symmetric:
        zero = feeds["zero_point"] = rng.integers(grid.qmin, grid.qmax + 1, steps).astype(np.float32)
    session = ort.InferenceSession(_function_model(grid, steps, shape).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, feeds)[0]
    assert got.tobytes() == quantize_dequantize_numpy(x, scale, index, grid.qmin, grid.qmax, zero).tobytes()


def test_standard_int8_qdq_is_bit_exact_with_the_reference():
    """One constant 8-bit symmetric scale is exported as QuantizeLinear/DequantizeLinear: same math (x / s)."""
    x = (np.random.default_rng(0).standard_normal(200_000) * 3).astype(np.float32)
    scale = np.float32(0.0123)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
                              initializer=[helper.make_tensor("s", TensorProto.FLOAT, [], [float(scale)]),
                                           helper.make_tensor("z", TensorProto.INT8, [], [0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    expected = quantize_dequantize_numpy(x[:, None], np.array([scale]), np.zeros(x.size, np.int64), -128, 127)
    assert got.tobytes() == expected.reshape(-1).tobytes()


def _efficientdm_model(unet, recipe_dict, *, symmetric=True, cache=False, lora=True):
    recipe_dict["quantize"]["activations"]["symmetric"] = symmetric
    if cache:
        recipe_dict["quantize"]["layers"][2:3] = [{"pattern": "time_embedding.*", "cache": True},
                                                  {"pattern": "*.time_emb_proj", "cache": True}]
    recipe = parse_recipe(recipe_dict)
    plan = plan_for(unet, recipe.quantize)
    signature = deployed_signature(unet, SEQ_LEN, plan, SCHEDULER, recipe.schedule)
    apply_plan(unet, plan, step_timesteps=signature.step_timesteps)
    torch.manual_seed(0)
    for quantizer in activation_quantizers(unet).values():  # stand-in calibration: distinct scales per step
        quantizer.set_table(torch.rand(quantizer.steps) * 0.05 + 0.01,
                            None if symmetric else torch.randint(100, 150, (quantizer.steps,)).float())
    if lora:
        attach_lora(unet, recipe.train.lora)
        with torch.no_grad():
            for layer in quantized_layers(unet).values():
                if layer._modules.get("lora") is not None:
                    layer.lora.b.normal_(0, 0.02)
    return unet.eval(), plan, signature


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("cache", [False, True])
def test_the_deployed_model_equals_the_trained_one_bit_for_bit(tiny_unet, tiny_efficientdm_recipe_dict, symmetric,
                                                               cache):
    """fp32 storage and no cached tables leave no storage rounding: the trained fake-quant model at timestep t and
    the deployed model at t's step index compute the same floats (LoRA merged, tables by step index)."""
    unet, plan, signature = _efficientdm_model(tiny_unet, tiny_efficientdm_recipe_dict, symmetric=symmetric,
                                               cache=cache)
    assert signature.time_input is TimeInput.STEP_INDEX and len(signature.step_timesteps) == 4
    deployed = deploy_unet(unet, plan, signature, ExportOptions(float_storage="fp32"))
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(3, *signature.sample_shape, generator=generator)
    states = torch.randn(3, SEQ_LEN, signature.cross_attention_dim, generator=generator)
    index = torch.tensor([0, 3, 1])
    timesteps = torch.tensor(signature.step_timesteps, dtype=torch.float32)[index]
    with torch.no_grad():
        trained = unet(sample, timesteps, encoder_hidden_states=states).sample
        got = deployed(sample, index, states)
    if not cache:
        assert torch.equal(got, trained)
        return
    # Cached tables are stored in fp16: the time features round, which flips some activation roundings downstream.
    # Still the same model: far closer than the same inputs at the neighbouring step.
    def sqnr(a, b):
        return float(10 * torch.log10(a.pow(2).sum() / (a - b).pow(2).sum()))

    with torch.no_grad():
        neighbour = deployed(sample, (index + 1) % 4, states)
    assert sqnr(trained, got) > 20 and sqnr(trained, got) > sqnr(trained, neighbour) + 10


def test_export_emits_the_op_for_per_step_tables_and_standard_qdq_for_constant_int8(tmp_path, tiny_unet,
                                                                                    tiny_efficientdm_recipe_dict):
    unet, plan, signature = _efficientdm_model(tiny_unet, tiny_efficientdm_recipe_dict)
    report = export_onnx(unet, tmp_path / "model.onnx", plan=plan, signature=signature)
    model = onnx.load(str(tmp_path / "model.onnx"))
    per_step = [d for d in plan.quantized if d.act_per_step]
    assert report.activation_nodes == len(per_step) > 0
    assert report.activation_qdq_pairs == len(plan.quantized) - len(per_step) > 0
    assert sum(node.op_type == "DequantizeLinear" for node in model.graph.node) == report.activation_qdq_pairs
    assert [fn.name for fn in model.functions if fn.name == ACTIVATION_OP_TYPE] == [ACTIVATION_OP_TYPE]
    node = next(n for n in model.graph.node if n.op_type == ACTIVATION_OP_TYPE)
    # The index comes from the graph input (through the UNet's broadcast and a cast), never from a counter.
    producers = {output: producer for producer in model.graph.node for output in producer.output}
    source, path = node.input[2], []
    while source in producers:
        path.append(producers[source].op_type)
        source = producers[source].input[0]
    assert source == "step_index" and set(path) <= {"Cast", "Expand"}, (source, path)
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attributes == {"qmin": -128, "qmax": 127, "plugin_namespace": b"lowbit", "plugin_version": b"1"}


def test_onnxruntime_agrees_with_the_deployed_model_within_the_float_noise(tmp_path, tiny_unet,
                                                                         tiny_efficientdm_recipe_dict):
    """Not bit-exact: an ulp of accumulation order flips an activation rounding (docs/gates.md). The function is
    bit-exact (above); here the whole graph stays close, and a wrong table row would not."""
    unet, plan, signature = _efficientdm_model(tiny_unet, tiny_efficientdm_recipe_dict)
    export_onnx(unet, tmp_path / "model.onnx", plan=plan, signature=signature)
    deployed = deploy_unet(unet, plan, signature)
    runner = OrtRunner(tmp_path / "model.onnx")
    generator = torch.Generator().manual_seed(1)
    feeds = signature.random_feeds(4, generator, torch.randn(4, SEQ_LEN, signature.cross_attention_dim,
                                                             generator=generator))
    with torch.no_grad():
        expected = deployed(*feeds.values())
    got = runner(feeds)
    sqnr = 10 * torch.log10(expected.pow(2).sum() / (got - expected).pow(2).sum().clamp_min(1e-30))
    assert sqnr > 40, float(sqnr)
    shifted = dict(feeds, step_index=(feeds["step_index"] + 1) % signature.num_steps)
    with torch.no_grad():
        other = deployed(*shifted.values())
    assert 10 * torch.log10(expected.pow(2).sum() / (other - expected).pow(2).sum()) < sqnr - 10


def test_a_step_index_beyond_the_table_is_a_clear_error(tmp_path, tiny_unet, tiny_efficientdm_recipe_dict):
    unet, plan, signature = _efficientdm_model(tiny_unet, tiny_efficientdm_recipe_dict)
    export_onnx(unet, tmp_path / "model.onnx", plan=plan, signature=signature)
    deployed = deploy_unet(unet, plan, signature)
    feeds = signature.random_feeds(2, torch.Generator().manual_seed(0), torch.randn(2, SEQ_LEN, 16))
    feeds["step_index"] = torch.tensor([0, 4])
    with pytest.raises(UserError, match=r"step index \[0, 4\] is out of range: this model's activation scales are "
                                        r"trained for 4 steps"):
        deployed(*feeds.values())
    with pytest.raises(UserError, match=r"step_index \[0, 4\] is out of range"):
        OrtRunner(tmp_path / "model.onnx")(feeds)


def test_the_schedule_the_tables_are_indexed_by_is_the_recipes(tiny_unet, tiny_efficientdm_recipe_dict):
    _, _, signature = _efficientdm_model(tiny_unet, tiny_efficientdm_recipe_dict, lora=False)
    assert list(signature.step_timesteps) == schedule_timesteps(SCHEDULER, 4)
