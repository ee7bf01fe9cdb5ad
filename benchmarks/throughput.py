"""Training throughput of the CMHSA phases against timm's VisionTransformer of the same width and depth.

For each model and precision: training images/s (forward + backward + AdamW step), FLOPs per image counted by
``torch.utils.flop_counter`` (forward + backward), and model-FLOP utilisation against the GEMM peak measured in the
same run (a 2048^2 matmul in that precision). Prints one markdown table per precision (``benchmarks/readme.py``
pastes it into the README as printed); ``--json`` also writes the rows to a file.

    python benchmarks/throughput.py                  # tiny sizes (28 px, D = 128), bf16 and fp32
    python benchmarks/throughput.py --size paper     # 224 px, D = 768 (slow on a CPU: a few images per step)
"""
from __future__ import annotations

import argparse
import json
import time

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch.utils.flop_counter import FlopCounterMode

import cmhsa  # noqa: F401  (registers the CMHSA models)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def gemm_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of an n x n matmul in ``dtype``: the reference for utilisation."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return repeats * 2 * n ** 3 / (time.perf_counter() - start)


def train_step(model, opt, x, y, dtype):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def measure(model, img_shape, batch: int, steps: int, dtype) -> tuple[float, float]:
    """(images/s, FLOPs per image for forward + backward)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x, y = torch.randn(batch, *img_shape), torch.randint(0, 10, (batch,))
    with FlopCounterMode(display=False) as counter:
        train_step(model, opt, x, y, dtype)  # also the warm-up step
    train_step(model, opt, x, y, dtype)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, opt, x, y, dtype)
    return steps * batch / (time.perf_counter() - start), counter.get_total_flops() / batch


def models(size: str):
    if size == "tiny":
        img, kw = (1, 28, 28), dict(num_classes=10)
        vit = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0)
        names = ("cmhsa5_conv_tiny", "cmhsa5_attn_tiny")
    else:
        img, kw = (3, 224, 224), dict(num_classes=100)
        vit = dict(img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=6, num_heads=12, mlp_ratio=4.0)
        names = ("cmhsa5_conv_224", "cmhsa5_attn_224")
    return img, [
        ("CMHSA conv phase", lambda: timm.create_model(names[0], **kw)),
        ("CMHSA attention phase", lambda: timm.create_model(names[1], **kw)),
        (f"timm ViT (D={vit['embed_dim']}, depth 6)",
         lambda: VisionTransformer(**vit, **kw, class_token=False, global_pool="avg")),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "paper"], default="tiny")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 tiny, 4 paper")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 5 tiny, 2 paper)")
    parser.add_argument("--precisions", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    batch = args.batch_size or (128 if args.size == "tiny" else 4)
    steps = args.steps or (5 if args.size == "tiny" else 2)
    torch.manual_seed(0)

    img, entries = models(args.size)
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, size {args.size}, batch {batch}")
    for precision in args.precisions:
        dtype = DTYPES[precision]
        peak = gemm_peak(dtype)
        print(f"\n{precision}: GEMM peak (2048^2 matmul) {peak / 1e9:.0f} GFLOP/s\n")
        print("| model | params | img/s | GFLOP/img | GFLOP/s | MFU |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, build in entries:
            model = build().train()
            params = sum(p.numel() for p in model.parameters())
            ips, flops = measure(model, img, batch, steps, dtype)
            row = dict(size=args.size, precision=precision, model=name, params=params, images_per_second=ips,
                       gflop_per_image=flops / 1e9, achieved_gflops=ips * flops / 1e9, peak_gflops=peak / 1e9,
                       mfu=ips * flops / peak)
            rows.append(row)
            print(f"| {name} | {params / 1e6:.2f}M | {ips:.0f} | {flops / 1e9:.3f} | {ips * flops / 1e9:.0f} | "
                  f"{100 * ips * flops / peak:.0f}% |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
