import copy

import pytest
import torch
from tinymodels import TINY_RECIPE

from lowbit_deploy.qat.optimizer import make_optimizer, parameter_groups
from lowbit_deploy.quant.apply import apply_plan, plan_for, quantized_layers
from lowbit_deploy.quant.grids import ScaleInit
from lowbit_deploy.recipes import parse_recipe


@pytest.fixture
def student(tiny_unet):
    plan = plan_for(tiny_unet, parse_recipe(copy.deepcopy(TINY_RECIPE)).quantize)
    apply_plan(tiny_unet, plan, scale_init=ScaleInit.MINMAX)
    return tiny_unet.train().requires_grad_(True)


def _step_with_zero_gradients(model, optimizer):
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()


def test_weight_decay_leaves_quantizer_scales_biases_and_norms_alone(student):
    before = {name: parameter.detach().clone() for name, parameter in student.named_parameters()}
    optimizer = make_optimizer(student, lr=0.5, weight_decay=1.0)
    _step_with_zero_gradients(student, optimizer)
    after = dict(student.named_parameters())
    scales = [name for name in before if name.endswith("weight_quantizer.scale")]
    assert len(scales) == len(quantized_layers(student))
    for name in scales + [name for name in before if name.endswith(".bias") or ".norm" in name]:
        assert torch.equal(after[name], before[name]), name
    # ... while latent weights do decay (w <- w * (1 - lr * weight_decay) with a zero gradient).
    conv = "down_blocks.0.resnets.0.conv1.weight"
    assert torch.equal(after[conv], before[conv] * 0.5)


def test_plain_adamw_would_shrink_the_scales(student):
    """The defect the parameter groups fix: with every parameter decayed, a scale with zero gradient shrinks."""
    scale = student.conv_in.weight_quantizer.scale
    before = scale.detach().clone()
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.5, weight_decay=1.0)
    _step_with_zero_gradients(student, optimizer)
    assert torch.equal(scale.detach(), before * 0.5)


def test_every_trainable_parameter_is_in_exactly_one_group(student):
    groups = parameter_groups(student, 0.1, 1e-3)
    grouped = [id(parameter) for group in groups for parameter in group["params"]]
    assert sorted(grouped) == sorted(id(parameter) for parameter in student.parameters())
    assert [(group["name"], group["weight_decay"]) for group in groups] == [("decay", 0.1), ("no_decay", 0.0)]
    assert [group["base_lr"] for group in groups] == [1e-3, 1e-3]
