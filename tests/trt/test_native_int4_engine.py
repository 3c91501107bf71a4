"""TensorRT-RTX engines (ahead of time, CPU) from native INT4 exports: they parse, build, and keep INT4 weights."""

from __future__ import annotations

import copy
import json

import onnx
import pytest
import torch
from torch import nn

from lowbit_deploy.engines.tensorrt_import import tensorrt_importable

pytestmark = [
    pytest.mark.trt,
    pytest.mark.skipif(not tensorrt_importable("tensorrt_rtx"),
                       reason="tensorrt_rtx is not installed (pip install 'lowbit-deploy[tensorrt-rtx]')"),
]

RTX = "tensorrt_rtx"
PLUGIN = "python"  # in-process creators; the C++ library builds the same engines (test_cpp_plugin.py)
NATIVE = {"bits": 4, "grid": "signed", "export": "native_int4"}


def _dequantize_layers(onnx_path) -> int:
    from lowbit_deploy.engines.engine import _parse_onnx
    from lowbit_deploy.engines.tensorrt_import import tensorrt_backend

    backend = tensorrt_backend(RTX)
    _, network, _ = _parse_onnx(onnx_path, backend, PLUGIN)
    layers = [network.get_layer(index) for index in range(network.num_layers)]
    return sum(layer.type == backend.module.LayerType.DEQUANTIZE for layer in layers)


@pytest.fixture(scope="module")
def native_run(tmp_path_factory):
    from tinymodels import TINY_RECIPE, make_tiny_unet

    from lowbit_deploy.export.onnx_export import export_run
    from lowbit_deploy.qat.trainer import train
    from lowbit_deploy.recipes import parse_recipe

    root = tmp_path_factory.mktemp("native-engine")
    make_tiny_unet().save_pretrained(root / "model" / "unet")
    data = copy.deepcopy(TINY_RECIPE)
    data["train"]["steps"] = 1
    data["quantize"]["layers"][4:4] = [{"pattern": "down_blocks.*.resnets.*.conv*", **NATIVE},
                                       {"pattern": "*attn*.to_[qkv]", **NATIVE}]
    train(parse_recipe(data), root / "run", model_path=str(root / "model"), progress=False)
    export_run(root / "run")
    return root / "run"


def test_the_build_stage_builds_native_int4_layers_and_reports_engine_bytes(native_run):
    from lowbit_deploy.pipeline import build_run

    outcome = build_run(native_run, ["8.9"], plugin=PLUGIN)
    model = onnx.load(str(native_run / "model.onnx"))
    lowbit_nodes = sum(node.domain == "lowbit" for node in model.graph.node)
    report = json.loads((native_run / "report.json").read_text())["build"]
    assert report == outcome.report and report["engine_bytes"] == (native_run / "model.engine").stat().st_size > 0
    assert report["plugin_layers"] == lowbit_nodes == 44 and report["fp16_engine_bytes"] > 0
    # TensorRT keeps the 29 DequantizeLinear nodes as its own dequantize layers (not plugins, not folded).
    assert _dequantize_layers(native_run / "model.onnx") == 29


def _chain(kind: str, depth: int, native: bool) -> tuple[nn.Module, torch.Tensor]:
    """``depth`` 512-wide layers, float32 or exported natively: Conv 3x3 (per channel) or Linear on 3-D inputs
    (blocked by 128)."""
    from lowbit_deploy.export.native_int4 import native_int4_layer
    from lowbit_deploy.quant.fake_quant import QUANTIZABLE_LAYERS
    from lowbit_deploy.quant.grids import GridKind, IntegerGrid, ScaleInit
    from lowbit_deploy.quant.scale_init import initialize_scale

    torch.manual_seed(0)
    if kind == "conv":
        chain = nn.Sequential(*[nn.Conv2d(512, 512, 3, padding=1) for _ in range(depth)])
        example = torch.randn(1, 512, 8, 8)
    else:
        chain, example = nn.Sequential(*[nn.Linear(512, 512) for _ in range(depth)]), torch.randn(2, 4, 512)
    if not native:
        return chain.eval(), example
    exported = nn.Sequential()
    for index, layer in enumerate(chain):
        quantized = QUANTIZABLE_LAYERS[type(layer)](layer, IntegerGrid(GridKind.SIGNED, 4))
        initialize_scale(quantized.weight.detach(), quantized.weight_quantizer, ScaleInit.MINMAX)
        exported.append(native_int4_layer(str(index), quantized))
    return exported.eval(), example


def _engine_bytes(module: nn.Module, example: torch.Tensor, folder) -> int:
    from lowbit_deploy.engines.engine import build_engine
    from lowbit_deploy.export.native_int4 import TRACE_OPSET, finalize_native_int4, native_int4_layers

    path = folder / "chain.onnx"
    with torch.no_grad():
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=TRACE_OPSET,
                          do_constant_folding=False)
    model = onnx.load(str(path))
    finalize_native_int4(model, native_int4_layers(module))  # a float chain has none: only the opset moves
    model.ir_version = 10
    onnx.save(model, str(path))
    return build_engine(path, folder / "chain.engine", compute_capabilities=((8, 9),), backend=RTX,
                        plugin=PLUGIN).engine_bytes


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_native_int4_weights_cost_about_half_an_engine_byte_each(kind, tmp_path):
    """Engine bytes per extra weight (4 layers minus 2; a build has a fixed part that differs between float and INT4
    networks): float32 costs 4, native INT4 about 0.55. Had TensorRT folded the DequantizeLinear into float
    constants, native would cost 4 too."""
    per_weight = {}
    for native in (False, True):
        sizes = [_engine_bytes(*_chain(kind, depth, native), tmp_path) for depth in (2, 4)]
        extra_weights = 2 * sum(parameter.numel() for name, parameter in _chain(kind, 1, False)[0].named_parameters()
                                if name.endswith("weight"))
        per_weight[native] = (sizes[1] - sizes[0]) / extra_weights
    print(f"{kind}: engine bytes per weight: float32 {per_weight[False]:.3f}, native INT4 {per_weight[True]:.3f}")
    assert 3.9 < per_weight[False] < 4.2
    assert 0.5 <= per_weight[True] < 0.7
