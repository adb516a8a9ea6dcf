"""Checkpoints: atomic saving, and loading a trained potential from its checkpoint alone."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from ..core.errors import CheckpointError, ConfigError
from ..core.files import write_atomic
from ..core.hashing import file_sha256  # noqa: F401  (where callers have found it)


def atomic_torch_save(obj, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically (:func:`~ekd_lightning.core.files.write_atomic`)."""
    write_atomic(path, lambda handle: torch.save(obj, handle))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that never leaves a half-written checkpoint behind, and resumes
    only from checkpoints that hold data, never code (``weights_only=True``, see
    :func:`safe_load`)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None):
        """The checkpoint to resume from; CheckpointError (naming it, saying to move it away)
        when it is corrupt, truncated or holds more than data."""
        return load_checkpoint_data(path, RESUME_FIX.format(path=path), map_location)


def safe_load(path: str | Path, map_location="cpu"):
    """``torch.load`` that unpickles data only: tensors, plain containers and the classes torch
    allows by default (``weights_only=True``). A checkpoint of this project holds nothing else
    (its pickle names only torch storages, ``_rebuild_tensor_v2`` and ``OrderedDict``: the RNG
    states of :class:`~ekd_lightning.train.callbacks.ResumableRNG` are stored as tensors and lists for
    this), so the allow-list needs no extra entry. A planted file whose pickle would call
    anything else (``os.system``, ...) raises ``pickle.UnpicklingError`` before any call."""
    return torch.load(path, map_location=map_location, weights_only=True)


def load_checkpoint_data(path: str | Path, fix: str, map_location="cpu"):
    """:func:`safe_load`, with every failure a CheckpointError naming ``path`` and ending with
    ``fix`` (what to do about it). A corrupt or truncated file says so; a pickle naming a class
    or function outside torch's allow-list is refused as possibly running code (torch's own
    advice to load it with ``weights_only=False`` is not repeated: that would run it)."""
    try:
        return safe_load(path, map_location)
    except pickle.UnpicklingError as exc:  # torch's message: boilerplate around one finding
        boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
        found = [line.strip() for line in str(exc).splitlines()
                 if line.strip() and not line.startswith(boilerplate) and "weights_only" not in line]
        what = found[-1] if found else "unreadable pickle"
        if "GLOBAL" not in what:  # not a pickle naming a class or function: corrupt
            raise CheckpointError(f"{path}: cannot read checkpoint (corrupt or truncated?): {what}; {fix}") from exc
        raise CheckpointError(
            f"{path}: refused: it holds more than weights and plain data ({what}), which could "
            f"run code when loaded; {fix}"
        ) from exc
    except Exception as exc:  # torch raises many types for a corrupt file
        what = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: cannot read checkpoint (corrupt or truncated?): {what}; {fix}") from exc


RESUME_FIX = ("move it away (e.g. mv {path} {path}.bad) to train the run from its start, or give "
              "this run another run_name=...")
"""How to proceed when a run's ``last.ckpt`` cannot be resumed from."""


def read_checkpoint(path: str | Path) -> dict:
    """The raw checkpoint dict; CheckpointError if unreadable or not an ekd-lightning checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    checkpoint = load_checkpoint_data(path, "use only checkpoints written by ekd-lightning")
    hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
    if not ("model" in hparams or "model_name" in hparams) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{path}: not an ekd-lightning checkpoint (no model config in hyper_parameters)"
        )
    return checkpoint


def load_potential(path: str | Path, expected_model: str | type | None = None, map_location="cpu"):
    """Rebuild a :class:`~ekd_lightning.task.module.PotentialModule` from a checkpoint alone, in eval
    mode: its hyperparameters hold the model config (``_target_`` and arguments) and the loss
    terms, built with :func:`hydra.utils.instantiate`.

    Args:
        path: a ``.ckpt`` written by ``train.py``. Checkpoints of the previous layout
            (``model_name``/``model_kwargs``, 0.1.0's ``ani2x`` included) load too
            (:func:`~ekd_lightning.task.module.upgrade_hparams`).
        expected_model: if given, refuse a checkpoint of another model class (the class, or its
            ``_target_`` path).
    """
    from .module import PotentialModule, upgrade_hparams

    checkpoint = read_checkpoint(path)
    hparams = upgrade_hparams(checkpoint["hyper_parameters"])
    target = hparams["model"].get("_target_")
    if expected_model is not None:
        expected = expected_model if isinstance(expected_model, str) else \
            f"{expected_model.__module__}.{expected_model.__qualname__}"
        if target != expected:
            raise CheckpointError(f"{path}: checkpoint is a '{target}' model, expected '{expected}'")
    try:
        module = PotentialModule(**hparams)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: cannot rebuild its model: {exc}") from exc
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: weights do not fit the model {hparams['model']}: {exc}"
        ) from exc
    return module.to(map_location).eval()
