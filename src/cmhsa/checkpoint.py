"""Crash-safe training checkpoints that never unpickle arbitrary objects.

A checkpoint is a directory::

    <path_dir>/
        model.safetensors   model weights (state_dict, wrapper prefixes stripped)
        ema.safetensors     EMA weights, only when an EMA model was passed
        state.pt            optimizer / scheduler / grad-scaler state, epoch, RNG states, ``extra`` dict

Weights are safetensors; ``state.pt`` holds only tensors and plain Python containers/scalars so it loads with
``torch.load(..., weights_only=True)``. The directory is replaced atomically: the new checkpoint is written
and fsynced in a sibling staging directory, then swapped in with ``os.replace``. A crash at any point leaves
either the old or the new checkpoint readable, never a mix of the two. With ``keep_previous`` the replaced
checkpoint stays beside the new one (``.<name>.previous``), so a checkpoint damaged later (a full disk, a bad copy)
can fall back to the epoch before it. A file that cannot be read raises :class:`CheckpointCorrupt` naming it.
"""
from __future__ import annotations

import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from timm.utils import unwrap_model
from torch import nn

from .atomic import fsync_dir

__all__ = ["save_checkpoint", "load_checkpoint", "load_weights", "has_checkpoint", "read_checkpoint_info",
           "read_optimizer_state", "CheckpointCorrupt"]

PathLike = Union[str, os.PathLike]

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "state.pt"
_CHECKPOINT_FILES = {MODEL_FILE, EMA_FILE, STATE_FILE}
_FORMAT_VERSION = 1
# Prefixes added by DistributedDataParallel (``module.``) and torch.compile (``_orig_mod.``).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _staging_dir(path_dir: Path) -> Path:
    return path_dir.parent / f".{path_dir.name}.staging"


def _previous_dir(path_dir: Path) -> Path:
    return path_dir.parent / f".{path_dir.name}.previous"


class CheckpointCorrupt(ValueError):
    """A checkpoint file exists but cannot be read (truncated, empty, not a checkpoint)."""


def _corrupt(path: Path, error: Exception) -> CheckpointCorrupt:
    return CheckpointCorrupt(f"checkpoint file {path} is corrupt or incomplete ({type(error).__name__}); "
                             f"delete it, or start the run over with --no-resume (resume=False)")


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _resolve_dir(path_dir: Path) -> Path:
    """The readable checkpoint directory: ``path_dir``, or the previous copy a crash mid-swap left aside."""
    for candidate in (path_dir, _previous_dir(path_dir)):
        if (candidate / STATE_FILE).is_file():
            return candidate
    raise FileNotFoundError(
        f"no checkpoint at {path_dir} (expected {path_dir / STATE_FILE}); "
        f"check the path, or start without resuming"
    )


def has_checkpoint(path_dir: PathLike) -> bool:
    """True if :func:`load_checkpoint` would find a checkpoint at ``path_dir``."""
    try:
        _resolve_dir(Path(path_dir))
    except FileNotFoundError:
        return False
    return True


def _weights_for_safetensors(module: nn.Module) -> Dict[str, torch.Tensor]:
    """``state_dict`` of the unwrapped module as contiguous CPU tensors that share no memory."""
    tensors, seen_storages = {}, set()
    for name, value in unwrap_model(module).state_dict().items():
        value = value.detach().cpu()
        # safetensors refuses tensors that share memory (tied weights, views into one buffer):
        # the first tensor of each storage is saved as is, later ones as copies.
        storage = value.untyped_storage().data_ptr()
        if storage in seen_storages and value.numel():
            value = value.clone()
        seen_storages.add(storage)
        tensors[name] = value.contiguous()
    return tensors


def _strip_wrapper_prefixes(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    stripped = {}
    for name, value in state_dict.items():
        while name.startswith(_WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        stripped[name] = value
    return stripped


def _rng_state() -> Dict[str, Any]:
    """RNG states of torch, numpy and python ``random`` as tensors and scalars (safe for ``weights_only``)."""
    py_version, py_state, py_gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": py_gauss},
        "numpy": {
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    np_state = state["numpy"]
    np.random.set_state(
        ("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"],
         np_state["cached_gaussian"])
    )
    if "cuda" in state and torch.cuda.is_available():
        # A checkpoint from a machine with more GPUs restores the devices that exist here.
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def save_checkpoint(
    path_dir: PathLike,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Any = None,
    ema: Optional[nn.Module] = None,
    *,
    epoch: int,
    extra: Optional[Dict[str, Any]] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
    keep_previous: bool = False,
    weights_from: Optional[PathLike] = None,
) -> Path:
    """Atomically write (or replace) the checkpoint directory ``path_dir``; returns it.

    Args:
        path_dir: checkpoint directory. It is replaced as a whole, so it must hold nothing but checkpoint files.
        model: model to save; DDP / torch.compile wrappers are unwrapped so keys carry no wrapper prefixes.
        optimizer, scheduler, scaler: optional; their ``state_dict()`` goes into ``state.pt``.
            ``scheduler`` is anything with ``state_dict()`` (timm schedulers included).
        ema: optional EMA model (e.g. ``timm.utils.ModelEmaV3``), saved as ``ema.safetensors``.
        epoch: last completed epoch (0-based).
        extra: metrics/config to store; plain containers, numbers, strings and tensors only, since
            ``state.pt`` is read back with ``weights_only=True``.
        keep_previous: keep the checkpoint being replaced as ``.<name>.previous`` (resume falls back to it).
        weights_from: a checkpoint directory just saved from this same ``model`` and ``ema`` (e.g. ``best/`` in the
            same epoch): its weight files are hard-linked rather than written again. Checkpoint files are never
            changed in place, so the two directories stay independent.
    """
    path_dir = Path(path_dir)
    if path_dir.is_dir():
        foreign = sorted(p.name for p in path_dir.iterdir() if p.name not in _CHECKPOINT_FILES)
        if foreign:
            raise ValueError(
                f"refusing to replace {path_dir}: it holds non-checkpoint files {foreign}; "
                f"save the checkpoint to its own directory"
            )
    state = {
        "format_version": _FORMAT_VERSION,
        "epoch": int(epoch),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": _rng_state(),
        "extra": dict(extra or {}),
    }

    staging, previous = _staging_dir(path_dir), _previous_dir(path_dir)
    shutil.rmtree(staging, ignore_errors=True)  # leftover of a crashed save
    staging.mkdir(parents=True)
    for name, weights in ((MODEL_FILE, model), (EMA_FILE, ema)):
        if weights is None:
            continue
        if weights_from is not None and _link(Path(weights_from) / name, staging / name):
            continue
        save_file(_weights_for_safetensors(weights), staging / name, metadata={"format": "pt"})
        _fsync_file(staging / name)
    with open(staging / STATE_FILE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(staging)

    # os.replace cannot overwrite a non-empty directory, so the old one is moved aside first;
    # _resolve_dir falls back to it if we crash between the two renames.
    if path_dir.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(path_dir, previous)
    os.replace(staging, path_dir)
    fsync_dir(path_dir.parent)
    if not keep_previous:
        shutil.rmtree(previous, ignore_errors=True)
    return path_dir


def _link(source: Path, target: Path) -> bool:
    """Hard-link ``source`` as ``target``; False where the file system cannot (the caller writes it instead)."""
    try:
        os.link(source, target)
        return True
    except OSError:
        return False


def _read_state(path_dir: Path) -> Dict[str, Any]:
    try:
        state = torch.load(path_dir / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, empty or foreign bytes: torch raises a variety of errors
        raise _corrupt(path_dir / STATE_FILE, e) from e
    if not isinstance(state, dict):
        raise _corrupt(path_dir / STATE_FILE, TypeError(f"holds a {type(state).__name__}"))
    if state.get("format_version") != _FORMAT_VERSION:
        raise ValueError(
            f"{path_dir / STATE_FILE} has format version {state.get('format_version')!r}, "
            f"this cmhsa reads version {_FORMAT_VERSION}"
        )
    return state


def read_checkpoint_info(path_dir: PathLike) -> Dict[str, Any]:
    """``{"epoch", "extra"}`` of a checkpoint without touching any model, optimizer or RNG."""
    state = _read_state(_resolve_dir(Path(path_dir)))
    return {"epoch": state["epoch"], "extra": state["extra"]}


def read_optimizer_state(path_dir: PathLike) -> Dict[str, Any]:
    """The optimizer ``state_dict`` a checkpoint holds, touching nothing else (no weights, no RNG)."""
    path_dir = Path(path_dir)
    state = _read_state(_resolve_dir(path_dir))
    if state["optimizer"] is None:
        raise ValueError(f"{path_dir} was saved without optimizer state (a weights-only checkpoint such as best/); "
                         f"read it from the phase's last/")
    return state["optimizer"]


def load_checkpoint(
    path_dir: PathLike,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Any = None,
    ema: Optional[nn.Module] = None,
    strict: bool = True,
    *,
    scaler: Optional[torch.amp.GradScaler] = None,
    check: Optional[Callable[[Dict[str, Any]], None]] = None,
    fallback: bool = False,
) -> Dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint`, including the global RNG states.

    Each object passed in is restored in place; pass ``None`` to skip it. ``strict`` applies to the weights
    (as in ``load_state_dict``) and to a missing EMA file (``strict=False`` then starts the EMA from the
    loaded model weights). ``check(extra)`` runs before anything is restored and may raise to refuse the
    checkpoint. With ``fallback``, a corrupt checkpoint gives way to the one kept before it (``keep_previous``),
    with a warning that says so.

    Returns:
        ``{"epoch": last completed epoch, "extra": the dict given at save time}``.

    Raises:
        FileNotFoundError: no checkpoint at ``path_dir``.
        CheckpointCorrupt: a checkpoint file cannot be read (and no fallback could be read either).
        ValueError: the checkpoint lacks state for an object that was passed in.
    """
    path_dir = Path(path_dir)
    first = _resolve_dir(path_dir)
    try:
        return _restore(first, model, optimizer, scheduler, ema, strict, scaler, check)
    except CheckpointCorrupt as e:
        previous = _previous_dir(path_dir)
        if not fallback or first == previous or not (previous / STATE_FILE).is_file():
            raise
        warnings.warn(f"{e}; resuming from the checkpoint before it, {previous}")
        try:
            return _restore(previous, model, optimizer, scheduler, ema, strict, scaler, check)
        except CheckpointCorrupt as e2:
            raise CheckpointCorrupt(f"{e}; the previous checkpoint is unreadable too: {e2}") from e2


def _restore(path_dir: Path, model, optimizer, scheduler, ema, strict: bool, scaler,
             check: Optional[Callable[[Dict[str, Any]], None]]) -> Dict[str, Any]:
    state = _read_state(path_dir)
    if check is not None:
        check(state["extra"])
    # every file is read before anything is restored, so a corrupt one leaves the objects untouched
    weights = _read_weights(path_dir / MODEL_FILE)
    ema_weights = _read_weights(path_dir / EMA_FILE) if ema is not None and (path_dir / EMA_FILE).is_file() else None
    unwrap_model(model).load_state_dict(weights, strict=strict)
    if ema is not None:
        if ema_weights is not None:
            unwrap_model(ema).load_state_dict(ema_weights, strict=strict)
        elif strict:
            raise ValueError(f"{path_dir} has no {EMA_FILE}; pass ema=None, or strict=False to start the EMA fresh")
        else:
            warnings.warn(f"{path_dir} has no {EMA_FILE}; the EMA starts from the loaded model weights")
            ema.set(unwrap_model(model))
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is None:
            continue
        if state[name] is None:
            raise ValueError(f"{path_dir} was saved without {name} state; pass {name}=None to load it")
        obj.load_state_dict(state[name])
    _set_rng_state(state["rng"])
    return {"epoch": state["epoch"], "extra": state["extra"]}


def _read_weights(path: Path) -> Dict[str, torch.Tensor]:
    try:
        return _strip_wrapper_prefixes(load_file(path))
    except Exception as e:  # safetensors raises its own error type for a truncated or foreign file
        raise _corrupt(path, e) from e


def load_weights(path: PathLike, model: nn.Module, strict: bool = True):
    """Load weights from a ``.safetensors`` file, or a checkpoint (any) directory's ``model.safetensors``.

    Works whether the file was saved from, or ``model`` is, wrapped by DDP or ``torch.compile``: the
    ``module.`` / ``_orig_mod.`` prefixes are stripped and the weights go into the unwrapped module.
    For the EMA weights of a checkpoint pass ``<dir>/ema.safetensors``.

    Returns:
        ``load_state_dict``'s result (missing / unexpected keys, useful with ``strict=False``).
    """
    path = Path(path)
    if path.is_dir():
        # Any directory with a model.safetensors works; a checkpoint caught mid-swap is read from its aside copy.
        aside = _previous_dir(path) / MODEL_FILE
        path = aside if not (path / MODEL_FILE).is_file() and aside.is_file() else path / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no weights file at {path}; pass a .safetensors file or a directory holding {MODEL_FILE}"
        )
    module = unwrap_model(model)
    try:
        return module.load_state_dict(_read_weights(path), strict=strict)
    except RuntimeError as e:  # torch lists every mismatch; the first few say what differs
        details = "; ".join(line.strip().rstrip(".") for line in str(e).splitlines()[1:4])
        raise ValueError(f"the weights in {path} do not fit this {type(module).__name__}: {details}. Build the "
                         f"model they were trained as (the same name and kwargs, e.g. in_chans and num_classes)") \
            from None
