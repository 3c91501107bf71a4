"""GPU speed of the lowbit::UnpackDequantize kernels (liblowbit_kernels.so, called through engines/kernels.py).

1. Memory speed: for every packing format (int8 words, int32 words, bit stream) and level count, the decode of one
   weight of ``--weights`` codes into float32 and into float16: achieved GB/s (packed + scale bytes read plus output
   bytes written, over the kernel time) and that as a fraction of the device's own device-to-device copy bandwidth,
   measured in the same run with a cudaMemcpy of the float32 output's size (bytes read + written over its time).
   Target (issue 6): >= 85% of copy bandwidth for every format.
2. Decode + conv at SD1.5 size: for every 3x3 conv of the SD1.5 UNet at batch 2 and 512x512 (latent 64x64), the time
   of (decode to float16 + the float16 cuDNN conv) against the float16 conv alone, as a ratio. Target: <= 1.15.

Times are CUDA-event times on torch's current stream, after ``--warmup`` runs, the median of ``--repeats`` samples;
a sample is ``--inner`` back-to-back runs queued behind a GPU sleep, so the events time the GPU's work and not
Python's launch overhead. The decode is launched through the kernel library's device-pointer launcher (arguments
checked once by the engines/kernels.py wrapper). Without a CUDA GPU it prints one line saying so and exits 0
(``--require-gpu``: exit 2).

Usage: python benchmarks/gpu_unpack.py [--weights 118000000] [--repeats 50] [--warmup 10] [--inner 10]
                                        [--levels 2,3,...] [--conv-levels 3,4,16] [--shapes N] [--require-gpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any, Callable, NamedTuple

import numpy as np
from _common import print_table

from lowbit_deploy.quant import packing
from lowbit_deploy.quant.packing import PackingFormat

FORMATS = (PackingFormat.INT8_WORDS, PackingFormat.INT32_WORDS, PackingFormat.BITSTREAM)
LEVELS = (*range(2, 18), 255, 256, 257, 65_536)
COPY_TARGET, CONV_TARGET = 0.85, 1.15
NO_GPU_EXIT = 2  # with --require-gpu
# GPU clock cycles slept before each timed sample (~1-2 ms): long enough for Python to queue the sample's launches.
SLEEP_CYCLES = 2_000_000


class ConvShape(NamedTuple):
    """One 3x3 conv of the SD1.5 UNet at batch 2, 512x512 (latent 64x64): weight [cout, cin, 3, 3] on an
    [2, cin, size, size] input, stride 1 or 2 (the downsamplers)."""

    where: str
    cout: int
    cin: int
    size: int
    stride: int = 1


# The distinct 3x3 conv shapes of SD1.5 (block_out_channels 320/640/1280/1280, 2 resnets per down block, 3 per up
# block; up-block resnets see the skip connection's channels concatenated; conv_in/conv_out are left out).
SD15_CONVS = (
    ConvShape("down0 resnets", 320, 320, 64),
    ConvShape("down0 downsample", 320, 320, 64, 2),
    ConvShape("down1 resnet0.conv1", 640, 320, 32),
    ConvShape("down1 resnets", 640, 640, 32),
    ConvShape("down1 downsample", 640, 640, 32, 2),
    ConvShape("down2 resnet0.conv1", 1280, 640, 16),
    ConvShape("down2 resnets", 1280, 1280, 16),
    ConvShape("down2 downsample", 1280, 1280, 16, 2),
    ConvShape("down3/mid resnets, up0 conv2", 1280, 1280, 8),
    ConvShape("up0 resnets.conv1", 1280, 2560, 8),
    ConvShape("up1 resnet0/1.conv1", 1280, 2560, 16),
    ConvShape("up1 resnet2.conv1", 1280, 1920, 16),
    ConvShape("up1 upsample", 1280, 1280, 32),
    ConvShape("up2 resnet0.conv1", 640, 1920, 32),
    ConvShape("up2 resnet1.conv1", 640, 1280, 32),
    ConvShape("up2 resnet2.conv1", 640, 960, 32),
    ConvShape("up2 upsample", 640, 640, 64),
    ConvShape("up3 resnet0.conv1", 320, 960, 64),
    ConvShape("up3 resnet1/2.conv1", 320, 640, 64),
)


def gpu_missing_reason() -> str | None:
    """Why nothing can be measured here (None when torch sees a CUDA GPU)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False)"
    return None


def median_ms(run: Callable[[], Any], args: argparse.Namespace) -> float:
    """Median CUDA-event time of one ``run`` (launches on torch's current stream), in milliseconds."""
    import torch

    for _ in range(args.warmup):
        run()
    times = []
    for _ in range(args.repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SLEEP_CYCLES)  # the GPU waits here while the runs below are queued
        start.record()
        for _ in range(args.inner):
            run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / args.inner)
    return statistics.median(times)


class Weight:
    """A packed random weight on the GPU and a decoder into a preallocated float32 or float16 output."""

    def __init__(self, shape: tuple[int, ...], levels: int, fmt: PackingFormat, rng: np.random.Generator) -> None:
        import torch

        self.shape, self.levels, self.fmt = shape, levels, fmt
        # Random words of the packed length: every word decodes to in-range codes (digits are taken modulo L) and the
        # decode's cost does not depend on the values, so packing ~10^8 codes on the CPU first would only cost time.
        words = packing.PackedLayout(levels, fmt, int(np.prod(shape))).num_words
        limits = np.iinfo(fmt.numpy_dtype)
        self.packed = torch.from_numpy(rng.integers(limits.min, limits.max, size=words, dtype=fmt.numpy_dtype,
                                                    endpoint=True)).cuda()
        self.scale = torch.from_numpy((rng.random(shape[0]) * 0.1 + 0.01).astype(np.float16)).cuda()
        self.outputs = {dtype: torch.empty(shape, dtype=dtype, device="cuda") for dtype in (torch.float32,
                                                                                             torch.float16)}

    def input_bytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scale.numel() * 2

    def launcher(self, dtype: Any) -> Callable[[], Any]:
        """A decode into the preallocated ``dtype`` output through the library's device-pointer launcher; the
        arguments are checked once here by the engines/kernels.py wrapper (which also runs the decode once)."""
        import torch

        from lowbit_deploy.engines import kernels

        out, qmin, fp16 = self.outputs[dtype], -(self.levels // 2), dtype == torch.float16
        library, stream = kernels.load_kernel_library(), torch.cuda.current_stream().cuda_stream
        pointers = (self.packed.data_ptr(), self.scale.data_ptr(), out.data_ptr())
        numel, channels = out.numel(), self.shape[0]
        if self.fmt is PackingFormat.BITSTREAM:
            size, bits = packing.bitstream_group(self.levels)
            kernels.unpack_dequantize_bitstream_cuda(self.packed, self.scale, self.levels, qmin, size, bits,
                                                     self.shape, out_dtype=dtype, out=out)
            num_bytes = self.packed.numel()

            def launch() -> Any:
                library.unpack_dequantize_bitstream_launch(pointers[0], num_bytes, pointers[1], pointers[2], numel,
                                                           channels, self.levels, qmin, size, bits, stream,
                                                           out_fp16=fp16)
                return out
            return launch
        k, word_bits = packing.codes_per_word(self.levels, self.fmt.word_bits), self.fmt.word_bits
        kernels.unpack_dequantize_cuda(self.packed, self.scale, self.levels, qmin, word_bits, k, self.shape,
                                       out_dtype=dtype, out=out)

        def launch() -> Any:
            library.unpack_dequantize_launch(pointers[0], word_bits, pointers[1], pointers[2], numel, channels,
                                             self.levels, qmin, k, stream, out_fp16=fp16)
            return out
        return launch


def copy_bandwidth(nbytes: int, args: argparse.Namespace) -> float:
    """Device-to-device copy bandwidth in GB/s (torch's copy_ of contiguous bytes: a cudaMemcpyAsync), counting bytes
    read plus written."""
    import torch

    source = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    milliseconds = median_ms(lambda: target.copy_(source), args)
    return 2 * nbytes / milliseconds / 1e6


def memory_speed(args: argparse.Namespace) -> list[list[object]]:
    import torch

    channels = 1280
    shape = (channels, max(1, int(args.weights) // channels))
    numel = int(np.prod(shape))
    copy_gbps = copy_bandwidth(numel * 4, args)
    print(f"device {torch.cuda.get_device_name()}: device-to-device copy {copy_gbps:.0f} GB/s (read + write, "
          f"{numel * 4 / 1e6:.0f} MB)", flush=True)
    rows, rng = [], np.random.default_rng(0)
    for levels in args.levels:
        for fmt in FORMATS:
            if fmt is not PackingFormat.BITSTREAM and packing.codes_per_word(levels, fmt.word_bits) < 1:
                continue
            weight = Weight(shape, levels, fmt, rng)
            for dtype, size in ((torch.float32, 4), (torch.float16, 2)):
                milliseconds = median_ms(weight.launcher(dtype), args)
                gbps = (weight.input_bytes() + numel * size) / milliseconds / 1e6
                rows.append([fmt.value, levels, str(dtype).removeprefix("torch."), round(milliseconds * 1e3, 1),
                             round(gbps), round(gbps / copy_gbps, 3)])
            del weight
    return rows


def conv_ratios(args: argparse.Namespace) -> list[list[object]]:
    import torch

    torch.backends.cudnn.benchmark = True
    rows, rng = [], np.random.default_rng(1)
    for conv in SD15_CONVS[:args.shapes]:
        x = torch.randn(2, conv.cin, conv.size, conv.size, device="cuda", dtype=torch.float16)
        dense = torch.randn(conv.cout, conv.cin, 3, 3, device="cuda", dtype=torch.float16) * 0.02

        def conv_alone() -> Any:
            return torch.nn.functional.conv2d(x, dense, padding=1, stride=conv.stride)

        conv_ms = median_ms(conv_alone, args)
        for levels in args.conv_levels:
            fmt = packing.best_format(levels)
            decode = Weight((conv.cout, conv.cin, 3, 3), levels, fmt, rng).launcher(torch.float16)

            def decode_and_conv() -> Any:
                return torch.nn.functional.conv2d(x, decode(), padding=1, stride=conv.stride)

            decode_ms = median_ms(decode, args)
            both_ms = median_ms(decode_and_conv, args)
            rows.append([conv.where, f"{conv.cout}x{conv.cin}x3x3", f"{conv.size}x{conv.size}/s{conv.stride}",
                         f"{fmt.value} L{levels}", round(conv_ms * 1e3, 1), round(decode_ms * 1e3, 1),
                         round(both_ms * 1e3, 1), round(both_ms / conv_ms, 3)])
    return rows


def _int_list(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=float, default=118e6, help="codes per decoded weight (memory-speed part)")
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per measurement (median)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs before each measurement")
    parser.add_argument("--inner", type=int, default=10, help="back-to-back runs per timed sample")
    parser.add_argument("--levels", type=_int_list, default=list(LEVELS), help="level counts, comma-separated")
    parser.add_argument("--conv-levels", type=_int_list, default=[3, 4, 16],
                        help="level counts of the decode+conv part (each in its best packing format)")
    parser.add_argument("--shapes", type=int, default=len(SD15_CONVS), help="first N SD1.5 conv shapes")
    parser.add_argument("--require-gpu", action="store_true", help=f"exit {NO_GPU_EXIT} without a CUDA GPU")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.inner < 1 or args.warmup < 0 or args.weights < 1:
        parser.error("--repeats, --inner and --weights must be >= 1 and --warmup >= 0")
    if any(not packing.MIN_LEVELS <= levels <= packing.MAX_LEVELS for levels in args.levels + args.conv_levels):
        parser.error(f"level counts must lie in [{packing.MIN_LEVELS}, {packing.MAX_LEVELS}]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = gpu_missing_reason()
    if reason is not None:
        print(f"gpu_unpack: needs a CUDA GPU, nothing measured ({reason})")
        return NO_GPU_EXIT if args.require_gpu else 0
    rows = memory_speed(args)
    print_table(f"decode speed, {int(args.weights):,} codes (target: >= {COPY_TARGET:.0%} of copy bandwidth)",
                ["format", "levels", "output", "us", "GB/s", "of copy"], rows)
    below = [row for row in rows if row[-1] < COPY_TARGET]
    print(f"{len(rows) - len(below)} of {len(rows)} decodes reach {COPY_TARGET:.0%} of the copy bandwidth")
    ratios = conv_ratios(args)
    print_table(f"float16 decode + float16 cuDNN conv vs the conv alone, batch 2, SD1.5 512x512 (target: <= "
                f"{CONV_TARGET})", ["layer", "weight", "input/stride", "packing", "conv us", "decode us",
                                    "decode+conv us", "ratio"], ratios)
    print(f"{sum(row[-1] <= CONV_TARGET for row in ratios)} of {len(ratios)} conv shapes within {CONV_TARGET}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
