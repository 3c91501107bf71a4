"""Measuring helpers of the size benchmarks: wall time and peak RSS per phase, and where an ONNX file's bytes go."""

from __future__ import annotations

import contextlib
import gc
import resource
import time

TARGET_RATIO = 8.0
WRAPPED = "unet"  # attribute under which DeployedUNet and the reference's wrapper hold the UNet


# ---- measuring ----------------------------------------------------------------------------------------------------
def status_gb(field: str) -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(f"{field}:"))
    return int(line.split()[1]) / 2**20


def _rss_gb() -> float:
    return status_gb("VmRSS")


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Phases:
    """Wall time of each phase and the process's peak RSS when it ended (ru_maxrss only grows)."""

    def __init__(self) -> None:
        self.rows: list[list[object]] = []

    @contextlib.contextmanager
    def __call__(self, name: str):
        print(f"-- {name} ...", flush=True)
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        gc.collect()
        self.rows.append([name, round(seconds, 1), round(_peak_rss_gb(), 2), round(_rss_gb(), 2)])
        print(f"   {name}: {seconds:.1f} s, peak RSS so far {_peak_rss_gb():.2f} GiB", flush=True)


# ---- where the bytes go ---------------------------------------------------------------------------------------------
def _tensor_bytes(tensor) -> int:
    from onnx import numpy_helper

    return len(tensor.raw_data) if tensor.raw_data else numpy_helper.to_array(tensor).nbytes


def byte_split(model, file_bytes: int, quantized_names: set[str]) -> dict[str, int]:
    """File bytes by what they hold: packed words, fp16 scales, cached tables, the float weights of the layers the
    plan quantizes and the time layers' params (the reference), other float params (biases, norms, stored fp16), and
    the graph: nodes (with their names and Constant values), local function, metadata, protobuf framing."""
    from lowbit_deploy.quant.plan import is_time_layer

    split = {"packed words": 0, "fp16 scales": 0, "cached time tables": 0, "quantized layers' weights": 0,
             "time layers' params": 0, "float params": 0}
    for tensor in model.graph.initializer:
        # Both graphs hold the UNet as the wrapper's ``unet`` submodule.
        owner, _, leaf = tensor.name.removeprefix(f"{WRAPPED}.").rpartition(".")
        if leaf == "packed":
            key = "packed words"
        elif leaf == "scale" and owner in quantized_names:
            key = "fp16 scales"
        elif leaf == "table":
            key = "cached time tables"
        elif leaf == "weight" and owner in quantized_names:
            key = "quantized layers' weights"
        elif is_time_layer(owner):
            key = "time layers' params"
        else:
            key = "float params"
        split[key] += _tensor_bytes(tensor)
    split["graph"] = file_bytes - sum(split.values())
    return {key: value for key, value in split.items() if value}


def print_split(title: str, split: dict[str, int], total_params: int) -> None:
    from _common import print_table

    total = sum(split.values())
    rows = [[key, value, f"{100 * value / total:.2f}%", round(8 * value / total_params, 4)]
            for key, value in split.items()]
    rows.append(["total (file)", total, "100%", round(8 * total / total_params, 4)])
    print_table(title, ["part", "bytes", "share", "bits per UNet param"], rows)


def print_budget(plan, split: dict[str, int], fp16_bytes: int, packed_bytes: int) -> None:
    """The packed file against the target's byte budget, in bits per UNet parameter: what the counted average
    (BitsFusion's formula) leaves out is what decides the ratio."""
    total = plan.total_params
    budget = fp16_bytes / TARGET_RATIO
    counted_weights = sum(layer.cost_bits * layer.weight_numel for layer in plan.quantized)
    words_bits = 8 * split.get("packed words", 0)
    rows = [
        ["counted: log2(L) of quantized weights", counted_weights / total],
        ["counted: 16 bits per cached value", 8 * split.get("cached time tables", 0) / total],
        ["stored words beyond log2(L) (bit-stream groups, padding)", (words_bits - counted_weights) / total],
        ["fp16 scales (not counted)", 8 * split.get("fp16 scales", 0) / total],
        ["float params, fp16 (counted as 0 bits)", 8 * split.get("float params", 0) / total],
        ["graph: nodes, names, function, metadata (not counted)", 8 * split.get("graph", 0) / total],
        ["= packed file", 8 * packed_bytes / total],
        [f"budget for {TARGET_RATIO}x (fp16 file / {TARGET_RATIO})", 8 * budget / total],
    ]
    from _common import print_table

    print_table("bits per UNet parameter: counted average vs the file", ["part", "bits/param"],
                [[name, round(value, 5)] for name, value in rows])
    over = packed_bytes - budget
    print(f"{'over' if over > 0 else 'under'} the {TARGET_RATIO}x budget by {abs(over):,.0f} bytes "
          f"({8 * abs(over) / total:.4f} bits/param)")
    # The smallest file this plan allows: exactly the counted bits (no group rounding, no padding), plus what
    # cannot be left out -- one fp16 scale per output channel, the fp16 float params, and the UNet's own graph,
    # which the packed file holds as the fp16 file does (the fp16 file's bytes beyond 2 bytes per parameter).
    fp16_graph = fp16_bytes - 2 * total
    floor_bytes = (counted_weights / 8 + split.get("cached time tables", 0) + split.get("fp16 scales", 0)
                   + split.get("float params", 0) + fp16_graph)
    print(f"smallest file this plan allows: {floor_bytes:,.0f} bytes = {8 * floor_bytes / total:.4f} bits/param "
          f"(counted bits exactly, fp16 scales and float params, the fp16 file's {fp16_graph:,} graph bytes): at most "
          f"{fp16_bytes / floor_bytes:.3f}x vs fp16 -- "
          + ("so the target is reachable" if fp16_bytes / floor_bytes >= TARGET_RATIO else
             f"the {TARGET_RATIO}x target is out of reach at this counted average"))
