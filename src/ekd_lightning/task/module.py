"""The Lightning module shared by every stage (teacher, baseline, student, oracle).

Stages differ only in their loss terms (:mod:`ekd_lightning.models.losses`, ``conf/stage/*.yaml``):
the energy term alone (teacher, baseline), plus a force term on distilled labels (student) or
on reference forces (oracle). Losses are in kcal/mol units: the energy term is the mean of
((E_pred - E_ref) / sqrt(n_atoms))², the force term the mean squared error per force
component in (kcal/mol/Å)². Metrics are logged in kcal/mol and
kcal/mol/Å: ``{split}/energy_mae|energy_rmse`` and, when the data has reference forces,
``{split}/force_mae|force_rmse`` (per component, against the reference forces, never the labels).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor
from torchmetrics import MeanAbsoluteError, MeanSquaredError

from ..core.units import HARTREE_TO_KCALMOL as KCAL
from ..models import instantiate_model, legacy_model_config, model_arguments
from ..models.losses import build_loss_terms

log = logging.getLogger(__name__)

ENERGY_ONLY = {"_target_": "ekd_lightning.models.losses.EnergyLoss", "weight": 1.0}
"""The energy term of every stage (``conf/stage/*.yaml``: ``loss.energy``)."""


def _plain(value: Mapping) -> dict:
    """A config (DictConfig or mapping) as plain, resolved Python containers (a copy)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.create(value), resolve=True)


def upgrade_hparams(hparams: Mapping) -> dict:
    """The hyperparameters of a checkpoint in today's layout (``model``: the model config,
    ``loss``: the loss terms). Checkpoints of the previous layout store ``model_name`` (the
    architecture: ``ani``, ``schnet``; ``ani2x`` in 0.1.0), ``model_kwargs`` and flat loss
    keys (``energy_weight``, ``force_weight``, ``force_target``: ``none``/``labels``/
    ``reference``, ``force_loss``: ``mse``/``uncertainty``, ``variance_floor``,
    ``force_warmup_epochs``); they load with the same model and the same loss."""
    hparams = dict(hparams)
    if "model_name" not in hparams:
        return hparams
    model = legacy_model_config(hparams.pop("model_name"), hparams.pop("model_kwargs", None))
    old = {k: hparams.pop(k) for k in ("energy_weight", "force_weight", "force_target", "force_loss",
                                       "variance_floor", "force_warmup_epochs") if k in hparams}
    loss = {"energy": {**ENERGY_ONLY, "weight": old.get("energy_weight", 1.0)}, "forces": None}
    if old.get("force_target", "none") != "none":
        loss["forces"] = {
            "_target_": "ekd_lightning.models.losses.ForceLoss", "target": old["force_target"],
            "weight": old.get("force_weight", 0.0),
            "warmup_epochs": old.get("force_warmup_epochs", 0),
            "weighting": "inverse_variance" if old.get("force_loss") == "uncertainty" else "uniform",
            "variance_floor": old.get("variance_floor", 1.0)}
    return {**hparams, "model": model, "loss": loss}


class FeatureCache:
    """Model input features (ANI AEVs) of training conformations, kept across epochs.

    In energy-only training (teacher, baseline) positions never change, so each conformation's
    features are computed once and reused: the AEV is about 40% of an ``ani2x`` energy-only
    step (``benchmarks/README.md``). :meth:`fill` computes them before the first training epoch
    of a fit in fixed batches of the training split in stored order (never in the shuffled
    batches of an epoch), so the held values depend on the data and the batch size only: a run
    resumed from ``last.ckpt`` holds the same bits as the uninterrupted run, and reaches the
    same weights. Energies from held features equal those from positions to float32 rounding
    (an AEV computed within another batch can differ in its last bit). A model with a repulsion
    prior has the prior's energy of each conformation held beside its features (computed at
    every step, it cost 1.12x the step without a prior; held, 0.98x:
    ``benchmarks/bench_prior_cache.py``). Keyed by conformation
    (``batch.mol``, ``batch.conf``); rows are packed into slabs of ``SLAB_BYTES`` (large
    allocations, handed back to the system when :meth:`clear` frees them); at most
    ``max_bytes`` are held (the first conformations in stored order), after which batches with
    a conformation not held take the usual path (:meth:`energies` returns None).
    """

    SLAB_BYTES = 16 * 2**20

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.clear()

    def clear(self) -> None:
        self.slabs: list[Tensor] = []
        self.rows: dict[tuple[int, int], Tensor] = {}  # views into the slabs
        self.priors: dict[tuple[int, int], Tensor | None] = {}  # () Hartree, None: no prior
        self.used = 0  # rows used in the last slab
        self.nbytes = 0  # bytes of the slabs
        self.full = False
        self.filled = False

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

    def fill(self, model, split, batch_size: int, device: torch.device | str = "cpu") -> None:
        """Compute and hold the features of ``split`` (a map-style dataset whose
        ``__getitems__`` returns a batch, :class:`~ekd_lightning.data.packed.PackedSplit`) in
        batches of ``batch_size`` in stored order, until ``max_bytes`` is reached. Draws no
        random numbers (no DataLoader), so the run's random stream is unchanged."""
        self.clear()
        self.filled = True
        for lo in range(0, len(split), batch_size):
            batch = split.__getitems__(range(lo, min(lo + batch_size, len(split)))).to(device)
            features = model.features(batch.z, batch.pos, batch.batch)
            sizes = torch.bincount(batch.batch, minlength=batch.num_graphs).tolist()
            keys = zip(batch.mol.tolist(), batch.conf.tolist(), strict=True)
            priors = [None] * batch.num_graphs
            if model.repulsion is not None:
                with torch.no_grad():
                    priors = model.prior_energies(model.species(batch.z), batch.pos, batch.batch,
                                                  batch.num_graphs)
            for key, rows, prior in zip(keys, features.split(sizes), priors, strict=True):
                if (copy := self._hold(rows)) is None:
                    self.full = True
                    return
                self.rows[key] = copy
                self.priors[key] = prior

    def energies(self, model, batch) -> Tensor | None:
        """Energies (n_molecules,) Hartree of ``batch`` from held features; None when a
        conformation of the batch is not held (not filled yet, or the cache is full)."""
        keys = list(zip(batch.mol.tolist(), batch.conf.tolist(), strict=True))
        held = [self.rows.get(key) for key in keys]
        if not held or any(rows is None for rows in held):
            return None
        features = torch.cat(held)
        priors = None
        if model.repulsion is not None:
            priors = torch.stack([self.priors[key] for key in keys])
        return model.energies_from_features(batch.z, features, batch.batch, batch.num_graphs,
                                            priors)


class PotentialModule(pl.LightningModule):
    """An MLIP with its training recipe; the checkpoint holds everything needed to rebuild it.

    Args:
        model: the model config: ``_target_`` (the model class) and its keyword arguments
            (sizes, cutoffs), plus ``name`` (a ``conf/model`` file's, kept for provenance);
            built by :func:`ekd_lightning.models.instantiate_model`.
        elements: element symbols.
        self_energies: SAE per element (Hartree), fitted on the training split.
        energy_scale: residual energy spread per atom (Hartree).
        stage: ``teacher``, ``baseline``, ``student`` or ``oracle`` (recorded for provenance).
        loss: the loss terms, ``{name: {_target_: a LossTerm class, **kwargs}}``
            (:mod:`ekd_lightning.models.losses`; null entries skipped); default: the energy term alone.
        lr, weight_decay, lr_factor, lr_patience: AdamW and ReduceLROnPlateau on ``val/loss``.
        lr_cycle_epochs: instead of ReduceLROnPlateau, cosine annealing from ``lr`` to 0 over
            cycles of this many epochs, restarted at ``lr`` after each (Loshchilov & Hutter's
            warm restarts): the schedule of snapshot ensembles (Huang et al., ICLR 2017), whose
            members are the weights at the end of each cycle (``training``'s snapshot
            checkpoints). None: ReduceLROnPlateau.
        feature_cache_mb: keep the input features of training conformations across epochs
            while no term needs forces (:class:`FeatureCache`), up to this many MiB; 0: off.
            Not a hyperparameter saved in checkpoints: it changes speed and memory, and the
            result only through float32 rounding (kept in the config hash, so that a run in the
            store is reproduced bit for bit).
        compile: while training on energies alone, run the model's heaviest block compiled
            (:meth:`~ekd_lightning.models.base.AtomisticModel.compile_for_training`; ViSNet's
            representation); evaluation stays eager. Not a hyperparameter saved in checkpoints
            either (the weights are the same modules); a force-trained fit stays eager
            (compiled graphs have no double backward).

    Checkpoints of the previous layout (``model_name``/``model_kwargs`` and flat loss keys) are
    read through :func:`upgrade_hparams`.
    """

    def __init__(
        self,
        model: Mapping,
        elements: Sequence[str] = ("H", "C", "N", "O"),
        self_energies: Sequence[float] | None = None,
        energy_scale: float = 1.0,
        stage: str = "teacher",
        loss: Mapping | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        lr_factor: float = 0.5,
        lr_patience: int = 5,
        lr_cycle_epochs: int | None = None,
        feature_cache_mb: float = 0.0,
        compile: bool = False,
    ):
        super().__init__()
        elements = list(elements)
        self_energies = [0.0] * len(elements) if self_energies is None else [float(e) for e in self_energies]
        loss = _plain(loss) if loss is not None else {"energy": dict(ENERGY_ONLY)}
        self.loss_terms = build_loss_terms(loss)
        self.save_hyperparameters(
            {"model": _plain(model), "elements": elements, "self_energies": self_energies,
             "energy_scale": float(energy_scale), "stage": stage, "loss": loss,
             "lr": lr, "weight_decay": weight_decay, "lr_factor": lr_factor,
             "lr_patience": lr_patience, "lr_cycle_epochs": lr_cycle_epochs}
        )
        self.model = instantiate_model(model, elements)
        self.model.set_energy_statistics(self_energies, energy_scale)
        self.compile_training = bool(compile)
        self.feature_cache = None
        if feature_cache_mb > 0 and hasattr(self.model, "energies_from_features"):
            self.feature_cache = FeatureCache(int(feature_cache_mb * 2**20))
        self.metrics = torch.nn.ModuleDict({
            f"{split}_{quantity}_{kind}": cls()
            for split in ("val", "test") for quantity in ("energy", "force")
            for kind, cls in (("mae", MeanAbsoluteError), ("mse", MeanSquaredError))
        })

    @property
    def model_name(self) -> str:
        """The model config's ``name`` (``ani2x``, ``schnet_small``, ...), else the model class's
        name (checkpoints of the previous layout): how label files and exports name the model."""
        return self.hparams.model.get("name") or type(self.model).__name__

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Save the loss terms' own state (e.g. a random generator) for an exact resume."""
        states = {name: state for name, term in self.loss_terms.items() if (state := term.state_dict())}
        if states:
            checkpoint["loss_term_states"] = states

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse (CheckpointError) to resume from a checkpoint of another model; restore the
        loss terms' state."""
        from ..core.errors import CheckpointError

        saved = upgrade_hparams(checkpoint.get("hyper_parameters", {}))
        if (model_arguments(saved.get("model") or {}), saved.get("elements")) != (
                model_arguments(self.hparams.model), self.hparams.elements):
            where = getattr(self._trainer, "ckpt_path", None) or "checkpoint"
            raise CheckpointError(
                f"{where}: cannot load a checkpoint of another model: it holds "
                f"{model_arguments(saved.get('model') or {})} for {saved.get('elements')}, this "
                f"run builds {model_arguments(self.hparams.model)} for {self.hparams.elements}; "
                "use another run directory (hydra.run.dir) or remove its checkpoints/"
            )
        for name, state in checkpoint.get("loss_term_states", {}).items():
            if name in self.loss_terms:
                self.loss_terms[name].load_state_dict(state)

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
    def term_weights(self, final: bool = False) -> dict[str, float]:
        """The weight of each loss term in this training epoch (warm-ups ramping);
        ``final=True``: the weights after every warm-up (what validation uses; 0 for a
        training-only term)."""
        epoch = None if final else self.current_epoch
        return {name: term.weight_at(epoch) if term.validated or not final else 0.0
                for name, term in self.loss_terms.items()}

    def needs_forces(self, weights: Mapping[str, float]) -> bool:
        """Whether a term with a non-zero weight needs the predicted forces."""
        return any(self.loss_terms[name].needs_forces for name, w in weights.items() if w != 0)

    def weighted_loss(self, weights: Mapping[str, float], energies: Tensor, forces: Tensor | None,
                      batch) -> Tensor:
        """The sum of ``weight * term`` over the terms with a non-zero weight, in order."""
        total = None
        for name, weight in weights.items():
            if weight != 0:
                term = self.loss_terms[name]
                extra = {"model": self.model} if term.needs_model else {}
                value = weight * term(energies, forces, batch, **extra)
                total = value if total is None else total + value
        return total if total is not None else 0.0 * energies.sum()

    def loss(self, batch, create_graph: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """Training loss, energies and forces (forces None when no term needs them)."""
        weights = self.term_weights()
        with_forces = self.needs_forces(weights)
        energies = None
        if not with_forces and self.training and self.feature_cache is not None:
            energies, forces = self.feature_cache.energies(self.model, batch), None
        if energies is None:
            energies, forces = self(batch, create_graph=create_graph, with_forces=with_forces)
        return self.weighted_loss(weights, energies, forces, batch), energies, forces

    # ----------------------------------------------------------------- steps
    def setup(self, stage: str) -> None:
        """When a fit starts, each loss term reads what it needs from the data module."""
        if stage == "fit":
            for term in self.loss_terms.values():
                term.setup(self.trainer.datamodule)

    def on_fit_start(self) -> None:
        if self.feature_cache is not None:  # features of another fit's data are not reused
            self.feature_cache.clear()
        if self.compile_training:
            if any(term.needs_forces or term.needs_model for term in self.loss_terms.values()):
                log.warning("compile=true: this fit trains on forces (a double backward, which "
                            "compiled graphs lack); it runs eager")
            elif not self.model.compile_for_training():
                log.info("compile=true: %s compiles nothing (measured to pay for ViSNet only)",
                         type(self.model).__name__)

    def on_train_epoch_start(self) -> None:
        """Fill the feature cache (once per fit, :meth:`FeatureCache.fill`) before the first
        epoch that trains on energies alone, from the training loader's dataset."""
        cache = self.feature_cache
        if cache is None or cache.filled or self.needs_forces(self.term_weights()):
            return
        loader = self.trainer.train_dataloader
        split = getattr(loader, "dataset", None)
        if split is None or not hasattr(split, "__getitems__") or not loader.batch_size:
            cache.filled = True  # not a packed split: every batch takes the usual path
            return
        cache.fill(self.model, split, loader.batch_size, self.device)

    def on_fit_end(self) -> None:
        if self.feature_cache is not None:  # the memory goes back before testing, or the next job
            self.feature_cache.clear()

    def training_step(self, batch, batch_idx):
        loss, _, _ = self.loss(batch, create_graph=True)
        self.log("train/loss", loss, batch_size=batch.num_graphs, prog_bar=True, on_epoch=True,
                 on_step=False)
        return loss

    def _evaluate(self, batch, split: str) -> None:
        """Log ``{split}/loss`` with the final weights (not a warm-up's ramping ones), so
        ModelCheckpoint and ReduceLROnPlateau, which watch ``val/loss``, compare the epochs on
        one quantity; and the energy/force metrics."""
        has_reference = "forces" in batch
        weights = self.term_weights(final=True)
        energies, forces = self(batch, with_forces=has_reference or self.needs_forces(weights))
        loss = self.weighted_loss(weights, energies, forces, batch)
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
        if hp.get("lr_cycle_epochs"):
            cycles = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
                optimizer, T_0=int(hp.lr_cycle_epochs))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cycles, "interval": "epoch"}}
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=hp.lr_factor, patience=hp.lr_patience
        )
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss"}}
