"""BitsFusion's mixed-precision sensitivity analysis (``lowbit-deploy analyze``): measure every quantizable layer
alone at each candidate bit width, assign bits per layer, write a :class:`~lowbit_deploy.quant.plan.QuantPlan`.

Modules: ``assign`` (the bit-assignment rule and the S_o search; no torch), ``candidates`` (measuring one
candidate), ``runner`` (worker processes + the resumable on-disk cache), ``analysis`` (the public entry point),
``report`` and ``plot`` (outputs). Importing this package loads no torch.
"""

from __future__ import annotations

from .analysis import AnalysisResult, analyze, candidate_layers, prepare
from .assign import AssignRule, CandidateScore, assign_bits, search_threshold, semantic_bumps

__all__ = ["AnalysisResult", "AssignRule", "CandidateScore", "analyze", "assign_bits", "candidate_layers",
           "prepare", "search_threshold", "semantic_bumps"]
