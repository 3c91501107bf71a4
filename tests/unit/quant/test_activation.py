"""Activation quantization (TALSQ): the torch math equals the op's numpy reference bit for bit, per-step scales are
selected by step index, and the documented rule maps other timesteps (fewer steps) onto trained ones."""

import numpy as np
import pytest
import torch

from lowbit_deploy.quant.activation import (
    ActivationQuantizer,
    StepContext,
    fake_quantize_activation,
    install_step_tracking,
    nearest_steps,
    resample_table,
)
from lowbit_deploy.quant.activation_grid import ActivationGrid, quantize_dequantize_numpy

GRIDS = [ActivationGrid(4), ActivationGrid(8), ActivationGrid(8, symmetric=False), ActivationGrid(4, symmetric=False)]


def _case(grid: ActivationGrid, steps: int, shape: tuple[int, ...], seed: int = 0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    scale = rng.uniform(0.01, 0.6, steps).astype(np.float32)
    index = rng.integers(0, steps, shape[0])
    zero = None if grid.symmetric else rng.integers(grid.qmin, grid.qmax + 1, steps).astype(np.float32)
    # Exact ties: values at (k + 0.5) * s for the first sample's step, so round-half-to-even decides.
    flat = x.reshape(shape[0], -1)
    flat[0, :8] = (np.arange(-4, 4, dtype=np.float32) + 0.5) * scale[index[0]]
    return x, scale, index, zero


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: g.describe())
@pytest.mark.parametrize("steps", [1, 20])
@pytest.mark.parametrize("shape", [(3, 17), (2, 5, 7), (4, 8, 6, 6)])
def test_torch_math_is_bit_exact_with_the_numpy_reference(grid, steps, shape):
    x, scale, index, zero = _case(grid, steps, shape)
    expected = quantize_dequantize_numpy(x, scale, index, grid.qmin, grid.qmax, zero)
    torch_zero = None if zero is None else torch.from_numpy(zero)[torch.from_numpy(index)]
    got = fake_quantize_activation(torch.from_numpy(x), torch.from_numpy(scale)[torch.from_numpy(index)],
                                   torch_zero, grid.qmin, grid.qmax)
    assert got.numpy().tobytes() == expected.tobytes()
    levels = expected / scale[index].reshape((-1,) + (1,) * (x.ndim - 1))
    assert np.allclose(levels, np.round(levels), atol=1e-4)  # on the grid
    assert all(np.unique(np.round(row)).size <= grid.qmax - grid.qmin + 1 for row in levels)


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: g.describe())
def test_the_quantizer_selects_each_samples_scale_by_its_step_index(grid):
    context = StepContext()
    quantizer = ActivationQuantizer(grid, 20, context)
    x, scale, index, zero = _case(grid, 20, (4, 3, 5, 5), seed=1)
    quantizer.set_table(torch.from_numpy(scale), None if zero is None else torch.from_numpy(zero))
    context.index = torch.from_numpy(index)
    got = quantizer(torch.from_numpy(x))
    expected = quantize_dequantize_numpy(x, quantizer.deployed_scale().numpy(), index, grid.qmin, grid.qmax,
                                         None if zero is None else quantizer.deployed_zero_point().numpy())
    assert got.detach().numpy().tobytes() == expected.tobytes()
    # Another step index gives other values: the table is really indexed.
    context.index = torch.from_numpy((index + 1) % 20)
    assert not torch.equal(quantizer(torch.from_numpy(x)), got)


def test_scale_and_zero_point_receive_gradients():
    quantizer = ActivationQuantizer(ActivationGrid(4, symmetric=False), 1, None)
    quantizer.set_table(torch.tensor([0.1]), torch.tensor([3.0]))
    x = torch.randn(2, 50, requires_grad=True)
    quantizer(x).pow(2).sum().backward()
    assert quantizer.scale.grad.abs().sum() > 0 and quantizer.zero_point.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0  # straight through the rounding


def test_a_per_step_quantizer_without_a_step_index_refuses_to_guess():
    quantizer = ActivationQuantizer(ActivationGrid(8), 20, StepContext())
    with pytest.raises(RuntimeError, match="step index"):
        quantizer(torch.randn(2, 4))
    with pytest.raises(ValueError, match="StepContext"):
        ActivationQuantizer(ActivationGrid(8), 20, None)


@pytest.mark.parametrize("bits", [1, 9, 16])
def test_activation_bits_out_of_range_are_refused(bits):
    with pytest.raises(ValueError, match="activation bits"):
        ActivationGrid(bits)


def test_timesteps_map_to_the_nearest_trained_step_ties_to_the_noisier_one():
    trained = torch.tensor([999, 949, 899, 849])
    assert nearest_steps(torch.tensor([999, 960, 924, 924.5, 0]), trained).tolist() == [0, 1, 1, 1, 3]
    assert nearest_steps(torch.tensor([974.0]), trained).tolist() == [0]  # equidistant: the earlier step


def test_fewer_steps_keep_every_kth_trained_scale():
    """20 trained DDIM steps (timesteps 951, 901, ...) used at 10 steps (901, 801, ...) -- each 10-step timestep is
    itself a trained one, so the rule keeps every second scale, as EfficientDM keeps every 5th of 100."""
    from lowbit_deploy.validate.sampling import schedule_timesteps

    config = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.00085, "beta_end": 0.012,
              "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
    trained, fewer = schedule_timesteps(config, 20), schedule_timesteps(config, 10)
    table = torch.arange(20, dtype=torch.float32)
    rows = resample_table(table, trained, fewer)
    assert rows.tolist() == [float(trained.index(t)) for t in fewer]
    assert rows.tolist() == [float(i) for i in range(1, 20, 2)]


def test_step_tracking_publishes_the_step_of_each_sample_and_keeps_the_features(tiny_unet):
    original = tiny_unet.time_proj(torch.tensor([901.0, 1.0]))
    context = install_step_tracking(tiny_unet, [951, 901, 851, 1])
    assert install_step_tracking(tiny_unet, [951, 901, 851, 1]) is context  # installing twice wraps once
    features = tiny_unet.time_proj(torch.tensor([901.0, 1.0]))
    assert torch.equal(features, original) and context.index.tolist() == [1, 3]
