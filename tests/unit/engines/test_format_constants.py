"""plugins/common/lowbitFormat.h, the kernel library and the plugin must agree with packing.PackingFormat."""

from __future__ import annotations

import re
from pathlib import Path

from lowbit_deploy.engines import plugin
from lowbit_deploy.quant import packing
from lowbit_deploy.quant.packing import PackingFormat

HEADER = Path(__file__).resolve().parents[3] / "plugins" / "common" / "lowbitFormat.h"


def _header_constants() -> dict[str, object]:
    text = HEADER.read_text()
    integers = {name: int(value) for name, value in re.findall(r"constexpr int32_t (k\w+) = (-?\d+);", text)}
    strings = dict(re.findall(r'constexpr char const\* (k\w+) = "([^"]*)";', text))
    enum_body = re.search(r"enum class PackingFormatId : int32_t\s*\{(.*?)\};", text, re.S).group(1)
    enum = {name: int(value) for name, value in re.findall(r"(k\w+) = (\d+),", enum_body)}
    return {**integers, **strings, **{f"enum.{name}": value for name, value in enum.items()}}


def test_header_matches_packing_format() -> None:
    constants = _header_constants()
    for fmt in PackingFormat:
        prefix = fmt.name  # INT8_WORDS / INT32_WORDS / BITSTREAM
        assert constants[f"k{prefix}_FORMAT_ID"] == fmt.format_id
        assert constants[f"enum.k{prefix}"] == fmt.format_id
        assert constants[f"k{prefix}_WORD_BITS"] == fmt.word_bits
    assert constants["kMIN_LEVELS"] == packing.MIN_LEVELS
    assert constants["kMAX_LEVELS"] == packing.MAX_LEVELS
    assert constants["kMAX_GROUP_BITS"] == packing.MAX_GROUP_BITS
    # Every enumerator is a PackingFormat (no stale id on either side).
    assert {name.removeprefix("enum.k") for name in constants if name.startswith("enum.")} == {
        fmt.name for fmt in PackingFormat}


def test_header_op_identity_matches_plugin() -> None:
    constants = _header_constants()
    assert constants["kUNPACK_DEQUANTIZE_NAME"] == plugin.OP_NAME
    assert constants["kPLUGIN_NAMESPACE"] == plugin.PLUGIN_NAMESPACE
    assert constants["kUNPACK_DEQUANTIZE_VERSION"] == plugin.PLUGIN_VERSION
    assert constants["kUNPACK_DEQUANTIZE_BITSTREAM_VERSION"] == plugin.PLUGIN_VERSION_V2
    assert set(plugin.PLUGIN_VERSIONS) == {plugin.PLUGIN_VERSION, plugin.PLUGIN_VERSION_V2}


def test_header_covers_every_format() -> None:
    # A new PackingFormat member must get its constants in the header (and a kernel) before it can ship.
    constants = _header_constants()
    assert {f"k{fmt.name}_FORMAT_ID" for fmt in PackingFormat} <= set(constants)


def test_library_reports_header_constants(kernel_library) -> None:
    reported = kernel_library.format_constants()
    assert reported == {
        "int8_words_format_id": PackingFormat.INT8_WORDS.format_id,
        "int8_words_word_bits": PackingFormat.INT8_WORDS.word_bits,
        "int32_words_format_id": PackingFormat.INT32_WORDS.format_id,
        "int32_words_word_bits": PackingFormat.INT32_WORDS.word_bits,
        "min_levels": packing.MIN_LEVELS,
        "max_levels": packing.MAX_LEVELS,
        "op_name": plugin.OP_NAME,
        "plugin_namespace": plugin.PLUGIN_NAMESPACE,
        "op_version": plugin.PLUGIN_VERSION,
        "bitstream_format_id": PackingFormat.BITSTREAM.format_id,
        "bitstream_word_bits": PackingFormat.BITSTREAM.word_bits,
        "max_group_bits": packing.MAX_GROUP_BITS,
        "bitstream_op_version": plugin.PLUGIN_VERSION_V2,
    }


def test_library_bitstream_group_matches_packing_for_every_level_count(kernel_library) -> None:
    # The C++ twin of packing.bitstream_group (lowbit::bitstreamGroup) chooses the same (g, B) for every L.
    mismatches = [levels for levels in range(packing.MIN_LEVELS, packing.MAX_LEVELS + 1)
                  if kernel_library.bitstream_group(levels) != packing.bitstream_group(levels)]
    assert mismatches == []
