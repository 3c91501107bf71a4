"""``analyze``: BitsFusion's mixed-precision analysis (Alg. 1) of a recipe's model, written as a plan file.

Candidates (each quantizable layer alone at each candidate bit width) are measured by :mod:`.candidates` in worker
processes (:mod:`.runner`, resumable), bits are assigned by :mod:`.assign`, and DIR receives ``plan.json``,
``sensitivity.json``, ``bits_per_layer.png`` and ``report.md`` (:mod:`.report`).
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..recipes import Recipe
from .assign import AssignRule, Assignment, CandidateScore, check_target_reachable, search_threshold
from .runner import Job, run_candidates

PLAN_NAME = "plan.json"


@dataclass
class AnalysisInputs:
    """What the analysis of one recipe on one model works from (computed without running any candidate)."""

    recipe: Recipe
    model_path: str | None
    bundle: object               # models.ModelBundle
    base_plan: object            # quant.plan.QuantPlan: the recipe's rules, before any candidate is decided
    candidates: list[str]
    rule: AssignRule
    metric: str
    settings: dict
    digest: str

    @property
    def jobs(self) -> list[Job]:
        return [(name, bits) for name in self.candidates for bits in self.rule.candidate_bits]


@dataclass
class AnalysisResult:
    out_dir: Path
    plan_path: Path
    assignment: Assignment
    target: float
    candidates: int              # candidate runs in the analysis (layers x candidate bits)
    computed: int                # of them, measured in this call (the rest came from DIR's cache)
    seconds: float
    metric: str

    @property
    def average_bits(self) -> float:
        return self.assignment.average_bits


def _resolved(model_path: str | None) -> str | None:
    return str(Path(model_path).expanduser().resolve()) if model_path else None


def candidate_layers(base_plan, exclude: list[str]) -> list[str]:
    """Layers the recipe's rules quantize and no ``exclude`` pattern matches, in model order."""
    return [layer.name for layer in base_plan.quantized
            if not any(fnmatch.fnmatchcase(layer.name, pattern) for pattern in exclude)]


def prepare(recipe: Recipe, model_path: str | None = None) -> AnalysisInputs:
    """Load the model, plan it with the recipe's rules, pick the candidates and refuse an unreachable target."""
    from ..models import load_recipe_model
    from ..quant.plan import layer_inventory, plan_from_rules
    from .candidates import key_digest, metric_for, settings_key

    if recipe.quantize.plan:
        raise UserError(f"recipe {recipe.name!r} names a plan file (quantize.plan); analyze computes a plan and "
                        f"needs pattern rules instead: give quantize.layers, where the layers to analyse get `bits` "
                        f"(e.g. `{{pattern: \"*\", bits: 2, grid: balanced}}`)")
    section = recipe.analyze
    model_path = _resolved(model_path or recipe.model.path)
    bundle = load_recipe_model(recipe, model_path)
    inventory, total_params = layer_inventory(bundle.unet)
    base_plan = plan_from_rules(inventory, recipe.quantize, total_params, f"recipe {recipe.name}")
    candidates = candidate_layers(base_plan, section.exclude)
    rule = AssignRule.from_section(section)
    check_target_reachable(base_plan, candidates, rule, recipe.schedule.num_steps, section.target_average_bits,
                           section.tolerance)
    settings = settings_key(recipe, bundle.source)
    return AnalysisInputs(recipe, model_path, bundle, base_plan, candidates, rule, metric_for(bundle), settings,
                          key_digest(settings))


def scores_from(records: dict[Job, dict]) -> list[CandidateScore]:
    return [CandidateScore(record["layer"], int(record["bits"]), int(record["weight_numel"]), float(record["mse"]),
                           record.get("semantic_drop")) for record in records.values()]


def analyze(recipe: Recipe, out_dir: str | Path, *, model_path: str | None = None, workers: int | None = None,
            progress: bool = True) -> AnalysisResult:
    """Run BitsFusion's sensitivity analysis for ``recipe`` into ``out_dir`` and write its plan.

    Candidates already measured in ``out_dir`` (same settings) are reused, so an interrupted analysis resumes, and
    a new ``target_average_bits`` / ``eta`` / percentiles re-assigns bits without measuring anything again.
    """
    from .report import write_outputs

    started = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; pass a directory for the analysis")
    inputs = prepare(recipe, model_path)
    section = recipe.analyze
    jobs = inputs.jobs
    records, computed = run_candidates(recipe, inputs.model_path, jobs, out_dir, inputs.digest,
                                       workers=workers or section.workers, progress=progress, bundle=inputs.bundle)
    source = f"analyze {recipe.name}, target {section.target_average_bits} bits"
    assignment = search_threshold(inputs.base_plan, scores_from(records), inputs.rule,
                                  target=section.target_average_bits, tolerance=section.tolerance,
                                  num_steps=recipe.schedule.num_steps, source=source)
    plan_path = out_dir / PLAN_NAME
    assignment.plan.save(plan_path)
    result = AnalysisResult(out_dir, plan_path, assignment, section.target_average_bits, len(jobs), computed,
                            time.perf_counter() - started, inputs.metric)
    write_outputs(inputs, records, result)
    return result
