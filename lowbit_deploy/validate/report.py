"""Human-readable reports: report.md from report.json, and the FP | quantized sample grid PNG."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..io import atomic_path, write_text_atomic

_UPSCALE = 4
_LABEL_HEIGHT = 14
_GAP = 6
_TILE_GAP = 1
_GAP_GRAY = 96


def _panel(images: torch.Tensor, columns: int):
    from PIL import Image

    images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    count, channels, height, width = images.shape
    rows = -(-count // columns)
    pitch_x, pitch_y = width + _TILE_GAP, height + _TILE_GAP
    canvas = Image.new("L" if channels == 1 else "RGB", (columns * pitch_x - _TILE_GAP, rows * pitch_y - _TILE_GAP),
                       color=_GAP_GRAY if channels == 1 else (_GAP_GRAY,) * 3)
    for index in range(count):
        array = images[index].permute(1, 2, 0).squeeze(-1).numpy()
        tile = Image.fromarray(array)
        canvas.paste(tile, ((index % columns) * pitch_x, (index // columns) * pitch_y))
    return canvas.resize((canvas.width * _UPSCALE, canvas.height * _UPSCALE), Image.NEAREST)


def write_sample_grid(path: Path, panels: list[tuple[str, torch.Tensor]], columns: int = 5) -> None:
    """Panels side by side (e.g. FP | quantized torch | quantized ORT), each a grid with its title above."""
    from PIL import Image, ImageDraw

    rendered = [(title, _panel(images, min(columns, images.shape[0])).convert("RGB")) for title, images in panels]
    width = sum(image.width for _, image in rendered) + _GAP * (len(rendered) - 1)
    height = max(image.height for _, image in rendered) + _LABEL_HEIGHT
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    x = 0
    for title, image in rendered:
        draw.text((x + 2, 1), title, fill="black")
        sheet.paste(image, (x, _LABEL_HEIGHT))
        x += image.width + _GAP
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")


def write_time_table_png(path: Path, tables: dict[str, torch.Tensor], step_timesteps: tuple[int, ...],
                         cell: int = 2, row_height: int = 12, label_width: int = 80) -> None:
    """The cached time features as the deployed graph gathers them: one row per step index (labelled with its
    timestep), every cached value a cell (dark = negative, light = positive, scaled per table)."""
    from PIL import Image, ImageDraw

    columns = [(table.float() / table.float().abs().amax().clamp_min(1e-12)) for table in tables.values()]
    values = torch.cat(columns, dim=1)  # [T, features], each table scaled to [-1, 1]
    steps, features = values.shape
    pixels = ((values + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    heat = Image.fromarray(pixels, mode="L").resize((features * cell, steps * row_height), Image.NEAREST)
    sheet = Image.new("RGB", (label_width + heat.width, heat.height + _LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((2, 1), f"cached time features: {len(tables)} tables, {features} values per step (fp16)", fill="black")
    sheet.paste(heat.convert("RGB"), (label_width, _LABEL_HEIGHT))
    for index, timestep in enumerate(step_timesteps):
        draw.text((2, _LABEL_HEIGHT + index * row_height), f"i={index} t={timestep}", fill="black")
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def render_markdown(report: dict) -> str:
    lines = ["# lowbit-deploy run report", ""]
    for stage in ("train", "export", "build", "validate"):
        entry = report.get(stage)
        if entry is None:
            continue
        lines += [f"## {stage}", ""]
        if stage == "validate":
            lines += [f"**{'PASSED' if entry['passed'] else 'FAILED'}**", "",
                      "| artifact | status | max abs | max rel | cosine | SQNR dB |", "| --- | --- | --- | --- | --- | --- |"]
            for item in entry["parity"]:
                stats = item["stats"] or {}
                lines.append(f"| {item['artifact']} | {item['status']} | " + " | ".join(
                    _fmt(stats.get(key, "-")) for key in ("max_abs", "max_rel", "cosine", "sqnr_db")) + " |")
                lines += [f"  - {failure}" for failure in item["failures"]]
            lines += _per_layer_lines(entry.get("per_layer"), "ONNX Runtime")
            lines += _per_layer_lines(entry.get("per_layer_tensorrt"), "TensorRT")
            rounding = entry.get("deployment_rounding")
            if rounding:
                lines += ["", f"Deployment rounding (trained vs deployed torch, informative): max abs "
                              f"{_fmt(rounding['max_abs'])}, SQNR {_fmt(rounding['sqnr_db'])} dB - {rounding['what']}"]
            lines += ["", "Sampling:", ""]
            lines += [f"- {key}: {_fmt(value)}" for key, value in entry["sampling"].items()]
            if "grid_png" in entry["sampling"]:
                lines += ["", f"![samples]({Path(entry['sampling']['grid_png']).name})"]
            conditions = entry.get("conditions") or {}
            if conditions:
                lines += ["", f"Conditions: {conditions['kind']}"
                          + (f" -- **warning**: {conditions['warning']}" if conditions.get("warning") else "")]
        else:
            lines += [f"- {key}: {_fmt(value) if not isinstance(value, dict) else json.dumps(value)}"
                      for key, value in entry.items()]
        lines.append("")
    return "\n".join(lines)


def _per_layer_lines(per_layer: dict | None, backend: str) -> list[str]:
    if not per_layer:
        return []
    if "layers" not in per_layer:
        return ["", f"Per-layer bisection ({backend}): {per_layer.get('status')}"]
    plot = per_layer.get("plot", "per_layer_sqnr.png")
    lines = ["", f"Per-layer bisection (PyTorch vs {backend}, graph order, gate {per_layer['min_sqnr_db']} dB): "
                 f"**{per_layer['verdict']}**", "", f"![per-layer SQNR, {backend}]({plot})", "",
             "| # | module | kind | SQNR dB | max abs |", "| --- | --- | --- | --- | --- |"]
    first = per_layer.get("first_failing")
    for index, layer in enumerate(per_layer["layers"]):
        mark = " **<- first below the gate**" if layer["module"] == first else ""
        lines.append(f"| {index} | {layer['module']}{mark} | {layer['kind']} | {_fmt(layer['sqnr_db'])} | "
                     f"{_fmt(layer['max_abs'])} |")
    return lines


_PLOT_SIZE = (900, 420)
_PLOT_MARGINS = (60, 20, 36, 40)  # left, right, top, bottom
_KIND_COLOURS = {"quantized": (31, 119, 180), "block": (214, 39, 40)}


def write_series_plot(path: Path, points: list[tuple[str, float, str]], gate: float, marked: str | None,
                      title: str, y_label: str) -> None:
    """``points``: (name, value, kind) in order; infinite values (exact equality) are drawn at the top edge."""
    import math

    from PIL import Image, ImageDraw

    width, height = _PLOT_SIZE
    left, right, top, bottom = _PLOT_MARGINS
    finite = [value for _, value, _ in points if math.isfinite(value)] + [gate]
    low, high = math.floor(min(finite) / 10) * 10, math.ceil(max(finite) / 10) * 10 + 10
    image = Image.new("RGB", _PLOT_SIZE, "white")
    draw = ImageDraw.Draw(image)
    plot_w, plot_h = width - left - right, height - top - bottom

    def to_y(value: float) -> float:
        value = high if not math.isfinite(value) else value
        return top + plot_h - (value - low) / (high - low) * plot_h

    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    for tick in range(low, high + 1, 10):
        draw.line([left - 4, to_y(tick), left, to_y(tick)], fill="black")
        draw.text((left - 34, to_y(tick) - 6), str(tick), fill="black")
    draw.line([left, to_y(gate), left + plot_w, to_y(gate)], fill=(255, 127, 14))
    draw.text((left + 4, to_y(gate) - 14), f"gate {gate:g}", fill=(255, 127, 14))
    step = plot_w / max(len(points), 1)
    for index, (name, value, kind) in enumerate(points):
        x, y = left + (index + 0.5) * step, to_y(value)
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=_KIND_COLOURS.get(kind, (110, 110, 110)))
        if name == marked:
            draw.ellipse([x - 6, y - 6, x + 6, y + 6], outline="black")
            draw.text((min(x + 8, width - 200), y + 4), name, fill="black")
    draw.text((left, 10), f"{title}; blue: quantized layers, red: blocks", fill="black")
    draw.text((4, top - 16), y_label, fill="black")
    draw.text((left + plot_w // 2 - 40, height - 20), "graph order", fill="black")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def write_markdown(path: Path, report: dict) -> None:
    write_text_atomic(path, render_markdown(report))
