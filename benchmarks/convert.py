"""Time to build and verify the MHSA for a paper-size layer (K=5, P=16, C=3 -> D=768, 14x14 grid).

Target: build < 1 s on a 2-core CPU. Prints a markdown table (``benchmarks/readme.py`` pastes it into the README as
printed): the median build time of several runs and the verified error.
"""
import argparse
import statistics
import time

import torch
import torch.nn as nn

from cmhsa import conv_to_mhsa, verify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kernel-size", type=int, default=5)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--chans", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    grid = args.image_size // args.patch_size
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; K={args.kernel_size} P={args.patch_size} "
          f"C={args.chans} D={args.patch_size ** 2 * args.chans} grid {grid}x{grid}, {args.repeats} builds each\n")
    print("| dtype | build median (ms) | build min (ms) | build max (ms) | verify: build + forward + conv + bound (ms) "
          "| relative error |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for dtype in (torch.float32, torch.float64):
        conv = nn.Conv2d(args.chans, args.chans, args.kernel_size, padding="same").to(dtype)
        conv_to_mhsa(conv, args.patch_size, grid)  # warm-up
        build = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            conv_to_mhsa(conv, args.patch_size, grid)
            build.append(time.perf_counter() - start)
        start = time.perf_counter()
        report = verify(conv, args.patch_size, args.image_size, dtype=dtype)
        verify_s = time.perf_counter() - start
        print(f"| {str(dtype).replace('torch.', '')} | {statistics.median(build) * 1e3:.0f} | {min(build) * 1e3:.0f} | "
              f"{max(build) * 1e3:.0f} | {verify_s * 1e3:.0f} | {report.relative_error:.1e} |", flush=True)


if __name__ == "__main__":
    main()
