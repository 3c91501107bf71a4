import subprocess
import sys

import pytest

HEAVY = ("torch", "tensorrt", "tensorrt_rtx", "onnxruntime", "diffusers", "onnx", "polygraphy")


@pytest.mark.parametrize("module", ["lowbit_deploy", "lowbit_deploy.cli", "lowbit_deploy.recipes",
                                    "lowbit_deploy.pipeline", "lowbit_deploy.models", "lowbit_deploy.engines"])
def test_import_is_cheap(module):
    code = f"import sys, {module}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"importing {module} loaded {result.stdout.strip()}"
