"""Write the input directory of the C++ app for one UNet call of a run, from the signature in its ONNX metadata.

    python examples/cpp_app/make_inputs.py runs/demo /tmp/app_inputs [--batch 2] [--seed 0]

The inputs are seeded like `lowbit-deploy validate`'s parity feeds: a Gaussian sample, step indexes (or timesteps)
spanning the schedule, and Gaussian encoder_hidden_states of the signature's [batch, tokens, dim] (stand-ins for
prompt embeddings: this checks the engine's arithmetic, not image quality). The batch must lie inside the engine's
profile (build.min_batch..max_batch of the recipe; 1..8 by default).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tensor_dir import TensorDirError, write_tensors


def onnx_path_of(run_or_onnx: str) -> Path:
    path = Path(run_or_onnx)
    return path / "model.onnx" if path.is_dir() else path


def make_inputs(run_or_onnx: str, out_dir: str, batch: int = 2, seed: int = 0) -> dict:
    """The seeded feeds (name -> numpy array), also written to ``out_dir``."""
    import torch

    from lowbit_deploy.runtime.ort import read_signature

    signature = read_signature(onnx_path_of(run_or_onnx))
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, signature.seq_len, signature.cross_attention_dim, generator=generator)
    feeds = signature.random_feeds(batch, generator, states)
    arrays = {name: feeds[name].numpy() for name in signature.input_names}
    write_tensors(out_dir, arrays)
    return arrays


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory (reads RUN/model.onnx) or an exported ONNX file")
    parser.add_argument("out_dir", help="directory to write tensors.txt and NAME.bin into")
    parser.add_argument("--batch", type=int, default=2, help="batch size (inside the engine's profile; default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error("--batch must be at least 1")

    from lowbit_deploy.errors import UserError

    try:
        arrays = make_inputs(args.run, args.out_dir, args.batch, args.seed)
    except (UserError, TensorDirError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name, array in arrays.items():
        print(f"{name}: {array.dtype} {list(array.shape)}")
    print(f"wrote {len(arrays)} input(s) to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
