"""ONNX Runtime weight modes side by side: resident memory and latency per call of ``packed`` vs ``folded``.

Each mode runs in its own fresh process (resident memory is per process and only grows): it reads the process's RSS,
opens the session (the first call included: ORT allocates lazily), reads RSS again -- the growth is what the session
keeps for the model -- then times ``--calls`` more calls at batch ``--batch`` and prints the median. Peak RSS
(``ru_maxrss``) shows what opening costs while it runs (folding decodes every layer at once).

Usage: python benchmarks/ort_weights.py [--onnx RUN/model.onnx] [--batch 1] [--calls 5] [--threads N]
Without ``--onnx`` it trains (0 steps) and exports the embedded default model into a temporary folder first.
benchmarks/scale.py runs it on an SD1.5-shaped export.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(f"{field}:")).split()[1])


def measure(onnx_path: str, mode: str, batch: int, calls: int, threads: int | None) -> dict:
    """One mode in this process: RSS growth at session open (+ first call), median seconds per call, peak RSS."""
    import statistics
    import time

    import torch

    from lowbit_deploy.runtime.ort import OrtRunner

    runner = OrtRunner(onnx_path, threads=threads, weights=mode)
    signature = runner.signature
    generator = torch.Generator().manual_seed(0)
    feeds = signature.random_feeds(batch, generator, torch.randn(batch, signature.seq_len,
                                                                 signature.cross_attention_dim, generator=generator))
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    first = runner(feeds)
    open_seconds = time.perf_counter() - start
    grown = _status_kib("VmRSS") - before
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        runner(feeds)
        seconds.append(time.perf_counter() - start)
    return {"mode": mode, "rss_growth_gib": grown / 2**20, "peak_rss_gib": _status_kib("VmHWM") / 2**20,
            "open_and_first_call_s": open_seconds, "median_call_s": statistics.median(seconds) if seconds else None,
            "output_sum": float(first.double().sum())}


def _default_export(root: Path) -> Path:
    import copy

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tinymodels import TINY_RECIPE

    from lowbit_deploy.export.onnx_export import export_run
    from lowbit_deploy.qat.trainer import train
    from lowbit_deploy.recipes import parse_recipe

    data = copy.deepcopy(TINY_RECIPE)
    data["train"] = {"steps": 0, "batch_size": 2, "checkpoint_every": 1, "data": "gaussian"}
    data["export"] = {"export_fp16_reference": False}
    train(parse_recipe(data), root, progress=False)
    export_run(root)
    return root / "model.onnx"


def compare_modes(onnx_path: Path, batch: int, calls: int, threads: int | None) -> list[dict]:
    """Both modes, each in a fresh child process; prints one row per mode."""
    from lowbit_deploy.runtime.ort import DEFAULT_WEIGHT_MODE, WEIGHT_MODES

    rows = []
    for mode in WEIGHT_MODES:
        command = [sys.executable, __file__, "--child", mode, "--onnx", str(onnx_path), "--batch", str(batch),
                   "--calls", str(calls)] + (["--threads", str(threads)] if threads else [])
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            rows.append({"mode": mode, "error": f"exit {done.returncode}: {done.stderr.strip()[-300:]}"})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"\n== ONNX Runtime weight modes on {onnx_path} ({onnx_path.stat().st_size / 2**20:.1f} MiB), batch {batch}, "
          f"{calls} timed calls (default mode: {DEFAULT_WEIGHT_MODE})")
    print(f"{'mode':8} {'RSS growth GiB':>15} {'peak RSS GiB':>13} {'open+1st call s':>16} {'median call s':>14}")
    for row in rows:
        if "error" in row:
            print(f"{row['mode']:8} failed: {row['error']}")
            continue
        median = f"{row['median_call_s']:.3f}" if row["median_call_s"] is not None else "-"
        print(f"{row['mode']:8} {row['rss_growth_gib']:15.3f} {row['peak_rss_gib']:13.3f} "
              f"{row['open_and_first_call_s']:16.2f} {median:>14}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", type=Path, help="an exported model.onnx (default: export the embedded model)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(str(args.onnx), args.child, args.batch, args.calls, args.threads)))
        return
    if args.onnx is not None:
        compare_modes(args.onnx, args.batch, args.calls, args.threads)
        return
    with tempfile.TemporaryDirectory(prefix="ort-weights-") as scratch:
        compare_modes(_default_export(Path(scratch) / "run"), args.batch, args.calls, args.threads)


if __name__ == "__main__":
    main()
