"""The C++ plugin library (plugins/, CMake) in TensorRT-RTX: only two exports, engines byte-identical to the Python
plugin's, malformed fields refused by both creators alike, short inputs refused at build time."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import onnx
import pytest
from fresh_process import build_in_fresh_process, creator_verdicts
from onnx import TensorProto, helper, numpy_helper

from lowbit_deploy.engines.tensorrt_import import tensorrt_importable
from lowbit_deploy.quant.packing import PackingFormat

pytestmark = [
    pytest.mark.trt,
    pytest.mark.skipif(not tensorrt_importable("tensorrt_rtx"),
                       reason="tensorrt_rtx is not installed (pip install 'lowbit-deploy[tensorrt-rtx]')"),
]

CHAINS = {
    "v1": [((8, 8, 3, 3), 3, PackingFormat.INT8_WORDS), ((8, 8, 3, 3), 17, PackingFormat.INT32_WORDS),
           ((4, 8, 1, 1), 4, PackingFormat.INT8_WORDS)],
    "v2": [((8, 8, 3, 3), 3, PackingFormat.BITSTREAM), ((8, 8, 3, 3), 17, PackingFormat.BITSTREAM),
           ((4, 8, 1, 1), 5, PackingFormat.BITSTREAM)],
}


def _chain(tag: str) -> onnx.ModelProto:
    from lowbit_deploy.engines.toy_models import conv_chain_model, random_weight

    rng = np.random.default_rng(0)
    weights = [random_weight(f"w{i}", shape, levels, fmt, rng) for i, (shape, levels, fmt) in enumerate(CHAINS[tag])]
    return conv_chain_model(weights, (1, 8, 8, 8))


def _fp16_network(model: onnx.ModelProto) -> onnx.ModelProto:
    """The chain with float16 activations: x and y float16, each decoded weight cast to float16 before its Conv
    (TensorRT-RTX is strongly typed, so this is how a network runs in half precision)."""
    graph = model.graph
    for value in (*graph.input, *graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    for conv in [n for n in graph.node if n.op_type == "Conv"]:
        half = f"{conv.input[1]}.fp16"
        cast = helper.make_node("Cast", [conv.input[1]], [half], name=f"{conv.name}.cast", to=TensorProto.FLOAT16)
        graph.node.insert(list(graph.node).index(conv), cast)
        conv.input[1] = half
    return model


def test_library_exports_only_get_creators_and_set_logger_finder(cpp_plugin_library) -> None:
    if shutil.which("nm") is None:
        pytest.skip("nm (binutils) is not installed")
    out = subprocess.run(["nm", "-D", "--defined-only", str(cpp_plugin_library.path)], capture_output=True,
                         text=True, check=True).stdout
    assert sorted(line.split()[-1] for line in out.splitlines() if line.strip()) == ["getCreators", "setLoggerFinder"]
    assert cpp_plugin_library.header_version.startswith("11.")


def test_library_links_no_tensorrt_or_cuda_runtime(cpp_plugin_library) -> None:
    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) is not installed")
    out = subprocess.run(["readelf", "-d", str(cpp_plugin_library.path)], capture_output=True, text=True,
                         check=True).stdout
    needed = {line.split("[")[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line}
    assert needed <= {"libstdc++.so.6", "libgcc_s.so.1", "libc.so.6", "libm.so.6", "ld-linux-x86-64.so.2"}, needed


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("tag", sorted(CHAINS))
def test_engines_built_with_either_plugin_are_byte_identical(cpp_plugin_library, tag, precision, tmp_path) -> None:
    model = _chain(tag) if precision == "fp32" else _fp16_network(_chain(tag))
    onnx.save(model, tmp_path / f"{tag}.onnx")
    results = {kind: build_in_fresh_process(kind, tmp_path / f"{tag}.onnx", tmp_path / f"{tag}_{kind}.engine")
               for kind in ("cpp", "python")}
    assert all(result["ok"] for result in results.values()), results
    assert results["cpp"]["report"]["plugin"] == "cpp"
    assert results["cpp"]["report"]["plugin_library"] == str(cpp_plugin_library.path)
    assert results["python"]["report"]["plugin"] == "python" and results["python"]["report"]["plugin_library"] is None
    assert results["cpp"]["report"]["plugin_layers"] == results["python"]["report"]["plugin_layers"] == 3
    cpp_bytes, python_bytes = ((tmp_path / f"{tag}_{kind}.engine").read_bytes() for kind in ("cpp", "python"))
    assert cpp_bytes == python_bytes


@pytest.mark.parametrize("version", ["1", "2"])
def test_python_plugin_offers_float_and_half_output(version) -> None:
    """The output may be FLOAT (the op's type, what get_output_data_types declares) or HALF, LINEAR; the inputs keep
    their one type each. (The C++ plugin's answers: plugins/tests/unpackDequantizePluginTest.cpp, CPU part.)"""
    from lowbit_deploy.engines.plugin import PLUGIN_VERSIONS, plugin_classes
    from lowbit_deploy.engines.tensorrt_import import tensorrt_backend

    trt = tensorrt_backend("tensorrt_rtx").module
    fields = {"levels": 3, "qmin": -1, "shape": np.array([4, 5], np.int64)}
    fields.update({"word_bits": 8, "codes_per_word": 5} if version == "1" else {"group_size": 29, "group_bits": 46})
    plugin = plugin_classes(trt, version)[0](PLUGIN_VERSIONS[version].parse(fields))
    assert plugin.get_output_data_types([trt.DataType.INT8, trt.DataType.HALF]) == [trt.DataType.FLOAT]

    def accepts(pos: int, dtype, fmt=trt.TensorFormat.LINEAR) -> bool:
        in_out = [trt.DynamicPluginTensorDesc() for _ in range(3)]
        in_out[pos].desc.type, in_out[pos].desc.format = dtype, fmt
        return plugin.supports_format_combination(pos, in_out, 2)

    assert accepts(2, trt.DataType.FLOAT) and accepts(2, trt.DataType.HALF)
    assert not accepts(2, trt.DataType.INT8) and not accepts(2, trt.DataType.BF16)
    assert not accepts(2, trt.DataType.HALF, trt.TensorFormat.CHW2)
    assert accepts(0, trt.DataType.INT8) and not accepts(0, trt.DataType.HALF)
    assert accepts(1, trt.DataType.HALF) and not accepts(1, trt.DataType.FLOAT)


def _truncate(model: onnx.ModelProto, input_index: int, keep: int) -> tuple[int, int]:
    """Cut the initializer feeding input ``input_index`` of the first lowbit node to ``keep`` elements."""
    node = next(n for n in model.graph.node if n.domain == "lowbit")
    initializer = next(i for i in model.graph.initializer if i.name == node.input[input_index])
    values = numpy_helper.to_array(initializer)
    initializer.CopyFrom(numpy_helper.from_array(values[:keep], initializer.name))
    return values.size, keep


@pytest.mark.parametrize("kind", ["cpp", "python"])
@pytest.mark.parametrize(("tag", "input_index", "keep", "message"), [
    ("v1", 0, 4, "the packed input has 4 elements but 576 codes need 116 words"),
    ("v1", 1, 2, "the scale input has 2 elements but shape\\[0\\] is 8"),
    ("v2", 0, 4, "the packed input has 4 elements but 576 codes need 115 stream bytes"),
])
def test_short_inputs_are_refused_at_build_time(cpp_plugin_library, kind, tag, input_index, keep, message,
                                                tmp_path) -> None:
    """Today's bug: an engine built with 4 of 116 packed words (or 2 of 8 scales) and read out of bounds at run
    time. Both plugins now refuse it while building and no engine file is written."""
    model = _chain(tag)
    _truncate(model, input_index, keep)
    onnx.save(model, tmp_path / "short.onnx")
    result = build_in_fresh_process(kind, tmp_path / "short.onnx", tmp_path / "short.engine")
    assert not result["ok"] and not (tmp_path / "short.engine").exists()
    assert re.search(message, result["error"] + result["log"]), (result["error"] + result["log"])[-3000:]


def test_malformed_fields_are_refused_by_both_creators(cpp_plugin_library) -> None:
    """At least 30 malformed field collections through each registry creator's create_plugin: every one refused
    (C++: None plus an error through TensorRT's logger; Python: UserError), the process survives, and both creators
    agree on every case, controls included."""
    from plugin_fuzz_cases import CASES

    verdicts = creator_verdicts("plugin_fuzz_cases.py", CASES)
    malformed = [case for case in CASES if not case.startswith("valid:")]
    assert len(malformed) >= 30
    assert all("lowbit::UnpackDequantize" in verdicts["cpp"][c]["message"] for c in malformed)
