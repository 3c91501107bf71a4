"""UnpackDequantize creator fields: parsed by name, validated with messages that say what is wrong."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from lowbit_deploy.engines.plugin import (
    FIELD_NAMES,
    FIELD_NAMES_V2,
    PLUGIN_VERSIONS,
    UnpackDequantizeBitstreamFields,
    UnpackDequantizeFields,
    parse_fields,
    parse_fields_v2,
)
from lowbit_deploy.engines.tensorrt_import import tensorrt_importable
from lowbit_deploy.errors import UserError

VALID = {"levels": np.array([3], np.int32), "qmin": np.array([-1], np.int32), "word_bits": np.array([8], np.int32),
         "codes_per_word": np.array([5], np.int32), "shape": np.array([4, 2, 3, 3], np.int64)}
# v2: ternary bit stream, g = 29 codes in B = 46 bits.
VALID_V2 = {"levels": np.array([3], np.int32), "qmin": np.array([-1], np.int32),
            "group_size": np.array([29], np.int32), "group_bits": np.array([46], np.int32),
            "shape": np.array([4, 2, 3, 3], np.int64)}


def test_valid_fields_parse_in_any_order() -> None:
    reordered = dict(reversed(list(VALID.items())))
    fields = parse_fields(reordered)
    assert fields == UnpackDequantizeFields(levels=3, qmin=-1, word_bits=8, codes_per_word=5, shape=(4, 2, 3, 3))
    assert fields.numel == 72 and fields.num_words == 15


def test_shape_accepts_int32_arrays() -> None:
    assert parse_fields({**VALID, "shape": np.array([4, 18], np.int32)}).shape == (4, 18)


@pytest.mark.parametrize(("override", "message"), [
    ({"levels": np.array([1], np.int32)}, r"levels=1 is out of range \[2, 65536\]"),
    ({"levels": np.array([65537], np.int32)}, "out of range"),
    ({"word_bits": np.array([16], np.int32)}, "word_bits=16 is not supported"),
    ({"codes_per_word": np.array([4], np.int32)}, "pack 5 codes per word"),
    ({"levels": np.array([257], np.int32)}, "do not fit one 8-bit word"),
    ({"shape": np.array([], np.int64)}, "shape must be non-empty"),
    ({"shape": np.array([4, 0], np.int64)}, "positive dimensions"),
    ({"levels": np.array([3, 4], np.int32)}, "must be one integer"),
    ({"levels": np.array([3.0], np.float32)}, "must be one integer"),
    ({"bits": np.array([2], np.int32)}, "unknown field"),
    ({"levels": np.array([2**40 + 3], np.int64)}, "does not fit a 32-bit integer"),
    ({"qmin": np.array([2**31 - 2], np.int32)}, "overflows a 32-bit integer"),
    ({"shape": np.array([1] * 9, np.int64)}, "at most 8 dimensions"),
    ({"shape": np.array([2**31 - 1] * 3, np.int64)}, "more than 2\\^48 elements"),
    ({"shape": np.array([4.0, 2.0], np.float32)}, "'shape' must hold integers"),
])
def test_invalid_fields(override, message) -> None:
    with pytest.raises(UserError, match=message):
        parse_fields({**VALID, **override})


@pytest.mark.parametrize("name", FIELD_NAMES)
def test_missing_field_is_named(name) -> None:
    fields = {k: v for k, v in VALID.items() if k != name}
    with pytest.raises(UserError, match=f"missing required field.*'{name}'"):
        parse_fields(fields)


def test_valid_v2_fields_parse_in_any_order() -> None:
    fields = parse_fields_v2(dict(reversed(list(VALID_V2.items()))))
    assert fields == UnpackDequantizeBitstreamFields(levels=3, qmin=-1, group_size=29, group_bits=46,
                                                     shape=(4, 2, 3, 3))
    assert fields.numel == 72 and fields.num_bytes == 18  # 3 groups of 46 bits
    assert fields.packed_type == "INT8"
    assert parse_fields_v2({**VALID_V2, "shape": np.array([4, 18], np.int32)}).shape == (4, 18)


@pytest.mark.parametrize(("levels", "group_size", "group_bits"), [(2, 1, 1), (5, 3, 7), (16, 1, 4), (17, 11, 45),
                                                                   (65536, 1, 16)])
def test_v2_accepts_the_group_of_every_level_count(levels, group_size, group_bits) -> None:
    fields = parse_fields_v2({**VALID_V2, "levels": np.array([levels], np.int32),
                              "group_size": np.array([group_size], np.int32),
                              "group_bits": np.array([group_bits], np.int64)})
    assert (fields.levels, fields.group_size, fields.group_bits) == (levels, group_size, group_bits)


@pytest.mark.parametrize(("override", "message"), [
    ({"levels": np.array([1], np.int32)}, r"levels=1 is out of range \[2, 65536\]"),
    ({"levels": np.array([65537], np.int32)}, "out of range"),
    ({"group_size": np.array([28], np.int32)}, r"group_size=28, group_bits=46 but 3 levels use the bit-stream "
                                               r"group \(group_size, group_bits\) = \(29, 46\)"),
    ({"group_bits": np.array([47], np.int32)}, "group_bits=47"),
    ({"levels": np.array([5], np.int32)}, r"= \(3, 7\)"),
    ({"shape": np.array([], np.int64)}, "shape must be non-empty"),
    ({"shape": np.array([4, 0], np.int64)}, "positive dimensions"),
    ({"group_size": np.array([29, 1], np.int32)}, "must be one integer"),
    ({"group_bits": np.array([46.0], np.float32)}, "must be one integer"),
    ({"word_bits": np.array([8], np.int32)}, r"unknown field\(s\) \['word_bits'\]"),
])
def test_invalid_v2_fields(override, message) -> None:
    with pytest.raises(UserError, match=message):
        parse_fields_v2({**VALID_V2, **override})


@pytest.mark.parametrize("name", FIELD_NAMES_V2)
def test_missing_v2_field_is_named(name) -> None:
    with pytest.raises(UserError, match=f"missing required field.*'{name}'"):
        parse_fields_v2({k: v for k, v in VALID_V2.items() if k != name})


@pytest.mark.parametrize(("fields", "packed", "scales", "message"), [
    (VALID, 4, 4, "the packed input has 4 elements but 72 codes need 15 words"),
    (VALID, 15, 2, r"the scale input has 2 elements but shape\[0\] is 4"),
    (VALID_V2, 17, 4, "the packed input has 17 elements but 72 codes need 18 stream bytes"),
])
def test_input_lengths_are_checked(fields, packed, scales, message) -> None:
    from lowbit_deploy.engines.plugin import check_input_lengths

    parse = parse_fields if "word_bits" in fields else parse_fields_v2
    with pytest.raises(UserError, match=message):
        check_input_lengths(parse(fields), packed, scales)
    check_input_lengths(parse_fields(VALID), 15, 4)
    check_input_lengths(parse_fields_v2(VALID_V2), 18, 4)


def test_v1_fields_are_not_v2_fields() -> None:
    # A v1 node routed to the v2 creator (or the reverse) fails loudly instead of decoding garbage.
    with pytest.raises(UserError, match="missing required field"):
        parse_fields_v2(VALID)
    with pytest.raises(UserError, match="missing required field"):
        parse_fields(VALID_V2)


def test_version_registry() -> None:
    assert {version: entry.field_names for version, entry in PLUGIN_VERSIONS.items()} == {
        "1": FIELD_NAMES, "2": FIELD_NAMES_V2}


def test_import_does_not_load_tensorrt() -> None:
    # A fresh interpreter: another test of this session may already have imported TensorRT.
    code = ("import sys, lowbit_deploy.engines, lowbit_deploy.engines.engine, lowbit_deploy.engines.plugin, "
            "lowbit_deploy.engines.kernels, lowbit_deploy.runtime.trt; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'tensorrt_rtx', 'polygraphy', "
            "'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.skipif(not tensorrt_importable("tensorrt_rtx") and not tensorrt_importable("tensorrt"),
                    reason="neither tensorrt nor tensorrt_rtx is installed")
def test_creator_validates_fields_and_serializes_by_name() -> None:
    from lowbit_deploy.engines.plugin import register_plugins
    from lowbit_deploy.engines.tensorrt_import import import_tensorrt

    trt = import_tensorrt()
    creators = register_plugins(trt)
    assert sorted(creators) == ["1", "2"]
    creator = creators["1"]
    assert (creator.name, creator.plugin_namespace, creator.plugin_version) == ("UnpackDequantize", "lowbit", "1")
    assert [field.name for field in creator.field_names] == list(FIELD_NAMES)
    int32 = trt.PluginFieldType.INT32

    def collection(values):
        return trt.PluginFieldCollection([trt.PluginField(k, v, int32 if v.dtype == np.int32 else
                                                          trt.PluginFieldType.INT64) for k, v in values.items()])

    invalid = {**VALID, "word_bits": np.array([16], np.int32)}  # kept alive: PluginField does not own its buffer
    with pytest.raises(UserError, match="word_bits=16"):
        creator.create_plugin("bad", collection(invalid), trt.TensorRTPhase.BUILD)
    plugin = creator.create_plugin("ok", collection(VALID), trt.TensorRTPhase.BUILD)
    serialized = {field.name: np.asarray(field.data).tolist() for field in plugin.get_fields_to_serialize()}
    assert serialized == {"levels": [3], "qmin": [-1], "word_bits": [8], "codes_per_word": [5], "shape": [4, 2, 3, 3]}
    assert plugin.clone().fields == plugin.fields
    # The CUDA library is loaded when a context attaches the plugin, never inside enqueue (which would scan the
    # sources, or even compile, per layer per inference): an unattached plugin refuses to enqueue.
    with pytest.raises(RuntimeError, match="before attach_to_context"):
        plugin.enqueue(None, None, [0, 0], [0], 0, 0)
    from lowbit_deploy.engines.kernels import load_kernel_library

    try:
        library = load_kernel_library()
    except UserError:
        library = None  # no nvcc and no built library: attaching would fail the same way
    if library is not None:
        attached = plugin.attach_to_context(None)
        assert attached.library is library and attached.fields == plugin.fields
    assert register_plugins(trt)["1"] is creator  # registering twice keeps the first creator
    assert trt.get_plugin_registry().get_creator("UnpackDequantize", "2", "lowbit") is not None


@pytest.mark.skipif(not tensorrt_importable("tensorrt_rtx") and not tensorrt_importable("tensorrt"),
                    reason="neither tensorrt nor tensorrt_rtx is installed")
def test_v2_creator_validates_fields_and_serializes_by_name() -> None:
    from lowbit_deploy.engines.plugin import register_plugins
    from lowbit_deploy.engines.tensorrt_import import import_tensorrt

    trt = import_tensorrt()
    creator = register_plugins(trt)["2"]
    assert (creator.name, creator.plugin_namespace, creator.plugin_version) == ("UnpackDequantize", "lowbit", "2")
    assert [field.name for field in creator.field_names] == list(FIELD_NAMES_V2)

    def collection(values):
        return trt.PluginFieldCollection([trt.PluginField(k, v, trt.PluginFieldType.INT32 if v.dtype == np.int32
                                                          else trt.PluginFieldType.INT64) for k, v in values.items()])

    invalid = {**VALID_V2, "group_bits": np.array([45], np.int32)}  # kept alive: PluginField does not own its buffer
    with pytest.raises(UserError, match="group_bits=45"):
        creator.create_plugin("bad", collection(invalid), trt.TensorRTPhase.BUILD)
    plugin = creator.create_plugin("ok", collection(VALID_V2), trt.TensorRTPhase.BUILD)
    assert plugin.plugin_version == "2"
    serialized = {field.name: np.asarray(field.data).tolist() for field in plugin.get_fields_to_serialize()}
    assert serialized == {"levels": [3], "qmin": [-1], "group_size": [29], "group_bits": [46], "shape": [4, 2, 3, 3]}
    assert plugin.clone().fields == plugin.fields
