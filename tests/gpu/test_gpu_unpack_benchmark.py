"""benchmarks/gpu_unpack.py on a CUDA GPU, at a small size: it measures every format it is given for float32 and
float16 output against the device's copy bandwidth, and decode + fp16 conv against the conv alone."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit_deploy.runtime.trt import gpu_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU")]

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_unpack.py"


def test_benchmark_runs_and_prints_its_figures() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--weights", "2e6", "--repeats", "3", "--warmup", "1",
                             "--inner", "2", "--levels", "3,4,257", "--conv-levels", "3", "--shapes", "2",
                             "--require-gpu"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"device-to-device copy \d+ GB/s", out), out
    # levels 3 and 4 in all three formats, 257 in int32 words and the bit stream (not int8), each fp32 and fp16
    assert "of 16 decodes reach 85% of the copy bandwidth" in out, out
    for fmt in ("int8_words", "int32_words", "bitstream"):
        assert re.search(rf"^{fmt}\s+3\s+float16\s", out, re.MULTILINE), out
    assert "of 2 conv shapes within 1.15x" in out, out
