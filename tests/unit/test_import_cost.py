import subprocess
import sys


def test_import_is_cheap():
    code = ("import sys, lowbit_deploy, lowbit_deploy.cli, lowbit_deploy.models, lowbit_deploy.build; "
            "heavy = [m for m in ('torch', 'tensorrt', 'tensorrt_rtx', 'onnxruntime', 'diffusers', 'onnx') "
            "if m in sys.modules]; print(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"importing lowbit_deploy loaded {result.stdout.strip()}"
