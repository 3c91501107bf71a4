"""The float32 noise floor: the float64 twin computes the same function exactly stored, and gates follow it."""

import math

import pytest
import torch

from lowbit_deploy.recipes import FloorGates, Gates, SamplingSection
from lowbit_deploy.validate.floor import NoiseFloor, float64_twin, floor_gates, measure_floor
from lowbit_deploy.validate.stats import OutputStats


@pytest.fixture(scope="module")
def context(tiny_run):
    from lowbit_deploy.validate.parity import prepare_validation

    return prepare_validation(tiny_run)


def test_twin_is_float64_everywhere_and_keeps_stored_values(context):
    twin = float64_twin(context.deployed)
    assert all(p.dtype == torch.float64 for p in twin.parameters())
    for name, layer in twin.packed_layers().items():
        original = context.deployed.packed_layers()[name].weight_value
        assert layer.weight_value.dtype == torch.float64
        assert torch.equal(layer.weight_value.float(), original)  # exact conversion, no rounding


def test_the_in_place_twin_equals_the_copy_and_restores_the_model_exactly(context):
    from lowbit_deploy.validate.floor import float64_in_place
    from lowbit_deploy.validate.sampling import module_runner

    deployed, feeds = context.deployed, context.inputs[0]
    state = {key: tensor.clone() for key, tensor in deployed.state_dict().items()}
    before = module_runner(deployed, deployed.signature)(feeds)
    args = [feeds[name].double() if feeds[name].is_floating_point() else feeds[name]
            for name in deployed.signature.input_names]
    with torch.no_grad():
        expected = float64_twin(deployed)(*args)
        with float64_in_place(deployed) as twin:
            assert twin is deployed and all(p.dtype == torch.float64 for p in twin.parameters())
            assert torch.equal(twin(*args), expected)
        after = module_runner(deployed, deployed.signature)(feeds)
    restored = deployed.state_dict()
    assert all(restored[key].dtype == tensor.dtype and torch.equal(restored[key], tensor)
               for key, tensor in state.items())
    assert all(layer.weight_value.dtype == torch.float32 for layer in deployed.packed_layers().values())
    assert torch.equal(after, before)


def test_floor_is_float32_rounding_not_a_model_difference(context):
    floor = measure_floor(context.deployed, context.inputs, context.reference_outputs())
    # float32 rounding through a small UNet: far above any quantization or storage error (those would be < 80 dB)
    assert 110 < floor.sqnr_db < 160 and 0 < floor.max_abs < 1e-4


def test_a_perturbed_reference_shows_as_a_lower_floor(context):
    outputs = [output + 1e-3 * torch.randn_like(output) for output in context.reference_outputs()]
    assert measure_floor(context.deployed, context.inputs, outputs).sqnr_db < 70


def _floor(sqnr_db, max_abs):
    return NoiseFloor(OutputStats(max_abs=max_abs, mean_abs=0.0, max_rel=0.0, cosine=1.0, sqnr_db=sqnr_db))


def test_gates_follow_the_floor_where_asked():
    gates, sampling = floor_gates(Gates(), SamplingSection(), _floor(131.3, 1.9e-6))
    assert gates.onnxruntime.min_sqnr_db == 121.3 and gates.onnxruntime.max_abs == 1.9e-5
    assert gates.per_layer_min_sqnr_db == 111.3 and sampling.min_psnr_db == 101.3
    assert gates.tensorrt == Gates().tensorrt  # fp16 kernels: not float32 noise


@pytest.mark.parametrize("follow", [None, FloorGates(output_margin_db=None, max_abs_factor=None,
                                                     per_layer_margin_db=None, sampling_margin_db=None)])
def test_fixed_gates_stay_fixed(follow):
    gates = Gates(follow_floor=follow)
    assert floor_gates(gates, SamplingSection(), _floor(131.3, 1.9e-6)) == (gates, SamplingSection())


def test_a_floor_without_noise_keeps_fixed_gates():
    assert floor_gates(Gates(), SamplingSection(), _floor(math.inf, 0.0)) == (Gates(), SamplingSection())
