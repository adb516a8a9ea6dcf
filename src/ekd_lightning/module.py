"""The Lightning module shared by every stage (teacher, baseline, student, oracle).

Stages differ only in their loss: energy-only (teacher, baseline), energy plus distilled force
labels (student), energy plus reference forces (oracle). Losses are in kcal/mol units: the
energy term is the mean of ((E_pred - E_ref) / sqrt(n_atoms))², the force term the mean
squared error per force component in (kcal/mol/Å)². Metrics are logged in kcal/mol and
kcal/mol/Å: ``{split}/energy_mae|energy_rmse`` and, when the data has reference forces,
``{split}/force_mae|force_rmse`` (per component, against the reference forces, never the labels).
"""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor
from torchmetrics import MeanAbsoluteError, MeanSquaredError

from .models import build_model, canonical_arch
from .units import HARTREE_TO_KCALMOL as KCAL

FORCE_TARGETS = ("none", "labels", "reference")


class FeatureCache:
    """Model input features (ANI AEVs) of training conformations, kept across epochs.

    In energy-only training (teacher, baseline) positions never change, so each conformation's
    features are computed once, in the first epoch, and reused: the AEV is about 40% of an
    ``ani2x`` energy-only step (``benchmarks/README.md``). The energies are the same values as
    from positions (to float32 rounding). Keyed by conformation (``batch.mol``, ``batch.conf``);
    rows are packed into slabs of ``SLAB_BYTES`` (large allocations, handed back to the system
    when :meth:`clear` frees them, where many small ones would stay in the process heap); at
    most ``max_bytes`` are held, after which batches with a conformation not held are left to
    the usual path (:meth:`energies` returns None).
    """

    SLAB_BYTES = 16 * 2**20

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.clear()

    def clear(self) -> None:
        self.slabs: list[Tensor] = []
        self.rows: dict[tuple[int, int], Tensor] = {}  # views into the slabs
        self.used = 0  # rows used in the last slab
        self.nbytes = 0  # bytes of the slabs
        self.full = False

    def _hold(self, rows: Tensor) -> Tensor | None:
        """A copy of ``rows`` (n, F) in a slab, or None when the cache would outgrow max_bytes."""
        n, width = rows.shape
        if not self.slabs or self.used + n > self.slabs[-1].shape[0]:
            slab_rows = max(n, self.SLAB_BYTES // (width * rows.element_size()))
            slab_bytes = slab_rows * width * rows.element_size()
            if self.nbytes + slab_bytes > self.max_bytes:
                return None
            self.slabs.append(rows.new_empty(slab_rows, width))
            self.nbytes += slab_bytes
            self.used = 0
        held = self.slabs[-1][self.used : self.used + n]
        held.copy_(rows)
        self.used += n
        return held

    def energies(self, model, batch) -> Tensor | None:
        """Energies (n_molecules,) Hartree of ``batch`` from held (or now computed) features;
        None when the cache is full and a conformation of the batch is not held."""
        keys = list(zip(batch.mol.tolist(), batch.conf.tolist(), strict=True))
        held = [self.rows.get(key) for key in keys]
        if all(rows is not None for rows in held):
            features = torch.cat(held)
        elif self.full:
            return None
        else:
            features = model.features(batch.z, batch.pos, batch.batch)
            sizes = torch.bincount(batch.batch, minlength=batch.num_graphs).tolist()
            for key, rows in zip(keys, features.split(sizes), strict=True):
                if key not in self.rows:
                    copy = self._hold(rows)
                    if copy is None:
                        self.full = True
                        break
                    self.rows[key] = copy
        return model.energies_from_features(batch.z, features, batch.batch, batch.num_graphs)


class PotentialModule(pl.LightningModule):
    """An MLIP with its training recipe; the checkpoint holds everything needed to rebuild it.

    Args:
        model_name: the architecture, a model config's ``arch`` (one of
            :data:`ekd_lightning.models.ARCHS`; a legacy ``ani2x`` is read as ``ani``).
        model_kwargs: keyword arguments of that model (sizes, cutoffs).
        elements: element symbols.
        self_energies: SAE per element (Hartree), fitted on the training split.
        energy_scale: residual energy spread per atom (Hartree).
        stage: ``teacher``, ``baseline``, ``student`` or ``oracle`` (recorded for provenance).
        energy_weight, force_weight: loss weights.
        force_target: ``none``, ``labels`` (distilled) or ``reference`` (the data's forces).
        force_loss: ``mse``, or ``uncertainty`` to weight each atom by its inverse teacher
            variance (floored at ``variance_floor`` (kcal/mol/Å)², weights normalised to mean 1).
        force_warmup_epochs: ramp the force weight linearly from 0 over this many epochs.
        lr, weight_decay, lr_factor, lr_patience: AdamW and ReduceLROnPlateau on ``val/loss``.
        feature_cache_mb: keep the input features of training conformations across epochs
            while no force term is trained (:class:`FeatureCache`), up to this many MiB; 0: off.
            Not a hyperparameter saved in checkpoints: it changes speed and memory, and the
            result only through float32 rounding (kept in the config hash, so that a run in the
            store is reproduced bit for bit).
    """

    def __init__(
        self,
        model_name: str,
        model_kwargs: dict | None = None,
        elements: Sequence[str] = ("H", "C", "N", "O"),
        self_energies: Sequence[float] | None = None,
        energy_scale: float = 1.0,
        stage: str = "teacher",
        energy_weight: float = 1.0,
        force_weight: float = 0.0,
        force_target: str = "none",
        force_loss: str = "mse",
        variance_floor: float = 1.0,
        force_warmup_epochs: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        lr_factor: float = 0.5,
        lr_patience: int = 5,
        feature_cache_mb: float = 0.0,
    ):
        super().__init__()
        if force_target not in FORCE_TARGETS:
            raise ValueError(f"force_target '{force_target}' is not one of {FORCE_TARGETS}")
        if force_loss not in ("mse", "uncertainty"):
            raise ValueError(f"force_loss '{force_loss}' is not 'mse' or 'uncertainty'")
        elements = list(elements)
        model_name = canonical_arch(model_name)
        self_energies = [0.0] * len(elements) if self_energies is None else [float(e) for e in self_energies]
        self.save_hyperparameters(
            {"model_name": model_name, "model_kwargs": dict(model_kwargs or {}), "elements": elements,
             "self_energies": self_energies, "energy_scale": float(energy_scale), "stage": stage,
             "energy_weight": energy_weight, "force_weight": force_weight,
             "force_target": force_target, "force_loss": force_loss,
             "variance_floor": variance_floor, "force_warmup_epochs": force_warmup_epochs,
             "lr": lr, "weight_decay": weight_decay, "lr_factor": lr_factor,
             "lr_patience": lr_patience}
        )
        self.model = build_model(model_name, elements, **(model_kwargs or {}))
        self.model.set_energy_statistics(self_energies, energy_scale)
        self.feature_cache = None
        if feature_cache_mb > 0 and hasattr(self.model, "energies_from_features"):
            self.feature_cache = FeatureCache(int(feature_cache_mb * 2**20))
        self.metrics = torch.nn.ModuleDict({
            f"{split}_{quantity}_{kind}": cls()
            for split in ("val", "test") for quantity in ("energy", "force")
            for kind, cls in (("mae", MeanAbsoluteError), ("mse", MeanSquaredError))
        })

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse (CheckpointError) to resume from a checkpoint of another architecture."""
        from .errors import CheckpointError

        saved = dict(checkpoint.get("hyper_parameters", {}))
        saved["model_name"] = canonical_arch(saved.get("model_name", ""))
        keys = ("model_name", "model_kwargs", "elements")
        if any(saved.get(k) != self.hparams.get(k) for k in keys):
            where = getattr(self._trainer, "ckpt_path", None) or "checkpoint"
            raise CheckpointError(
                f"{where}: cannot load a checkpoint of another architecture: it holds "
                f"{ {k: saved.get(k) for k in keys} }, this run builds "
                f"{ {k: self.hparams.get(k) for k in keys} }; use another run directory "
                "(hydra.run.dir) or remove its checkpoints/"
            )

    # ----------------------------------------------------------------- prediction
    def forward(self, batch, create_graph: bool = False, with_forces: bool = True):
        """Energies (n_molecules,) Hartree and forces (n_atoms, 3) Hartree/Å (None if not asked)."""
        pos = batch.pos
        if not with_forces:
            return self.model(batch.z, pos, batch.batch, batch.num_graphs), None
        pos = pos.detach().requires_grad_(True)
        with torch.enable_grad():
            energies = self.model(batch.z, pos, batch.batch, batch.num_graphs)
            (grad,) = torch.autograd.grad(energies.sum(), pos, create_graph=create_graph)
        return energies, -grad

    # ----------------------------------------------------------------- losses
    def current_force_weight(self, final: bool = False) -> float:
        """Force-loss weight of this epoch: ramped linearly over ``force_warmup_epochs`` in
        training; ``final=True`` gives the weight after the ramp (what validation uses)."""
        hp = self.hparams
        if hp.force_target == "none":
            return 0.0
        if hp.force_warmup_epochs > 0 and not final:
            return hp.force_weight * min(1.0, (self.current_epoch + 1) / hp.force_warmup_epochs)
        return hp.force_weight

    def energy_loss(self, energies: Tensor, batch) -> Tensor:
        n_atoms = torch.bincount(batch.batch, minlength=batch.num_graphs).to(energies.dtype)
        squared = ((energies - batch.energy) * KCAL) ** 2 / n_atoms
        if "weight" in batch:  # per-conformation weights (teacher-labelled extra geometries)
            squared = squared * batch.weight.to(squared.dtype)
        return squared.mean().float()

    def force_target(self, batch) -> Tensor:
        return batch.label_forces if self.hparams.force_target == "labels" else batch.forces

    def force_loss(self, forces: Tensor, batch) -> Tensor:
        target = self.force_target(batch)
        squared = ((forces - target) * KCAL) ** 2  # (n_atoms, 3)
        valid = torch.isfinite(squared).all(dim=-1)
        per_atom = torch.where(valid, squared.sum(-1) / 3, torch.zeros_like(squared[:, 0]))
        weights = valid.to(per_atom.dtype)
        if self.hparams.force_loss == "uncertainty":
            variance = torch.nan_to_num(batch.label_force_var * KCAL**2, nan=float("inf"))
            weights = weights / variance.clamp(min=self.hparams.variance_floor)
        norm = weights.sum().clamp(min=1e-12)
        if "weight" in batch:  # per-conformation weights, on top of the mean over atoms
            weights = weights * batch.weight[batch.batch].to(weights.dtype)
        return (weights * per_atom).sum() / norm

    def loss(self, batch, create_graph: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """Total loss, energies and forces (forces None when no force term is needed)."""
        force_weight = self.current_force_weight()
        energies = None
        if force_weight == 0 and self.training and self.feature_cache is not None:
            energies, forces = self.feature_cache.energies(self.model, batch), None
        if energies is None:
            energies, forces = self(batch, create_graph=create_graph, with_forces=force_weight > 0)
        total = self.hparams.energy_weight * self.energy_loss(energies, batch)
        if force_weight > 0:
            total = total + force_weight * self.force_loss(forces, batch)
        return total, energies, forces

    # ----------------------------------------------------------------- steps
    def on_fit_start(self) -> None:
        if self.feature_cache is not None:  # features of another fit's data are not reused
            self.feature_cache.clear()

    def on_fit_end(self) -> None:
        if self.feature_cache is not None:  # the memory goes back before testing, or the next job
            self.feature_cache.clear()

    def training_step(self, batch, batch_idx):
        loss, _, _ = self.loss(batch, create_graph=True)
        self.log("train/loss", loss, batch_size=batch.num_graphs, prog_bar=True, on_epoch=True,
                 on_step=False)
        return loss

    def _evaluate(self, batch, split: str) -> None:
        """Log ``{split}/loss`` with the final force weight (not the warm-up's ramping one), so
        ModelCheckpoint and ReduceLROnPlateau, which watch ``val/loss``, compare the epochs on
        one quantity; and the energy/force metrics."""
        has_reference = "forces" in batch
        force_weight = self.current_force_weight(final=True)
        energies, forces = self(batch, with_forces=has_reference or force_weight > 0)
        loss = self.hparams.energy_weight * self.energy_loss(energies, batch)
        if force_weight > 0:
            loss = loss + force_weight * self.force_loss(forces, batch)
        n = batch.num_graphs
        self.log(f"{split}/loss", loss, batch_size=n, prog_bar=split == "val", sync_dist=True)
        self._update(split, "energy", energies * KCAL, batch.energy * KCAL, n)
        if has_reference:
            self._update(split, "force", forces * KCAL, batch.forces * KCAL, n)

    def _update(self, split: str, quantity: str, pred: Tensor, ref: Tensor, n: int) -> None:
        mae, mse = self.metrics[f"{split}_{quantity}_mae"], self.metrics[f"{split}_{quantity}_mse"]
        mae.update(pred.detach(), ref)
        mse.update(pred.detach(), ref)
        self.log(f"{split}/{quantity}_mae", mae, batch_size=n, prog_bar=quantity == "force")

    def on_validation_epoch_end(self) -> None:
        self._log_rmse("val")

    def on_test_epoch_end(self) -> None:
        self._log_rmse("test")

    def _log_rmse(self, split: str) -> None:
        for quantity in ("energy", "force"):
            mse = self.metrics[f"{split}_{quantity}_mse"]
            if mse.update_called:
                self.log(f"{split}/{quantity}_rmse", mse.compute().sqrt())
                mse.reset()

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=hp.lr_factor, patience=hp.lr_patience
        )
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss"}}
