"""The C++ plugin's runtime path on a GPU without TensorRT: plugins/tests/unpackDequantizePluginTest.cpp creates
plugins through the creators with PluginFields and compares enqueue on cudaMalloc'd buffers with the host
reference bit for bit (v1 INT8/INT32 words and v2 bit stream, 11 level counts x 5 shapes)."""

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
    assert "enqueue cases compared bit for bit" in result.stdout and "PASSED (0 failures)" in result.stdout
