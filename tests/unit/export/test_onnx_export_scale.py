"""Export at scale: the fp16 reference built without copying the model and traced at the smallest latent (the same
graph as a full-size trace), and external data past the 2 GiB protobuf limit."""

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from lowbit_deploy.export import onnx_export
from lowbit_deploy.export.deployed import deploy_unet
from lowbit_deploy.export.onnx_export import export_float_reference, export_onnx, float_reference_unet
from lowbit_deploy.quant.apply import apply_plan, plan_for, quantized_layers
from lowbit_deploy.quant.fake_quant import deployed_float_layer
from lowbit_deploy.recipes import parse_recipe
from lowbit_deploy.runtime.ort import OrtRunner, read_signature
from lowbit_deploy.signature import deployed_signature
from lowbit_deploy.validate.sampling import module_runner

SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
             "clip_sample": False, "prediction_type": "epsilon"}
SEQ_LEN = 5


@pytest.fixture
def trained(tiny_unet, tiny_recipe_dict):
    recipe = parse_recipe(tiny_recipe_dict)
    plan = plan_for(tiny_unet, recipe.quantize)
    apply_plan(tiny_unet, plan)
    return tiny_unet, plan, deployed_signature(tiny_unet, SEQ_LEN, plan, SCHEDULER, recipe.schedule)


def _fingerprint(model: onnx.ModelProto) -> list[tuple]:
    """Op types, inputs, outputs and attribute values of every node: equal iff the computations are."""
    return [(node.op_type, node.domain, tuple(node.input), tuple(node.output),
             tuple(attribute.SerializeToString() for attribute in node.attribute)) for node in model.graph.node]


def _io(model: onnx.ModelProto) -> list[tuple]:
    return [(value.name, value.type.tensor_type.elem_type,
             tuple(dim.dim_value or dim.dim_param for dim in value.type.tensor_type.shape.dim))
            for value in (*model.graph.input, *model.graph.output)]


def test_reference_traced_at_the_smallest_latent_is_the_full_size_graph(tmp_path, trained):
    unet, plan, signature = trained
    small, full = tmp_path / "small.onnx", tmp_path / "full.onnx"
    export_float_reference(unet, plan, signature, small, 17)  # default: traced at the smallest latent
    export_float_reference(unet, plan, signature, full, 17, trace_side=None)
    small_model, full_model = onnx.load(str(small)), onnx.load(str(full))
    assert _fingerprint(small_model) == _fingerprint(full_model)
    assert _io(small_model) == _io(full_model)
    assert _io(small_model)[0][2][2:] == signature.sample_shape[1:]  # fixed to the model's latent size
    stored = {init.name: init.raw_data for init in full_model.graph.initializer}
    assert {init.name: init.raw_data for init in small_model.graph.initializer} == stored
    assert read_signature(small) == read_signature(full)


# Each deployed-contract feature the trace meets: packed W2 with a float timestep, per-step activation scales
# (EfficientDM), native INT4 DequantizeLinear, SDXL added conditions with a cached time table, class labels.
PACKED_CASES = {
    "w2-balanced": ("make_tiny_unet", "TINY_RECIPE", None),
    "efficientdm": ("make_tiny_unet", "TINY_EFFICIENTDM_RECIPE", None),
    "native-int4": ("make_tiny_unet", "TINY_RECIPE", "native"),
    "sdxl-cached": ("make_tiny_sdxl_unet", None, True),
    "class-labels": ("make_tiny_class_unet", None, False),
}


@pytest.mark.parametrize("case", PACKED_CASES)
def test_packed_export_traced_at_the_smallest_latent_is_the_full_size_graph(tmp_path, case):
    import tinymodels

    from lowbit_deploy.export.onnx_export import export_deployed
    from lowbit_deploy.qat.checkpoint import load_checkpoint
    from lowbit_deploy.qat.trainer import train

    make, recipe_name, variant = PACKED_CASES[case]
    if recipe_name is None:
        data = tinymodels.tiny_family_recipe(cached=variant)
    else:
        data = copy.deepcopy(getattr(tinymodels, recipe_name))
        if variant == "native":
            from test_native_int4 import NATIVE_RULES

            data["quantize"]["layers"][4:4] = NATIVE_RULES
    getattr(tinymodels, make)().save_pretrained(tmp_path / "model" / "unet")
    train(parse_recipe(data), tmp_path / "run", model_path=str(tmp_path / "model"), steps=0, progress=False)
    checkpoint = load_checkpoint(tmp_path / "run")
    assert checkpoint.signature.sample_shape[1] > onnx_export.smallest_side(checkpoint.unet)  # a real change of size
    models = {}
    for side in (-1, None):  # default: traced at the smallest latent; None: at the signature's size
        deployed = deploy_unet(checkpoint.unet, checkpoint.plan, checkpoint.signature)
        models[side] = export_deployed(deployed, tmp_path / f"{side}.onnx", trace_side=side)
    small, full = models[-1], models[None]
    assert _fingerprint(small) == _fingerprint(full)
    assert _io(small) == _io(full)
    assert {init.name: init.raw_data for init in small.graph.initializer} == \
        {init.name: init.raw_data for init in full.graph.initializer}
    assert small.metadata_props == full.metadata_props
    casts = _no_op_index_casts(small)
    assert casts == [], casts


def _no_op_index_casts(model: onnx.ModelProto) -> list[str]:
    """Cast nodes on the step index's way in (through Expand) that leave it int64: the tracer records one for a no-op
    ``.to(torch.int64)`` (diffusers' own shape-arithmetic casts are left to the runtimes' optimizers)."""
    producers = {output: node for node in model.graph.node for output in node.output}

    def from_step_index(name: str) -> bool:
        while name in producers and producers[name].op_type == "Expand":
            name = producers[name].input[0]
        return name == "step_index"

    return [node.name for node in model.graph.node if node.op_type == "Cast" and from_step_index(node.input[0])
            and next(a.i for a in node.attribute if a.name == "to") == onnx.TensorProto.INT64]


def test_reference_holds_the_deployed_weights_and_leaves_the_model_alone(trained):
    unet, _, _ = trained
    before = {key: tensor.clone() for key, tensor in unet.state_dict().items()}
    reference = float_reference_unet(unet)
    assert set(quantized_layers(unet))  # still the trained model: export deploys it afterwards
    assert all(torch.equal(before[key], tensor) for key, tensor in unet.state_dict().items())
    state = reference.state_dict()
    assert all(tensor.dtype == torch.float16 for tensor in state.values() if tensor.is_floating_point())
    for name, layer in quantized_layers(unet).items():
        assert torch.equal(state[f"{name}.weight"], deployed_float_layer(layer).weight.to(torch.float16))
    floats = {key: tensor for key, tensor in before.items() if key in state and not any(
        key.startswith(f"{name}.") for name in quantized_layers(unet))}
    assert floats and all(torch.equal(state[key], tensor.to(torch.float16)) for key, tensor in floats.items())
    # The reference computes the float UNet: the trained model with dequantized weights and float activations.
    generator = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    sample = torch.randn(2, unet.config.in_channels, size, size, generator=generator)
    states = torch.randn(2, SEQ_LEN, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        expected = copy.deepcopy(unet).float()(sample, torch.tensor([10, 500]), states).sample
        actual = reference.float()(sample, torch.tensor([10, 500]), states).sample
    torch.testing.assert_close(actual, expected, atol=2e-2, rtol=0)  # fp16-stored weights vs float32 ones


def test_a_model_past_the_protobuf_limit_goes_to_external_data(tmp_path, trained, monkeypatch):
    unet, plan, signature = trained
    deployed = deploy_unet(unet, plan, signature)
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_ABOVE", 0)  # every model is "large"
    target = tmp_path / "model.onnx"
    report = export_onnx(copy.deepcopy(unet), target, plan=plan, signature=signature)
    data = tmp_path / "model.onnx.data"
    assert data.is_file() and report.onnx_bytes == target.stat().st_size + data.stat().st_size
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    header = onnx.load(str(target), load_external_data=False)
    assert any(init.data_location == onnx.TensorProto.EXTERNAL for init in header.graph.initializer)
    assert read_signature(target) == signature
    generator = torch.Generator().manual_seed(0)
    feeds = signature.random_feeds(2, generator, torch.randn(2, SEQ_LEN, signature.cross_attention_dim))
    with torch.no_grad():
        expected = module_runner(deployed, signature)(feeds).numpy()
    for mode in ("packed", "folded"):
        np.testing.assert_allclose(OrtRunner(target, weights=mode)(feeds).numpy(), expected, atol=1e-5, rtol=0)
    monkeypatch.undo()  # a small export into the same place drops the stale data file
    export_onnx(copy.deepcopy(unet), target, plan=plan, signature=signature)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx"]
    loaded = onnx.load(str(target))
    assert numpy_helper.to_array(loaded.graph.initializer[0]).size > 0
