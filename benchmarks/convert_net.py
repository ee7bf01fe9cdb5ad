"""Cost of exact attention twins: parameters, FLOPs and CPU forward time of five timm CNNs and their twins.

Every convolution is converted (``convert_network(..., patch_size='auto')``), for each attention form
of :data:`FORMS`. FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and
convolutions, per image); times are the median of several float32 forward passes, and ratios are taken within
one run. Prints a markdown table (the README's "Convert any CNN" section).

    OMP_NUM_THREADS=1 python benchmarks/convert_net.py --img-size 64
"""
from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from cmhsa.network import convert_network

NETWORKS = ["resnet18", "resnet50", "convnext_atto", "mobilenetv3_small_100", "efficientnet_b0"]
# the global forms; the local form is the paper's heads on a window, costlier per head than the factorized one
FORMS = ("paper", "factorized")


@torch.no_grad()
def measure(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> dict:
    with FlopCounterMode(display=False) as counter:
        model(x[:1])
    model(x)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return {"params": sum(p.numel() for p in model.parameters()), "flops": counter.get_total_flops(),
            "ms": 1e3 * statistics.median(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--networks", nargs="+", default=NETWORKS)
    args = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    print(f"{args.img_size}x{args.img_size} input, float32, batch {args.batch_size}, "
          f"{torch.get_num_threads()} thread(s); FLOPs per image\n")
    print("| network | form | layers as attention | params | FLOPs | forward (ms) | params x | FLOPs x | time x |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.networks:
        cnn = timm.create_model(name, pretrained=False).eval()
        base = measure(cnn, x, args.repeats)
        print(f"| {name} | CNN | 0 | {base['params'] / 1e6:.1f}M | {base['flops'] / 1e9:.3f}G | {base['ms']:.1f} "
              f"| 1 | 1 | 1 |", flush=True)
        for form in FORMS:
            twin, table = convert_network(cnn, form=form, img_size=args.img_size, verify=False)
            cost = measure(twin, x, args.repeats)
            done = sum(r["converted"] for r in table)
            print(f"| {name} | twin ({form}) | {done}/{len(table)} | {cost['params'] / 1e6:.1f}M | "
                  f"{cost['flops'] / 1e9:.3f}G | {cost['ms']:.1f} | {cost['params'] / base['params']:.1f} | "
                  f"{cost['flops'] / base['flops']:.1f} | {cost['ms'] / base['ms']:.1f} |", flush=True)
            del twin


if __name__ == "__main__":
    main()
