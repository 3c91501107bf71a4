"""UnpackDequantize creator fields: parsed by name, validated with messages that say what is wrong."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from lowbit_deploy.build.plugin import FIELD_NAMES, UnpackDequantizeFields, parse_fields
from lowbit_deploy.build.tensorrt_import import tensorrt_importable
from lowbit_deploy.errors import UserError

VALID = {"levels": np.array([3], np.int32), "qmin": np.array([-1], np.int32), "word_bits": np.array([8], np.int32),
         "codes_per_word": np.array([5], np.int32), "shape": np.array([4, 2, 3, 3], np.int64)}


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
])
def test_invalid_fields(override, message) -> None:
    with pytest.raises(UserError, match=message):
        parse_fields({**VALID, **override})


@pytest.mark.parametrize("name", FIELD_NAMES)
def test_missing_field_is_named(name) -> None:
    fields = {k: v for k, v in VALID.items() if k != name}
    with pytest.raises(UserError, match=f"missing required field.*'{name}'"):
        parse_fields(fields)


def test_import_does_not_load_tensorrt() -> None:
    # A fresh interpreter: another test of this session may already have imported TensorRT.
    code = ("import sys, lowbit_deploy.build, lowbit_deploy.build.engine, lowbit_deploy.build.plugin, "
            "lowbit_deploy.build.kernels, lowbit_deploy.runtime.trt; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'tensorrt_rtx', 'polygraphy', "
            "'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.skipif(not tensorrt_importable("tensorrt_rtx") and not tensorrt_importable("tensorrt"),
                    reason="neither tensorrt nor tensorrt_rtx is installed")
def test_creator_validates_fields_and_serializes_by_name() -> None:
    from lowbit_deploy.build.plugin import register_plugins
    from lowbit_deploy.build.tensorrt_import import import_tensorrt

    trt = import_tensorrt()
    creator = register_plugins(trt)
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
    assert register_plugins(trt) is creator  # registering twice keeps the first creator
