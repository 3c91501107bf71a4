"""The CUDA kernels (through torch CUDA tensors) equal the host reference bit-identically, for float32 and float16
output; engine execution."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit_deploy.quant import packing
from lowbit_deploy.quant.packing import WORD_FORMATS, PackingFormat
from lowbit_deploy.runtime.trt import gpu_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU")]

LEVELS = [2, 3, 4, 5, 7, 9, 15, 16, 17, 256, 65536]
SHAPES = [(1,), (3, 5), (7, 3, 3, 3), (320, 320, 3, 3), (1280, 641)]


def _expected(codes: np.ndarray, qmin: int, scale_fp16: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return ((codes.reshape(shape[0], -1) + qmin).astype(np.float32)
            * scale_fp16.astype(np.float32)[:, None]).reshape(shape)


OUT_DTYPES = ["float32", "float16"]


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt", WORD_FORMATS, ids=lambda f: f.value)
@pytest.mark.parametrize("levels", LEVELS)
def test_cuda_kernel_matches_host_and_reference(levels, fmt, shape, out_dtype) -> None:
    import torch

    from lowbit_deploy.engines.kernels import unpack_dequantize_cuda, unpack_dequantize_host

    k = packing.codes_per_word(levels, fmt.word_bits)
    if k < 1:
        pytest.skip(f"{levels} levels do not fit a {fmt.word_bits}-bit word")
    rng = np.random.default_rng(levels)
    codes = rng.integers(0, levels, size=shape)
    packed = packing.pack_codes(codes, levels, fmt)
    scale_fp16 = rng.normal(0, 0.05, size=shape[0]).astype(np.float16)
    qmin = -(levels // 2)
    host = unpack_dequantize_host(packed, scale_fp16, levels, qmin, fmt.word_bits, k, shape, out_dtype=out_dtype)
    device = unpack_dequantize_cuda(torch.from_numpy(packed).cuda(), torch.from_numpy(scale_fp16).cuda(), levels,
                                    qmin, fmt.word_bits, k, shape, out_dtype=out_dtype)
    torch.cuda.synchronize()
    expected = _expected(codes, qmin, scale_fp16, shape).astype(out_dtype)
    bits = f"u{expected.itemsize}"
    np.testing.assert_array_equal(device.cpu().numpy().view(bits), host.view(bits))
    np.testing.assert_array_equal(host.view(bits), expected.view(bits))


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("levels", [*range(2, 18), 256, 257, 65536])
def test_cuda_bitstream_kernel_matches_host_and_reference(levels, shape, out_dtype) -> None:
    """Op v2: one thread per output element over the bit stream; equal to the host path and the reference."""
    import torch

    from lowbit_deploy.engines.kernels import unpack_dequantize_bitstream_cuda, unpack_dequantize_bitstream_host

    size, bits = packing.bitstream_group(levels)
    rng = np.random.default_rng(levels)
    codes = rng.integers(0, levels, size=shape)
    codes.reshape(-1)[-1] = levels - 1  # the last group's top digit sits next to the end of the stream
    packed = packing.pack_codes(codes, levels, PackingFormat.BITSTREAM)
    scale_fp16 = rng.normal(0, 0.05, size=shape[0]).astype(np.float16)
    qmin = -(levels // 2)
    host = unpack_dequantize_bitstream_host(packed, scale_fp16, levels, qmin, size, bits, shape, out_dtype=out_dtype)
    device = unpack_dequantize_bitstream_cuda(torch.from_numpy(packed).cuda(), torch.from_numpy(scale_fp16).cuda(),
                                              levels, qmin, size, bits, shape, out_dtype=out_dtype)
    torch.cuda.synchronize()
    expected = _expected(codes, qmin, scale_fp16, shape).astype(out_dtype)
    bits_view = f"u{expected.itemsize}"
    np.testing.assert_array_equal(device.cpu().numpy().view(bits_view), host.view(bits_view))
    np.testing.assert_array_equal(host.view(bits_view), expected.view(bits_view))


ENGINE_CHAINS = {
    "v1": [(3, PackingFormat.INT8_WORDS), (17, PackingFormat.INT32_WORDS)],
    "v2": [(3, PackingFormat.BITSTREAM), (17, PackingFormat.BITSTREAM)],
}


@pytest.mark.parametrize("chain", sorted(ENGINE_CHAINS))
def test_engine_runs_and_matches_dense_reference(tmp_path, chain) -> None:
    """Builds and runs the toy conv chain where a TensorRT that targets this GPU is installed."""
    import torch

    from lowbit_deploy.engines.tensorrt_import import tensorrt_importable

    major, minor = torch.cuda.get_device_capability()
    if tensorrt_importable("tensorrt"):
        backend, capabilities = "tensorrt", ()
    elif tensorrt_importable("tensorrt_rtx") and (major, minor) != (9, 0):
        backend, capabilities = "tensorrt_rtx", ((major, minor),)
    else:
        pytest.skip(f"no TensorRT that runs on SM{major}{minor}: full tensorrt is not installed and TensorRT-RTX "
                    "does not target SM90")
    import onnx

    from lowbit_deploy.engines.engine import build_engine
    from lowbit_deploy.engines.toy_models import conv_chain_model, random_weight
    from lowbit_deploy.runtime.trt import TrtRunner

    rng = np.random.default_rng(0)
    (levels0, fmt0), (levels1, fmt1) = ENGINE_CHAINS[chain]
    weights = [random_weight("w0", (8, 8, 3, 3), levels0, fmt0, rng),
               random_weight("w1", (4, 8, 3, 3), levels1, fmt1, rng)]
    onnx.save(conv_chain_model(weights, (1, 8, 8, 8)), tmp_path / "chain.onnx")
    report = build_engine(tmp_path / "chain.onnx", tmp_path / "chain.engine", compute_capabilities=capabilities,
                          backend=backend)
    assert report.plugin_layers == 2
    x = torch.randn(1, 8, 8, 8, device="cuda")
    y = TrtRunner(tmp_path / "chain.engine", backend=backend).infer({"x": x})["y"]
    dense = [torch.from_numpy(w.dequantized()).cuda() for w in weights]
    expected = torch.nn.functional.conv2d(torch.relu(torch.nn.functional.conv2d(x, dense[0], padding=1)), dense[1],
                                          padding=1)
    torch.testing.assert_close(y, expected, rtol=1e-3, atol=1e-3)  # TF32 convolutions in TensorRT
