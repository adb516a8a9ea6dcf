"""Checkpoints: atomic saving, and loading a trained potential from its checkpoint alone."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from .errors import CheckpointError


def atomic_torch_save(obj, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that never leaves a half-written checkpoint behind."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_torch_save(checkpoint, path)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_checkpoint(path: str | Path) -> dict:
    """The raw checkpoint dict; CheckpointError if unreadable or not an ekd-lightning checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise CheckpointError(f"{path}: cannot read checkpoint (corrupt or truncated?): {exc}") from exc
    hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
    if "model_name" not in hparams or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{path}: not an ekd-lightning checkpoint (no model_name in hyper_parameters)"
        )
    return checkpoint


def load_potential(path: str | Path, expected_model: str | None = None, map_location="cpu"):
    """Rebuild a :class:`~ekd_lightning.module.PotentialModule` from a checkpoint, in eval mode.

    Args:
        path: a ``.ckpt`` written by ``train.py``.
        expected_model: if given, refuse a checkpoint of another architecture.
    """
    from .module import PotentialModule

    checkpoint = read_checkpoint(path)
    hparams = checkpoint["hyper_parameters"]
    if expected_model is not None and hparams["model_name"] != expected_model:
        raise CheckpointError(
            f"{path}: checkpoint is a '{hparams['model_name']}' model, expected '{expected_model}'"
        )
    module = PotentialModule(**hparams)
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: weights do not fit a '{hparams['model_name']}' model with "
            f"{hparams.get('model_kwargs')}: {exc}"
        ) from exc
    return module.to(map_location).eval()
