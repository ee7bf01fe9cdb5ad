"""Training engine: a small-library take on timm's ``train.py``.

The building blocks (:func:`train_one_epoch`, :func:`evaluate`, the ``build_*`` helpers) can be used on their
own; :func:`fit` ties them together with checkpointing, exact resume, metrics logging and DDP.

Determinism and exact resume
    :func:`fit` makes every epoch a pure function of ``(cfg.seed, epoch, rank)`` and the state saved at the end
    of the previous epoch: before each epoch it re-seeds the global torch / numpy / python RNGs (dropout, Mixup,
    augmentations) from ``(seed, epoch, rank)``, re-seeds the train loader's shuffling generator with
    ``loader.generator.manual_seed(seed + epoch)`` when it has one, and calls ``sampler.set_epoch(epoch)`` when
    the sampler has it (``DistributedSampler``). A run stopped after epoch k and resumed therefore replays
    epochs k+1.. bit for bit like an uninterrupted run (given deterministic kernels and data loading, e.g.
    fp32 with ``num_workers=0``), on every DDP rank. Checkpoints are written at epoch ends only.

Distributed training
    Call :func:`init_distributed` first (it reads the environment ``torchrun`` sets). :func:`fit` then wraps the
    model in ``DistributedDataParallel``, all-reduces the reported metrics, and writes files on rank 0 only.
    Give the train loader a ``DistributedSampler``; for exact validation metrics give the val loader a
    ``DistributedSampler(shuffle=False)`` and a dataset size divisible by the world size (the sampler pads the
    last shard with repeated samples otherwise).
"""
from __future__ import annotations

import fnmatch
import functools
import itertools
import logging
import math
import os
import random
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, get_optimizer_info
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, accuracy, dispatch_clip_grad, unwrap_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from .attention import RelPosAttention
from .checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from .config import PRECISIONS, RESUME_FREE_KEYS, TrainConfig
from .models import CMHSA
from .rundir import PhaseDir

__all__ = [
    "TrainConfig",
    "resolve_device",
    "resolve_precision",
    "cpu_bf16_support",
    "cpu_auto_precision",
    "autocast_context",
    "seed_everything",
    "init_distributed",
    "distributed_session",
    "all_ranks_agree",
    "is_main_process",
    "steps_per_epoch",
    "build_optimizer",
    "build_scheduler",
    "lr_scale_groups",
    "build_loss",
    "build_scaler",
    "train_one_epoch",
    "evaluate",
    "TrainState",
    "create_train_state",
    "transfer_optimizer_state",
    "fit",
]

_LOGGER = logging.getLogger(__name__)

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------- devices


def resolve_device(cfg: TrainConfig) -> torch.device:
    """``cfg.device`` as a ``torch.device``; "auto" -> ``cuda:LOCAL_RANK`` if CUDA is available, else cpu."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cfg.device == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={cfg.device!r} but CUDA is not available; use device='cpu' or 'auto'")
        if device.index is None:  # one GPU per DDP process
            device = torch.device("cuda", local_rank)
    return device


def cpu_bf16_support() -> str:
    """"amx", "avx512_bf16" or "none": how this CPU runs bf16 matmuls (AMX tiles are several times faster)."""
    # These private probes exist in current torch; get_cpu_capability() only reports the vector ISA
    # ("AVX512"), not bf16 support, so it cannot answer this on its own.
    for kind, probe in (("amx", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        if getattr(torch.cpu, probe, lambda: False)():
            return kind
    return "none"


def cpu_auto_precision(bf16_support: str, model: Optional[nn.Module]) -> str:
    """What ``precision='auto'`` means on a CPU: bf16 only for the models measured faster in it, else fp32.

    ``benchmarks/throughput.py`` measured, training with bf16 autocast against fp32: on CPUs without native bf16
    it is emulated and slow for every model; a timm ViT of width 128 is slower in bf16 even with AMX (its small
    GEMMs do not pay for the casts); a CMHSA attention-phase model (either attention form; wide value GEMMs)
    is faster in bf16 on AVX512-BF16 and on AMX; the CMHSA conv phase is faster with AMX and on par without. So:
    AMX -> bf16 for CMHSA models; AVX512-BF16 -> bf16 for CMHSA attention-phase models in a global form (the local
    form was not measured and counts as the conv phase); everything else fp32.
    A model of unknown class (or none) gets fp32, which is never slower than a bf16 guess.
    """
    model = unwrap_model(model) if model is not None else None
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    if bf16_support == "none" or not isinstance(model, CMHSA):
        return "fp32"
    attention_phase = any(isinstance(m, RelPosAttention) for m in model.modules())
    return "bf16" if bf16_support == "amx" or attention_phase else "fp32"


def resolve_precision(device: Union[str, torch.device], precision: str, model: Optional[nn.Module] = None) -> str:
    """Resolve ``precision`` to "bf16", "fp16" or "fp32" for ``device`` (and ``model``).

    "auto" picks bf16 on CUDA GPUs that support it, fp16 on older GPUs, and on a CPU what
    :func:`cpu_auto_precision` says for ``model`` (bf16 only where it is measured faster). An explicit
    "bf16"/"fp16" is honoured even where it is slow.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return cpu_auto_precision(cpu_bf16_support(), model)
    return "fp32"


def autocast_context(device: Union[str, torch.device], precision: str) -> ContextManager:
    """Autocast context for ``precision`` on ``device`` ("fp32" -> a no-op context).

    fp16 additionally needs a ``torch.amp.GradScaler`` around backward/step; :func:`fit` creates one.
    """
    device = torch.device(device)
    precision = resolve_precision(device, precision)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=_AMP_DTYPES[precision])


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global RNG and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------- distributed


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """True outside distributed runs and on global rank 0."""
    return not _distributed() or dist.get_rank() == 0


def init_distributed(backend: Optional[str] = None) -> Tuple[int, int, int]:
    """Join the process group described by torchrun's environment; returns ``(rank, world_size, local_rank)``.

    Without ``RANK`` / ``WORLD_SIZE`` in the environment (not launched by torchrun) this is a no-op returning
    ``(0, 1, 0)``. The backend defaults to nccl when CUDA is available (and the process is pinned to GPU
    ``LOCAL_RANK``), gloo otherwise. Calling it again once initialised just returns the ranks.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)  # env:// reads MASTER_ADDR / MASTER_PORT
    return rank, world_size, local_rank


@contextmanager
def distributed_session() -> Iterator[Tuple[int, int, int]]:
    """:func:`init_distributed`, and ``destroy_process_group`` on every way out (an unfinished group aborts the
    process at exit)."""
    try:
        yield init_distributed()
    finally:
        if _distributed():
            dist.destroy_process_group()


def all_ranks_agree(ok: bool) -> bool:
    """True if ``ok`` holds on every rank (``ok`` itself outside distributed runs)."""
    if not _distributed():
        return ok
    flag = torch.tensor([int(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


# ----------------------------------------------------------------------------------------- components


def steps_per_epoch(loader: DataLoader, cfg: TrainConfig) -> int:
    """Optimizer steps per epoch: ``len(loader) // cfg.grad_accum_steps`` (a step takes that many batches; the
    batches left over are not used), capped by ``cfg.max_steps_per_epoch``."""
    num_steps = len(loader) // cfg.grad_accum_steps
    if num_steps == 0:
        images = len(loader.dataset) if hasattr(loader.dataset, "__len__") else "?"
        accum = f" x grad_accum_steps {cfg.grad_accum_steps}" if cfg.grad_accum_steps > 1 else ""
        dropped = " and drop_last (a partial batch is dropped)" if loader.drop_last else ""
        raise ValueError(f"the train loader makes no optimizer step: {images} training images, batch_size "
                         f"{loader.batch_size}{accum}{dropped}; "
                         f"lower the batch size (--set train.batch_size=...){' or grad_accum_steps' * bool(accum)} "
                         f"or train on more images")
    if cfg.max_steps_per_epoch is None:
        return num_steps
    return min(num_steps, cfg.max_steps_per_epoch)


def lr_scale_groups(model: nn.Module, cfg: TrainConfig) -> List[Dict[str, Any]]:
    """Parameter groups for ``cfg.lr_scale`` ({name pattern: lr multiplier}, first match wins, else 1), with timm's
    weight-decay rule: 1-D parameters and the model's ``no_weight_decay()`` get none."""
    model = unwrap_model(model)
    no_decay = set(getattr(model, "no_weight_decay", lambda: set())())
    groups: Dict[Tuple[float, float], List[nn.Parameter]] = {}
    matched = set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        pattern = next((p for p in cfg.lr_scale if fnmatch.fnmatchcase(name, p)), None)
        matched.add(pattern)
        decay = 0.0 if param.ndim <= 1 or name in no_decay else cfg.weight_decay
        groups.setdefault((float(cfg.lr_scale.get(pattern, 1.0)), decay), []).append(param)
    unmatched = [p for p in cfg.lr_scale if p not in matched]
    if unmatched:
        names = [n for n, _ in model.named_parameters()]
        raise ValueError(f"lr_scale pattern(s) {unmatched} match no parameter of {type(model).__name__}; names look "
                         f"like {names[:2] + names[-2:]} (fnmatch, e.g. '*.rel_pos_bias')")
    # timm's schedulers multiply the schedule (from each group's initial_lr) by lr_scale from their first update
    # on; before it, and with no scheduler, the group's own lr holds
    return [{"params": params, "lr_scale": scale, "lr": cfg.lr * scale, "initial_lr": cfg.lr, "weight_decay": decay}
            for (scale, decay), params in groups.items()]


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, param_groups_fn: Optional[Callable[[nn.Module], Any]] = None
) -> torch.optim.Optimizer:
    """timm optimizer ``cfg.opt``; biases and norm weights get no weight decay unless ``param_groups_fn`` is given.

    ``param_groups_fn(model)`` may return custom param groups (e.g. a lower lr for pretrained parts);
    ``cfg.lr_scale`` builds them from name patterns (:func:`lr_scale_groups`).
    """
    if cfg.lr_scale:
        if param_groups_fn is not None:
            raise ValueError("lr_scale and param_groups_fn both define the param groups; give one of them")
        param_groups_fn = functools.partial(lr_scale_groups, cfg=cfg)
    kwargs = {"betas": cfg.opt_betas} if get_optimizer_info(cfg.opt).has_betas else {}
    return create_optimizer_v2(
        model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, param_group_fn=param_groups_fn, **kwargs
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, updates_per_epoch: int):
    """timm lr scheduler stepped per optimizer update (``scheduler.step_update``); None for ``sched='none'``.

    The lr starts at ``cfg.warmup_lr``, rises linearly to ``cfg.lr`` over ``cfg.warmup_epochs``, then follows
    the schedule from ``cfg.lr`` down to ``cfg.min_lr`` over the remaining epochs, reaching it at the end of
    training (``cfg.total_epochs`` in total, warm-up included).
    """
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.sched,
        # The decay starts after the warm-up (warmup_prefix) rather than already running during it, so the
        # lr peaks at exactly cfg.lr with no drop after warm-up; the total stays cfg.total_epochs.
        num_epochs=cfg.total_epochs - cfg.warmup_epochs,
        warmup_epochs=cfg.warmup_epochs,
        warmup_prefix=True,
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    return scheduler


def build_loss(cfg: TrainConfig) -> Tuple[nn.Module, Optional[Mixup]]:
    """``(train loss, mixup_fn)``.

    Mixup/CutMix on -> ``SoftTargetCrossEntropy`` with label smoothing folded into Mixup's soft targets;
    otherwise ``LabelSmoothingCrossEntropy`` (``label_smoothing > 0``) or plain cross-entropy.
    """
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup_fn = Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            prob=cfg.mixup_prob,
            switch_prob=cfg.mixup_switch_prob,
            label_smoothing=cfg.label_smoothing,
            num_classes=cfg.num_classes,
        )
        return SoftTargetCrossEntropy(), mixup_fn
    if cfg.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing), None
    return nn.CrossEntropyLoss(), None


def build_scaler(device: Union[str, torch.device], precision: str) -> torch.amp.GradScaler:
    """A GradScaler, enabled for fp16 only: one step path serves every precision."""
    device = torch.device(device)
    return torch.amp.GradScaler(device.type, enabled=resolve_precision(device, precision) == "fp16")


def _base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The schedule's lr: a group scaled by ``lr_scale`` (see :func:`lr_scale_groups`) reports it divided back."""
    scaled = [g["lr"] / g.get("lr_scale", 1.0) for g in optimizer.param_groups if g.get("lr_scale", 1.0) > 0]
    return scaled[0] if scaled else 0.0


# --------------------------------------------------------------------------------------- train / eval


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    cfg: TrainConfig,
    epoch: int,
    scheduler: Any = None,
    mixup_fn: Optional[Mixup] = None,
    ema: Optional[ModelEmaV3] = None,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
    scaler: Optional[torch.amp.GradScaler] = None,
) -> Dict[str, float]:
    """Train ``model`` for one epoch (at most ``steps_per_epoch(loader, cfg)`` optimizer steps).

    Forward under autocast (``cfg.precision``), loss in fp32, gradients summed over ``cfg.grad_accum_steps`` batches
    per step (each batch's loss divided by that count, so a step sees the mean over all of them; under DDP ranks
    synchronise on a step's last batch only), gradient clipping to ``cfg.clip_grad``, the scheduler stepped per
    update with the global update count ``epoch * steps + step + 1``, EMA updated after every step. ``scaler``
    defaults to :func:`build_scaler`'s. Shuffling/seeding per epoch is the caller's job (see :func:`fit`).
    ``device`` defaults to the model's.

    Returns:
        ``train_loss`` (mean batch loss, averaged over DDP ranks), ``lr`` (mean over param groups, as used by
        the epoch's last update), ``epoch_seconds``, ``images_per_second`` (all ranks together), ``steps``,
        ``precision`` (what ``cfg.precision`` resolved to).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    num_steps = steps_per_epoch(loader, cfg)
    precision = resolve_precision(device, cfg.precision, model)
    scaler = scaler or build_scaler(device, precision)
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on device: no per-step sync
    lr, steps, samples = _base_lr(optimizer), 0, 0
    bar = tqdm(
        total=num_steps, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
        disable=not (progress and is_main_process()),
    )
    accum = cfg.grad_accum_steps
    start = time.perf_counter()
    for batch, (images, targets) in enumerate(itertools.islice(loader, num_steps * accum), 1):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            if len(images) % 2:
                raise ValueError(
                    f"Mixup/CutMix needs even batch sizes, got a batch of {len(images)}; "
                    f"use an even batch_size and drop_last=True on the train loader"
                )
            images, targets = mixup_fn(images, targets)
        samples += len(images)
        if (batch - 1) % accum == 0:  # a step's first batch
            optimizer.zero_grad(set_to_none=True)
        # DDP all-reduces gradients in backward: only a step's last batch needs to
        stepping = batch % accum == 0
        with nullcontext() if stepping or not isinstance(model, DistributedDataParallel) else model.no_sync():
            with autocast_context(device, precision):
                output = model(images)
            loss = loss_fn(output.float(), targets)
            scaler.scale(loss / accum).backward()  # a disabled scaler (every precision but fp16) passes all through
        loss_sum += loss.detach() / accum
        if not stepping:
            continue

        if cfg.clip_grad:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            dispatch_clip_grad(model.parameters(), cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()

        steps += 1
        num_updates = epoch * num_steps + steps
        lr = _base_lr(optimizer)  # the lr this update used, before the scheduler moves it
        if scheduler is not None:
            scheduler.step_update(num_updates=num_updates)
        if ema is not None:
            ema.update(unwrap_model(model), step=num_updates)

        bar.update()
        if steps % cfg.log_interval == 0 or steps == num_steps:
            running_loss = loss_sum.item() / steps
            if not math.isfinite(running_loss):
                raise FloatingPointError(
                    f"non-finite training loss at epoch {epoch} step {steps}; "
                    f"lower lr, enable clip_grad, or try precision='fp32'"
                )
            bar.set_postfix(loss=f"{running_loss:.4f}", lr=f"{lr:.2e}")
    bar.close()
    seconds = time.perf_counter() - start

    totals = _all_reduce_sum(torch.stack([loss_sum, loss_sum.new_tensor(steps), loss_sum.new_tensor(samples)]))
    return {
        "train_loss": (totals[0] / totals[1]).item(),
        "lr": lr,
        "epoch_seconds": seconds,
        "images_per_second": totals[2].item() / seconds,
        "steps": steps,
        "precision": precision,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: Optional[Union[str, torch.device]] = None,
    precision: str = "auto",
    num_classes: Optional[int] = None,
) -> Dict[str, float]:
    """Cross-entropy loss and top-1 / top-k accuracy (percent) over the whole loader.

    Sums are accumulated per sample and all-reduced across DDP ranks, so the result is the exact average over
    every sample seen by any rank (not an average of batch or rank averages). k = min(5, num_classes);
    ``num_classes`` defaults to the width of the model output. ``device`` defaults to the model's.

    Returns:
        ``{"loss", "top1", "top5"}``.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    precision = resolve_precision(device, precision, model)
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1 hits, top5 hits, samples
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast_context(device, precision):
            output = model(images)
        output = output.float()
        if num_classes is not None and output.shape[1] != num_classes:
            raise ValueError(f"the model outputs {output.shape[1]} classes but num_classes={num_classes}")
        k = min(5, output.shape[1])
        top1, top5 = accuracy(output, targets, topk=(1, k))  # percent of the batch
        n = len(targets)
        sums += torch.stack([
            F.cross_entropy(output, targets, reduction="sum").double(),
            top1.double() * n / 100,
            top5.double() * n / 100,
            sums.new_tensor(n),
        ])
    loss_sum, top1_sum, top5_sum, count = _all_reduce_sum(sums).tolist()
    if count == 0:
        raise ValueError("the evaluation loader yields no samples")
    return {"loss": loss_sum / count, "top1": 100 * top1_sum / count, "top5": 100 * top5_sum / count}


# -------------------------------------------------------------------------------------------------- fit


def _derived_seed(seed: int, epoch: int, rank: int) -> int:
    # SeedSequence mixes the three numbers well, so neighbouring (seed, epoch, rank) don't give related streams.
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _seed_epoch(loader: DataLoader, seed: int, epoch: int, rank: int) -> None:
    """Make the epoch's randomness a pure function of (seed, epoch, rank), so resume replays it exactly."""
    seed_everything(_derived_seed(seed, epoch, rank))
    if loader.generator is not None:
        # Shuffling (RandomSampler) and the workers' seeds come from this generator, and train loaders start their
        # workers afresh each epoch (no persistent workers), so workers replay exactly too. Ranks > 0 draw their
        # own worker seeds, so their augmentations differ from rank 0's.
        loader.generator.manual_seed(seed + epoch if rank == 0 else _derived_seed(seed, epoch, rank))
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)


@dataclass
class TrainState:
    """What training changes and a checkpoint saves: the (unwrapped) model, optimizer, per-update scheduler, EMA
    model and grad scaler, with the next epoch to run and the best val top-1 so far."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: Optional[ModelEmaV3]
    scaler: torch.amp.GradScaler
    epoch: int = 0
    best_top1: float = -math.inf
    best_epoch: int = -1

    @property
    def best(self) -> Dict[str, Any]:
        return {"best_top1": self.best_top1, "best_epoch": self.best_epoch}

    def end_epoch(self, epoch: int, val_top1: Optional[float]) -> bool:
        """Move on past ``epoch``; True if its val top-1 (None: not evaluated) is the best so far."""
        self.epoch = epoch + 1
        improved = val_top1 is not None and val_top1 > self.best_top1
        if improved:
            self.best_top1, self.best_epoch = val_top1, epoch
        return improved

    def _scaler(self) -> Optional[torch.amp.GradScaler]:
        return self.scaler if self.scaler.is_enabled() else None  # a disabled scaler has no state

    def save(self, path: Path, weights_from: Optional[Path] = None, **extra) -> None:
        """Everything needed to resume, into the checkpoint directory ``path`` (weight files linked from
        ``weights_from``, a checkpoint of this same state)."""
        save_checkpoint(path, self.model, self.optimizer, self.scheduler, self.ema, epoch=self.epoch - 1,
                        scaler=self._scaler(), extra={**extra, **self.best}, keep_previous=True,
                        weights_from=weights_from)

    def load(self, path: Path, check: Callable[[Dict[str, Any]], None]) -> Dict[str, Any]:
        """Restore from the checkpoint at ``path`` (or the one before it, if that one is corrupt); returns its
        ``extra``. ``check(extra)`` raises if the checkpoint does not belong to this run."""
        restored = load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.ema, scaler=self._scaler(),
                                   check=check, fallback=True)
        extra = restored["extra"]
        self.epoch, self.best_top1, self.best_epoch = restored["epoch"] + 1, extra["best_top1"], extra["best_epoch"]
        return extra


def create_train_state(model: nn.Module, cfg: TrainConfig, device: torch.device, updates_per_epoch: int,
                       param_groups_fn: Optional[Callable[[nn.Module], Any]] = None) -> TrainState:
    """A fresh :class:`TrainState` for ``cfg``, the model moved to ``device`` (and, under DDP, given rank 0's
    weights, so every rank's EMA copy starts identical)."""
    model = unwrap_model(model).to(device)
    if _distributed():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    optimizer = build_optimizer(model, cfg, param_groups_fn)
    return TrainState(
        model=model, optimizer=optimizer, scheduler=build_scheduler(optimizer, cfg, updates_per_epoch),
        ema=ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay else None,
        scaler=build_scaler(device, cfg.precision),
    )


def transfer_optimizer_state(source: nn.Module, source_optimizer: torch.optim.Optimizer, target: nn.Module,
                             target_optimizer: torch.optim.Optimizer,
                             source_name: Callable[[str], str] = lambda name: name) -> List[str]:
    """Give each parameter of ``target`` the optimizer state (e.g. AdamW's moments and step count) of the
    ``source`` parameter named ``source_name(its name)``, if the shapes agree; returns the names carried over. The
    others start fresh."""
    source_state = {name: source_optimizer.state[p] for name, p in unwrap_model(source).named_parameters()
                    if p in source_optimizer.state}
    carried = []
    for name, param in unwrap_model(target).named_parameters():
        state = source_state.get(source_name(name))
        if state is None or any(torch.is_tensor(v) and v.ndim and v.shape != param.shape for v in state.values()):
            continue
        target_optimizer.state[param] = {k: v.detach().clone().to(param.device) if torch.is_tensor(v) else v
                                         for k, v in state.items()}
        carried.append(name)
    return carried


def _check_resumable(extra: Dict[str, Any], phase: str, config: Dict[str, Any], path: Path) -> None:
    if extra.get("phase") != phase:
        raise ValueError(
            f"{path} holds a checkpoint of phase {extra.get('phase')!r}, not {phase!r}; "
            f"use one out_dir per phase, or resume=False to overwrite it"
        )
    saved = extra["config"]
    changed = [
        f"{name}: {saved.get(name)!r} -> {value!r}"
        for name, value in config.items()
        if name not in RESUME_FREE_KEYS and saved.get(name) != value
    ]
    if changed:
        raise ValueError(
            f"cannot resume from {path}: the config changed ({'; '.join(changed)}), so the run would not "
            f"continue the one checkpointed. Restore those values, or start over with resume=False "
            f"(--no-resume) or another out_dir (--output)"
        )


def _wrap(model: nn.Module, cfg: TrainConfig, device: torch.device) -> Tuple[nn.Module, nn.Module]:
    """(model to train: DDP and/or compiled, model to evaluate). Evaluation runs without DDP: no collectives, so
    ranks may see different batch counts."""
    train_model, eval_model = model, model
    if _distributed():
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model, eval_model = torch.compile(train_model), torch.compile(model)
    return train_model, eval_model


def _validate(model: nn.Module, ema: Optional[ModelEmaV3], loader: DataLoader, device: torch.device,
              cfg: TrainConfig) -> Dict[str, float]:
    """``val_*`` metrics of the model, and ``ema_val_*`` of the EMA model when there is one."""
    precision = resolve_precision(device, cfg.precision, model)
    out = {}
    for prefix, net in (("val_", model), ("ema_val_", ema.module if ema is not None else None)):
        if net is not None:
            metrics = evaluate(net, loader, device, precision, cfg.num_classes)
            out.update({prefix + k: metrics[k] for k in ("loss", "top1", "top5")})
    return out


def _record(phase: str, epoch: int, train: Dict[str, Any], val: Dict[str, float]) -> Dict[str, Any]:
    """The epoch's metrics line; ``val`` is empty on epochs that were not evaluated (``eval_every``)."""
    return {"phase": phase, "epoch": epoch, "train_loss": train["train_loss"], **val, "lr": train["lr"],
            "epoch_seconds": train["epoch_seconds"], "images_per_second": train["images_per_second"],
            "precision": train["precision"], "wall_time": time.time()}  # unix time at the end of the epoch


def _save_epoch(out: PhaseDir, state: TrainState, cfg: TrainConfig, record: Dict[str, Any], improved: bool,
                config: Dict[str, Any]) -> None:
    """The checkpoint policy (rank 0): the metrics line; best/ when val top-1 improved; epoch_XXX/ (weights, for
    analyses) every ``cfg.checkpoint_every`` epochs; last/ (everything, and the epoch before it) every epoch."""
    # Metrics first: if we die before the checkpoint lands, resume drops this line and re-runs the epoch.
    out.append_metrics(record)
    meta = {"phase": record["phase"], "metrics": record}
    if improved:
        save_checkpoint(out.best, state.model, ema=state.ema, epoch=record["epoch"], extra=meta)
    if cfg.checkpoint_every and state.epoch % cfg.checkpoint_every == 0:
        save_checkpoint(out.epoch(state.epoch), state.model, ema=state.ema, epoch=record["epoch"], extra=meta,
                        weights_from=out.best if improved else None)
    # the same weights as best/ when it improved: linked, not written twice (600 MB a save at paper size)
    state.save(out.last, **meta, config=config, weights_from=out.best if improved else None)


def _log_epoch(record: Dict[str, Any], cfg: TrainConfig, progress: bool) -> None:
    val = (f"val_loss {record['val_loss']:.4f}  top1 {record['val_top1']:.2f}  top5 {record['val_top5']:.2f}  "
           if "val_top1" in record else "")
    line = (f"[{record['phase']}] epoch {record['epoch'] + 1}/{cfg.epochs}  train_loss {record['train_loss']:.4f}  "
            f"{val}lr {record['lr']:.2e}  {record['images_per_second']:.0f} img/s  {record['epoch_seconds']:.1f}s")
    _say(line, progress)


def _say(line: str, progress: bool) -> None:
    """One line for the user: between progress bars, or to the log when there are none."""
    if progress:
        tqdm.write(line)
    else:
        _LOGGER.info(line)


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    cfg: TrainConfig,
    out_dir: Union[str, Path, PhaseDir],
    resume: bool = True,
    phase: str = "train",
    on_epoch_end: Optional[Callable[[int, Dict[str, Any]], None]] = None,
    param_groups_fn: Optional[Callable[[nn.Module], Any]] = None,
    progress: bool = True,
    on_start: Optional[Callable[[TrainState], None]] = None,
    on_epoch_start: Optional[Callable[[int, nn.Module], None]] = None,
) -> Dict[str, Any]:
    """Train ``model`` for ``cfg.epochs`` epochs with checkpointing and exact resume; returns the final metrics.

    ``model`` is trained in place (moved to the resolved device; pass it unwrapped, DDP and compile are
    applied here). After every ``cfg.eval_every``-th epoch and the last it is evaluated on ``val_loader`` (and so
    is the EMA model when ``cfg.ema_decay`` is set). After each epoch rank 0 appends a line to
    ``out_dir/metrics.jsonl`` (without the ``val_*`` keys when not evaluated) and writes the
    checkpoints ``out_dir/last/`` (everything needed to resume) and ``out_dir/best/`` (weights with the best
    val top-1 so far, plus its metrics), see :mod:`cmhsa.checkpoint` and :class:`cmhsa.rundir.PhaseDir`.

    With ``resume`` and a checkpoint in ``out_dir/last/``, training continues after its epoch, exactly as if
    never interrupted; metrics lines of this phase for later epochs are dropped. A corrupt ``last/`` falls back
    to the checkpoint of the epoch before it, with a warning. A finished run loads its final weights and returns
    its stored metrics without training. The checkpoint must come from the same ``phase`` and config (only
    ``device``, ``compile``, ``log_interval``, ``checkpoint_every`` and ``eval_every`` may differ), else
    ValueError. Without ``resume`` any metrics lines of this phase are dropped and training starts from scratch.

    A phase of a longer run (``cfg.first_epoch`` > 0 or ``cfg.schedule_epochs``) draws each epoch's randomness
    and lr as that epoch of the whole run; its metrics lines count its own epochs from 0.

    Args:
        phase: label written into every metrics line; use one ``out_dir`` per phase.
        on_epoch_end: called as ``on_epoch_end(epoch, metrics)`` on every rank after each epoch.
        param_groups_fn: custom optimizer param groups, see :func:`build_optimizer`.
        progress: show a tqdm bar and print a summary line per epoch (rank 0); otherwise the summary is
            logged at INFO level.
        on_start: called as ``on_start(state)`` when training starts afresh (not on resume), e.g. to carry over
            optimizer state (:func:`transfer_optimizer_state`).
        on_epoch_start: called as ``on_epoch_start(epoch, model)`` on every rank before each epoch trains, with
            the unwrapped model, e.g. to move a parameter on a schedule (:func:`cmhsa.pipeline.position_bias_annealer`);
            what it changes is in that epoch's checkpoint, so a resumed run replays it exactly.

    Returns:
        The last epoch's metrics line (``phase, epoch, train_loss, val_loss, val_top1, val_top5, lr,
        epoch_seconds, images_per_second, precision, wall_time`` [+ ``ema_val_loss, ema_val_top1, ema_val_top5``])
        plus ``best_top1``, ``best_epoch`` and ``epochs_run`` (epochs trained by this call).
    """
    out = out_dir if isinstance(out_dir, PhaseDir) else PhaseDir(out_dir)
    rank = dist.get_rank() if _distributed() else 0
    if _distributed() and not isinstance(train_loader.sampler, DistributedSampler):
        warnings.warn("distributed run without a DistributedSampler: every rank iterates the whole train set")
    if getattr(train_loader, "persistent_workers", False):
        warnings.warn("persistent train-loader workers keep their RNG across epochs, so resume is not exact")
    device = resolve_device(cfg)
    updates_per_epoch = steps_per_epoch(train_loader, cfg)
    state = create_train_state(model, cfg, device, updates_per_epoch, param_groups_fn)
    loss_fn, mixup_fn = build_loss(cfg)
    config = asdict(cfg)

    record: Dict[str, Any] = {}
    if resume and has_checkpoint(out.last):
        record = state.load(out.last, check=lambda extra: _check_resumable(extra, phase, config, out.last))["metrics"]
        if rank == 0 and state.epoch < cfg.epochs:
            _say(f"[{phase}] resuming from {out.last}: {state.epoch} of {cfg.epochs} epochs done", progress)
    else:
        if cfg.first_epoch and state.scheduler is not None:  # the lr where the run this phase continues left it
            state.scheduler.step_update(num_updates=cfg.first_epoch * updates_per_epoch)
        if on_start is not None:
            on_start(state)
    if rank == 0 and state.epoch < cfg.epochs:
        out.truncate_metrics(phase, state.epoch - 1)
    train_model, eval_model = _wrap(state.model, cfg, device)

    start_epoch = state.epoch
    for epoch in range(start_epoch, cfg.epochs):
        _seed_epoch(train_loader, cfg.seed, cfg.first_epoch + epoch, rank)
        if on_epoch_start is not None:
            on_epoch_start(epoch, state.model)
        train = train_one_epoch(train_model, train_loader, state.optimizer, loss_fn, cfg, cfg.first_epoch + epoch,
                                scheduler=state.scheduler, mixup_fn=mixup_fn, ema=state.ema, device=device,
                                progress=progress, scaler=state.scaler)
        evaluated = (epoch + 1) % cfg.eval_every == 0 or epoch == cfg.epochs - 1
        record = _record(phase, epoch, train,
                         _validate(eval_model, state.ema, val_loader, device, cfg) if evaluated else {})
        improved = state.end_epoch(epoch, record.get("val_top1"))
        if rank == 0:
            _save_epoch(out, state, cfg, record, improved, config)
            _log_epoch(record, cfg, progress)
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)

    if _distributed() and start_epoch < cfg.epochs:
        dist.barrier()  # nobody returns before rank 0 has written the final checkpoint
    return {**record, **state.best, "epochs_run": cfg.epochs - start_epoch}
