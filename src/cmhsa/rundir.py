"""The layout of a run directory, in one place.

::

    <run>/
        config.yaml          the resolved RunConfig (resume refuses a different one)
        .lock                held (fcntl.flock) by the process writing the run; holds its PID
        phase1/, phase2/     one PhaseDir per phase (``train/`` for `cmhsa train`)
            model.json       the model spec: how to rebuild the model the weights belong to
            metrics.jsonl    one line per epoch
            last/            everything needed to resume (and .last.previous/, the epoch before)
            best/            weights with the best val top-1
            epoch_XXX/       weights every n epochs (train.checkpoint_every)
        convert.json         the transfer error of the conversion
        curves.png, summary.json, summary.md

Every file is written atomically (a temporary file, then ``os.replace``). Only the main process of a distributed
run writes, and takes the lock.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Union


from .atomic import append_line, atomic_write_json, atomic_write_text
from .config import RESUME_FREE_KEYS, RunConfig, config_differences, read_yaml, save_config

__all__ = ["RunDir", "PhaseDir", "RunDirLocked"]


class RunDirLocked(RuntimeError):
    """Another live process holds the run directory's lock."""


class PhaseDir:
    """One training phase's directory: model spec, metrics and checkpoints."""

    def __init__(self, root: Union[str, Path]):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"PhaseDir({str(self.root)!r})"

    @property
    def spec_path(self) -> Path:
        return self.root / "model.json"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def last(self) -> Path:
        return self.root / "last"

    @property
    def best(self) -> Path:
        return self.root / "best"

    def epoch(self, number: int) -> Path:
        """Weights kept after epoch ``number`` (1-based), see ``checkpoint_every``."""
        return self.root / f"epoch_{number:03d}"

    def write_spec(self, spec: Dict[str, Any]) -> None:
        atomic_write_json(self.spec_path, spec)

    def read_spec(self) -> Dict[str, Any]:
        return json.loads(self.spec_path.read_text())

    def read_metrics(self) -> List[Dict[str, Any]]:
        """Every complete line of ``metrics.jsonl`` (a line torn by a crash is skipped)."""
        if not self.metrics_path.is_file():
            return []
        lines = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return lines

    def append_metrics(self, record: Dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        append_line(self.metrics_path, json.dumps(record))

    def truncate_metrics(self, phase: str, last_epoch: int) -> None:
        """Drop ``phase`` lines after ``last_epoch`` (epochs that will run again) and torn lines."""
        if not self.metrics_path.is_file():
            return
        kept = [r for r in self.read_metrics() if not (r.get("phase") == phase and r.get("epoch", -1) > last_epoch)]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))


class RunDir:
    """A run directory (see the module docstring); ``RunDir(config.run_dir())``."""

    PHASES = ("phase1", "phase2", "train")

    def __init__(self, root: Union[str, Path]):
        self.root = Path(root)
        self._lock_fd: Optional[int] = None

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    config_path = property(lambda self: self.root / "config.yaml")
    convert_path = property(lambda self: self.root / "convert.json")
    summary_json = property(lambda self: self.root / "summary.json")
    summary_md = property(lambda self: self.root / "summary.md")
    curves_path = property(lambda self: self.root / "curves.png")
    lock_path = property(lambda self: self.root / ".lock")

    def phase(self, name: str) -> PhaseDir:
        if name not in self.PHASES:
            raise ValueError(f"phase must be one of {self.PHASES}, got {name!r}")
        return PhaseDir(self.root / name)

    # ------------------------------------------------------------------------------------------- the config

    def saved_config(self) -> Optional[RunConfig]:
        """The run's config.yaml as a RunConfig (defaults filled), or None when there is none."""
        if not self.config_path.is_file():
            return None
        try:
            return RunConfig.from_dict(read_yaml(self.config_path) or {})
        except ValueError as e:
            raise ValueError(f"{self.config_path}: {e}; start over with --no-resume, or use another --output") \
                from None

    def differences(self, config: RunConfig) -> List[str]:
        """Keys whose values differ between the saved config and ``config`` (ignoring RESUME_FREE_KEYS)."""
        saved = self.saved_config()
        if saved is None:
            return []
        changed = config_differences(saved.to_dict(), config.to_dict())
        return [c for c in changed if c.split(":")[0].split(".")[-1] not in RESUME_FREE_KEYS]

    def start(self, config: RunConfig, resume: bool = True) -> None:
        """Take the lock and write config.yaml; resuming refuses a directory that holds a different run that trained
        at least an epoch, and starting over (``resume=False``) clears what the previous run wrote."""
        self.lock()
        changed = self.differences(config) if resume else []
        if changed and self.trained_anything():
            self.unlock()
            raise ValueError(
                f"cannot resume {self.root}: it holds a run with a different config ({'; '.join(changed)}). "
                f"Start it over with --no-resume (resume=False), or write to another directory with --output")
        if not resume or changed:  # a run that failed before its first epoch leaves nothing worth keeping
            self.clear()
        save_config(config, self.config_path)

    def trained_anything(self) -> bool:
        """Whether a phase of the run here finished an epoch (it wrote a metrics line or a checkpoint)."""
        return any(self.phase(p).read_metrics() or self.phase(p).last.exists() for p in self.PHASES)

    def clear(self) -> None:
        """Remove the files of a previous run (phases, conversion, summary); other files are left alone."""
        for name in self.PHASES:
            shutil.rmtree(self.root / name, ignore_errors=True)
        for path in (self.convert_path, self.summary_json, self.summary_md, self.curves_path, self.config_path):
            path.unlink(missing_ok=True)

    # --------------------------------------------------------------------------------------------- the lock

    def lock(self) -> None:
        """Hold an exclusive ``flock`` on ``.lock`` until :meth:`unlock` or process exit; fails at once if another
        process holds it. The kernel drops the lock when its holder dies, so a killed run never blocks."""
        if self._lock_fd is not None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirLocked(f"run directory {self.root} is in use by process {holder} (lock {self.lock_path}); "
                               f"wait for it to finish, stop it, or use another --output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def holder(self) -> Optional[str]:
        """The PID of the live process holding the lock (as the lock file records it), or None if none does."""
        if not self.lock_path.exists():
            return None
        fd = os.open(self.lock_path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)  # also drops the shared lock taken just to test
        return None

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.unlock()

    # ---------------------------------------------------------------------------------------------- outputs

    def write_json(self, path: Path, obj: Any) -> None:
        atomic_write_json(path, obj)

    def write_text(self, path: Path, text: str) -> None:
        atomic_write_text(path, text)
