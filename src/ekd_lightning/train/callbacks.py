"""Lightning callbacks that keep long runs safe: stop on a non-finite loss before it reaches the
weights or a checkpoint, make a resumed run continue exactly as an uninterrupted one would, and
(tests only) kill the process at a chosen batch.

:func:`robustness_callbacks` returns the set :func:`ekd_lightning.train.training.run_training` adds to
every trainer.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from ..core.errors import NonFiniteLossError
from ..core.files import write_json_atomic

log = logging.getLogger(__name__)

KILL_ENV = "EKD_TEST_SIGKILL_AT"
"""Test hook: ``"EPOCH:BATCH"`` makes the training process SIGKILL itself after that training
batch (0-based epoch and batch index), as a crash or an out-of-memory kill would."""


class NonFiniteLossGuard(Callback):
    """Raise :class:`~ekd_lightning.core.errors.NonFiniteLossError` as soon as a loss is NaN/inf.

    The training loss is checked before its backward pass, so the optimiser never applies a
    non-finite gradient; the validation loss is checked before
    :class:`~pytorch_lightning.callbacks.ModelCheckpoint` (always run after the other callbacks)
    would save it. Either way no checkpoint is written with the bad state: ``last.ckpt`` keeps
    the last good epoch, and a restart resumes from it. The message names the epoch, the global
    step, the batch index and the HDF5 groups of the batch's conformations.
    """

    def __init__(self) -> None:
        self._batch_idx = -1
        self._batch = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_idx, self._batch = batch_idx, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batch = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        # every process stops together (one rank raising alone would hang the others in DDP)
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            return
        raise NonFiniteLossError(
            f"training loss is {float(loss.detach().float().sum())} "
            f"{'' if bad else '(here; non-finite on another process) '}at epoch {trainer.current_epoch}, "
            f"global step {trainer.global_step}, batch {self._batch_idx}{self._groups(trainer)}; "
            f"training stopped before the weights were updated. {self._advice(trainer)}"
        )

    def on_validation_end(self, trainer: pl.Trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get("val/loss")
        if value is None or math.isfinite(float(value)):
            return
        raise NonFiniteLossError(
            f"validation loss is {float(value)} after epoch {trainer.current_epoch} (global step "
            f"{trainer.global_step}); training stopped before saving a checkpoint of these "
            f"weights. {self._advice(trainer)}"
        )

    def _groups(self, trainer) -> str:
        """`` (conformations of groups [...])`` for the current batch, when it can tell."""
        records = getattr(trainer.datamodule, "records", None) if trainer.datamodule else None
        mol = getattr(self._batch, "mol", None)
        if records is None or mol is None:
            return ""
        keys = list(dict.fromkeys(records[int(m)].key for m in mol.view(-1).tolist()))
        return f" (conformations of groups {keys[:5]}{' ...' if len(keys) > 5 else ''})"

    @staticmethod
    def _advice(trainer) -> str:
        last = [Path(c.dirpath) / f"{c.CHECKPOINT_NAME_LAST}{c.FILE_EXTENSION}"
                for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]
        last = [p for p in last if p.is_file()]
        where = f"The last good checkpoint {last[0]} is left intact; " if last else ""
        return (f"{where}check the data of the batch, or lower optim.lr / "
                "trainer.gradient_clip_val, then restart (resume=true continues from last.ckpt).")


class ResumableRNG(Callback):
    """Store the global random generators (torch CPU and CUDA, numpy, python) in checkpoints and
    restore them on resume.

    Lightning restores weights, optimiser, scheduler and loop counters but not these; without
    them a resumed run would shuffle the next epoch differently from an uninterrupted run. With
    them, a run killed anywhere and restarted from ``last.ckpt`` (saved at the end of an epoch's
    validation, before the next epoch draws its shuffling seed) repeats the remaining epochs
    exactly on CPU.
    """

    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        # plain lists and tensors only, so weights_only checkpoint loading accepts them
        state = {"torch": torch.get_rng_state(),
                 "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
                 "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        name, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate(state_dict["python"])
        cuda = state_dict.get("cuda")
        if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


HISTORY_KEYS = ("val/loss", "val/energy_mae", "val/force_mae")
"""Validation quantities recorded per epoch by :class:`TrainingHistory` (val/loss at the fixed,
final force weight; MAE in kcal/mol and kcal/mol/Å; the force MAE only where the data has
reference forces)."""


class TrainingHistory(Callback):
    """The per-epoch validation history and the training wall time of a run.

    After each validation epoch (not the sanity check) it appends ``{"epoch": e (1-based),
    "time_s": training wall time so far, "val/loss": ..., "val/energy_mae": ...,
    "val/force_mae": ...}`` and, on rank 0, rewrites ``path`` (``history.json``) atomically, so
    a running training's curve can be read. Its state travels in checkpoints: a resumed run
    continues the same history and the same clock (the time of a killed epoch is lost).
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.history: list[dict[str, float]] = []
        self.train_time_s = 0.0
        self._mark: float | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self._mark = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self._mark is None:
            return
        now = time.perf_counter()
        self.train_time_s += now - self._mark
        self._mark = now
        m = trainer.callback_metrics
        entry = {"epoch": trainer.current_epoch + 1, "time_s": round(self.train_time_s, 3)}
        entry.update({k: float(m[k]) for k in HISTORY_KEYS if k in m})
        self.history.append(entry)
        if self.path is not None and trainer.is_global_zero:
            write_json_atomic(self.history, self.path)

    def summary(self, monitor: str = "val/loss") -> dict:
        """``epochs`` trained, ``best_epoch`` (lowest ``monitor``: what best.ckpt holds), that
        lowest value (``best_val_loss``) and ``train_time_s``."""
        scored = [h for h in self.history if math.isfinite(h.get(monitor, math.nan))]
        best = min(scored, key=lambda h: h[monitor]) if scored else {}
        return {"epochs": len(self.history), "best_epoch": best.get("epoch"),
                f"best_{monitor.replace('/', '_')}": best.get(monitor),
                "train_time_s": round(self.train_time_s, 3)}

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "train_time_s": self.train_time_s}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.train_time_s = float(state_dict.get("train_time_s", 0.0))


class SigkillAt(Callback):
    """Test hook: SIGKILL this process after training batch ``batch`` of epoch ``epoch``."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            log.warning("%s: killing this process (test hook)", KILL_ENV)
            os.kill(os.getpid(), signal.SIGKILL)


def robustness_callbacks() -> list[Callback]:
    """The callbacks every training run gets (plus :class:`SigkillAt` when ``KILL_ENV`` is set)."""
    callbacks: list[Callback] = [NonFiniteLossGuard(), ResumableRNG()]
    if os.environ.get(KILL_ENV):
        epoch, batch = (int(v) for v in os.environ[KILL_ENV].split(":"))
        callbacks.append(SigkillAt(epoch, batch))
    return callbacks
