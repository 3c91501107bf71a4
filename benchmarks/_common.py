"""Shared helpers for the benchmarks: recipes derived from the shipped demo recipe, and table printing."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from lowbit_deploy.recipes import Recipe, parse_recipe

REPO = Path(__file__).resolve().parents[1]
DEMO_RECIPE = REPO / "recipes" / "tiny-w2-balanced.yaml"


def recipe_with(bits: int, grid: str, **train) -> Recipe:
    """The demo recipe with the catch-all rule at ``bits``/``grid`` and train overrides."""
    data = yaml.safe_load(DEMO_RECIPE.read_text())
    data = copy.deepcopy(data)
    data["name"] = f"bench-{grid}-w{bits}"
    data["quantize"]["layers"][-1].update(bits=bits, grid=grid)
    data["train"].update(train)
    return parse_recipe(data, f"{DEMO_RECIPE} (benchmark variant)")


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    cells = [header] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n== {title}")
    for index, row in enumerate(cells):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
        if index == 0:
            print("  ".join("-" * width for width in widths))
