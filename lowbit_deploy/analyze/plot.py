"""The analysis plot: bits per layer against its parameter count (log scale), coloured by UNet block. Drawn with
Pillow (already a dependency) rather than matplotlib, which lowbit-deploy does not need elsewhere."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from ..io import atomic_path

BLOCK_COLOURS = {"down": (31, 119, 180), "mid": (44, 160, 44), "up": (214, 39, 40), "other": (110, 110, 110)}
_WIDTH, _HEIGHT = 760, 440
_LEFT, _RIGHT, _TOP, _BOTTOM = 60, 190, 36, 48
_RADIUS = 3
_PITCH = 7
_CROWD_COLUMNS = 8


def block_of(name: str) -> str:
    for prefix, block in (("down_blocks.", "down"), ("mid_block.", "mid"), ("up_blocks.", "up")):
        if name.startswith(prefix):
            return block
    return "other"


def write_bits_plot(path: Path, points: Sequence[tuple[str, int, int, bool]], title: str) -> None:
    """``points``: (layer name, parameter count, bits, is_candidate). Candidates are filled circles, layers the
    recipe's rules fixed (e.g. conv_in/out) hollow squares."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (_WIDTH, _HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    plot_w, plot_h = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM
    counts = [max(count, 1) for _, count, _, _ in points] or [1]
    x_low, x_high = math.floor(math.log10(min(counts))), math.ceil(math.log10(max(counts)))
    x_high = max(x_high, x_low + 1)
    y_high = max([bits for _, _, bits, _ in points] or [1]) + 1

    def to_x(count: int) -> float:
        return _LEFT + (math.log10(max(count, 1)) - x_low) / (x_high - x_low) * plot_w

    def to_y(bits: float) -> float:
        return _TOP + plot_h - bits / y_high * plot_h

    draw.rectangle([_LEFT, _TOP, _LEFT + plot_w, _TOP + plot_h], outline="black")
    for bits in range(0, y_high + 1):
        y = to_y(bits)
        draw.line([_LEFT - 4, y, _LEFT, y], fill="black")
        draw.line([_LEFT + 1, y, _LEFT + plot_w - 1, y], fill=(235, 235, 235))
        draw.text((_LEFT - 22, y - 6), str(bits), fill="black")
    for power in range(x_low, x_high + 1):
        x = _LEFT + (power - x_low) / (x_high - x_low) * plot_w
        draw.line([x, _TOP + plot_h, x, _TOP + plot_h + 4], fill="black")
        draw.text((x - 10, _TOP + plot_h + 8), f"1e{power}", fill="black")
    draw.text((_LEFT, 10), title, fill="black")
    draw.text((_LEFT - 50, _TOP - 16), "bits", fill="black")
    draw.text((_LEFT + plot_w // 2 - 70, _HEIGHT - 20), "parameters of the layer (log)", fill="black")

    crowds: dict[tuple[int, int], list[tuple[str, int, int, bool]]] = defaultdict(list)
    for point in points:
        crowds[(round(to_x(point[1])), point[2])].append(point)
    for crowd in crowds.values():
        # Layers sharing (params, bits) -- common in a UNet -- are laid out as a small centred grid in their lane.
        columns = min(len(crowd), _CROWD_COLUMNS)
        rows = math.ceil(len(crowd) / columns)
        for slot, (name, count, bits, candidate) in enumerate(sorted(crowd, key=lambda p: block_of(p[0]))):
            x = to_x(count) + (slot % columns - (columns - 1) / 2) * _PITCH
            y = to_y(bits) + (slot // columns - (rows - 1) / 2) * _PITCH
            colour = BLOCK_COLOURS[block_of(name)]
            box = [x - _RADIUS, y - _RADIUS, x + _RADIUS, y + _RADIUS]
            if candidate:
                draw.ellipse(box, fill=colour, outline=colour)
            else:
                draw.rectangle(box, outline=colour, width=2)

    legend_x, legend_y = _LEFT + plot_w + 16, _TOP
    totals: dict[str, int] = defaultdict(int)
    for name, _, _, _ in points:
        totals[block_of(name)] += 1
    for index, (block, colour) in enumerate(BLOCK_COLOURS.items()):
        y = legend_y + index * 18
        draw.ellipse([legend_x, y + 2, legend_x + 8, y + 10], fill=colour)
        draw.text((legend_x + 14, y), f"{block} ({totals.get(block, 0)} layers)", fill="black")
    y = legend_y + len(BLOCK_COLOURS) * 18 + 8
    draw.ellipse([legend_x, y + 2, legend_x + 8, y + 10], outline="black", fill="black")
    draw.text((legend_x + 14, y), "analysed candidate", fill="black")
    draw.rectangle([legend_x, y + 20, legend_x + 8, y + 28], outline="black", width=2)
    draw.text((legend_x + 14, y + 18), "fixed by quantize.layers", fill="black")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def write_plan_plot(path: Path, plan, num_steps: int = 0) -> Path:
    """Bits per quantized layer of a realized :class:`~lowbit_deploy.quant.plan.QuantPlan` (training writes it into
    the run directory)."""
    points = [(layer.name, layer.weight_numel, layer.bits, layer.name not in ("conv_in", "conv_out"))
              for layer in plan.quantized]
    write_bits_plot(path, points, f"{plan.source or 'plan'}: {plan.average_bits(num_steps):.3f} average bits "
                                  f"(BitsFusion's count)")
    return path
