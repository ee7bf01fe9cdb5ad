"""Local (windowed) against global attention in the CMHSA attention phase, at 28 px and at a larger image size.

Same model (cmhsa5 tiny: P = 4, D = 128, 6 layers, 9 heads of 128), ``form='paper'`` (global RelPosMHSA) against
``form='local'`` (LocalRelPosMHSA over the 3x3 window of patch offsets a 5x5 kernel reaches), plus the conv phase for
reference. For each image size: training images/s (forward + backward + AdamW step), inference images/s, activation
memory saved for backward per image (bytes of the distinct tensor storages autograd keeps, a deterministic measure of
training memory), and the attention's own FLOPs per image (QK^T and AV, counted analytically: the local form's
products are elementwise, which torch's FLOP counter does not see). Ratios are taken within this run.

    python benchmarks/local_attention.py                       # 28 and 112 px (a 28x28 grid of 4x4 patches)
    python benchmarks/local_attention.py --sizes 28 56 112 --json results/shift/local_attention_bench.json
"""
from __future__ import annotations

import argparse
import json
import time

import timm
import torch
import torch.nn.functional as F

import cmhsa  # noqa: F401  (registers the CMHSA models)

MODELS = {"conv phase": "cmhsa5_conv_tiny", "global attention": "cmhsa5_attn_tiny",
          "local attention": "cmhsa5_lattn_tiny"}


def saved_bytes(model, x, y) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass of one training loss."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def timed(fn, steps: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def attention_flops(model, grid) -> float:
    """FLOPs of QK^T and AV per image over all layers (2 per multiply-add); 0 for the conv phase."""
    mixer = model.blocks[0].mixer
    if not hasattr(mixer, "num_heads"):
        return 0.0
    n = grid[0] * grid[1]
    keys = mixer.window_size[0] * mixer.window_size[1] if hasattr(mixer, "window_size") else n
    keys += int(mixer.null_key)
    return len(model.blocks) * 2 * 2 * mixer.num_heads * n * keys * mixer.head_dim


def measure(name: str, img: int, batch: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=img)
    grid = model.patch_embed.grid_size
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x, y = torch.randn(batch, 1, img, img), torch.randint(0, 10, (batch,))

    def train():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def infer():
        with torch.no_grad():
            model(x)

    model.train()
    mem = saved_bytes(model, x, y) / batch
    train_s = timed(train, steps)
    model.eval()
    infer_s = timed(infer, steps)
    return {"model": name, "img_size": img, "grid": list(grid), "batch": batch,
            "train_img_s": batch / train_s, "infer_img_s": batch / infer_s,
            "saved_mb_per_img": mem / 2 ** 20, "attn_gflop_per_img": attention_flops(model, grid) / 1e9,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 112], help="image sizes (multiples of 4)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[64, 4],
                        help="batch per size (one value for all sizes, or one per size)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    batches = args.batch_size * len(args.sizes) if len(args.batch_size) == 1 else args.batch_size
    if len(batches) != len(args.sizes):
        raise SystemExit(f"--batch-size needs 1 or {len(args.sizes)} values, got {len(batches)}")
    torch.set_num_threads(torch.get_num_threads())
    rows = []
    print(f"{'model':<18} {'px':>4} {'grid':>6} {'batch':>5} {'train img/s':>12} {'infer img/s':>12} "
          f"{'saved MB/img':>13} {'attn GFLOP/img':>15}")
    for img, batch in zip(args.sizes, batches):
        for label, name in MODELS.items():
            r = measure(name, img, batch, args.steps)
            r["label"] = label
            rows.append(r)
            print(f"{label:<18} {img:>4} {r['grid'][0]:>3}x{r['grid'][1]:<2} {batch:>5} {r['train_img_s']:>12.1f} "
                  f"{r['infer_img_s']:>12.1f} {r['saved_mb_per_img']:>13.2f} {r['attn_gflop_per_img']:>15.3f}")
        g, loc = rows[-2], rows[-1]
        print(f"{'':<18} {img:>4}  local / global: train {loc['train_img_s'] / g['train_img_s']:.2f}x, "
              f"inference {loc['infer_img_s'] / g['infer_img_s']:.2f}x, "
              f"memory {loc['saved_mb_per_img'] / g['saved_mb_per_img']:.2f}x")
    if args.json:
        from cmhsa.experiments import git_state, hardware
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "code": git_state(), "hardware": hardware(),
                       "threads": torch.get_num_threads()}, f, indent=2)


if __name__ == "__main__":
    main()
