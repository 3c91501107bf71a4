"""The QuantizeDequantizeActivation CUDA kernel (through torch CUDA tensors) equals the host path and the numpy
reference bit for bit (docs/ops/QuantizeDequantizeActivation_v1.md: __fdiv_rn, rintf, __fmul_rn on the device)."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit_deploy.quant.activation_grid import ActivationGrid, quantize_dequantize_numpy
from lowbit_deploy.runtime.trt import gpu_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU")]

GRIDS = [(ActivationGrid(4), False), (ActivationGrid(8), False), (ActivationGrid(8, symmetric=False), True),
         (ActivationGrid(8, symmetric=False), False)]
# Ranks 1 to 5; the largest spans many blocks of the grid-stride loop (> 65535 * 256 elements would need 17M).
SHAPES = [(7,), (3, 5), (2, 320, 33), (2, 320, 32, 32), (3, 2, 5, 7, 9), (2, 1280, 64, 64)]


def _case(grid, with_zero_point, shape, steps, rng):
    scale = (rng.random(steps) * 0.3 + 0.01).astype(np.float32)
    step_index = rng.integers(0, steps, size=shape[0]).astype(np.int64)
    zero_point = rng.integers(grid.qmin, grid.qmax + 1, size=steps).astype(np.float32) if with_zero_point else None
    broadcast = (-1,) + (1,) * (len(shape) - 1)
    x = (rng.standard_normal(shape) * (grid.qmax - grid.qmin) * 0.5 * scale[step_index].reshape(broadcast))
    x = x.astype(np.float32)
    # Exact ties (k + 0.5) * s in every case: the rounding mode is what differs between a right and a wrong kernel.
    x.reshape(-1)[: min(x.size, 16)] = ((np.arange(min(x.size, 16)) - 8 + 0.5)
                                        * scale[step_index[0]]).astype(np.float32)
    return x, scale, step_index, zero_point


@pytest.mark.parametrize("steps", [1, 20], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("grid", "with_zero_point"), GRIDS, ids=["A4sym", "A8sym", "A8asym-zp", "A8asym"])
def test_cuda_kernel_matches_host_and_reference(grid, with_zero_point, shape, steps) -> None:
    import torch

    from lowbit_deploy.engines.kernels import quantize_dequantize_activation_cuda, quantize_dequantize_activation_host

    rng = np.random.default_rng(steps * 100 + len(shape))
    x, scale, step_index, zero_point = _case(grid, with_zero_point, shape, steps, rng)
    host = quantize_dequantize_activation_host(x, scale, step_index, grid.qmin, grid.qmax, zero_point)
    device = quantize_dequantize_activation_cuda(
        torch.from_numpy(x).cuda(), torch.from_numpy(scale).cuda(), torch.from_numpy(step_index).cuda(), grid.qmin,
        grid.qmax, None if zero_point is None else torch.from_numpy(zero_point).cuda())
    torch.cuda.synchronize()
    assert device.cpu().numpy().tobytes() == host.tobytes()
    expected = quantize_dequantize_numpy(x, scale, step_index, grid.qmin, grid.qmax, zero_point)
    assert host.tobytes() == expected.tobytes()


def test_cuda_out_of_range_step_index_and_nan() -> None:
    import torch

    from lowbit_deploy.engines.kernels import quantize_dequantize_activation_cuda, quantize_dequantize_activation_host

    rng = np.random.default_rng(1)
    grid = ActivationGrid(8, symmetric=False)
    x, scale, _, zero_point = _case(grid, True, (4, 3, 5), 20, rng)
    x[0, 0, 0] = np.nan
    step_index = np.array([3, 20, -1, 19], np.int64)
    host = quantize_dequantize_activation_host(x, scale, step_index, grid.qmin, grid.qmax, zero_point)
    device = quantize_dequantize_activation_cuda(*(torch.from_numpy(a).cuda() for a in (x, scale, step_index)),
                                                 grid.qmin, grid.qmax, torch.from_numpy(zero_point).cuda()).cpu()
    device = device.numpy()
    assert np.isnan(device[1:3]).all() and np.isnan(host[1:3]).all()
    assert np.isnan(device[0, 0, 0]) and np.isnan(host[0, 0, 0])  # NaN payloads may differ: the device's is canonical
    finite = ~np.isnan(host)
    assert (np.isnan(device) == ~finite).all()
    assert device[finite].tobytes() == host[finite].tobytes()


@pytest.mark.parametrize(("grid", "with_zero_point"), GRIDS, ids=["A4sym", "A8sym", "A8asym-zp", "A8asym"])
def test_cuda_fp16_output_matches_host(grid, with_zero_point) -> None:
    """float16 output: the device's equals the host's (the float32 value rounded to nearest even) bit for bit."""
    import torch

    from lowbit_deploy.engines.kernels import quantize_dequantize_activation_cuda, quantize_dequantize_activation_host

    rng = np.random.default_rng(7)
    x, scale, step_index, zero_point = _case(grid, with_zero_point, (2, 4, 8, 8), 20, rng)
    host = quantize_dequantize_activation_host(x, scale, step_index, grid.qmin, grid.qmax, zero_point,
                                               out_dtype=np.float16)
    device = quantize_dequantize_activation_cuda(
        torch.from_numpy(x).cuda(), torch.from_numpy(scale).cuda(), torch.from_numpy(step_index).cuda(), grid.qmin,
        grid.qmax, None if zero_point is None else torch.from_numpy(zero_point).cuda(), out_dtype=torch.float16)
    assert device.dtype == torch.float16 and device.cpu().numpy().tobytes() == host.tobytes()
