"""The C++ plugins' runtime path on a GPU without TensorRT: plugins/tests/pluginRuntimeTest.cpp creates plugins
through the creators with PluginFields and compares enqueue on cudaMalloc'd buffers with the host reference bit for
bit: UnpackDequantize v1 INT8/INT32 words and v2 bit stream (11 level counts x 5 shapes, FLOAT and HALF output) and
QuantizeDequantizeActivation (with and without a zero point, 1 to 20 steps, an out-of-range step index)."""

from __future__ import annotations

import subprocess

import pytest

from lowbit_deploy.engines.plugin_library import PLUGINS_DIR
from lowbit_deploy.runtime.trt import gpu_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU")]


@pytest.mark.parametrize("family", [11, 10])
def test_enqueue_matches_the_host_reference_bit_for_bit(family) -> None:
    program = PLUGINS_DIR / "build" / f"lowbit_plugin_test_trt{family}"
    library = PLUGINS_DIR / "build" / f"liblowbit_plugins_trt{family}.so"
    if not program.exists():
        pytest.fail(f"{program} is missing: build it with `make -C plugins tensorrt`")
    result = subprocess.run([str(program), str(library)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "UnpackDequantize enqueue cases compared bit for bit (FLOAT and HALF output)" in result.stdout
    assert "QuantizeDequantizeActivation enqueue cases compared bit for bit" in result.stdout
    assert "PASSED (0 failures)" in result.stdout
