"""benchmarks/gpu_unpack.py (the kernels' GPU speed) cannot rot silently on machines without a GPU: it runs, says in
one line that it needs a CUDA GPU and exits 0 (2 with --require-gpu); its SD1.5 conv list is the UNet's own. The run
on a GPU is tests/gpu/test_gpu_unpack_benchmark.py."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "gpu_unpack.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a machine that has one
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize(("args", "code"), [((), 0), (("--require-gpu",), 2)])
def test_without_a_gpu_it_says_so_in_one_line(args, code) -> None:
    result = _run(*args)
    assert result.returncode == code, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_unpack: needs a CUDA GPU, nothing measured"), result.stdout


def test_bad_arguments_are_refused_before_anything_runs() -> None:
    result = _run("--levels", "1,3")
    assert result.returncode == 2 and "level counts must lie in [2, 65536]" in result.stderr


@pytest.mark.slow
def test_the_conv_list_is_every_3x3_conv_of_sd15() -> None:
    """Every 3x3 conv of an SD1.5-configured UNet (meta device: shapes only) at batch 2, 64x64 latent, conv_in and
    conv_out aside, is one row of SD15_CONVS (weight shape, input size, stride), and no row is made up."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    spec = importlib.util.spec_from_file_location("gpu_unpack", SCRIPT)
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(
            sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    seen = set()

    def record(conv, inputs, output) -> None:
        if conv.kernel_size == (3, 3) and 4 not in (conv.in_channels, conv.out_channels):
            seen.add((conv.out_channels, conv.in_channels, inputs[0].shape[-1], conv.stride[0]))

    for conv in (m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)):
        conv.register_forward_hook(record)
    with torch.device("meta"):
        unet(torch.randn(2, 4, 64, 64), torch.tensor([1, 1]), torch.randn(2, 77, 768))
    listed = [(c.cout, c.cin, c.size, c.stride) for c in module.SD15_CONVS]
    assert len(listed) == len(set(listed)) and set(listed) == seen
