"""Training throughput of the CMHSA phases and attention forms against timm's VisionTransformer of the same width,
depth and MLP ratio.

Rows: the conv phase, the attention phase in the paper's form and in the factorized form, and a timm ViT. For each
model and precision: training images/s (forward + backward + AdamW step), FLOPs per image counted by
``torch.utils.flop_counter`` (forward + backward), and model-FLOP utilisation against the GEMM peak measured in the
same run (the best of several large GEMM shapes and repeats, in that precision). Every rate, the peak's too, is the
best of ``--rounds`` interleaved rounds: on a shared machine the least disturbed round is the closest to the
machine's own speed, and interleaving lets load from other processes hit every model alike. The precision ``auto`` picks for each model is marked. Prints
markdown tables: the rows, then the ratios the factorized form is judged by. Absolute numbers differ between
machines; ratios within one run do not depend on it as much.

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
from cmhsa.engine import resolve_precision
from cmhsa.provenance import git_state

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# (M, K, N) of the peak GEMMs: square, and the tall-skinny shapes a transformer's linear layers have
GEMM_SHAPES = [(2048, 2048, 2048), (4096, 1024, 4096), (8192, 768, 3072), (6272, 128, 1152), (4096, 4096, 1024)]


def gemm_peak(dtype: torch.dtype, repeats: int = 3) -> float:
    """Best FLOP/s over :data:`GEMM_SHAPES` and ``repeats`` timings each: the reference for utilisation."""
    best = 0.0
    for m, k, n in GEMM_SHAPES:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * m * k * n / (time.perf_counter() - start))
    return best


def train_step(model, opt, x, y, dtype):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


class Bench:
    """One model in one precision: its FLOPs per image (counted once) and its best timed rate."""

    def __init__(self, name: str, build, img_shape, batch: int, precision: str):
        torch.manual_seed(0)
        self.name, self.precision, self.batch = name, precision, batch
        self.dtype = DTYPES[precision]
        self.model = build().train()
        self.params = sum(p.numel() for p in self.model.parameters())
        self.auto = resolve_precision("cpu", "auto", self.model)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.x, self.y = torch.randn(batch, *img_shape), torch.randint(0, 10, (batch,))
        with FlopCounterMode(display=False) as counter:
            self.step()  # also the warm-up step
        self.flops = counter.get_total_flops() / batch
        self.step()
        self.images_per_second = 0.0

    def step(self):
        train_step(self.model, self.opt, self.x, self.y, self.dtype)

    def time(self, steps: int) -> None:
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.images_per_second = max(self.images_per_second, steps * self.batch / (time.perf_counter() - start))


def models(size: str):
    if size == "tiny":
        img, kw, suffix = (1, 28, 28), dict(num_classes=10), "tiny"
        vit = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0)
    else:
        img, kw, suffix = (3, 224, 224), dict(num_classes=100), "224"
        vit = dict(img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=6, num_heads=12, mlp_ratio=4.0)
    return img, [
        ("CMHSA conv phase", lambda: timm.create_model(f"cmhsa5_conv_{suffix}", **kw)),
        ("CMHSA attention, paper form", lambda: timm.create_model(f"cmhsa5_attn_{suffix}", **kw)),
        ("CMHSA attention, factorized", lambda: timm.create_model(f"cmhsa5_fattn_{suffix}", **kw)),
        (f"timm ViT (D={vit['embed_dim']}, depth 6)",
         lambda: VisionTransformer(**vit, **kw, class_token=False, global_pool="avg")),
    ]


def markdown(rows, peaks) -> str:
    lines = ["| model | precision | params | img/s | GFLOP/img | GFLOP/s | MFU |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        auto = " (auto)" if r["precision"] == r["auto_precision"] else ""
        lines.append(f"| {r['model']} | {r['precision']}{auto} | {r['params'] / 1e6:.2f}M | "
                     f"{r['images_per_second']:.3g} | {r['gflop_per_image']:.3f} | {r['achieved_gflops']:.0f} | "
                     f"{100 * r['mfu']:.1f}% |")
    lines.append("")
    lines.append("GEMM peak (best of " + ", ".join(f"{m}x{k}x{n}" for m, k, n in GEMM_SHAPES) + "): "
                 + ", ".join(f"{p} {v / 1e9:.0f} GFLOP/s" for p, v in peaks.items()))
    return "\n".join(lines)


def ratios(rows) -> str:
    """Factorized form vs the paper form, the conv phase and the ViT, per precision and at each model's auto."""
    by = {(r["model"], r["precision"]): r for r in rows}
    names = list(dict.fromkeys(r["model"] for r in rows))
    conv, paper, fact, vit = names
    lines = ["| precision | factorized / paper img/s | factorized / conv img/s | factorized / ViT GFLOP/img |",
             "| --- | ---: | ---: | ---: |"]
    precisions = list(dict.fromkeys(r["precision"] for r in rows))
    for p in precisions:
        f = by[(fact, p)]
        lines.append(f"| {p} | {f['images_per_second'] / by[(paper, p)]['images_per_second']:.2f}x | "
                     f"{f['images_per_second'] / by[(conv, p)]['images_per_second']:.2f}x | "
                     f"{f['gflop_per_image'] / by[(vit, p)]['gflop_per_image']:.2f}x |")
    if len(precisions) > 1:
        at_auto = {n: by[(n, by[(n, precisions[0])]["auto_precision"])] for n in names}
        f = at_auto[fact]
        lines.append(f"| each at auto | {f['images_per_second'] / at_auto[paper]['images_per_second']:.2f}x | "
                     f"{f['images_per_second'] / at_auto[conv]['images_per_second']:.2f}x | "
                     f"{f['gflop_per_image'] / at_auto[vit]['gflop_per_image']:.2f}x |")
    return "\n".join(lines + [""] + targets(by, names, precisions))


# the factorized form's targets: (what, numerator row, denominator row, metric, bound, at least?)
TARGETS = [("factorized / paper training img/s", 2, 1, "images_per_second", 2.5, True),
           ("stretch: factorized / conv-phase training img/s", 2, 0, "images_per_second", 0.5, True),
           ("factorized / ViT training GFLOP per image", 2, 3, "gflop_per_image", 1.5, False)]


def targets(by, names, precisions) -> list:
    """One line per target: the ratio at each precision and whether it meets the bound, or by how much it misses."""
    lines = []
    for what, num, den, metric, bound, at_least in TARGETS:
        parts = []
        for p in precisions:
            ratio = by[(names[num], p)][metric] / by[(names[den], p)][metric]
            met = ratio >= bound if at_least else ratio <= bound
            parts.append(f"{p} {ratio:.2f}x ({'met' if met else f'misses by {abs(ratio - bound):.2f}x'})")
        lines.append(f"- {what}, target {'≥' if at_least else '≤'} {bound}x: " + ", ".join(parts))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "paper"], default="tiny")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 tiny, 4 paper")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round (default: 2 tiny, 1 paper)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved timing rounds, the best counts (default: 5 tiny, 2 paper)")
    parser.add_argument("--precisions", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    batch = args.batch_size or (128 if args.size == "tiny" else 4)
    steps = args.steps or (2 if args.size == "tiny" else 1)
    args.rounds = args.rounds or (5 if args.size == "tiny" else 2)

    img, entries = models(args.size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, size {args.size}, batch {batch}, "
          f"{steps} steps x {args.rounds} rounds\n")
    rows, peaks = [], {}
    for precision in args.precisions:
        benches = [Bench(name, build, img, batch, precision) for name, build in entries]
        peaks[precision] = 0.0
        for _ in range(args.rounds):
            peaks[precision] = max(peaks[precision], gemm_peak(DTYPES[precision]))
            for b in benches:
                b.time(steps)
        for b in benches:
            achieved = b.images_per_second * b.flops
            rows.append(dict(size=args.size, precision=precision, auto_precision=b.auto, model=b.name,
                             params=b.params, images_per_second=b.images_per_second,
                             gflop_per_image=b.flops / 1e9, achieved_gflops=achieved / 1e9,
                             peak_gflops=peaks[precision] / 1e9, mfu=achieved / peaks[precision]))
        del benches
    print(markdown(rows, peaks))
    print()
    print(ratios(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"git": git_state(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
