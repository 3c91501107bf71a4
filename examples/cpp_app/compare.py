"""Compare the C++ app's output with ONNX Runtime on the same inputs (the run's ONNX file, CPU).

    python examples/cpp_app/compare.py runs/demo /tmp/app_inputs /tmp/app_outputs

Statistics and gates are `lowbit-deploy validate`'s (max_abs, cosine, SQNR; default gates: the TensorRT ones,
since the engine computes in TensorRT's kernels). Ends with one line PASSED|FAILED; exit 0 / 1, 2 for bad input.
"""

from __future__ import annotations

import argparse
import sys

from make_inputs import onnx_path_of
from tensor_dir import TensorDirError, read_tensors


def compare_outputs(run_or_onnx: str, input_dir: str, output_dir: str, tolerances=None) -> tuple[dict, list[str]]:
    """(statistics of every output, failures against ``tolerances``), ONNX Runtime being the reference."""
    import numpy as np
    import torch

    from lowbit_deploy.errors import UserError
    from lowbit_deploy.recipes import TENSORRT_GATES
    from lowbit_deploy.runtime.ort import OrtRunner
    from lowbit_deploy.validate.stats import check, compare

    tolerances = tolerances or TENSORRT_GATES
    runner = OrtRunner(onnx_path_of(run_or_onnx))
    inputs = read_tensors(input_dir)
    app_outputs = read_tensors(output_dir)
    expected_names = [spec.name for spec in runner.signature.outputs]
    missing = [name for name in expected_names if name not in app_outputs]
    if missing:
        raise UserError(f"{output_dir} lacks output(s) {', '.join(missing)} (it has {', '.join(app_outputs)}): "
                        f"was it written by the app for this run's engine?")
    reference = runner({name: torch.from_numpy(array) for name, array in inputs.items()}).numpy()
    candidate = app_outputs[expected_names[0]]
    if candidate.shape != reference.shape:
        raise UserError(f"the app's {expected_names[0]} has shape {list(candidate.shape)}, ONNX Runtime's "
                        f"{list(reference.shape)}: were both run on {input_dir}?")
    stats = compare(reference, candidate.astype(np.float32))
    return {expected_names[0]: stats}, [f"{expected_names[0]}: {failure}" for failure in check(stats, tolerances)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory (reads RUN/model.onnx) or the exported ONNX file")
    parser.add_argument("input_dir", help="the inputs the app ran on (make_inputs.py)")
    parser.add_argument("output_dir", help="the app's OUTPUT_DIR")
    parser.add_argument("--max-abs", type=float, help="gate on the largest absolute difference")
    parser.add_argument("--min-cosine", type=float, help="gate on the cosine similarity")
    parser.add_argument("--min-sqnr-db", type=float, help="gate on the signal-to-quantization-noise ratio (dB)")
    args = parser.parse_args(argv)

    from lowbit_deploy.errors import UserError
    from lowbit_deploy.recipes import TENSORRT_GATES

    overrides = {key: value for key, value in (("max_abs", args.max_abs), ("min_cosine", args.min_cosine),
                                                      ("min_sqnr_db", args.min_sqnr_db)) if value is not None}
    tolerances = TENSORRT_GATES.model_copy(update=overrides)
    try:
        stats, failures = compare_outputs(args.run, args.input_dir, args.output_dir, tolerances)
    except (UserError, TensorDirError) as error:
        print(f"error: {error}", file=sys.stderr)
        print(f"FAILED | cpp_app vs onnxruntime | {args.output_dir}")
        return 2
    for name, values in stats.items():
        print(f"{name}: max_abs {values.max_abs:.3g}, mean_abs {values.mean_abs:.3g}, cosine {values.cosine:.8f}, "
              f"SQNR {values.sqnr_db:.1f} dB")
    for failure in failures:
        print(f"  {failure}")
    print(f"{'FAILED' if failures else 'PASSED'} | cpp_app vs onnxruntime | {args.output_dir}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
