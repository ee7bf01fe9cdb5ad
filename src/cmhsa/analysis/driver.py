"""``analyze()`` and ``cmhsa analyze``: every instrument for a checkpoint or run, into ``analysis.json`` + PNGs."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..models import CMHSA
from ..network import ConvAsAttention, conv_attention_mass
from ..pipeline import load_model, run_config_path, spec_label
from ..provenance import git_state
from ..rundir import PhaseDir, RunDir
from ._common import _eval_mode, _to_model
from ._data import _materialise, _model_img_size, _model_in_chans, _val_loader
from .attention import attention_distance, attention_layers, plot_attention_distance
from .remaining import plot_remaining_convolution, remaining_convolution, remaining_convolution_over_checkpoints
from .shift import plot_shift_consistency, shift_consistency
from .similarity import cka_matrix, plot_cka

__all__ = ["analyze", "add_analyze_parser", "cmd_analyze"]


def _jsonable(obj: Any) -> Any:
    """Tensors -> lists, non-finite floats -> None (strict JSON), tuples -> lists, keys -> str."""
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _load(source: Union[str, Path, nn.Module], which: str) -> Tuple[nn.Module, Dict[str, Any]]:
    """A model and what is known about where it came from."""
    if isinstance(source, nn.Module):
        return source, {"name": type(source).__name__, "path": None, "checkpoint": None, "run_dir": None,
                        "config": None}

    path = Path(source)
    model, spec, ckpt = load_model(path, which=which)
    run_dir = path if RunDir(path).config_path.exists() else None
    if run_dir is None:
        config = run_config_path(ckpt)
        run = RunDir(config.parent) if config is not None else None
        run_dir = run.root if run is not None and any(run.phase(p).root.is_dir() for p in ("phase1", "phase2")) \
            else None
    return model.float(), {"name": spec_label(spec), "path": str(path), "checkpoint": str(ckpt),
                           "run_dir": str(run_dir) if run_dir else None, "config": run_config_path(ckpt)}


def _accuracy(model: nn.Module, batches: List[Tuple[torch.Tensor, Any]]) -> Optional[float]:
    correct = total = 0
    with torch.no_grad(), _eval_mode(model):
        for images, labels in batches:
            if labels is None:
                return None
            pred = model(_to_model(model, images)).argmax(-1).cpu()
            correct += int((pred == torch.as_tensor(labels)).sum())
            total += len(pred)
    return 100.0 * correct / max(total, 1)


def _default_out_dir(info: Dict[str, Any]) -> Path:
    """Where analyze writes for a loaded checkpoint: ``<run>/analysis`` for a run dir, ``<ckpt>/analysis`` for a
    ``cmhsa convert`` output, else ``<phase>/analysis-<last|best>``."""
    if info["checkpoint"] is None:
        raise ValueError("analyze(model) needs out_dir=... to write analysis.json and the plots")
    ckpt, path = Path(info["checkpoint"]), Path(info["path"])
    if RunDir(path).config_path.exists():
        return path / "analysis"
    if PhaseDir(ckpt).spec_path.exists():  # weights beside model.json (`cmhsa convert` output)
        return ckpt / "analysis"
    # beside, never inside, the checkpoint: save_checkpoint refuses to replace a dir with foreign files
    return ckpt.parent / f"analysis-{ckpt.name}"


def _has_attention(model: nn.Module) -> bool:
    try:
        attention_layers(model)
    except ValueError:
        return False
    return True


def analyze(source: Union[str, Path, nn.Module], compare: Union[str, Path, nn.Module, None] = None, *,
            dataset: Optional[str] = None, data_dir: Optional[str] = None, img_size: Any = None,
            max_batches: int = 4, batch_size: int = 64, which: str = "last",
            out_dir: Union[str, Path, None] = None, loader: Optional[Iterable] = None,
            shifts: Optional[Iterable[int]] = None, checkpoints: bool = True) -> Dict[str, Any]:
    """Every analysis of this package for one model (and a second one to compare), into ``analysis.json`` + PNGs.

    ``source`` / ``compare``: a run, phase or checkpoint directory (loaded with :func:`cmhsa.pipeline.load_model`,
    ``which`` picks last/best) or a model. The images are the first ``max_batches`` validation batches of the
    dataset: ``loader`` if given, else the run's own ``config.yaml`` data section with ``dataset`` / ``data_dir`` /
    ``img_size`` overriding it (``img_size`` defaults to the model's input size); a model without a run needs
    ``dataset=`` or ``loader=``.

    Writes into ``out_dir`` (default ``<run>/analysis`` for a run dir, ``<phase>/analysis-<last|best>`` for a phase
    or checkpoint dir; required for a model): ``analysis.json`` and
    ``attention_distance.png`` (attention models), ``cka_self.png``, ``cka_compare.png`` (with ``compare``),
    ``shift_consistency.png`` (circular and zero-filled shifts), ``remaining_convolution.png`` (a CMHSA run with
    ``checkpoints``: phase-2 epochs). Returns the JSON content as a dict, plus ``'files'``.
    """
    model, info = _load(source, which)
    out_dir = Path(out_dir) if out_dir is not None else _default_out_dir(info)

    if loader is None:
        loader, data_cfg = _val_loader(info["config"], _model_in_chans(model), batch_size, dataset, data_dir,
                                       img_size if img_size is not None else _model_img_size(model))
        data_desc = {"dataset": data_cfg["dataset"], "img_size": data_cfg["img_size"], "split": "val"}
        black = data_cfg["black"]
    else:
        data_desc = {"dataset": "loader"}
        black = 0.0  # unknown normalisation: fill with the mean
    batches = _materialise(loader, max_batches)
    images = sum(b[0].shape[0] for b in batches)
    result: Dict[str, Any] = {"model": {k: info[k] for k in ("name", "path", "checkpoint", "run_dir")},
                              "data": {**data_desc, "images": images, "batches": len(batches)},
                              "top1": _accuracy(model, batches)}
    files: List[Path] = []
    title = info["name"]

    if _has_attention(model):
        dist = attention_distance(model, batches)
        result["attention_distance"] = dist
        files.append(plot_attention_distance(dist, out_dir / "attention_distance.png", title=f"{title}: attention "
                                                                                            f"distance"))
    # remaining convolution reads the global attention's bias table (form 'paper' or 'factorized')
    global_form = not isinstance(model, CMHSA) or model.config.get("form", "paper") != "local"
    if isinstance(model, CMHSA) and model.config["mixer"] == "attn" and global_form:
        rc = remaining_convolution(model, batches)
        rc.pop("kernels")
        result["remaining_convolution"] = rc
    if checkpoints and global_form and info["run_dir"] and RunDir(info["run_dir"]).phase("phase1").root.is_dir():
        records = remaining_convolution_over_checkpoints(info["run_dir"], batches)
        result["remaining_convolution_over_checkpoints"] = records
        files.append(plot_remaining_convolution(records, out_dir / "remaining_convolution.png", title=title))

    if any(isinstance(m, ConvAsAttention) for m in model.modules()):  # an attention twin of a CNN
        result["conv_attention_mass"] = conv_attention_mass(model, torch.cat([_to_model(model, b[0]) for b in batches]))

    self_cka = cka_matrix(model, None, batches)
    result["cka_self"] = self_cka
    files.append(plot_cka(self_cka, out_dir / "cka_self.png", labels=(title, title), title="CKA within the model"))
    if compare is not None:
        other, other_info = _load(compare, which)
        cross = cka_matrix(model, other, batches)
        result["compare"] = {"model": {k: other_info[k] for k in ("name", "path", "checkpoint")},
                             "top1": _accuracy(other, batches), "cka": cross}
        files.append(plot_cka(cross, out_dir / "cka_compare.png", labels=(title, other_info["name"]),
                              title="CKA between models"))

    shift = {mode: shift_consistency(model, batches, shifts=shifts, mode=mode, fill=black)
             for mode in ("circular", "zero")}
    result["shift_consistency"] = shift
    result["shift_zero_fill"] = black
    files.append(plot_shift_consistency(shift, out_dir / "shift_consistency.png", title=f"{title}: shift consistency"))

    result = _jsonable(result)
    result["git"] = git_state()
    result["files"] = [str(p) for p in [out_dir / "analysis.json", *files]]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "analysis.json").write_text(json.dumps(result, indent=2, allow_nan=False))
    return result


def cmd_analyze(args: argparse.Namespace) -> int:
    """The ``cmhsa analyze`` command."""
    result = analyze(args.checkpoint, args.compare, dataset=args.dataset, data_dir=args.data_dir,
                     img_size=args.img_size, max_batches=args.max_batches, batch_size=args.batch_size,
                     which=args.which, out_dir=args.out, checkpoints=not args.no_checkpoints)
    lines = [f"{result['model']['name']} on {result['data']['images']} {result['data']['dataset']} images"
             + (f": top-1 {result['top1']:.2f}" if result.get("top1") is not None else "")]
    if "attention_distance" in result:
        lines.append("attention distance per layer (patches): "
                     + ", ".join(f"{d:.2f}" for d in result["attention_distance"]["mean"]))
    if "remaining_convolution" in result:
        rc = result["remaining_convolution"]
        lines.append(f"remaining convolution: offset mass {rc['offset_mass']:.3f}, positional share "
                     f"{rc['positional_share']:.3f}, conv projection error {rc['conv_projection_error']:.3e}")
    if "conv_attention_mass" in result:
        lines.append("attention on the converted convolution's keys per layer: "
                     + ", ".join(f"{n} {m:.3f}" for n, m in result["conv_attention_mass"].items()))
    for mode, curve in result["shift_consistency"].items():
        lines.append(f"shift consistency ({mode}): " + ", ".join(f"{s}px {v:.3f}" for s, v in curve.items()))
    lines.append(f"written: {', '.join(result['files'])}")
    print("\n".join(lines))
    return 0


def add_analyze_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``cmhsa analyze`` on an ``add_subparsers()`` object; its ``func`` is :func:`cmd_analyze`."""
    from ..cli import add_which_argument

    p = subparsers.add_parser(
        "analyze", help="attention distance, CKA, remaining convolution and shift consistency of a model",
        description="Analyse a run, phase or checkpoint directory on validation images: attention distance per "
                    "head, CKA between layers (and with --compare), how much of the converted convolution each "
                    "CMHSA attention layer keeps (over the run's phase-2 checkpoints), and shift consistency. "
                    "Writes analysis.json and PNGs into --out (default <run>/analysis).")
    p.add_argument("checkpoint", type=Path, help="run dir, phase dir (runs/x/phase2) or checkpoint dir")
    p.add_argument("--compare", type=Path, default=None, help="a second run/phase/checkpoint dir for CKA")
    add_which_argument(p)
    p.add_argument("--dataset", default=None,
                   help="dataset name (default: the run's own; a model outside a run needs it)")
    p.add_argument("--data-dir", default=None, help="dataset location (default: the run's own)")
    p.add_argument("--img-size", type=int, default=None, help="image size (default: the model's)")
    p.add_argument("--max-batches", type=int, default=4, help="validation batches to analyse (default: 4)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default: <run>/analysis, or <phase>/analysis-<which>)")
    p.add_argument("--no-checkpoints", action="store_true",
                   help="skip the remaining-convolution tracking over the run's checkpoints")
    p.set_defaults(func=cmd_analyze)
    return p
