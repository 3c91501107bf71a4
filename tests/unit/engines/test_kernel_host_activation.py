"""The kernel library's QuantizeDequantizeActivation host path (the per-element function the CUDA kernel runs too)
equals the numpy reference of docs/ops/QuantizeDequantizeActivation_v1.md bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit_deploy.engines.kernels import KernelError, quantize_dequantize_activation_host
from lowbit_deploy.quant.activation_grid import ActivationGrid, quantize_dequantize_numpy

# (grid, with zero point): EfficientDM's settings, symmetric without and asymmetric with a zero point, plus the
# asymmetric grid without one (the node may omit input 3 on any grid).
GRIDS = [(ActivationGrid(4), False), (ActivationGrid(8), False), (ActivationGrid(8, symmetric=False), True),
         (ActivationGrid(8, symmetric=False), False), (ActivationGrid(4, symmetric=False), True)]
SHAPES = [(3,), (2, 5), (4, 3, 7), (2, 4, 5, 5), (3, 2, 3, 2, 4)]
STEPS = [1, 20]


def _case(grid: ActivationGrid, with_zero_point: bool, shape: tuple[int, ...], steps: int, seed: int):
    rng = np.random.default_rng(seed)
    scale = (rng.random(steps) * 0.3 + 0.01).astype(np.float32)
    step_index = rng.integers(0, steps, size=shape[0]).astype(np.int64)
    zero_point = rng.integers(grid.qmin, grid.qmax + 1, size=steps).astype(np.float32) if with_zero_point else None
    # Centred on the grid with a spread of half its width: most values inside, some clamped at either end.
    broadcast = (-1,) + (1,) * (len(shape) - 1)
    z = 0.0 if zero_point is None else zero_point[step_index].reshape(broadcast)
    centre = (grid.qmin + grid.qmax) / 2 - z
    x = ((centre + rng.standard_normal(shape) * (grid.qmax - grid.qmin) * 0.5)
         * scale[step_index].reshape(broadcast)).astype(np.float32)
    return x, scale, step_index, zero_point


def _assert_bit_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    assert actual.tobytes() == expected.tobytes(), np.flatnonzero(actual.view(np.uint32) != expected.view(np.uint32))


@pytest.mark.parametrize("steps", STEPS, ids=lambda t: f"T{t}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"rank{len(s)}")
@pytest.mark.parametrize(("grid", "with_zero_point"), GRIDS,
                         ids=lambda v: v.describe().replace(" ", "-") if isinstance(v, ActivationGrid) else
                         ("zp" if v else "nozp"))
def test_host_matches_numpy_reference_bit_for_bit(kernel_library, grid, with_zero_point, shape, steps) -> None:
    x, scale, step_index, zero_point = _case(grid, with_zero_point, shape, steps, seed=steps * 7 + len(shape))
    y = quantize_dequantize_activation_host(x, scale, step_index, grid.qmin, grid.qmax, zero_point)
    expected = quantize_dequantize_numpy(x, scale, step_index, grid.qmin, grid.qmax, zero_point)
    _assert_bit_equal(y, expected)
    if x.size >= 40:  # the larger cases clamp at both ends of the grid (a check that cannot fail is a defect)
        broadcast = (-1,) + (1,) * (len(shape) - 1)
        z = 0 if zero_point is None else zero_point[step_index].reshape(broadcast)
        unclamped = np.round(x / scale[step_index].reshape(broadcast)) + z
        assert unclamped.min() < grid.qmin and unclamped.max() > grid.qmax


@pytest.mark.parametrize("with_zero_point", [False, True])
def test_ties_round_half_to_even_and_clamp(kernel_library, with_zero_point) -> None:
    """x / s exactly at k + 0.5 rounds to the even neighbour (torch.round, np.round, rintf), never away from zero."""
    grid = ActivationGrid(4)
    scale = np.array([0.5, 0.25], np.float32)
    halves = np.arange(-10.5, 10.5, 1.0, dtype=np.float32)  # -10.5 .. 9.5: ties, beyond the grid at both ends
    x = np.stack([halves * scale[0], halves * scale[1]]).astype(np.float32)
    step_index = np.array([0, 1], np.int64)
    zero_point = np.array([1.0, -2.0], np.float32) if with_zero_point else None
    y = quantize_dequantize_activation_host(x, scale, step_index, grid.qmin, grid.qmax, zero_point)
    _assert_bit_equal(y, quantize_dequantize_numpy(x, scale, step_index, grid.qmin, grid.qmax, zero_point))
    if not with_zero_point:
        q = y / scale[:, None]
        np.testing.assert_array_equal(q[0], np.clip(np.round(halves), -8, 7))
        assert q[0][list(halves).index(2.5)] == 2.0 and q[0][list(halves).index(-0.5)] == 0.0
        assert q[0][list(halves).index(-9.5)] == -8.0 and q[0][list(halves).index(9.5)] == 7.0


def test_out_of_range_step_index_gives_nan_for_that_sample_only(kernel_library) -> None:
    grid = ActivationGrid(8, symmetric=False)
    x, scale, _, zero_point = _case(grid, True, (5, 3, 4), 20, seed=3)
    step_index = np.array([0, 20, 7, -1, 19], np.int64)
    y = quantize_dequantize_activation_host(x, scale, step_index, grid.qmin, grid.qmax, zero_point)
    assert np.isnan(y[[1, 3]]).all()
    valid = [0, 2, 4]
    expected = quantize_dequantize_numpy(x[valid], scale, step_index[valid], grid.qmin, grid.qmax, zero_point)
    _assert_bit_equal(np.ascontiguousarray(y[valid]), expected)


def test_nan_and_infinity_in_x(kernel_library) -> None:
    x = np.array([[np.nan, np.inf, -np.inf, 0.3, -0.0]], np.float32)
    scale, step_index = np.array([0.1], np.float32), np.array([0], np.int64)
    y = quantize_dequantize_activation_host(x, scale, step_index, -8, 7)
    with np.errstate(invalid="ignore"):
        expected = quantize_dequantize_numpy(x, scale, step_index, -8, 7)
    assert np.isnan(y[0, 0]) and np.isnan(expected[0, 0])
    _assert_bit_equal(y[:, 1:].copy(), expected[:, 1:].copy())


def test_empty_batch(kernel_library) -> None:
    y = quantize_dequantize_activation_host(np.zeros((0, 4), np.float32), np.ones(3, np.float32),
                                            np.zeros(0, np.int64), -8, 7)
    assert y.shape == (0, 4)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(qmin=7, qmax=7), "qmin < qmax"),
    (dict(qmin=0, qmax=65536), "at most 65536 levels"),
    (dict(step_index=np.zeros(3, np.int64)), "one per sample"),
    (dict(step_index=np.zeros(2, np.int32)), "step_index must be int64"),
    (dict(x=np.zeros((2, 3), np.float16)), "x must be float32"),
    (dict(scale=np.ones(4, np.float64)), "scale must be float32"),
    (dict(zero_point=np.zeros(3, np.float32)), "zero_point"),
    (dict(scale=np.ones(0, np.float32)), "non-empty"),
    (dict(x=np.float32(1.0)), "rank >= 1"),
])
def test_argument_errors(kernel_library, kwargs, message) -> None:
    arguments = dict(x=np.zeros((2, 3), np.float32), scale=np.ones(4, np.float32), step_index=np.zeros(2, np.int64),
                     qmin=-8, qmax=7, zero_point=None)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        quantize_dequantize_activation_host(**arguments)


def test_c_abi_validates_on_its_own(kernel_library) -> None:
    """The C ABI checks its arguments again (what the TensorRT plugins rely on) and names the problem."""
    x, out = np.zeros(4, np.float32), np.empty(4, np.float32)
    scale, step_index = np.ones(2, np.float32), np.zeros(2, np.int64)
    pointers = (x.ctypes.data, scale.ctypes.data, step_index.ctypes.data, None, out.ctypes.data)
    with pytest.raises(KernelError, match="qmin < qmax"):
        kernel_library.quantize_dequantize_activation_host(*pointers, 2, 2, 2, 5, 5)
    with pytest.raises(KernelError, match="at least one entry"):
        kernel_library.quantize_dequantize_activation_host(*pointers, 2, 2, 0, -8, 7)
    with pytest.raises(KernelError, match="batch and per_sample"):
        kernel_library.quantize_dequantize_activation_host(*pointers, -1, 2, 2, -8, 7)
    with pytest.raises(KernelError, match="null pointer"):
        kernel_library.quantize_dequantize_activation_host(None, *pointers[1:], 2, 2, 2, -8, 7)


@pytest.mark.parametrize("steps", STEPS, ids=lambda t: f"T{t}")
@pytest.mark.parametrize(("grid", "with_zero_point"), GRIDS,
                         ids=lambda v: v.describe().replace(" ", "-") if isinstance(v, ActivationGrid) else
                         ("zp" if v else "nozp"))
def test_fp16_output_is_the_fp32_output_rounded_to_nearest_even(kernel_library, grid, with_zero_point,
                                                               steps) -> None:
    x, scale, step_index, zero_point = _case(grid, with_zero_point, (4, 3, 7, 5), steps, seed=steps)
    # A step index out of range (NaN for that sample) and tiny scales (products in the float16 subnormals).
    step_index[-1] = steps
    scale[: max(1, steps // 2)] *= np.float32(2.0**-20)
    fp32 = quantize_dequantize_activation_host(x, scale, step_index, grid.qmin, grid.qmax, zero_point)
    fp16 = quantize_dequantize_activation_host(x, scale, step_index, grid.qmin, grid.qmax, zero_point,
                                               out_dtype=np.float16)
    assert fp16.dtype == np.float16 and fp16.shape == x.shape and np.isnan(fp16[-1]).all()
    assert fp16.tobytes() == fp32.astype(np.float16).tobytes()
