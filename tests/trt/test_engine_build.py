"""Ahead-of-time TensorRT-RTX engine builds with lowbit::UnpackDequantize plugins (CPU: no GPU is needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from lowbit_deploy.engines.tensorrt_import import tensorrt_importable
from lowbit_deploy.errors import UserError
from lowbit_deploy.quant.packing import PackingFormat

pytestmark = [
    pytest.mark.trt,
    pytest.mark.skipif(not tensorrt_importable("tensorrt_rtx"),
                       reason="tensorrt_rtx is not installed (pip install 'lowbit-deploy[tensorrt-rtx]')"),
]

RTX = "tensorrt_rtx"
# The Python creators, so this pytest process never loads the C++ library (a process keeps it once loaded); the C++
# plugin builds in fresh processes in test_cpp_plugin.py, and the two build byte-identical engines.
PLUGIN = "python"


def _weights(specs, seed=0):
    from lowbit_deploy.engines.toy_models import random_weight

    rng = np.random.default_rng(seed)
    return [random_weight(f"w{i}", shape, levels, fmt, rng) for i, (shape, levels, fmt) in enumerate(specs)]


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def chain_onnx(tmp_path_factory) -> tuple[Path, int]:
    """x[1,8,8,8] -> Conv(ternary INT8 words) -> Relu -> Conv(17 levels INT32 words) -> Relu -> Conv(4 levels INT8)."""
    from lowbit_deploy.engines.toy_models import conv_chain_model

    weights = _weights([((8, 8, 3, 3), 3, PackingFormat.INT8_WORDS), ((8, 8, 3, 3), 17, PackingFormat.INT32_WORDS),
                        ((4, 8, 1, 1), 4, PackingFormat.INT8_WORDS)])
    model = conv_chain_model(weights, (1, 8, 8, 8))
    lowbit_nodes = sum(node.domain == "lowbit" for node in model.graph.node)
    return _save(model, tmp_path_factory.mktemp("onnx") / "chain.onnx"), lowbit_nodes


@pytest.fixture(scope="module")
def chain_onnx_v2(tmp_path_factory) -> tuple[Path, int]:
    """The same chain with every weight in the op-v2 bit stream: ternary (g=29, B=46), 17 levels (g=11, B=45),
    5 levels (g=3, B=7); none of the numels is a multiple of g."""
    from lowbit_deploy.engines.toy_models import conv_chain_model

    weights = _weights([((8, 8, 3, 3), 3, PackingFormat.BITSTREAM), ((8, 8, 3, 3), 17, PackingFormat.BITSTREAM),
                        ((4, 8, 1, 1), 5, PackingFormat.BITSTREAM)])
    model = conv_chain_model(weights, (1, 8, 8, 8))
    assert [imp.version for imp in model.opset_import if imp.domain == "lowbit"] == [2]
    lowbit_nodes = sum(node.domain == "lowbit" for node in model.graph.node)
    return _save(model, tmp_path_factory.mktemp("onnx_v2") / "chain_v2.onnx"), lowbit_nodes


def test_v2_build_has_one_plugin_layer_per_lowbit_node(chain_onnx_v2, tmp_path) -> None:
    from lowbit_deploy.engines.engine import build_engine, count_plugin_layers

    onnx_path, lowbit_nodes = chain_onnx_v2
    report = build_engine(onnx_path, tmp_path / "chain_v2.engine", compute_capabilities=((8, 9),), backend=RTX,
                          plugin=PLUGIN)
    assert lowbit_nodes == 3
    assert report.plugin_layers == lowbit_nodes
    assert count_plugin_layers(onnx_path, plugin=PLUGIN) == lowbit_nodes
    assert report.warnings == [] and report.engine_bytes > 0
    engine = (tmp_path / "chain_v2.engine").read_bytes()
    assert b"UnpackDequantize" in engine and b"group_bits" in engine  # v2 fields serialized by name


def test_v2_engine_keeps_the_bit_stream_packed(tmp_path) -> None:
    """Growing a ternary conv weight from 64x64x3x3 to 256x256x3x3 grows the engine by about the bit stream's bytes
    (1.59 bit/weight: 109,636 more bytes; v1 int8 words at 1.6 bit/weight: 110,592)."""
    from lowbit_deploy.engines.engine import build_engine
    from lowbit_deploy.engines.toy_models import conv_chain_model

    sizes, packed_bytes = {}, {}
    for channels in (64, 256):
        (weight,) = _weights([((channels, channels, 3, 3), 3, PackingFormat.BITSTREAM)], seed=channels)
        onnx_path = _save(conv_chain_model([weight], (1, channels, 8, 8)), tmp_path / f"v2_{channels}.onnx")
        report = build_engine(onnx_path, tmp_path / f"v2_{channels}.engine", backend=RTX, plugin=PLUGIN)
        assert report.plugin_layers == 1
        sizes[channels], packed_bytes[channels] = report.engine_bytes, weight.packed_words.nbytes
    expected_growth = packed_bytes[256] - packed_bytes[64]
    assert expected_growth == 109_636
    assert 0.8 * expected_growth < sizes[256] - sizes[64] < 1.3 * expected_growth + 16_384, sizes


def test_invalid_v2_plugin_fields_fail_the_parse(tmp_path) -> None:
    from lowbit_deploy.engines.engine import build_engine
    from lowbit_deploy.engines.toy_models import conv_chain_model

    model = conv_chain_model(_weights([((8, 8, 3, 3), 3, PackingFormat.BITSTREAM)]), (1, 8, 8, 8))
    node = next(n for n in model.graph.node if n.domain == "lowbit")
    next(a for a in node.attribute if a.name == "group_bits").i = 45  # ternary groups of 29 codes need 46 bits
    onnx.save(model, tmp_path / "bad_v2.onnx")
    with pytest.raises(UserError):
        build_engine(tmp_path / "bad_v2.onnx", tmp_path / "bad_v2.engine", backend=RTX, plugin=PLUGIN)
    assert not (tmp_path / "bad_v2.engine").exists()


def test_aot_build_for_sm89_has_one_plugin_layer_per_lowbit_node(chain_onnx, tmp_path) -> None:
    from lowbit_deploy.engines.engine import build_engine

    onnx_path, lowbit_nodes = chain_onnx
    report = build_engine(onnx_path, tmp_path / "chain.engine", compute_capabilities=((8, 9),), backend=RTX,
                          plugin=PLUGIN)
    assert lowbit_nodes == 3
    assert report.plugin_layers == lowbit_nodes
    assert report.engine_bytes > 0 and (tmp_path / "chain.engine").stat().st_size == report.engine_bytes
    assert (report.backend, report.compute_capabilities) == (RTX, ["8.9"])
    assert report.warnings == []
    # The engine names the plugin: whoever deserializes it needs the same creator registered.
    assert b"UnpackDequantize" in (tmp_path / "chain.engine").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain.engine"]  # no temporary left behind
    assert '"plugin_layers": 3' in report.to_json()


def test_count_plugin_layers_from_onnx_path(chain_onnx) -> None:
    from lowbit_deploy.engines.engine import count_plugin_layers

    onnx_path, lowbit_nodes = chain_onnx
    assert count_plugin_layers(onnx_path, plugin=PLUGIN) == lowbit_nodes


def test_multiple_compute_capabilities(chain_onnx, tmp_path) -> None:
    from lowbit_deploy.engines.engine import build_engine

    single = build_engine(chain_onnx[0], tmp_path / "one.engine", compute_capabilities=((8, 9),), backend=RTX,
                          plugin=PLUGIN)
    multi = build_engine(chain_onnx[0], tmp_path / "two.engine", compute_capabilities=((8, 0), (8, 9)), backend=RTX,
                         plugin=PLUGIN)
    assert multi.compute_capabilities == ["8.0", "8.9"]
    assert multi.engine_bytes > single.engine_bytes  # code for two architectures


def test_engine_keeps_weights_packed(tmp_path) -> None:
    """Growing one ternary conv weight from 64x64x3x3 to 256x256x3x3 grows the engine by about the packed bytes
    (1.6 bit/weight), not by the float32 bytes; the same net with float32 weights grows by the float32 bytes."""
    from lowbit_deploy.engines.engine import build_engine
    from lowbit_deploy.engines.toy_models import conv_chain_model, plain_conv_model

    sizes = {}
    for channels in (64, 256):
        (weight,) = _weights([((channels, channels, 3, 3), 3, PackingFormat.INT8_WORDS)], seed=channels)
        for kind, make in (("packed", conv_chain_model), ("fp32", plain_conv_model)):
            onnx_path = _save(make([weight], (1, channels, 8, 8)), tmp_path / f"{kind}{channels}.onnx")
            report = build_engine(onnx_path, tmp_path / f"{kind}{channels}.engine", backend=RTX, plugin=PLUGIN)
            assert report.plugin_layers == (1 if kind == "packed" else 0)
            sizes[kind, channels] = report.engine_bytes
        sizes["packed_bytes", channels] = weight.packed_words.nbytes
        sizes["fp32_bytes", channels] = weight.dequantized().nbytes
    packed_growth = sizes["packed", 256] - sizes["packed", 64]
    expected_growth = sizes["packed_bytes", 256] - sizes["packed_bytes", 64]  # 110,592 bytes
    fp32_growth = sizes["fp32_bytes", 256] - sizes["fp32_bytes", 64]  # 2,211,840 bytes
    assert 0.8 * expected_growth < packed_growth < 1.3 * expected_growth + 16_384, sizes
    assert sizes["fp32", 256] - sizes["fp32", 64] > 0.9 * fp32_growth, sizes
    assert sizes["packed", 256] < sizes["fp32", 256] / 4, sizes


def test_missing_onnx_is_a_user_error(tmp_path) -> None:
    from lowbit_deploy.engines.engine import build_engine

    with pytest.raises(UserError, match="does not exist"):
        build_engine(tmp_path / "nope.onnx", tmp_path / "nope.engine", backend=RTX, plugin=PLUGIN)
    assert list(tmp_path.iterdir()) == []


def test_unparsable_onnx_is_a_user_error(tmp_path) -> None:
    from lowbit_deploy.engines.engine import build_engine

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"this is not a protobuf")
    with pytest.raises(UserError, match="could not parse"):
        build_engine(broken, tmp_path / "broken.engine", backend=RTX, plugin=PLUGIN)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.onnx"]


def test_invalid_plugin_fields_fail_the_parse(tmp_path) -> None:
    from lowbit_deploy.engines.engine import build_engine
    from lowbit_deploy.engines.toy_models import conv_chain_model

    model = conv_chain_model(_weights([((8, 8, 3, 3), 3, PackingFormat.INT8_WORDS)]), (1, 8, 8, 8))
    node = next(n for n in model.graph.node if n.domain == "lowbit")
    next(a for a in node.attribute if a.name == "codes_per_word").i = 4  # ternary bytes hold 5 codes
    onnx.save(model, tmp_path / "bad.onnx")
    with pytest.raises(UserError):
        build_engine(tmp_path / "bad.onnx", tmp_path / "bad.engine", backend=RTX, plugin=PLUGIN)
    assert not (tmp_path / "bad.engine").exists()


def test_unsupported_options_are_user_errors(chain_onnx, tmp_path) -> None:
    from lowbit_deploy.engines.engine import build_engine

    with pytest.raises(UserError, match="compute capability 9.0"):
        build_engine(chain_onnx[0], tmp_path / "e.engine", compute_capabilities=((9, 0),), backend=RTX,
                     plugin=PLUGIN)
    with pytest.raises(UserError, match="strongly typed"):
        build_engine(chain_onnx[0], tmp_path / "e.engine", fp16=True, backend=RTX, plugin=PLUGIN)
    assert list(tmp_path.iterdir()) == []


def test_fresh_process_builds_with_plugins(chain_onnx, tmp_path) -> None:
    """The libtensorrt_rtx.so pitfall (shared/docs/TENSORRT.md) would kill this process with 'terminate called
    without an active exception'; import_tensorrt() must prevent it in any fresh interpreter."""
    code = ("import sys; from lowbit_deploy.engines.engine import build_engine; "
            "r = build_engine(sys.argv[1], sys.argv[2], backend='tensorrt_rtx', plugin='python'); "
            "print('plugin_layers', r.plugin_layers)")
    # An empty cache directory: the shim is compiled from scratch in this run.
    env = {**os.environ, "LOWBIT_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", code, str(chain_onnx[0]), str(tmp_path / "fresh.engine")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "plugin_layers 3" in result.stdout
    assert list((tmp_path / "cache").glob("lowbit_deploy/rtx_shim/*/libtensorrt_rtx.so"))


@pytest.mark.skipif(not tensorrt_importable("tensorrt"), reason="full TensorRT (tensorrt) is not installed")
def test_full_tensorrt_build(chain_onnx, tmp_path) -> None:
    from lowbit_deploy.engines.engine import build_engine
    from lowbit_deploy.runtime.trt import gpu_available

    if not gpu_available():
        pytest.skip("full TensorRT builds for the GPU present: no CUDA GPU")
    report = build_engine(chain_onnx[0], tmp_path / "full.engine", backend="tensorrt", plugin=PLUGIN)
    assert report.backend == "tensorrt" and report.plugin_layers == chain_onnx[1] and report.engine_bytes > 0


def test_a_real_build_failure_quotes_tensorrts_cause_and_keeps_stdout_clean(chain_onnx, tmp_path, capfd) -> None:
    """A profile that does not fit the network: TensorRT says why only in its log, Polygraphy raises "Invalid
    Engine". The error quotes the cause; TensorRT's and Polygraphy's lines go to stderr, not the command's stdout."""
    from lowbit_deploy.engines.engine import build_engine

    onnx_path, _ = chain_onnx
    wrong = ((1, 8, 4, 4), (1, 8, 4, 4), (1, 8, 4, 4))  # the network's input x is [1, 8, 8, 8]
    with pytest.raises(UserError, match=r"TensorRT: .*static dimensions that don't match kMIN dimensions"):
        build_engine(onnx_path, tmp_path / "x.engine", input_shapes={"x": wrong}, backend=RTX, plugin=PLUGIN)
    out, err = capfd.readouterr()
    assert out == "" and "Error Code 4" in err
    assert not (tmp_path / "x.engine").exists()
