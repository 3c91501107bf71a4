"""Mutation self-test of `validate`: does it catch the smallest corruption of every quantized layer?

For every quantized layer of a finished run's model.onnx, separately: (a) one packed code moved to a neighbouring
level, (b) one scale moved by one fp16 ulp, (c) one bias moved by a relative 1e-3 (lowbit_deploy/validate/mutation.py).
Each mutated file goes through validate's ONNX checks (validate/parity.py `check_onnx`: output gates + exact weight
parity); the untouched file goes through them with 5 input seeds (false alarms). Prints caught / tried per kind, and
what the output gates alone would have caught (they cannot see changes below float32 op-ordering noise).

Usage: python benchmarks/mutation.py [RUN_DIR] [--seeds 5] [--kinds code,scale,bias] [--layers N] [--bisect N]
       python benchmarks/mutation.py [RUN_DIR] --break LAYER --out DIR [--kind code]
RUN_DIR defaults to runs/demo (`make demo`). Gates: the current defaults (recipes.Gates()); --run-gates uses the run's.
The second form writes a copy of the run whose model.onnx has one mutation in LAYER, for trying
`lowbit-deploy validate DIR --per-layer` on a deliberately broken artifact.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

from _common import REPO, print_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", type=Path, default=REPO / "runs" / "demo")
    parser.add_argument("--seeds", type=int, default=5, help="input seeds of the clean (false-alarm) check")
    parser.add_argument("--kinds", default="code,scale,bias")
    parser.add_argument("--layers", type=int, default=None, help="only the first N quantized layers")
    parser.add_argument("--bisect", type=int, default=0,
                        help="also run per-layer bisection on N code mutations and check it names the layer")
    parser.add_argument("--run-gates", action="store_true", help="use the run's recipe gates, not the defaults")
    parser.add_argument("--break", dest="break_layer", default=None,
                        help="write a copy of the run with one mutation in this layer (with --out) and stop")
    parser.add_argument("--out", type=Path, default=None, help="where --break writes the broken run")
    parser.add_argument("--kind", default="code", help="the mutation --break applies (code, scale or bias)")
    args = parser.parse_args()
    if args.break_layer:
        write_broken_run(args.run_dir, args.break_layer, args.out, args.kind)
        return

    import onnx
    import torch

    from lowbit_deploy.recipes import Gates
    from lowbit_deploy.validate.mutation import MutationKind, mutate, quantized_layer_names
    from lowbit_deploy.validate.parity import check_onnx, parity_feeds, prepare_validation
    from lowbit_deploy.validate.per_layer import per_layer_parity

    torch.set_num_threads(1)
    onnx_path = args.run_dir / "model.onnx"
    if not onnx_path.is_file():
        raise SystemExit(f"no {onnx_path}; run `make demo` (or `lowbit-deploy run ...`) first")
    context = prepare_validation(args.run_dir)
    config = context.checkpoint.recipe.validate_
    gates = config.gates if args.run_gates else Gates()
    gates, _ = context.effective_gates(gates, config.sampling)  # floor-following gates resolved for this model
    floor = f"float32 noise floor {context.noise_floor().sqnr_db:.1f} dB; " if gates.follow_floor else ""
    print(f"run: {args.run_dir}  {floor}gates: onnxruntime {gates.onnxruntime.model_dump()}, per-layer "
          f"{gates.per_layer_min_sqnr_db} dB")
    started = time.perf_counter()

    false_alarms = []
    for seed in range(args.seeds):
        seeded = copy.copy(context)
        seeded.inputs = parity_feeds(context.signature, context.bundle.condition, config.batches, config.batch_size,
                                     seed)
        seeded._references = None
        outputs, weights = check_onnx(onnx_path, seeded, gates)
        print(f"clean, seed {seed}: outputs {outputs.status} (SQNR {outputs.stats.sqnr_db:.1f} dB, max_abs "
              f"{outputs.stats.max_abs:.3g}), weights {weights.status}")
        if outputs.status != "passed" or weights.status != "passed":
            false_alarms.append(seed)

    model = onnx.load(str(onnx_path))
    layers = quantized_layer_names(model)[:args.layers]
    rows, escaped = [], []
    bisected = named = 0
    with tempfile.TemporaryDirectory() as tmp:
        mutated_path = Path(tmp) / "model.onnx"
        for kind in (MutationKind(k) for k in args.kinds.split(",")):
            tried = caught = by_outputs = by_weights = not_applicable = 0
            for index, layer in enumerate(layers):
                mutated = copy.deepcopy(model)
                mutation = mutate(mutated, layer, kind, seed=index)
                if mutation is None:
                    not_applicable += 1
                    continue
                onnx.save(mutated, str(mutated_path))
                outputs, weights = check_onnx(mutated_path, context, gates)
                tried += 1
                by_outputs += outputs.status == "failed"
                by_weights += weights.status == "failed"
                if outputs.status == "failed" or weights.status == "failed":
                    caught += 1
                else:
                    escaped.append(f"{kind.value} {layer}: {mutation.detail}")
                if kind is MutationKind.CODE and bisected < args.bisect:
                    bisected += 1
                    report = per_layer_parity(mutated_path, context.deployed, context.inputs[:1],
                                              gates.per_layer_min_sqnr_db)
                    first = report.first_failing
                    named += first is not None and first.tap.module == layer
            rows.append([kind.value, tried, caught, by_outputs, by_weights, not_applicable])
    print_table("mutations caught by validate's ONNX checks", ["kind", "tried", "caught", "by output gates",
                                                              "by exact weights", "not applicable"], rows)
    for line in escaped:
        print(f"  ESCAPED {line}")
    if args.bisect:
        print(f"per-layer bisection named the mutated layer first: {named} / {bisected}")
    print(f"false alarms on the clean artifact: {len(false_alarms)} / {args.seeds} seeds")
    total_tried = sum(row[1] for row in rows)
    total_caught = sum(row[2] for row in rows)
    print(f"caught {total_caught} / {total_tried}; {'PASS' if total_caught == total_tried and not false_alarms else 'MISS'}"
          f" (target: all caught, no false alarm); {time.perf_counter() - started:.0f}s")


def write_broken_run(run_dir: Path, layer: str, out: Path | None, kind: str) -> None:
    """Copy ``run_dir`` (without engines) to ``out`` with one ``kind`` mutation in ``layer``'s packed weight."""
    import shutil

    import onnx

    from lowbit_deploy.validate.mutation import MutationKind, mutate

    if out is None or out.exists():
        raise SystemExit("--break needs --out DIR, a folder that does not exist yet")
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("*.engine", "per_layer_sqnr*.png"))
    model = onnx.load(str(out / "model.onnx"))
    mutation = mutate(model, layer, MutationKind(kind), seed=0)
    if mutation is None:
        shutil.rmtree(out)
        raise SystemExit(f"layer {layer!r} has nothing to mutate for {kind!r}")
    onnx.save(model, str(out / "model.onnx"))
    print(f"{out}: {kind} mutation in {layer}: {mutation.detail}")
    print(f"try: lowbit-deploy validate {out} --per-layer --skip-sampling")


if __name__ == "__main__":
    main()
