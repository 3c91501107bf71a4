"""SD1.5-shaped size benchmark: the packed ONNX of a 1.99-bit plan vs a plain fp16 ONNX of the same UNet (files).

BitsFusion computed 1.72 GB -> 219 MB (7.9x) for SD1.5; this measures files. Target: packed ONNX >= 8.0x smaller.

What it does (nothing is downloaded):
1. Builds a UNet2DConditionModel with diffusers' SD1.5 UNet config (859.5M parameters; ``--config tiny``: a small
   SD-like UNet, about a minute) with seeded random weights (torch.manual_seed + default init).
2. Plans it at 1.99 bits (BitsFusion's counted average over every UNet parameter, 50-step DDIM schedule):
   conv_in/conv_out signed 8-bit, time_embedding.* and *.time_emb_proj cached, every other Conv2d/Linear balanced
   1, 2 or 3 bits. THE ALLOCATION IS A SIZE STAND-IN: a random-weight model has no sensitivities, so the bits come
   from a proxy (see :func:`allocate_bits`). A real plan comes from ``lowbit-deploy analyze`` on a real
   checkpoint; sizes depend only on how many weights get each bit width, which the stand-in fixes at 1.99.
3. Applies the plan (scale init ``--scale-init``, default alternating x10) and exports it with ``export_onnx``
   (v2 bit stream, fp16 float storage, cached time tables, step-index input).
4. Writes the fp16 reference: the same dequantized, float, uncached UNet in fp16, traced by the same TorchScript
   exporter as export_onnx's reference but at a small latent (8x8 for SD1.5, spatial axes dynamic while tracing,
   then fixed to the full latent size): tracing fp16 at 64x64 on a CPU takes ~25 minutes, and the weights are the
   same bytes whatever the example's spatial size (``--config tiny`` checks that the graph traced small equals the
   graph traced at full size, node for node).
5. Prints both file sizes, the ratio (PASS/MISS vs 8.0x), where the packed file's bytes go, wall time and peak RSS
   per phase. ``--engines`` also builds TensorRT-RTX engines (ahead of time for compute capability 8.9) of both.

Time tables: export computes them with one UNet run at batch T on the smallest latent the UNet accepts (the values
depend only on the timestep), as lowbit_deploy/export/time_cache.py does for every model.

Usage: python benchmarks/size_sd15.py [--config sd15|tiny] [--out DIR] [--engines] [--scale-init minmax]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _measure import TARGET_RATIO, Phases, status_gb, byte_split, print_budget, print_split

TARGET_BITS = 1.99
BITS_TOLERANCE = 0.01
NUM_STEPS = 50
SEQ_LEN = 77
SD15_PARAMS = 859_520_964
ETA = 0.3  # BitsFusion's size exponent in S(i, b) = MSE(i, b) * N_i^-eta

# diffusers' SD1.5 UNet config (runwayml/stable-diffusion-v1-5 unet/config.json, defaults omitted).
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
    "act_fn": "silu", "center_input_sample": False, "downsample_padding": 1, "flip_sin_to_cos": True,
    "freq_shift": 0, "mid_block_scale_factor": 1, "norm_eps": 1e-5,
}
# Same block layout at toy width, for checking the script in seconds.
TINY_UNET = {**SD15_UNET, "sample_size": 16, "block_out_channels": (32, 64, 64, 64), "cross_attention_dim": 32,
             "layers_per_block": 1}
CONFIGS = {"sd15": SD15_UNET, "tiny": TINY_UNET}


# ---- the model and the plan ---------------------------------------------------------------------------------------
def build_unet(config: dict, seed: int = 0):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval().requires_grad_(False)


def _role_factor(name: str) -> int:
    """Proxy of how much a layer's quantization error hurts: x2 for attention projections, x2 in the first/last
    block (closest to the latent)."""
    factor = 2 if (".attn1." in name or ".attn2." in name) else 1
    return factor * (2 if name.startswith(("down_blocks.0.", "up_blocks.3.")) else 1)


def allocate_bits(inventory, total_params: int, num_steps: int, target: float = TARGET_BITS):
    """A deterministic stand-in for BitsFusion's Alg. 1 on a model without real sensitivities.

    Proxy sensitivity ``S(i, b) = r_i * 4**-b * N_i**-0.3``: quantization noise power falls ~4x per bit, ``N_i``
    is the layer's weight count (BitsFusion's size term, eta = 0.3: smaller layers get more bits) and ``r_i`` the
    role factor of :func:`_role_factor`. Upgrades ``(i, b -> b+1)`` for b = 1, 2 are sorted by ``S(i, b)``
    (descending, ties by module order) and the first ``k`` are applied; ``k`` is bisected so that
    ``QuantPlan.average_bits(num_steps)`` comes closest to ``target``. That is the rule
    ``b_i = min{b : S(i, b) < S_o}`` (capped at 3) with the threshold ``S_o`` between the k-th and (k+1)-th key.
    """
    from lowbit_deploy.quant.grids import GridKind
    from lowbit_deploy.quant.plan import LayerDecision, LayerRole, QuantPlan, is_time_layer

    fixed = {"conv_in", "conv_out"}
    free = [(index, info) for index, info in enumerate(inventory)
            if info.name not in fixed and not is_time_layer(info.name)]
    moves = sorted(((-(_role_factor(info.name) * 4.0**-bits * info.weight_numel**-ETA)), index, bits)
                   for index, info in free for bits in (1, 2))

    def plan_with(applied: int) -> QuantPlan:
        bits = {index: 1 for index, _ in free}
        for _, index, _ in moves[:applied]:
            bits[index] += 1
        decisions = []
        for index, info in enumerate(inventory):
            base = (info.name, info.layer_type, info.weight_numel, info.out_features)
            if info.name in fixed:
                decisions.append(LayerDecision(*base, LayerRole.QUANTIZED, GridKind.SIGNED, 8))
            elif is_time_layer(info.name):
                decisions.append(LayerDecision(*base, LayerRole.CACHED))
            else:
                decisions.append(LayerDecision(*base, LayerRole.QUANTIZED, GridKind.BALANCED, bits[index]))
        return QuantPlan(tuple(decisions), total_params, f"size stand-in allocation (proxy S_o bisection to "
                                                         f"{target} bits, {num_steps} steps)")

    low, high = 0, len(moves)  # smallest k with average >= target
    while low < high:
        middle = (low + high) // 2
        if plan_with(middle).average_bits(num_steps) >= target:
            high = middle
        else:
            low = middle + 1
    candidates = [plan_with(k) for k in sorted({max(low - 1, 0), low})]
    plan = min(candidates, key=lambda p: abs(p.average_bits(num_steps) - target))
    if abs(plan.average_bits(num_steps) - target) > BITS_TOLERANCE:
        raise SystemExit(f"allocation reached {plan.average_bits(num_steps):.4f} bits, not {target} +- "
                         f"{BITS_TOLERANCE}: the model is too small for a 1.99-bit mix of 1..3-bit layers")
    return plan


def print_plan(plan, num_steps: int) -> None:
    from _common import print_table

    from lowbit_deploy.quant.plan import LayerRole

    weights: dict[str, list[int]] = {}
    for layer in plan.layers:
        key = f"{layer.grid.value}-{layer.bits}bit" if layer.role is LayerRole.QUANTIZED else layer.role.value
        entry = weights.setdefault(key, [0, 0])
        entry[0] += 1
        entry[1] += layer.weight_numel
    rows = [[key, count, numel, f"{100 * numel / plan.total_params:.2f}%"] for key, (count, numel) in
            sorted(weights.items())]
    print_table("plan (SIZE STAND-IN allocation, not a sensitivity analysis; real plans: `lowbit-deploy analyze`)",
                ["role / grid", "layers", "weights", "of all params"], rows)
    summary = plan.summary(num_steps)
    print(f"counted average bits (BitsFusion, {num_steps} steps): {plan.average_bits(num_steps):.4f} "
          f"(target {TARGET_BITS} +- {BITS_TOLERANCE}); cached values {summary['cached_values']}; "
          f"params outside Conv2d/Linear weights {plan.total_params - sum(l.weight_numel for l in plan.layers)}")


# ---- time tables at the smallest latent -----------------------------------------------------------------------------
def smallest_side(config: dict) -> int:
    """Smallest latent side the UNet takes without padding: one pixel after every downsampling."""
    return 2 ** (len(config["block_out_channels"]) - 1)


# ---- the fp16 reference ---------------------------------------------------------------------------------------------
def fp16_state(unet) -> dict:
    """Every parameter of the trained UNet in fp16, quantized weights dequantized (the deployed values)."""
    import torch

    from lowbit_deploy.quant.apply import quantized_layers

    quantized = quantized_layers(unet)
    state = {}
    for name, tensor in unet.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if owner.endswith(".weight_quantizer"):
            continue
        if leaf == "weight" and owner in quantized:
            layer = quantized[owner]
            tensor = layer.weight_quantizer.dequantized_weight(layer.weight)
        state[name] = tensor.detach().to(torch.float16) if tensor.is_floating_point() else tensor
    return state


def trace_fp16_reference(config: dict, state: dict, path: Path, side: int, opset: int = 17) -> None:
    """Trace the float UNet in fp16 at a ``side`` x ``side`` latent with dynamic spatial axes (TorchScript, as
    export_onnx's reference); the weights are the bytes of ``state``."""
    import warnings

    import torch
    from diffusers import UNet2DConditionModel

    class PositionalUNet(torch.nn.Module):
        def __init__(self, unet) -> None:
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    with torch.device("meta"):
        float_unet = UNet2DConditionModel(**config)
    float_unet.load_state_dict(state, strict=True, assign=True)
    model = PositionalUNet(float_unet.eval()).eval()
    example = (torch.randn(2, config["in_channels"], side, side, dtype=torch.float16),
               torch.tensor([999.0, 1.0], dtype=torch.float16),
               torch.randn(2, SEQ_LEN, config["cross_attention_dim"], dtype=torch.float16))
    spatial = {0: "batch", 2: "height", 3: "width"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, str(path), dynamo=False, opset_version=opset,
                          input_names=["sample", "timestep", "encoder_hidden_states"], output_names=["noise_pred"],
                          dynamic_axes={"sample": spatial, "timestep": {0: "batch"},
                                        "encoder_hidden_states": {0: "batch", 1: "tokens"}, "noise_pred": spatial},
                          do_constant_folding=False)


def finish_fp16_reference(traced: Path, target: Path, signature) -> "object":
    """Fix the latent axes to the signature's size, add its metadata, write ``target``; returns the model."""
    import onnx

    from lowbit_deploy.export.onnx_export import IR_VERSION
    from lowbit_deploy.io import atomic_path
    from lowbit_deploy.runtime.ort import METADATA_SIGNATURE

    model = onnx.load(str(traced))
    height, width = signature.sample_shape[1:]
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if value.name in ("sample", "noise_pred"):
            dims[2].dim_value, dims[3].dim_value = height, width
    del model.graph.value_info[:]  # intermediate shape hints still name the traced symbolic axes
    model.ir_version = IR_VERSION
    onnx.helper.set_model_props(model, {METADATA_SIGNATURE: signature.to_json()})
    with atomic_path(target) as tmp:
        onnx.save(model, str(tmp))
    return model


def graph_fingerprint(model) -> list[tuple]:
    """Nodes' op types and attributes (values included), without names: equal iff the computations are."""
    return [(node.op_type, node.domain, tuple(attribute.SerializeToString() for attribute in node.attribute))
            for node in model.graph.node]


# ---- engines ------------------------------------------------------------------------------------------------------
def _build_engine_child(onnx_path: str, queue) -> None:
    """One engine build in a fresh process: its memory is returned when it ends and an out-of-memory kill of a
    build loses nothing the parent printed."""
    from lowbit_deploy.engines.engine import build_engine
    from lowbit_deploy.recipes import BuildSection
    from lowbit_deploy.runtime.ort import read_signature

    section = BuildSection()  # the pipeline's default batch profile (1, 2, 8) and compute capability 8.9
    try:
        report = build_engine(onnx_path, Path(onnx_path).with_suffix(".engine"), compute_capabilities=((8, 9),),
                              input_shapes=read_signature(onnx_path).shape_ranges(
                                  (section.min_batch, section.opt_batch, section.max_batch)))
        # VmHWM: the peak of this process's own memory since exec (ru_maxrss would include the parent's peak,
        # which a forked child inherits).
        queue.put([report.engine_bytes, report.plugin_layers, report.build_seconds, round(status_gb("VmHWM"), 2)])
    except Exception as error:  # reported as a row of the table; the benchmark goes on
        queue.put([f"failed: {type(error).__name__}: {error}", "-", "-", round(status_gb("VmHWM"), 2)])


def build_engines(paths: dict[str, Path], phases: "Phases") -> list[list[object]]:
    import multiprocessing

    from lowbit_deploy.engines import backend_unavailable_reason

    reason = backend_unavailable_reason()
    if reason:
        return [[label, f"not run: {reason}", "-", "-", "-"] for label in paths]
    context = multiprocessing.get_context("spawn")
    rows = []
    for label, path in paths.items():
        with phases(f"engine build ({label}, child process)"):
            queue = context.SimpleQueue()
            process = context.Process(target=_build_engine_child, args=(str(path), queue))
            process.start()
            process.join()
            if queue.empty():
                killed = " (SIGKILL: out of memory?)" if process.exitcode == -9 else ""
                rows.append([label, f"failed: the build process exited with {process.exitcode}{killed}", "-", "-",
                             "-"])
            else:
                rows.append([label, *queue.get()])
    return rows


# ---- main ---------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="sd15",
                        help="sd15: diffusers' SD1.5 UNet (859.5M params; measured 9.5 min and 10.3 GiB peak RSS "
                             "with --engines on 2 shared CPU cores); tiny: the same layout at toy width (~1 min)")
    parser.add_argument("--out", type=Path, default=None, help="artifact folder (default: a new temp folder)")
    parser.add_argument("--scale-init", choices=["alternating", "minmax"], default="alternating")
    parser.add_argument("--engines", action="store_true", help="also build TensorRT-RTX engines (CC 8.9) of both")
    args = parser.parse_args()

    import torch

    from _common import print_table

    from lowbit_deploy.export.handlers import ExportOptions
    from lowbit_deploy.export.onnx_export import export_onnx
    from lowbit_deploy.models.loading import SD15_DDPM_CONFIG
    from lowbit_deploy.quant.apply import apply_plan
    from lowbit_deploy.quant.grids import ScaleInit
    from lowbit_deploy.quant.plan import layer_inventory
    from lowbit_deploy.recipes import ScheduleSection
    from lowbit_deploy.signature import deployed_signature, signature_for

    config = CONFIGS[args.config]
    root = args.out or Path(tempfile.mkdtemp(prefix=f"lowbit-size-{args.config}-"))
    root.mkdir(parents=True, exist_ok=True)
    packed_path, fp16_path = root / "model.onnx", root / "model_fp16.onnx"
    side = smallest_side(config)
    phases = Phases()
    print(f"config {args.config}, torch threads {torch.get_num_threads()}, artifacts in {root}")

    with phases("build UNet (seeded random weights)"):
        unet = build_unet(config)
    inventory, total_params = layer_inventory(unet)
    print(f"parameters: {total_params:,}" + (f" (SD1.5: {SD15_PARAMS:,})" if args.config == "sd15" else ""))

    with phases("plan (stand-in allocation)"):
        plan = allocate_bits(inventory, total_params, NUM_STEPS)
    print_plan(plan, NUM_STEPS)
    schedule = ScheduleSection(scheduler="ddim", num_steps=NUM_STEPS)
    signature = deployed_signature(unet, SEQ_LEN, plan, SD15_DDPM_CONFIG, schedule)
    float_signature = signature_for(unet, SEQ_LEN)

    with phases(f"apply plan ({args.scale_init} scale init)"):
        apply_plan(unet, plan, scale_init=ScaleInit(args.scale_init), iterations=10)

    quantized_names = {layer.name for layer in plan.quantized}
    with phases(f"fp16 reference (trace at {side}x{side}, fp16)"), tempfile.TemporaryDirectory(dir=root) as scratch:
        traced = Path(scratch) / "trace.onnx"
        trace_fp16_reference(config, fp16_state(unet), traced, side)
        reference = finish_fp16_reference(traced, fp16_path, float_signature)
        fp16_bytes = fp16_path.stat().st_size
        fp16_split = byte_split(reference, fp16_bytes, quantized_names)
        if args.config == "tiny":
            full = Path(scratch) / "trace_full.onnx"
            trace_fp16_reference(config, fp16_state(unet), full, config["sample_size"])
            import onnx

            same = graph_fingerprint(onnx.load(str(full))) == graph_fingerprint(reference)
            print(f"check: the fp16 graph traced at {side}x{side} equals the one traced at full size: {same}")
        del reference

    with phases("packed export (export_onnx, inplace)"):
        report = export_onnx(unet, packed_path, plan=plan, signature=signature,
                             options=ExportOptions(packing="auto", float_storage="fp16"), inplace=True)
        del unet
    import onnx

    packed_split = byte_split(onnx.load(str(packed_path)), report.onnx_bytes, quantized_names)

    # ---- figures (printed before the engine builds, which may not fit) ----
    ratio = fp16_bytes / report.onnx_bytes
    print(f"\n== SD1.5-shaped size ({args.config}; random weights, stand-in 1.99-bit plan, {args.scale_init} scales)")
    print(f"fp16 reference: {fp16_path.name}, the dequantized float UNet (time layers uncached) in fp16, traced "
          f"at {side}x{side} with dynamic spatial axes, latent fixed to {signature.sample_shape}")
    print(f"packed: {packed_path.name} (export_onnx), {report.lowbit_nodes} lowbit::UnpackDequantize "
          f"v{report.op_version} nodes, time input {report.time_input}, float storage {report.float_storage}, time "
          "tables computed by export at the smallest latent")
    print_table("ONNX bytes (ratio = fp16 / packed)", ["file", "bytes", "MB"],
                [["fp16 reference", fp16_bytes, round(fp16_bytes / 1e6, 2)],
                 ["packed", report.onnx_bytes, round(report.onnx_bytes / 1e6, 2)]])
    verdict = "PASS" if ratio >= TARGET_RATIO else "MISS"
    print(f"ratio: {ratio:.3f}x  [{verdict} vs target >= {TARGET_RATIO}x; BitsFusion computed 7.9x]")
    print(f"packed weight bytes (words + scales): {report.packed_weight_bytes}; quantized weights "
          f"{report.quantized_weights}; stored bits per quantized weight {report.stored_bits_per_weight:.4f}; "
          f"cached values {report.cached_values}; counted average bits {report.counted_average_bits:.4f}")
    print_split("packed ONNX: where the bytes go", packed_split, total_params)
    print_split("fp16 reference ONNX: where the bytes go", fp16_split, total_params)
    print_budget(plan, packed_split, fp16_bytes, report.onnx_bytes)

    if args.engines:
        engine_rows = build_engines({"packed": packed_path, "fp16": fp16_path}, phases)
        print_table("TensorRT-RTX engines (CC 8.9, ahead of time, batch profile 1/2/8)",
                    ["onnx", "engine bytes", "plugin layers", "build s", "build peak RSS GiB"], engine_rows)
        sizes = [row[1] for row in engine_rows if isinstance(row[1], int)]
        if len(sizes) == 2:
            print(f"engine ratio (fp16 / packed): {sizes[1] / sizes[0]:.3f}x")
    else:
        print("engines: not built (pass --engines)")
    print_table("phases (peak RSS: this process's maximum so far; engine builds run in child processes, their "
                "peaks are in the engine table)", ["phase", "wall s", "peak RSS GiB", "RSS after GiB"], phases.rows)
    print(f"artifacts in {root}")


if __name__ == "__main__":
    main()
