import pytest
import torch

from lowbit_deploy.quant.fake_quant import WeightQuantizer
from lowbit_deploy.quant.grids import GridKind, IntegerGrid
from lowbit_deploy.quant.scale_init import ScaleInit, initialize_scale, quantization_mse


@pytest.mark.parametrize("grid", [IntegerGrid(GridKind.BALANCED, b) for b in (1, 2, 3)] +
                         [IntegerGrid(GridKind.SIGNED, b) for b in (2, 4)], ids=lambda g: f"{g.kind.value}{g.bits}")
def test_alternating_optimisation_beats_minmax(grid):
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    errors = {}
    for method in ScaleInit:
        quantizer = WeightQuantizer(weight.shape, grid)
        initialize_scale(weight, quantizer, method)
        errors[method] = quantization_mse(weight, quantizer)
    assert errors[ScaleInit.ALTERNATING] < errors[ScaleInit.MINMAX]


def test_minmax_scale_maps_the_largest_weight_to_the_edge():
    weight = torch.tensor([[0.5, -2.0, 1.0], [0.1, 0.2, 0.4]])
    quantizer = WeightQuantizer(weight.shape, IntegerGrid(GridKind.BALANCED, 2))
    initialize_scale(weight, quantizer, ScaleInit.MINMAX)
    assert quantizer.scale.tolist() == pytest.approx([1.0, 0.2])


def test_all_zero_channel_keeps_a_positive_scale():
    weight = torch.zeros(2, 4)
    weight[1] = torch.tensor([1.0, -1.0, 0.5, 0.25])
    quantizer = WeightQuantizer(weight.shape, IntegerGrid(GridKind.BALANCED, 1))
    initialize_scale(weight, quantizer, ScaleInit.ALTERNATING)
    assert torch.all(quantizer.scale > 0)
    assert torch.equal(quantizer.dequantized_weight(weight)[0], torch.zeros(4))
