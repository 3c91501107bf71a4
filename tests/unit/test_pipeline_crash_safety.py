"""The whole chain killed at any instant after training -- inside the export, the report updates and validate's
writes included -- is finished by one command (``run --resume``), with the same artifacts as a run never
interrupted (training's own crash points: tests/unit/qat/test_crash_safety.py). The crashing run is a fresh
interpreter: a forked child of a process that already ran ONNX Runtime can deadlock on its thread pool.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from crash_hooks import CRASHED, crash_in_fresh_process, run_in_fresh_process
from tinymodels import TINY_RECIPE, make_tiny_unet

from lowbit_deploy.pipeline import run_pipeline
from lowbit_deploy.qat.checkpoint import CHECKPOINT_DIRNAME, TRAIN_STATE_FILE, WEIGHTS_FILE

# Byte-identical after recovery: the checkpoint and both ONNX files (README: "Reproducible artifacts").
ARTIFACTS = (f"{CHECKPOINT_DIRNAME}/{WEIGHTS_FILE}", f"{CHECKPOINT_DIRNAME}/{TRAIN_STATE_FILE}", "model.onnx",
             "model_fp16.onnx")
STAGES = {"train", "export", "build", "validate"}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The model, the recipe file, an uninterrupted run's artifact bytes and its file-system events."""
    root = tmp_path_factory.mktemp("chain")
    make_tiny_unet().save_pretrained(root / "model" / "unet")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    # Every run of these tests is a fresh interpreter, as a user's is: state earlier tests left in the pytest
    # process (torch's thread count) changes floating-point results, and the comparisons are byte for byte.
    run_in_fresh_process(_run, (root, recipe, root / "reference"), root / "events.json")
    expected = {name: (root / "reference" / name).read_bytes() for name in ARTIFACTS}
    events = [tuple(event) for event in json.loads((root / "events.json").read_text())]
    return root, recipe, expected, events


def _run(root: Path, recipe: Path, out: Path, resume: bool = False) -> dict:
    return run_pipeline(recipe, out, model_path=str(root / "model"), build=False, progress=False, resume=resume)


def _after_training(events: list[tuple[str, str]]) -> int:
    """1-based number of the first event after the train stage's report entry is in place."""
    renames = [i for i, (kind, name) in enumerate(events, 1) if kind == "rename" and name == "report.json"]
    return renames[0] + 1


def _points(events: list[tuple[str, str]]) -> list[int]:
    """Crash points where a wrong order would lose or corrupt the chain: the ONNX half-written and just renamed,
    the export's report entry half-written, validate's first write, and the last event of the run."""
    start = _after_training(events)

    def first(kind: str, name_part: str, after: int = start) -> int:
        return next(i for i, (k, n) in enumerate(events, 1) if i >= after and k == kind and name_part in n)

    onnx_rename = first("rename", "model.onnx")
    export_report = first("write", "report.json", onnx_rename)
    validate_write = first("write", "", export_report + 3)
    return [start, onnx_rename - 1, onnx_rename, export_report, validate_write, len(events)]


def _crash_and_recover(chain, tmp_path: Path, crash_at: int) -> None:
    root, recipe, expected, events = chain
    out = tmp_path / f"crash-{crash_at}"
    assert crash_in_fresh_process(_run, (root, recipe, out), crash_at) == CRASHED, (crash_at, events[crash_at - 1])
    run_in_fresh_process(_run, (root, recipe, out, True))
    assert json.loads((out / "report.json").read_text())["validate"]["passed"], crash_at
    assert {name: (out / name).read_bytes() for name in ARTIFACTS} == expected, \
        f"the chain recovered after event {crash_at} {events[crash_at - 1]} differs"
    report = json.loads((out / "report.json").read_text())
    assert STAGES <= report.keys(), (crash_at, sorted(report))
    leftovers = [path.name for path in out.rglob(".*")]
    assert not leftovers, (crash_at, leftovers)


def test_the_chain_stopped_at_its_critical_writes_is_finished_by_run_resume(chain, tmp_path):
    _, _, _, events = chain
    for crash_at in _points(events):
        _crash_and_recover(chain, tmp_path, crash_at)


@pytest.mark.slow
def test_the_chain_stopped_at_any_event_after_training_is_finished_by_run_resume(chain, tmp_path):
    _, _, _, events = chain
    for crash_at in range(_after_training(events), len(events) + 1):
        _crash_and_recover(chain, tmp_path, crash_at)


def test_a_real_ctrl_c_closes_with_130_and_run_resume_finishes(chain, tmp_path):
    """SIGINT to a running `lowbit-deploy run` (not a patched exception): exit 130 with the closing line and no
    traceback; the same command with --resume then finishes the chain."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root, recipe, expected, _ = chain
    out = tmp_path / "interrupted"
    command = [sys.executable, "-m", "lowbit_deploy", "run", str(recipe), "--out", str(out), "--model",
               str(root / "model"), "--no-build", "-v"]
    # A shell that starts the suite as a background job (`make test &`) ignores SIGINT in everything it starts, and
    # Python keeps an inherited SIG_IGN; a user's terminal delivers Ctrl-C to a foreground command, so the child gets
    # the default disposition back.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not out.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)  # the run directory appears when the run takes its lock, before training starts
    time.sleep(0.5)
    # How the child handles SIGINT when it is sent (blocked / ignored / caught masks), for the failure message.
    masks = [line.strip() for line in Path(f"/proc/{process.pid}/status").read_text().splitlines()
             if line.startswith(("SigBlk", "SigIgn", "SigCgt"))] if process.poll() is None else ["exited already"]
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, f"{masks}\n{output}"
    assert output.strip().splitlines()[-1].startswith("FAILED | Runtime: "), output
    assert "Traceback" not in output and "Aborted!" not in output, output
    finished = subprocess.run([*command[:-1], "--resume"], capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert {name: (out / name).read_bytes() for name in ARTIFACTS} == expected
