"""QALoRA: the merged update equals running the LoRA branch, the merge happens before fake quantization, bad ranks
are clear errors, only LoRA and quantizer parameters train, learning rates follow each layer's weight scale."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit_deploy.errors import UserError
from lowbit_deploy.quant.fake_quant import QUANTIZABLE_LAYERS
from lowbit_deploy.quant.grids import GridKind, IntegerGrid
from lowbit_deploy.quant.lora import LoRA, attach_lora, lora_parameter_groups, trainable_fraction
from lowbit_deploy.quant.scale_init import initialize_scale
from lowbit_deploy.recipe_efficientdm import LoraSection


def _quantized(layer: nn.Module, bits: int = 4):
    quantized = QUANTIZABLE_LAYERS[type(layer)](layer, IntegerGrid(GridKind.SIGNED, bits))
    initialize_scale(quantized.weight, quantized.weight_quantizer, "alternating", 10)
    return quantized


def _random_lora(layer, rank: int) -> LoRA:
    lora = LoRA(tuple(layer.weight.shape), rank)
    with torch.no_grad():
        lora.b.normal_(0, 0.05)
    return lora


@pytest.mark.parametrize("conv", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1),
                                  dict(kernel_size=1), dict(kernel_size=3, padding=2, dilation=2)])
def test_a_merged_conv_update_equals_the_conv_then_1x1_branch(conv):
    """EfficientDM's branch: A = conv(in -> r) with the layer's kernel/stride/padding/dilation, B = 1x1 conv."""
    torch.manual_seed(0)
    layer = nn.Conv2d(6, 10, **conv)
    lora = _random_lora(layer, 3)
    x = torch.randn(2, 6, 9, 9)
    a = lora.a.reshape(3, 6, *layer.weight.shape[2:])
    branch = F.conv2d(F.conv2d(x, a, None, layer.stride, layer.padding, layer.dilation), lora.b[:, :, None, None])
    merged = F.conv2d(x, layer.weight + lora.delta(), layer.bias, layer.stride, layer.padding, layer.dilation)
    torch.testing.assert_close(merged, layer(x) + branch, rtol=1e-5, atol=1e-5)


def test_a_merged_linear_update_equals_b_after_a():
    torch.manual_seed(0)
    layer = nn.Linear(12, 7)
    lora = _random_lora(layer, 4)
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(F.linear(x, layer.weight + lora.delta(), layer.bias),
                               layer(x) + F.linear(F.linear(x, lora.a), lora.b), rtol=1e-5, atol=1e-5)


def test_the_update_is_merged_before_fake_quantization():
    torch.manual_seed(0)
    layer = _quantized(nn.Conv2d(4, 8, 3, padding=1))
    layer.lora = _random_lora(layer, 2)
    merged = layer.weight + layer.lora.delta()
    assert torch.equal(layer.quantized_weight(), layer.weight_quantizer(merged))
    assert torch.equal(layer.weight_quantizer.integer_weight(layer.latent_weight()),
                       layer.weight_quantizer.integer_weight(merged))
    # B starts at zero: a fresh LoRA leaves the quantized weight unchanged.
    layer.lora = LoRA(tuple(layer.weight.shape), 2)
    assert torch.equal(layer.quantized_weight(), layer.weight_quantizer(layer.weight))


def _model_with_quantized_layers():
    model = nn.Sequential()
    model.conv_in = _quantized(nn.Conv2d(1, 8, 3, padding=1), bits=8)
    model.body = _quantized(nn.Conv2d(8, 8, 3, padding=1))
    model.head = _quantized(nn.Linear(8, 16))
    model.norm = nn.GroupNorm(2, 8)
    return model


def test_rank_larger_than_a_layer_allows_is_a_clear_error():
    model = _model_with_quantized_layers()
    with pytest.raises(UserError,
                       match=r"rank 9 is larger than layer body allows \(at most 8 .* 2 layer\(s\) are too small"):
        attach_lora(model, LoraSection(rank=9, exclude=["conv_in"]))
    with pytest.raises(UserError, match=r"every quantized layer is excluded"):
        attach_lora(model, LoraSection(rank=2, exclude=["*"]))


def test_a_grouped_conv_is_refused():
    model = nn.Sequential()
    model.grouped = _quantized(nn.Conv2d(8, 8, 3, padding=1, groups=2))
    with pytest.raises(UserError, match="grouped conv"):
        attach_lora(model, LoraSection(rank=2, exclude=[]))


def test_only_lora_and_quantizer_parameters_train_and_the_fraction_is_reported():
    model = _model_with_quantized_layers()
    targets = attach_lora(model, LoraSection(rank=2))
    assert sorted(targets) == ["body", "head"]  # conv_in excluded by default (EfficientDM keeps it at W8A8)
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["body.lora.a", "body.lora.b", "body.weight_quantizer.scale", "conv_in.weight_quantizer.scale",
                         "head.lora.a", "head.lora.b", "head.weight_quantizer.scale"]
    count, total = trainable_fraction(model)
    assert count == sum(dict(model.named_parameters())[name].numel() for name in trainable) and count < total


def test_attaching_is_seeded_so_a_resume_rebuilds_the_same_start():
    first, second = _model_with_quantized_layers(), _model_with_quantized_layers()
    second.load_state_dict(first.state_dict(), strict=False)
    attach_lora(first, LoraSection(rank=2), generator_seed=3)
    torch.rand(5)  # the global generator moved: attaching must not depend on it
    attach_lora(second, LoraSection(rank=2), generator_seed=3)
    assert torch.equal(first.body.lora.a, second.body.lora.a)


def test_scale_aware_rates_follow_each_layers_mean_weight_scale():
    model = _model_with_quantized_layers()
    with torch.no_grad():
        model.head.weight_quantizer.scale.mul_(4)
    section = LoraSection(rank=2, weight_scale_lr=1e-6, activation_scale_lr=5e-4)
    attach_lora(model, section)
    groups = {group["name"]: group for group in lora_parameter_groups(model, 1e-3, section)}
    means = {name: float(getattr(model, name).weight_quantizer.deployed_scale().mean()) for name in ("body", "head")}
    rates = {name: groups[f"lora:{name}"]["base_lr"] for name in means}
    assert rates["head"] / rates["body"] == pytest.approx(means["head"] / means["body"])
    assert (rates["head"] + rates["body"]) / 2 == pytest.approx(1e-3)  # the stage lr stays the average LoRA rate
    assert groups["weight_scales"]["base_lr"] == 1e-6 and "activation_scales" not in groups
    flat = lora_parameter_groups(model, 1e-3, SimpleNamespace(**{**section.model_dump(), "scale_aware": False}))
    assert {g["base_lr"] for g in flat if g["name"].startswith("lora:")} == {1e-3}


def test_lora_survives_a_deep_copy_and_a_state_dict_round_trip():
    model = _model_with_quantized_layers()
    attach_lora(model, LoraSection(rank=2))
    with torch.no_grad():
        model.body.lora.b.normal_()
    clone = copy.deepcopy(model)
    assert torch.equal(clone.body.quantized_weight(), model.body.quantized_weight())
