"""The analysis outputs besides the plan: ``sensitivity.json`` (every candidate's numbers), ``bits_per_layer.png``
and ``report.md``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..io import write_json_atomic, write_text_atomic
from .assign import percentile, semantic_bumps, sensitivity
from .plot import block_of, write_bits_plot

if TYPE_CHECKING:
    from .analysis import AnalysisInputs, AnalysisResult
    from .runner import Job

SENSITIVITY_NAME = "sensitivity.json"
PLOT_NAME = "bits_per_layer.png"
REPORT_NAME = "report.md"


def _layer_rows(inputs: "AnalysisInputs", records: dict["Job", dict], chosen: dict[str, int]) -> list[dict]:
    rule = inputs.rule
    top = rule.candidate_bits[-1]
    drops = {name: records[(name, top)].get("semantic_drop") for name in inputs.candidates}
    bumps = semantic_bumps(drops, rule.percentiles)
    rows = []
    for name in inputs.candidates:
        numel = records[(name, top)]["weight_numel"]
        by_bits = {}
        for bits in rule.candidate_bits:
            record = records[(name, bits)]
            by_bits[str(bits)] = {key: record.get(key) for key in ("mse", "semantic_drop", "accuracy_drop",
                                                                   "confidence", "accuracy", "weight_mse",
                                                                   "tune_loss", "seconds")}
            by_bits[str(bits)]["sensitivity"] = sensitivity(record["mse"], numel, rule.eta)
        rows.append({"layer": name, "block": block_of(name), "params": numel, "chosen_bits": chosen[name],
                     "semantic_bump": bumps[name], "candidates": by_bits})
    return rows


def sensitivity_document(inputs: "AnalysisInputs", records: dict["Job", dict], result: "AnalysisResult") -> dict:
    rule = inputs.rule
    top = rule.candidate_bits[-1]
    measured = [records[(name, top)]["semantic_drop"] for name in inputs.candidates
                if records[(name, top)].get("semantic_drop") is not None]
    section = inputs.recipe.analyze
    return {
        "recipe": inputs.recipe.name, "model": inputs.bundle.source, "semantic_metric": inputs.metric,
        "settings": inputs.settings, "eta": rule.eta, "candidate_bits": list(rule.candidate_bits),
        "grid": rule.grid.value, "fallback_bits": rule.fallback_bits, "max_bits": rule.max_bits,
        "percentile_cutoffs": {f"{q:g}": percentile(measured, q) for q in rule.percentiles} if measured else {},
        "target_average_bits": section.target_average_bits, "tolerance": section.tolerance,
        "threshold_S_o": result.assignment.threshold, "average_bits": result.average_bits,
        "schedule_steps": inputs.recipe.schedule.num_steps,
        "layers": _layer_rows(inputs, records, result.assignment.bits),
    }


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def render_report(document: dict, inputs: "AnalysisInputs", result: "AnalysisResult") -> str:
    plan = result.assignment.plan
    steps = document["schedule_steps"]
    bits_columns = document["candidate_bits"]
    top = bits_columns[-1]
    lines = [
        f"# Sensitivity analysis: {document['recipe']}", "",
        f"- model: `{document['model']}`",
        f"- plan: `{result.plan_path.name}` ({plan.source})",
        f"- achieved average bits: **{result.average_bits:.4f}** (target {document['target_average_bits']} +- "
        f"{document['tolerance']}; BitsFusion's average over {plan.total_params:,} UNet parameters, incl. 16 bits "
        f"per cached time-feature value for {steps} steps)",
        f"- threshold S_o: {document['threshold_S_o']:.6g} (S = MSE * N^-{document['eta']})",
        f"- candidates: {len(inputs.candidates)} layers x bits {bits_columns} on the {document['grid']} grid = "
        f"{result.candidates} runs ({result.computed} measured now, {result.candidates - result.computed} from the "
        f"cache); {result.seconds:.0f} s",
        f"- sample metric: MSE of {inputs.recipe.analyze.num_samples} samples vs the float model's (same seeds; DDIM "
        f"{steps} steps, guidance {inputs.recipe.validate_.sampling.guidance_scale})",
        f"- semantic metric: {document['semantic_metric']}",
        f"- percentile bumps (semantic drop at {top} bits): " + (", ".join(
            f"p{q} = {_fmt(cutoff)}" for q, cutoff in document["percentile_cutoffs"].items()) or "none"),
        f"- layers: {plan.bits_histogram()}", "",
        f"![bits per layer]({PLOT_NAME})", "",
        "| layer | params | " + " | ".join(f"S @ {bits} bit" for bits in bits_columns)
        + f" | semantic drop @ {top} bit | chosen bits |",
        "| --- | ---: | " + " | ".join("---:" for _ in bits_columns) + " | ---: | ---: |",
    ]
    for row in document["layers"]:
        cells = [_fmt(row["candidates"][str(bits)]["sensitivity"]) for bits in bits_columns]
        bump = f" (+{row['semantic_bump']})" if row["semantic_bump"] else ""
        lines.append(f"| `{row['layer']}` | {row['params']:,} | " + " | ".join(cells)
                     + f" | {_fmt(row['candidates'][str(top)]['semantic_drop'])} | {row['chosen_bits']}{bump} |")
    candidates = set(inputs.candidates)
    fixed = [layer for layer in plan.quantized if layer.name not in candidates]
    others = [layer for layer in plan.layers if layer.name not in candidates and layer.bits is None]
    roles = {role: sum(layer.role.value == role for layer in others) for role in ("cached", "float")}
    lines += ["", "Not analysed, kept as quantize.layers gives them: " + (", ".join(
        f"`{layer.name}` ({layer.bits}-bit {layer.grid.value})" for layer in fixed) or "no quantized layer")
        + f"; {roles['cached']} cached and {roles['float']} float layers.", ""]
    return "\n".join(lines)


def write_outputs(inputs: "AnalysisInputs", records: dict["Job", dict], result: "AnalysisResult") -> None:
    document = sensitivity_document(inputs, records, result)
    write_json_atomic(result.out_dir / SENSITIVITY_NAME, document)
    candidates = set(inputs.candidates)
    points = [(layer.name, layer.weight_numel, layer.bits, layer.name in candidates)
              for layer in result.assignment.plan.quantized]
    write_bits_plot(result.out_dir / PLOT_NAME, points,
                    f"{inputs.recipe.name}: {result.average_bits:.3f} average bits (target {result.target})")
    write_text_atomic(result.out_dir / REPORT_NAME, render_report(document, inputs, result))
