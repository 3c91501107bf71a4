"""Running candidates: in worker processes (each loads the model once, one torch thread), with every finished
candidate appended to an on-disk JSONL cache so an interrupted analysis resumes where it stopped.

The cache is ``DIR/candidates.jsonl``: one complete JSON record per line, each written with a single ``write`` and
fsynced. A line cut off by a kill (no trailing newline) is dropped on the next start. Every record carries the
digest of the settings it was measured under; records from other settings are refused, never mixed in.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from ..errors import UserError
from ..progress import show_progress

CACHE_NAME = "candidates.jsonl"

Job = tuple[str, int]  # (layer name, bits)


# ---- the cache ---------------------------------------------------------------------------------------------------
def read_cache(path: Path, digest: str) -> dict[Job, dict]:
    """Finished records by (layer, bits); drops a torn last line (so appends start on a fresh line)."""
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]
    if len(complete) != len(raw):
        with open(path, "r+b") as handle:
            handle.truncate(len(complete))
    records: dict[Job, dict] = {}
    for number, line in enumerate(complete.decode().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise UserError(f"{path} line {number} is not JSON; delete the file (every candidate is then measured "
                            f"again) or the line") from None
        if record.get("settings") != digest:
            raise UserError(f"{path} holds candidates measured with other settings (model, schedule, samples, seed, "
                            f"grid, scale init or tuning differ from this recipe's); analyze into a new --out, or "
                            f"delete {path} to measure again")
        records[(record["layer"], int(record["bits"]))] = record
    return records


def append_record(path: Path, record: dict) -> None:
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


# ---- workers -----------------------------------------------------------------------------------------------------
_EVALUATOR = None


def _evaluate(job: Job, recipe_json: str, model_path: str | None) -> dict:
    """Runs in a worker process: the first job loads the model and computes the reference (so a problem loading it
    comes back as that job's exception, not as an anonymous broken pool); later jobs reuse them."""
    import torch

    from ..recipes import recipe_from_json
    from .candidates import CandidateEvaluator

    global _EVALUATOR
    if _EVALUATOR is None:
        # Workers already run in parallel; more threads per process would only fight over the same cores.
        torch.set_num_threads(1)
        _EVALUATOR = CandidateEvaluator(recipe_from_json(recipe_json), model_path)
    return _EVALUATOR.evaluate(*job)


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _results_inline(recipe, model_path: str | None, jobs: Sequence[Job], bundle) -> Iterable[dict]:
    from .candidates import CandidateEvaluator

    with _torch_threads(1):
        evaluator = CandidateEvaluator(recipe, model_path, bundle)
        for job in jobs:
            yield evaluator.evaluate(*job)


def _results_parallel(recipe, model_path: str | None, jobs: Sequence[Job], workers: int) -> Iterable[dict]:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    # spawn, not fork: a forked child inherits torch's thread pools and locks in whatever state they were in.
    context = multiprocessing.get_context("spawn")
    recipe_json = recipe.to_json()
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending = {pool.submit(_evaluate, job, recipe_json, model_path) for job in jobs}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        finally:
            for future in pending:
                future.cancel()


def run_candidates(recipe, model_path: str | None, jobs: Sequence[Job], out_dir: Path, digest: str, *,
                   workers: int = 1, progress: bool = True, bundle=None) -> tuple[dict[Job, dict], int]:
    """Measure every job not yet in ``out_dir``'s cache; returns all records of ``jobs`` and how many were new.

    ``workers`` > 1 runs them in that many processes; with 1 they run here (on ``bundle`` when given)."""
    from tqdm.auto import tqdm

    path = Path(out_dir) / CACHE_NAME
    cached = read_cache(path, digest)
    todo = [job for job in jobs if job not in cached]
    records = {job: cached[job] for job in jobs if job in cached}
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="analyze", unit="candidate",
               disable=not show_progress(progress))
    try:
        if todo:
            workers = max(1, min(workers, len(todo)))
            results = (_results_inline(recipe, model_path, todo, bundle) if workers == 1 else
                       _results_parallel(recipe, model_path, todo, workers))
            for record in results:
                record["settings"] = digest
                append_record(path, record)
                records[(record["layer"], record["bits"])] = record
                bar.update(1)
                bar.set_postfix(layer=record["layer"][-24:], bits=record["bits"])
    finally:
        bar.close()
    return records, len(todo)
