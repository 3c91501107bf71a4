"""What a run directory holds, read from headers and metadata only: ``lowbit-deploy inspect RUN_DIR``.

Nothing here loads a weight into a model or imports torch: the checkpoint's plan and signature come from the
safetensors header (read with the numpy framework), packing figures from the ONNX graph's lowbit nodes and their
initializers' shapes, validation figures from report.json. Every piece that is absent or unreadable is reported as
such (``status`` "missing" / "unreadable" with a ``detail`` saying how to produce it); only a run directory that
does not exist is an error.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .errors import UserError

# Mirrors lowbit_deploy.qat.checkpoint (which imports torch); tests/unit/test_inspect_run.py keeps them equal.
CHECKPOINT_PATH = Path("checkpoint") / "quantized_unet.safetensors"
CHECKPOINT_FORMAT = "lowbit-deploy/quantized-unet/2"
ONNX_NAME = "model.onnx"
REPORT_NAME = "report.json"
INSPECT_FORMAT = "lowbit-deploy/inspect/1"
_BUILD_FIELDS = ("backend", "backend_version", "compute_capabilities", "plugin", "plugin_layers", "engine_bytes")


def inspect_run(run_dir: str | os.PathLike) -> dict:
    """A JSON-ready description of ``run_dir``: format, run_dir, files, checkpoint, plan, onnx, signature, build,
    validation. Raises UserError only when ``run_dir`` is not a readable directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a run directory (it does not exist or is a file); pass the --out folder "
                        f"of `lowbit-deploy run` or `train`")
    try:
        files = _file_sizes(run_dir)
    except OSError as error:
        raise UserError(f"run directory {run_dir} is not readable ({error}); check its permissions") from None
    checkpoint = _checkpoint(run_dir / CHECKPOINT_PATH)
    onnx_info, onnx_signature, onnx_plan = _onnx(run_dir / ONNX_NAME)
    signature = _signature(onnx_signature, checkpoint.pop("_signature", None))
    num_steps = len(signature.get("step_timesteps", [])) if signature.get("time_input") == "step_index" else 0
    report = _report(run_dir / REPORT_NAME)
    return {"format": INSPECT_FORMAT, "run_dir": str(run_dir), "files": files, "checkpoint": checkpoint,
            "plan": _plan(checkpoint.pop("_plan", None), onnx_plan, num_steps), "onnx": onnx_info,
            "signature": signature, "build": report.get("build", _missing("no build entry in report.json; run "
                                                                          "`lowbit-deploy build RUN_DIR`")),
            "validation": report.get("validation", _missing("no validate entry in report.json; run "
                                                            "`lowbit-deploy validate RUN_DIR`"))}


def _missing(detail: str) -> dict:
    return {"status": "missing", "detail": detail}


def _unreadable(path: Path, error: object) -> dict:
    return {"status": "unreadable", "detail": f"{path.name}: {error}"}


def _file_sizes(run_dir: Path) -> dict:
    sizes = {}
    for folder, _, names in os.walk(run_dir):
        for name in names:
            path = Path(folder) / name
            sizes[path.relative_to(run_dir).as_posix()] = path.stat().st_size
    return {"total_bytes": sum(sizes.values()), "bytes": dict(sorted(sizes.items()))}


def _checkpoint(path: Path) -> dict:
    if not path.is_file():
        return _missing(f"no {CHECKPOINT_PATH}; run `lowbit-deploy train RECIPE --out RUN_DIR`")
    from safetensors import SafetensorError, safe_open

    try:
        # The numpy framework reads the header without importing torch; no tensor is read.
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        return _unreadable(path, error)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        return {"status": "unreadable", "detail": f"format {metadata.get('format')!r}, expected "
                                                  f"{CHECKPOINT_FORMAT!r}; re-run `lowbit-deploy train`"}
    recipe = _json_or_none(metadata.get("recipe")) or {}
    return {"status": "ok", "path": CHECKPOINT_PATH.as_posix(), "format": metadata["format"],
            "step": int(metadata.get("step", 0)), "model_source": metadata.get("model_source") or None,
            "variant": (recipe.get("model") or {}).get("variant"),
            "prompts_file": (recipe.get("conditions") or {}).get("prompts_file"),
            "recipe": recipe.get("name"), "_plan": _json_or_none(metadata.get("plan")),
            "_signature": _json_or_none(metadata.get("signature"))}


def _json_or_none(text: str | None):
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _plan(full_plan: dict | None, onnx_summary: dict | None, num_steps: int) -> dict:
    """The checkpoint's plan (every layer), else the summary export wrote into the ONNX metadata."""
    from .quant.plan import LayerRole, QuantPlan

    if full_plan is None:
        if onnx_summary is None:
            return _missing("no plan in a checkpoint header or in model.onnx's metadata")
        return {"status": "ok", "from": ONNX_NAME, "source": onnx_summary.get("source", ""),
                "by_grid_bits": onnx_summary.get("layers", {}), "average_bits": onnx_summary.get("average_bits"),
                "quantized_weights": onnx_summary.get("quantized_weights"),
                "total_params": onnx_summary.get("total_params"),
                "cached_values": onnx_summary.get("cached_values")}
    try:
        plan = QuantPlan.from_dict(full_plan, "the checkpoint's plan")
    except UserError as error:
        return {"status": "unreadable", "detail": str(error)}
    by_bits: dict[str, dict] = {}
    for layer in plan.quantized:
        entry = by_bits.setdefault(str(layer.bits), {"layers": 0, "weights": 0})
        entry["layers"] += 1
        entry["weights"] += layer.weight_numel
    summary = plan.summary(num_steps)
    return {"status": "ok", "from": CHECKPOINT_PATH.as_posix(), "source": plan.source, "layers": len(plan.layers),
            "by_role": {role.value: len(plan.by_role(role)) for role in LayerRole},
            "by_bits": dict(sorted(by_bits.items(), key=lambda item: int(item[0]))),
            "by_grid_bits": summary["layers"], "average_bits": plan.average_bits(num_steps),
            "quantized_weights": summary["quantized_weights"], "total_params": plan.total_params,
            "cached_values": summary["cached_values"],
            "per_layer": [{"name": layer.name, "role": layer.role.value, "bits": layer.bits,
                           "grid": layer.grid.value if layer.grid else None, "export": layer.export.value,
                           "activations": (layer.activation_grid().describe()
                                           + (", per step" if layer.act_per_step else ", one scale")
                                           if layer.act_bits is not None else None),
                           "weights": layer.weight_numel} for layer in plan.layers]}


def _onnx(path: Path) -> tuple[dict, dict | None, dict | None]:
    """(packing section, signature dict, plan summary) of model.onnx; the graph is parsed, no session is built."""
    if not path.is_file():
        return _missing("no model.onnx; run `lowbit-deploy export RUN_DIR`"), None, None
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # noqa: BLE001 - protobuf raises its own DecodeError types for truncated files
        return _unreadable(path, error), None, None
    from .export.lowbit_ops import OP_DOMAIN, OP_TYPE
    from .export.onnx_export import METADATA_PLAN
    from .runtime.ort import METADATA_SIGNATURE

    props = {prop.key: prop.value for prop in model.metadata_props}
    initializers = {init.name: init for init in model.graph.initializer}
    groups: dict[tuple[str, int], dict] = {}
    for node in model.graph.node:
        if node.domain != OP_DOMAIN or node.op_type != OP_TYPE:
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        fmt = _packing_format(attributes)
        levels = int(attributes["levels"])
        group = groups.setdefault((fmt, levels), {"format": fmt, "levels": levels, "log2_levels": math.log2(levels),
                                                  "nodes": 0, "weights": 0, "packed_bytes": 0, "scale_bytes": 0})
        group["nodes"] += 1
        group["weights"] += math.prod(attributes["shape"])
        group["packed_bytes"] += _tensor_bytes(initializers.get(node.input[0]))
        group["scale_bytes"] += _tensor_bytes(initializers.get(node.input[1]))
    for group in groups.values():
        group["stored_bits_per_weight"] = 8 * group["packed_bytes"] / max(group["weights"], 1)
    weights = sum(group["weights"] for group in groups.values())
    packed = sum(group["packed_bytes"] for group in groups.values())
    info = {"status": "ok", "path": ONNX_NAME, "lowbit_nodes": sum(group["nodes"] for group in groups.values()),
            "op_versions": sorted(imp.version for imp in model.opset_import if imp.domain == OP_DOMAIN),
            "quantized_weights": weights, "packed_bytes": packed,
            "scale_bytes": sum(group["scale_bytes"] for group in groups.values()),
            # Packed words only, per quantized weight: the figure export reports as stored_bits_per_weight.
            "stored_bits_per_weight": 8 * packed / weights if weights else None,
            "formats": sorted(groups.values(), key=lambda group: (group["format"], group["levels"]))}
    return info, _json_or_none(props.get(METADATA_SIGNATURE)), _json_or_none(props.get(METADATA_PLAN))


def _packing_format(attributes: dict) -> str:
    """The PackingFormat a node decodes: its op version, and for the word formats (v1) the word size."""
    from .export.lowbit_ops import op_version
    from .quant.packing import PackingFormat

    version = int(attributes.get("plugin_version", b"1"))
    candidates = [fmt for fmt in PackingFormat if op_version(fmt) == version]
    if len(candidates) > 1:
        candidates = [fmt for fmt in candidates if fmt.word_bits == attributes.get("word_bits")]
    return candidates[0].value if len(candidates) == 1 else f"unknown (op version {version})"


def _tensor_bytes(tensor) -> int:
    if tensor is None:
        return 0
    import onnx

    return math.prod(tensor.dims) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _signature(from_onnx: dict | None, from_checkpoint: dict | None) -> dict:
    from .signature import DeployedSignature

    for data, origin in ((from_onnx, ONNX_NAME), (from_checkpoint, CHECKPOINT_PATH.as_posix())):
        if data is None:
            continue
        try:
            signature = DeployedSignature.from_dict(data)
        except (UserError, KeyError, TypeError, ValueError) as error:
            return {"status": "unreadable", "from": origin, "detail": str(error)}
        return {"status": "ok", "from": origin, **signature.to_dict(), "describe": signature.describe()}
    return _missing("no signature in model.onnx's metadata or a checkpoint header")


def _report(path: Path) -> dict:
    """The build and validation entries of report.json ({} when the file or an entry is absent)."""
    if not path.is_file():
        return {}
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return {"build": _unreadable(path, error), "validation": _unreadable(path, error)}
    sections = {}
    if isinstance(report.get("build"), dict):
        build = report["build"]
        sections["build"] = {"status": build.get("status", "ok"),
                             **{key: build[key] for key in _BUILD_FIELDS if key in build}}
    if isinstance(report.get("validate"), dict):
        validate = report["validate"]
        sections["validation"] = {
            "status": "ok", "passed": validate.get("passed"), "seconds": validate.get("seconds"),
            "backends": [{key: item.get(key) for key in ("artifact", "status", "stats", "failures")}
                         for item in validate.get("parity", [])],
            "sampling": validate.get("sampling"),
            "per_layer": {backend: {key: entry.get(key) for key in ("status", "verdict", "first_failing",
                                                                      "min_sqnr_db")}
                          for backend, entry in (("onnxruntime", validate.get("per_layer")),
                                                 ("tensorrt", validate.get("per_layer_tensorrt")))
                          if isinstance(entry, dict)},
            **{key: validate[key] for key in ("tolerances", "gates", "noise_floor") if key in validate}}
    return sections


# What the checkpoint was distilled from, where set (the embedded default has no model_source).
_MODEL_FIELDS = (("model_source", "model"), ("variant", "variant"), ("prompts_file", "prompts"))


def describe_run(info: dict) -> list[str]:
    """Human lines for :func:`inspect_run`'s dict (what the CLI prints without --json)."""
    lines = [f"run: {info['run_dir']}"]
    checkpoint = info["checkpoint"]
    lines.append("checkpoint: " + (f"{checkpoint['path']}, step {checkpoint['step']}, recipe {checkpoint['recipe']}"
                                   + "".join(f", {label} {checkpoint[key]}" for key, label in _MODEL_FIELDS
                                             if checkpoint.get(key))
                                   if checkpoint["status"] == "ok" else _absent(checkpoint)))
    lines += _describe_plan(info["plan"])
    lines += _describe_onnx(info["onnx"])
    signature = info["signature"]
    lines.append(f"signature (from {signature['from']}):" if signature["status"] == "ok"
                 else f"signature: {_absent(signature)}")
    lines += [f"  {row}" for row in signature.get("describe", [])]
    build = info["build"]
    lines.append("build: " + (", ".join(f"{key}={build[key]}" for key in _BUILD_FIELDS if key in build)
                              if build["status"] in ("ok", "built") else _absent(build)))
    validation = info["validation"]
    if validation["status"] != "ok":
        lines.append(f"validation: {_absent(validation)}")
    else:
        lines.append(f"validation: {'passed' if validation['passed'] else 'FAILED'}")
        for backend in validation["backends"]:
            stats = backend.get("stats") or {}
            figures = " ".join(f"{key}={stats[key]}" for key in ("max_abs", "cosine", "sqnr_db") if key in stats)
            lines.append(f"  {backend['artifact']}: {backend['status']}" + (f"  {figures}" if figures else ""))
        floor, gates = validation.get("noise_floor"), validation.get("gates") or {}
        if floor:
            lines.append(f"  float32 noise floor {floor['sqnr_db']:.1f} dB -> gates: onnxruntime SQNR >= "
                         f"{gates['onnxruntime']['min_sqnr_db']} dB, per-layer >= {gates['per_layer_min_sqnr_db']} dB")
        for backend, entry in (validation.get("per_layer") or {}).items():
            lines.append(f"  per-layer {backend}: {entry['status']}"
                         + (f" ({entry['verdict']})" if entry.get("verdict") else ""))
        sampling = validation.get("sampling") or {}
        if sampling:
            lines.append("  sampling: " + ", ".join(f"{key}={value}" for key, value in sampling.items()
                                                    if key in ("status", "num_samples", "num_steps",
                                                               "psnr_ort_vs_torch_db", "min_psnr_db")))
    files = info["files"]
    lines.append(f"files ({files['total_bytes']:,} bytes):")
    lines += [f"  {name}  {size:,}" for name, size in files["bytes"].items()]
    return lines


def _absent(section: dict) -> str:
    return f"{section['status']} ({section['detail']})" if section.get("detail") else section["status"]


def _describe_plan(plan: dict) -> list[str]:
    if plan["status"] != "ok":
        return [f"plan: {_absent(plan)}"]
    average = plan.get("average_bits")
    head = (f"plan (from {plan['from']}, {plan['source'] or 'no source'}): average "
            f"{average:.4f} bits over {plan['total_params']:,} params" if average is not None
            else f"plan (from {plan['from']})")
    lines = [head]
    if "by_role" in plan:
        lines.append("  layers: " + ", ".join(f"{count} {role}" for role, count in plan["by_role"].items()))
        lines.append("  bits: " + ", ".join(f"{bits}-bit {entry['layers']} layers ({entry['weights']:,} weights)"
                                            for bits, entry in plan["by_bits"].items()))
    lines.append("  grids: " + ", ".join(f"{key} {count}" for key, count in plan["by_grid_bits"].items()))
    if plan.get("per_layer"):
        lines.append("  per layer (bits, grid / role, weights):")
        lines += [f"    {layer['name']}: " + (f"{layer['bits']}-bit {layer['grid']}"
                                              + (f" ({layer['export']})" if layer["export"] != "packed" else "")
                                              + (f", {layer['activations']}" if layer.get("activations") else "")
                                              if layer["role"] == "quantized" else layer["role"])
                  + f", {layer['weights']:,}" for layer in plan["per_layer"]]
    return lines


def _describe_onnx(section: dict) -> list[str]:
    if section["status"] != "ok":
        return [f"onnx: {_absent(section)}"]
    bits = section["stored_bits_per_weight"]
    lines = [f"onnx: {section['path']}, {section['lowbit_nodes']} lowbit nodes (UnpackDequantize v"
             f"{','.join(map(str, section['op_versions'])) or '-'}), "
             + (f"{bits:.4f} stored bits per quantized weight" if bits is not None else "no packed weights")]
    lines += [f"  {group['format']} L={group['levels']}: {group['nodes']} nodes, {group['weights']:,} weights, "
              f"{group['stored_bits_per_weight']:.4f} bits/weight (log2 L = {group['log2_levels']:.4f})"
              for group in section["formats"]]
    return lines
