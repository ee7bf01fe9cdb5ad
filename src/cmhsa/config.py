"""The typed run configuration: defaults <- a YAML preset <- ``--set section.key=value`` overrides, validated once.

A :class:`RunConfig` has sections ``data``, ``model``, ``convert``, ``train`` (training settings shared by both
phases), ``phase1`` and ``phase2`` (per-phase training settings: a field left unset there takes ``train``'s), plus
``name`` and ``output``. See ``configs/*.yaml``.

Validation happens when a config is built (:meth:`RunConfig.from_dict`): an unknown key at any level is an error with
a did-you-mean, every value is coerced to its field's type (``"1e-3"`` -> ``0.001``, ``"3"`` -> ``3``) or rejected
with the key and the type expected, and ranges are checked. ``model.kwargs`` and ``convert.kwargs`` are free-form
(arguments of the timm model); the model name is checked when the model is created.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import timm.optim
import torch
import yaml

from .atomic import atomic_write_text
from .convert import DEFAULT_BIAS_STRENGTH

__all__ = ["DataConfig", "ModelConfig", "ConvertConfig", "TrainConfig", "PhaseConfig", "RunConfig", "load_config",
           "apply_overrides", "save_config", "CONVERT_FORMS", "PHASES", "RESUME_FREE_KEYS"]

PHASES = ("phase1", "phase2")
CONVERT_FORMS = ("paper", "factorized", "local", "tied")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# Settings that may change between a run and its resume without changing what it computes.
RESUME_FREE_KEYS = frozenset({"output", "device", "compile", "log_interval", "checkpoint_every", "eval_every"})


def _check(test, allowed: str) -> Dict[str, Any]:
    """Field metadata: ``test(value)`` must hold for a set value; ``allowed`` says what is allowed."""
    return {"check": test, "allowed": allowed}


def _choice(*options: str) -> Dict[str, Any]:
    return _check(lambda v: v in options, f"one of {', '.join(map(repr, options))}")


def _is_device(value: str) -> bool:
    try:
        return value == "auto" or torch.device(value) is not None
    except RuntimeError:
        return False


SCHEDULERS = ("cosine", "tanh", "step", "multistep", "poly", "rsqrt", "constant", "none")
_POSITIVE = _check(lambda v: v > 0, "> 0")
_NON_NEGATIVE = _check(lambda v: v >= 0, ">= 0")
_AT_LEAST_1 = _check(lambda v: v >= 1, ">= 1")
_SUBSET = _check(lambda v: v > 0 if isinstance(v, int) else 0 < v <= 1,
                 "an image count > 0 or a fraction in (0, 1]")


@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"
    data_dir: Optional[str] = None
    img_size: int = field(default=28, metadata=_AT_LEAST_1)
    train_subset: Optional[Union[int, float]] = field(default=None, metadata=_SUBSET)
    val_subset: Optional[Union[int, float]] = field(default=None, metadata=_SUBSET)
    augment: str = field(default="light", metadata=_choice("none", "light", "deit"))
    hflip: Optional[bool] = None  # None: flip only where a mirrored image keeps its label (not mnist, digits)
    resize: str = field(default="pad", metadata=_choice("pad", "resize", "crop"))
    num_workers: int = field(default=0, metadata=_NON_NEGATIVE)


@dataclass
class ModelConfig:
    name: str = "cmhsa5_conv_tiny"  # timm name of the model trained first (a CMHSA conv model in the pipeline)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # timm.create_model arguments


@dataclass
class ConvertConfig:
    """Arguments of :func:`cmhsa.models.convert_model` (phase 1 -> phase 2)."""

    bias_strength: float = field(default=DEFAULT_BIAS_STRENGTH, metadata=_NON_NEGATIVE)
    null_key: bool = True
    qk_std: float = field(default=0.0, metadata=_NON_NEGATIVE)  # > 0: W_Q, W_K start small and random
    form: str = field(default="paper", metadata=_choice(*CONVERT_FORMS))
    qk_dim: Optional[int] = field(default=None, metadata=_AT_LEAST_1)  # Q/K head size of the non-paper forms
    kwargs: Dict[str, Any] = field(default_factory=dict)  # training-only settings of the attention model
    # a control: phase 2 trains the phase-1 convolution model on (the same restarted schedule, no conversion), which
    # separates what restarting the schedule costs from what the attention adds
    keep_conv: bool = False
    # convert mid-run: phase 1 and phase 2 are one training run of phase1.epochs + phase2.epochs epochs with phase
    # 1's settings (one lr schedule, one data order), and every parameter the conversion keeps (name and shape) keeps
    # its optimizer state (an EMA starts afresh from the converted weights). With keep_conv it is the conv model's
    # run, bit for bit.
    continue_schedule: bool = False
    # anneal the position logits: over the first anneal_fraction of phase 2's epochs (null: 0.25), every position
    # bias (and the null key's) is scaled at each epoch's start by the same factor, from bias_strength to
    # anneal_bias_to in all, so the conversion starts exact and the attention ends soft enough to learn where to look
    anneal_bias_to: Optional[float] = field(default=None, metadata=_POSITIVE)
    anneal_fraction: Optional[float] = field(default=None, metadata=_check(lambda v: 0 < v <= 1, "in (0, 1]"))

    @property
    def resolved_anneal_fraction(self) -> float:
        """The part of phase 2's epochs that ``anneal_bias_to`` anneals over."""
        return 0.25 if self.anneal_fraction is None else self.anneal_fraction


@dataclass
class TrainConfig:
    """One phase's training settings, the input of :func:`cmhsa.engine.fit`; names follow timm's ``train.py``."""

    epochs: int = field(default=10, metadata=_AT_LEAST_1)
    # A budget in optimizer steps, whatever the data's size: when set, it decides the length (epochs is not used)
    # and RunConfig.in_epochs turns it into the epochs it comes to for the images trained on. Likewise warm-up.
    steps: Optional[int] = field(default=None, metadata=_AT_LEAST_1)
    warmup_steps: Optional[int] = field(default=None, metadata=_NON_NEGATIVE)
    batch_size: int = field(default=128, metadata=_AT_LEAST_1)  # for callers building loaders
    # batches whose gradients one optimizer step sums (timm's --grad-accum-steps): a step sees batch_size x this
    # many images, for a batch that does not fit in memory
    grad_accum_steps: int = field(default=1, metadata=_AT_LEAST_1)
    lr: float = field(default=5e-4, metadata=_POSITIVE)
    min_lr: float = field(default=1e-5, metadata=_NON_NEGATIVE)
    weight_decay: float = field(default=0.05, metadata=_NON_NEGATIVE)
    opt: str = field(default="adamw", metadata=_check(
        lambda v: v.lower().removeprefix("lookahead_") in timm.optim.list_optimizers(),
        "a timm optimizer name, e.g. adamw, sgd, lamb, lion (timm.optim.list_optimizers())"))
    opt_betas: Tuple[float, float] = (0.9, 0.999)  # only passed to optimizers that take betas
    warmup_epochs: int = field(default=0, metadata=_NON_NEGATIVE)  # linear warm-up, counted within epochs
    warmup_lr: float = field(default=1e-6, metadata=_NON_NEGATIVE)
    # timm's create_scheduler_v2 names, without 'plateau' (fit schedules per update, a plateau needs a metric)
    sched: str = field(default="cosine", metadata=_choice(*SCHEDULERS))
    clip_grad: Optional[float] = field(default=1.0, metadata=_NON_NEGATIVE)  # max grad norm; None or 0: off
    # {parameter-name pattern (fnmatch): lr multiplier}, first match wins, e.g. {"*.rel_pos_bias": 10}; the
    # schedule scales every group alike (timm's lr_scale). Each pattern must match some parameter.
    lr_scale: Dict[str, float] = field(default_factory=dict)
    label_smoothing: float = field(default=0.1, metadata=_check(lambda v: 0 <= v < 1, "in [0, 1)"))
    mixup: float = field(default=0.0, metadata=_NON_NEGATIVE)  # mixup alpha; 0 -> off
    cutmix: float = field(default=0.0, metadata=_NON_NEGATIVE)  # cutmix alpha; 0 -> off (image batches only)
    mixup_prob: float = field(default=1.0, metadata=_check(lambda v: 0 <= v <= 1, "in [0, 1]"))
    mixup_switch_prob: float = field(default=0.5, metadata=_check(lambda v: 0 <= v <= 1, "in [0, 1]"))
    ema_decay: Optional[float] = field(default=None, metadata=_check(lambda v: 0 <= v < 1, "in [0, 1)"))
    precision: str = field(default="auto", metadata=_choice(*PRECISIONS))  # see engine.resolve_precision
    device: str = field(default="auto", metadata=_check(_is_device, "'auto', 'cpu', 'cuda' or 'cuda:N' (a torch "
                                                                   "device)"))  # "auto" -> cuda if available else cpu
    compile: bool = False  # torch.compile the model
    seed: int = field(default=0, metadata=_NON_NEGATIVE)
    log_interval: int = field(default=50, metadata=_AT_LEAST_1)  # steps between progress updates / loss checks
    # evaluate every n epochs and after the last; training does not depend on it (each epoch's randomness is seeded
    # afresh), so only the curve's resolution and best/ change
    eval_every: int = field(default=1, metadata=_AT_LEAST_1)
    max_steps_per_epoch: Optional[int] = field(default=None, metadata=_AT_LEAST_1)  # cap, for smoke tests
    checkpoint_every: int = field(default=0, metadata=_NON_NEGATIVE)  # keep epoch_XXX/ weights every n epochs
    # set by RunConfig.phase_config, not config keys:
    num_classes: int = field(default=10, metadata=_AT_LEAST_1)  # from the dataset
    # a phase that is part of a longer run (convert.continue_schedule) trains epochs first_epoch ..
    # first_epoch + epochs - 1 of a run whose lr schedule spans schedule_epochs (None: epochs)
    first_epoch: int = field(default=0, metadata=_NON_NEGATIVE)
    schedule_epochs: Optional[int] = field(default=None, metadata=_AT_LEAST_1)

    def __post_init__(self) -> None:
        _validate(self, "")
        for pattern, scale in self.lr_scale.items():
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 0:
                raise ValueError(f"lr_scale[{pattern!r}] must be a number >= 0 (a multiplier of lr), got {scale!r}")
        if self.steps is not None or self.warmup_steps is not None:
            if None not in (self.steps, self.warmup_steps) and not self.warmup_steps < self.steps:
                raise ValueError(f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}")
            return  # the epoch checks below run once the steps are epochs (RunConfig.in_epochs)
        if not self.warmup_epochs < self.total_epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs={self.total_epochs}), got {self.warmup_epochs}: "
                             f"lower warmup_epochs (0 switches warm-up off) or raise epochs")
        if self.first_epoch + self.epochs > self.total_epochs:
            raise ValueError(f"epochs {self.first_epoch}..{self.first_epoch + self.epochs - 1} run past the schedule's "
                             f"{self.total_epochs} epochs")

    @property
    def total_epochs(self) -> int:
        """The length of the lr schedule this phase is part of."""
        return self.schedule_epochs or self.epochs


# A phase section: every TrainConfig setting, unset (None) by default, meaning "as in train". Use 0 to switch off
# clip_grad or ema_decay in one phase only.
_DERIVED_KEYS = ("num_classes", "first_epoch", "schedule_epochs")  # TrainConfig fields the run config sets itself
PhaseConfig = dataclasses.make_dataclass(
    "PhaseConfig",
    [(f.name, Optional[typing.get_type_hints(TrainConfig)[f.name]], field(default=None, metadata=f.metadata))
     for f in fields(TrainConfig) if f.name not in _DERIVED_KEYS],
    namespace={"__doc__": "Per-phase training settings over ``train``; None means unset (train's value)."},
)
PhaseConfig.__module__ = __name__


def _train_section() -> TrainConfig:
    return TrainConfig()


@dataclass
class RunConfig:
    """A whole run; build it with :meth:`from_dict` or :func:`load_config`, change it with :meth:`set`."""

    name: str = "run"
    output: Optional[str] = None  # run directory; default runs/<name>
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    train: TrainConfig = field(default_factory=_train_section)
    phase1: PhaseConfig = field(default_factory=PhaseConfig)
    phase2: PhaseConfig = field(default_factory=PhaseConfig)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "RunConfig":
        """The validated config: defaults updated with ``values`` (nested sections, any subset of keys)."""
        if not isinstance(values, dict):
            raise ValueError(f"a run config is a mapping of sections, got {type(values).__name__}")
        config = _build(cls, values, "")
        # settings that only make sense together, e.g. warmup_epochs < epochs
        for phase in PHASES[:1] if config.convert.continue_schedule else PHASES:
            try:
                config._layered(phase)
            except ValueError as e:
                raise ValueError(f"{phase} (train layered with {phase}): {e}") from None
        if config.convert.continue_schedule and not config.budget_in_steps:
            config.phase_config("phase2")  # its error names the phase-2 keys at fault
        if config.convert.anneal_fraction is not None and config.convert.anneal_bias_to is None:
            raise ValueError("convert.anneal_fraction is how long convert.anneal_bias_to anneals, which is not set: "
                             "set it (e.g. convert.anneal_bias_to=4) or drop convert.anneal_fraction")
        if config.convert.anneal_bias_to is not None and (config.convert.keep_conv or not config.convert.bias_strength):
            raise ValueError("convert.anneal_bias_to scales the attention's position biases from "
                             "convert.bias_strength, but " + ("convert.keep_conv keeps the convolution (no attention)"
                                                              if config.convert.keep_conv else "that is 0") +
                             ": drop convert.anneal_bias_to")
        return config

    def to_dict(self) -> Dict[str, Any]:
        """Plain containers (tuples as lists) for YAML and JSON; phase sections hold only the settings they set."""
        out = _plain(dataclasses.asdict(self))
        for key in _DERIVED_KEYS:
            out["train"].pop(key)
        for phase in PHASES:
            out[phase] = {k: v for k, v in out[phase].items() if v is not None}
        return out

    def set(self, values: Dict[str, Any]) -> "RunConfig":
        """A copy with ``{"section.key": value}`` set (typed values, no parsing), validated again."""
        tree = self.to_dict()
        for dotted, value in values.items():
            keys = dotted.split(".")
            node = tree
            for key in keys[:-1]:
                if not isinstance(node.get(key, {}), dict):
                    raise ValueError(f"{dotted}: {key!r} is not a section")
                node = node.setdefault(key, {})
            node[keys[-1]] = copy.deepcopy(value)
        return RunConfig.from_dict(tree)

    def phase_config(self, phase: str, num_classes: int = 10) -> TrainConfig:
        """The engine's settings for ``phase`` ('phase1' or 'phase2'): ``train`` with the phase's set fields, or
        under ``convert.continue_schedule`` the phase's part of phase 1's run."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        if self.budget_in_steps:
            raise ValueError("this config has a budget in steps: RunConfig.in_epochs(train_images) turns it into "
                             "the epochs it comes to for the data first")
        if self.convert.continue_schedule:
            return self._continued_phase_config(phase, num_classes)
        return self._layered(phase, num_classes=num_classes)

    def _layered(self, phase: str, **derived) -> TrainConfig:
        """``train`` with the phase section's set fields; a phase's own epochs beat a budget in steps from train."""
        own = _set_fields(getattr(self, phase))
        for length, budget in (("epochs", "steps"), ("warmup_epochs", "warmup_steps")):
            if length in own and budget in own:
                raise ValueError(f"{phase}.{length} and {phase}.{budget} are both set: keep one (a budget in steps "
                                 f"becomes epochs for the data's size)")
            if length in own:
                own[budget] = None
        return dataclasses.replace(self.train, **own, **derived)

    @property
    def budget_in_steps(self) -> bool:
        """Whether a phase's length or warm-up is in optimizer steps (see :meth:`in_epochs`)."""
        return any(getattr(self._layered(phase), key) is not None
                   for phase in PHASES for key in ("steps", "warmup_steps"))

    def in_epochs(self, train_images: int, world_size: int = 1) -> "RunConfig":
        """This config with its budgets in steps as the epochs they come to on ``train_images`` training images,
        in batches of each phase's ``batch_size`` per process of ``world_size`` (a partial batch is dropped),
        ``grad_accum_steps`` batches a step: ``epochs = ceil(steps / steps per epoch)``. The phases of one continued
        run (``convert.continue_schedule``) round at the end of each, so the run's total is rounded once; its phase 2
        lasts as long as phase 1 unless it sets its own length. A config without steps comes back as it is."""
        if not self.budget_in_steps:
            return self
        changes: Dict[str, Any] = {f"{section}.{key}": None for section in ("train", *PHASES)
                                   for key in ("steps", "warmup_steps")}
        continued, before = self.convert.continue_schedule, 0  # steps of the run's earlier phases
        first = self._layered("phase1")
        for phase in PHASES:
            cfg = self._layered(phase)
            if continued and phase == "phase2":  # the rest of phase 1's run, with its batch size
                own = _set_fields(self.phase2)
                cfg = dataclasses.replace(first, epochs=own.get("epochs", first.epochs),
                                          steps=own.get("steps", None if "epochs" in own else first.steps),
                                          warmup_steps=own.get("warmup_steps"))
            per_epoch = math.ceil(train_images / world_size) // cfg.batch_size // cfg.grad_accum_steps
            if per_epoch < 1 and (cfg.steps is not None or cfg.warmup_steps is not None):
                step = f"{cfg.grad_accum_steps} batches of {cfg.batch_size}" if cfg.grad_accum_steps > 1 else \
                    f"batch of {cfg.batch_size}"
                raise ValueError(f"{phase}: {train_images} training images make no optimizer step ({step}"
                                 f"{f' on each of {world_size} processes' if world_size > 1 else ''}); lower "
                                 f"batch_size{' or grad_accum_steps' * (cfg.grad_accum_steps > 1)} or train on more "
                                 f"images")
            if cfg.steps is not None:  # at least one epoch, though phase 1's rounding may already hold the steps
                changes[f"{phase}.epochs"] = max(1, _epochs_for_steps(cfg.steps, per_epoch, before if continued else 0))
            if cfg.warmup_steps is not None:
                changes[f"{phase}.warmup_epochs"] = _epochs_for_steps(cfg.warmup_steps, per_epoch)
            before += cfg.steps if cfg.steps is not None else cfg.epochs * per_epoch
        return self.set(changes)

    def _continued_phase_config(self, phase: str, num_classes: int) -> TrainConfig:
        """``convert.continue_schedule``: both phases are parts of phase 1's run, whose schedule spans both; phase 2
        may set only its length, per-parameter lr multipliers (its parameters differ) and how it logs, evaluates
        and keeps weights."""
        first, own = self._layered("phase1"), _set_fields(self.phase2)
        differ = [f"phase2.{key}={value!r} (phase 1: {getattr(first, key)!r})" for key, value in own.items()
                  if key not in ("epochs", "lr_scale", *RESUME_FREE_KEYS) and value != getattr(first, key)]
        if differ:
            raise ValueError(f"convert.continue_schedule makes phase 2 the rest of phase 1's run, with phase 1's "
                             f"settings, but {', '.join(differ)}. Unset those phase2 keys, or drop "
                             f"convert.continue_schedule")
        total = first.epochs + own.get("epochs", first.epochs)
        if phase == "phase1":
            return dataclasses.replace(first, schedule_epochs=total, num_classes=num_classes)
        # one replace: phase 2 alone may be shorter than the warm-up, which counts within the whole schedule
        return dataclasses.replace(first, **own, first_epoch=first.epochs, schedule_epochs=total,
                                   num_classes=num_classes)

    def run_dir(self) -> Path:
        return Path(self.output or Path("runs") / self.name)


_LENGTH_UNITS = {"epochs": "steps", "steps": "epochs", "warmup_epochs": "warmup_steps", "warmup_steps": "warmup_epochs"}


def _epochs_for_steps(steps: int, batches_per_epoch: int, before: int = 0) -> int:
    """The whole epochs of ``batches_per_epoch`` that hold ``steps`` optimizer steps following ``before`` steps of
    the same run: a run's epoch count is rounded up once, not phase by phase."""
    return math.ceil((before + steps) / batches_per_epoch) - math.ceil(before / batches_per_epoch)


def _set_fields(section) -> Dict[str, Any]:
    """The fields a phase section sets (not None)."""
    return {f.name: getattr(section, f.name) for f in fields(section) if getattr(section, f.name) is not None}


# ------------------------------------------------------------------------------------------------ validation


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@functools.lru_cache(maxsize=None)
def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(key: str, known: Iterable[str], where: str) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {where + close[0]!r}?" if close else ""
    return f"unknown config key {where + key!r}{hint} (known keys here: {', '.join(sorted(known))})"


def _build(cls, values: Dict[str, Any], where: str):
    """An instance of the dataclass ``cls`` from ``values``, checking keys, types and ranges."""
    hints = _hints(cls)
    known = {f.name: f for f in fields(cls) if not (cls is TrainConfig and f.name in _DERIVED_KEYS)}
    for key in values:
        if key not in known:
            raise ValueError(_unknown_key(str(key), known, where))
    kwargs = {}
    for name, value in values.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ValueError(f"{where}{name} must be a section (a mapping of keys), got {value!r}")
            kwargs[name] = _build(kind, value, f"{where}{name}.")
        else:
            kwargs[name] = value
    if cls is TrainConfig:
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{where}{e}" if not str(e).startswith(where) else str(e)) from None
    instance = cls(**kwargs)
    _validate(instance, where)
    return instance


def _validate(instance, where: str) -> None:
    """Coerce every field of ``instance`` to its type in place and check its range; ValueError names the key."""
    hints = _hints(type(instance))
    for f in fields(instance):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            continue
        key = f"{where}{f.name}"
        value = _coerce(getattr(instance, f.name), kind, key)
        if value is not None and "check" in f.metadata and not f.metadata["check"](value):
            raise ValueError(f"{key} must be {f.metadata['allowed']}, got {value!r}")
        setattr(instance, f.name, value)


def _type_name(kind) -> str:
    args = typing.get_args(kind)
    if typing.get_origin(kind) is Union:
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if typing.get_origin(kind) in (tuple, Tuple):
        return f"a list of {len(args)} {_type_name(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if typing.get_origin(kind) in (dict, Dict):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(kind, str(kind))


def _coerce(value: Any, kind, key: str) -> Any:
    """``value`` as ``kind`` (int, float, bool, str, Optional/Union of those, Tuple, Dict), or ValueError."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if int in options and float in options and not isinstance(value, (bool, float)):
            try:  # an exact integer stays an int (an image count), anything else numeric is a float (a fraction)
                return _coerce(value, int, key)
            except ValueError:
                pass
        if int in options and float in options:
            try:
                return _coerce(value, float, key)
            except ValueError:
                raise ValueError(f"{key} must be {_type_name(kind)}, got {value!r}") from None
        if len(options) == 1:
            try:
                return _coerce(value, options[0], key)
            except ValueError:
                raise ValueError(f"{key} must be {_type_name(kind)}, got {value!r}") from None
    elif origin in (tuple, Tuple):
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    elif origin in (dict, Dict):
        if isinstance(value, dict):
            for k, v in value.items():
                if v is None and ":" in str(k):  # YAML read "{depth:2}" as the key "depth:2" with no value
                    name, _, given = str(k).partition(":")
                    raise ValueError(f"{key} has the key {k!r} with no value: YAML needs a space after the colon, "
                                     f"e.g. {{{name}: {given}}}")
            return copy.deepcopy(value)
        if value is None:
            return {}
    elif kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
    elif kind is float:
        number = value
        if isinstance(value, str):
            try:
                number = float(value.strip())  # YAML 1.1 reads 1e-3 as a string
            except ValueError:
                number = None
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            if not math.isfinite(number):
                raise ValueError(f"{key} must be a finite number, got {value!r}")
            return float(number)
    elif kind is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, str):
            return value
    raise ValueError(f"{key} must be {_type_name(kind)}, got {value!r}")


# ------------------------------------------------------------------------------------------------ files


def read_yaml(path: Path) -> Any:
    """The YAML document in ``path``; a syntax error is a ValueError that names the file and the place."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None


def load_config(path: Optional[str | Path], overrides: Iterable[str] = ()) -> RunConfig:
    """Defaults <- the YAML file (if any) <- ``section.key=value`` overrides (values parsed as YAML)."""
    values: Dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist; presets are in configs/ (e.g. "
                                    f"configs/fmnist_tiny.yaml)")
        values = read_yaml(path) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a YAML mapping at the top level")
        try:
            config = RunConfig.from_dict(values)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    else:
        config = RunConfig()
    return apply_overrides(config, overrides)


def parse_overrides(overrides: Iterable[str]) -> Dict[str, Any]:
    """``["phase1.epochs=3", ...]`` -> ``{"phase1.epochs": 3, ...}`` (each value parsed as YAML)."""
    quote = "quote an override whose value holds spaces, e.g. --set 'model.kwargs={depth: 2, num_heads: 4}'"
    parsed = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. phase1.epochs=3); {quote}")
        dotted, raw = item.split("=", 1)
        try:
            parsed[dotted.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"override {item!r}: the value is not valid YAML ({problem}); {quote}") from None
    return parsed


def apply_overrides(config: RunConfig, overrides: Iterable[str]) -> RunConfig:
    """Apply ``section.key=value`` strings, e.g. ``phase1.epochs=3`` or ``data.train_subset=0.1``."""
    parsed = parse_overrides(overrides)
    if not parsed:
        return config
    for dotted in list(parsed):  # a length on the command line replaces the file's, in steps or in epochs
        section, _, key = dotted.rpartition(".")
        other = _LENGTH_UNITS.get(key)
        if other and f"{section}.{other}" not in parsed and (section in PHASES or other.endswith("steps")):
            parsed[f"{section}.{other}"] = None
    config = config.set(parsed)
    _check_reaches_phases(config, parsed)
    return config


def _check_reaches_phases(config: RunConfig, parsed: Dict[str, Any]) -> None:
    """A ``train.key`` override is the default of both phases, so a phase section that already sets ``key`` wins and
    the override would silently not apply there (e.g. ``train.lr`` under a preset's ``phase1.lr``). Overrides that
    set both (``train.lr=.. phase2.lr=..``) say what they mean."""
    own = {phase: _set_fields(getattr(config, phase)) for phase in PHASES}
    for dotted in parsed:
        section, _, key = dotted.partition(".")
        if section != "train":
            continue
        value = getattr(config.train, key)  # typed (YAML reads 1e-2 as a string)
        shadowed = [phase for phase in PHASES if key in own[phase] and f"{phase}.{key}" not in parsed]
        if shadowed:
            sets = ", ".join(f"{phase}.{key}={own[phase][key]!r}" for phase in shadowed)
            fix = " and ".join(f"{phase}.{key}={value!r}" for phase in shadowed)
            raise ValueError(f"{dotted}={value!r} does not reach {' or '.join(shadowed)}: the config sets {sets}, "
                             f"which wins over the shared train section. Override {fix} instead")


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write ``config`` as YAML, atomically."""
    atomic_write_text(Path(path), yaml.safe_dump(config.to_dict(), sort_keys=False))


def config_differences(old: Dict[str, Any], new: Dict[str, Any], where: str = "") -> List[str]:
    """``["section.key: old -> new", ...]`` for the keys whose values differ between two ``to_dict()`` trees."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key not in ("kwargs",):
            out += config_differences(a, b, f"{where}{key}.")
        elif a != b:
            out.append(f"{where}{key}: {a!r} -> {b!r}")
    return out
