import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from lowbit_deploy.export.lowbit_ops import PackedWeight, standalone_model
from lowbit_deploy.quant.fake_quant import QUANTIZABLE_LAYERS, WeightQuantizer, round_ste
from lowbit_deploy.quant.grids import GridKind, IntegerGrid
from lowbit_deploy.quant.packing import PackingFormat, codes_per_word, unpack_codes
from lowbit_deploy.quant.scale_init import ScaleInit, initialize_scale

GRIDS = [IntegerGrid(kind, bits) for kind in GridKind for bits in (1, 2, 3, 4, 8)]


def _calibrated(weight: torch.Tensor, grid: IntegerGrid) -> WeightQuantizer:
    quantizer = WeightQuantizer(weight.shape, grid)
    initialize_scale(weight, quantizer, ScaleInit.ALTERNATING)
    return quantizer


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g.kind.value}{g.bits}")
@pytest.mark.parametrize("fmt", list(PackingFormat), ids=lambda f: f.value)
@pytest.mark.parametrize("shape", [(5, 3, 3, 3), (7, 13)], ids=["conv", "linear"])
def test_torch_quantizer_and_onnx_function_are_bit_identical(grid, fmt, shape):
    if codes_per_word(grid.levels, fmt.word_bits) < 1:
        pytest.skip(f"{grid.levels} levels do not fit an {fmt.word_bits}-bit word (export uses int32 words)")
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(grid.bits))
    quantizer = _calibrated(weight, grid)
    torch_weight = quantizer.dequantized_weight(weight).numpy()
    forward_weight = quantizer(weight).detach().numpy()
    packed = PackedWeight.from_integers("w", quantizer.integer_weight(weight).numpy(), grid.qmin, grid.levels,
                                        quantizer.deployed_scale().numpy().astype(np.float16), fmt)
    session = ort.InferenceSession(standalone_model(packed).SerializeToString(), providers=["CPUExecutionProvider"])
    onnx_weight = session.run(None, {})[0]
    assert onnx_weight.dtype == np.float32
    np.testing.assert_array_equal(onnx_weight.view(np.uint32), torch_weight.view(np.uint32))
    np.testing.assert_array_equal(forward_weight.view(np.uint32), torch_weight.view(np.uint32))
    codes = unpack_codes(packed.packed_words, grid.levels, fmt, weight.numel())
    assert codes.min() >= 0 and codes.max() < grid.levels


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g.kind.value}{g.bits}")
def test_integer_weight_stays_on_grid(grid):
    weight = torch.randn(6, 20) * 3
    q = _calibrated(weight, grid).integer_weight(weight)
    assert q.min() >= grid.qmin and q.max() <= grid.qmax


def test_round_ste_passes_gradient_straight_through():
    x = torch.tensor([0.2, 0.7, 1.5, -2.5], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y.detach(), torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(4))


def test_ste_weight_gradient_is_identity_inside_range_and_zero_when_clipped():
    grid = IntegerGrid(GridKind.BALANCED, 2)
    quantizer = WeightQuantizer((1, 3), grid)
    with torch.no_grad():
        quantizer.scale.fill_(0.5)
    weight = torch.tensor([[0.3, -0.6, 5.0]], requires_grad=True)  # 5.0 / 0.5 = 10 is clipped to 2
    quantizer(weight).sum().backward()
    assert torch.equal(weight.grad, torch.tensor([[1.0, 1.0, 0.0]]))


def test_lsq_scale_gradient_matches_formula():
    grid = IntegerGrid(GridKind.BALANCED, 2)
    quantizer = WeightQuantizer((1, 2), grid)
    with torch.no_grad():
        quantizer.scale.fill_(0.5)
    weight = torch.tensor([[0.3, 5.0]])
    quantizer(weight).sum().backward()
    # d(q*s)/ds = round(w/s) - w/s inside the range, qmax when clipped; times LSQ's 1/sqrt(numel * max_level).
    expected = ((1.0 - 0.6) + 2.0) / np.sqrt(2 * 2)  # round(0.6) = 1; 5.0 clips to qmax = 2
    assert quantizer.scale.grad.item() == pytest.approx(expected, rel=1e-5)


def test_scale_is_rounded_to_float16_in_forward():
    quantizer = WeightQuantizer((1, 1), IntegerGrid(GridKind.SIGNED, 4))
    with torch.no_grad():
        quantizer.scale.fill_(0.1)
    out = quantizer(torch.tensor([[0.3]]))
    assert out.item() == pytest.approx(3 * float(np.float16(0.1)), abs=0)


@pytest.mark.parametrize("layer", [nn.Conv2d(3, 4, 3, padding=1), nn.Linear(5, 6)], ids=["conv", "linear"])
def test_quantized_layers_share_parameters_and_match_functional_forward(layer):
    quantized = QUANTIZABLE_LAYERS[type(layer)](layer, IntegerGrid(GridKind.BALANCED, 2))
    assert quantized.weight is layer.weight
    initialize_scale(quantized.weight, quantized.weight_quantizer, ScaleInit.MINMAX)
    x = torch.randn(2, 3, 5, 5) if isinstance(layer, nn.Conv2d) else torch.randn(2, 5)
    deployed = quantized.weight_quantizer.dequantized_weight(quantized.weight)
    reference = (nn.functional.conv2d(x, deployed, layer.bias, padding=1) if isinstance(layer, nn.Conv2d)
                 else nn.functional.linear(x, deployed, layer.bias))
    assert torch.equal(quantized(x), reference)


@pytest.mark.parametrize("layer", [nn.Conv2d(3, 4, 3), nn.Linear(5, 6)], ids=["conv", "linear"])
def test_deployed_float_layer_is_the_plain_type_with_dequantized_weight(layer):
    from lowbit_deploy.quant.fake_quant import deployed_float_layer

    quantized = QUANTIZABLE_LAYERS[type(layer)](layer, IntegerGrid(GridKind.BALANCED, 2))
    initialize_scale(quantized.weight, quantized.weight_quantizer, ScaleInit.ALTERNATING)
    plain = deployed_float_layer(quantized)
    assert type(plain) is type(layer) and "weight_quantizer" not in dict(plain.named_children())
    assert torch.equal(plain.weight, quantized.weight_quantizer.dequantized_weight(quantized.weight))
    assert quantized.weight is layer.weight  # the quantized layer keeps its latent weight



def _scales_across_magnitudes(count: int) -> torch.Tensor:
    """Log-uniform float32 scales over the usable range, plus every few float16 rounding ties and their float32
    neighbours: there, an ulp of error in the training forward picks another float16 scale than the artifact."""
    from lowbit_deploy.quant.fake_quant import MIN_SCALE

    generator = torch.Generator().manual_seed(0)
    exponents = torch.empty(count).uniform_(float(np.log2(MIN_SCALE)) + 0.01, 10.0, generator=generator)
    bits = torch.arange(0x0400, 0x6400, 3, dtype=torch.int16)  # float16 2^-14 .. 1024
    lower, upper = bits.view(torch.float16).float(), (bits + 1).view(torch.float16).float()
    ties = (lower + upper) / 2  # exact in float32
    neighbours = [torch.nextafter(ties, torch.zeros_like(ties)), ties, torch.nextafter(ties, upper)]
    return torch.cat([torch.exp2(exponents), *neighbours])


@pytest.mark.parametrize("grid", [IntegerGrid(GridKind.BALANCED, 2), IntegerGrid(GridKind.SIGNED, 8)],
                         ids=lambda g: f"{g.kind.value}{g.bits}")
def test_forward_uses_the_deployed_scale_in_every_channel_and_lsq_gradient(grid):
    scales = _scales_across_magnitudes(1_000_000)
    assert scales.numel() >= 1_000_000
    per_channel = 3
    quantizer = WeightQuantizer((scales.numel(), per_channel), grid)
    with torch.no_grad():
        quantizer.scale.copy_(scales)
    generator = torch.Generator().manual_seed(1)
    # Codes from below qmin to above qmax, so both the in-range and the clipped gradient branches are exercised.
    levels = torch.empty(scales.numel(), per_channel).uniform_(grid.qmin - 1.5, grid.qmax + 1.5, generator=generator)
    weight = levels * scales[:, None]
    upstream = torch.randn(weight.shape, generator=generator)

    effective = quantizer(weight)
    (effective * upstream).sum().backward()

    deployed = quantizer.dequantized_weight(weight)
    mismatched = (effective.detach().view(torch.int32) != deployed.view(torch.int32)).any(dim=1)
    assert not mismatched.any(), f"{int(mismatched.sum())} channels, e.g. scale {scales[mismatched][:3].tolist()}"
    # LSQ: d(q * s)/ds = round(w/s) - w/s inside the grid, the clipped level outside; times 1/sqrt(numel * max_level).
    scale16 = quantizer.deployed_scale().double()[:, None]
    ratio = weight.double() / scale16
    rounded = torch.round(ratio)
    inside = (rounded >= grid.qmin) & (rounded <= grid.qmax)
    per_weight = torch.where(inside, rounded - ratio, rounded.clamp(grid.qmin, grid.qmax))
    factor = 1.0 / np.sqrt(per_channel * grid.max_abs_level)
    expected = factor * (per_weight * upstream.double()).sum(dim=1)
    # float32 autograd cancels in round(x) - x: its error grows with the level magnitude, not with the result.
    float32_cancellation = 8 * 2.0**-23 * factor * per_channel * (grid.max_abs_level + 2)
    torch.testing.assert_close(quantizer.scale.grad.double(), expected, rtol=1e-5, atol=float32_cancellation)
