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
            rounding = entry.get("deployment_rounding")
            if rounding:
                lines += ["", f"Deployment rounding (trained vs deployed torch, informative): max abs "
                              f"{_fmt(rounding['max_abs'])}, SQNR {_fmt(rounding['sqnr_db'])} dB - {rounding['what']}"]
            lines += ["", "Sampling:", ""]
            lines += [f"- {key}: {_fmt(value)}" for key, value in entry["sampling"].items()]
            if "grid_png" in entry["sampling"]:
                lines += ["", f"![samples]({Path(entry['sampling']['grid_png']).name})"]
        else:
            lines += [f"- {key}: {_fmt(value) if not isinstance(value, dict) else json.dumps(value)}"
                      for key, value in entry.items()]
        lines.append("")
    return "\n".join(lines)


def write_markdown(path: Path, report: dict) -> None:
    write_text_atomic(path, render_markdown(report))
