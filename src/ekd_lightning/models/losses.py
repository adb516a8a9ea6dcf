"""Loss terms: each one object built from a ``_target_`` entry of the config's ``loss`` mapping.

A stage's loss is a mapping ``{term name: term config}`` (``conf/stage/*.yaml``), e.g.
``loss: {energy: {_target_: ekd_lightning.models.losses.EnergyLoss, weight: 1.0}, forces: {...}}``;
the training loss is the sum of ``weight * term(energies, forces, batch)`` over its terms, in
the mapping's order. A null entry is no term (``loss.forces: null``: energy-only training).
Keyed by name, so command lines and sweeps reach one setting: ``loss.forces.weight=1.0``,
``-m loss.forces.weight=0.1,1.0``.

Units: terms are in kcal/mol units (energies in (kcal/mol)² per atom, forces in
(kcal/mol/Å)²); the model predicts Hartree and Hartree/Å, the batch holds Hartree.

To add a term: subclass :class:`LossTerm` (``__call__`` and, if it needs forces or a data file,
``needs_forces``/``target``; ``needs_model``, ``validated`` and ``setup`` for a term that
evaluates the model itself, such as :class:`ekd_lightning.distill.hessian.HessianLoss`) and add
an entry with its ``_target_`` to a stage YAML.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..core.errors import ConfigError
from ..core.units import HARTREE_TO_KCALMOL as KCAL


class LossTerm:
    """One weighted term of the training loss.

    Args:
        weight: its weight in the total loss.
        warmup_epochs: ramp the weight linearly from ``weight / warmup_epochs`` (first epoch)
            to ``weight`` over this many training epochs; 0: constant. Validation (``val/loss``,
            watched by the best checkpoint, early stopping and the LR schedule) always uses
            ``weight``, so that epochs are compared on one quantity.
    """

    needs_forces = False
    """Whether the term needs the predicted forces (and thus a backward pass in the loss)."""
    target: str | None = None
    """The data the term needs beyond energies: ``labels`` (a distilled label file),
    ``reference`` (the dataset's own forces, ``data.force_key``) or None."""
    needs_model = False
    """Whether the term evaluates the model itself (``__call__`` then also gets ``model=``, the
    module's network), e.g. second derivatives (:class:`ekd_lightning.distill.hessian.HessianLoss`)."""
    validated = True
    """Whether ``val/loss`` includes the term; False: a training-only term."""

    def __init__(self, weight: float = 1.0, warmup_epochs: int = 0):
        self.weight = weight
        self.warmup_epochs = int(warmup_epochs)

    def weight_at(self, epoch: int | None) -> float:
        """The weight in training epoch ``epoch`` (0-based); ``None``: the final weight."""
        if self.warmup_epochs > 0 and epoch is not None:
            return self.weight * min(1.0, (epoch + 1) / self.warmup_epochs)
        return self.weight

    def state_dict(self) -> dict:
        """The term's own state beyond its config (e.g. a random generator's), saved in
        checkpoints so that a resumed run continues exactly; default: none."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (on resume)."""

    def setup(self, datamodule) -> None:
        """Read what the term needs from the run's data module (set up) when a fit starts (the
        Lightning module's ``setup`` hook); default: nothing."""

    def __call__(self, energies: Tensor, forces: Tensor | None, batch) -> Tensor:
        """The unweighted term (a scalar) for predicted ``energies`` (n_molecules,) Hartree and
        ``forces`` (n_atoms, 3) Hartree/Å (None unless :attr:`needs_forces`)."""
        raise NotImplementedError


class EnergyLoss(LossTerm):
    """Mean over molecules of ((E_pred - E_ref) in kcal/mol)² / n_atoms."""

    def __call__(self, energies: Tensor, forces: Tensor | None, batch) -> Tensor:
        n_atoms = torch.bincount(batch.batch, minlength=batch.num_graphs).to(energies.dtype)
        squared = ((energies - batch.energy) * KCAL) ** 2 / n_atoms
        if "weight" in batch:  # per-conformation weights (teacher-labelled extra geometries)
            squared = squared * batch.weight.to(squared.dtype)
        return squared.mean().float()


class ForceLoss(LossTerm):
    """Mean squared error per force component, (kcal/mol/Å)², over the atoms with a finite target.

    Args:
        target: ``labels`` (the distilled ensemble-mean forces, ``batch.label_forces``: the
            student) or ``reference`` (the dataset's forces, ``batch.forces``: the oracle).
        weight, warmup_epochs: see :class:`LossTerm`.
        weighting: ``uniform``, or ``inverse_variance``: each atom weighted by the inverse of
            the teachers' force variance (``batch.label_force_var``, mean over components),
            floored at ``variance_floor`` (kcal/mol/Å)²: the term is then the weighted mean over
            the batch's atoms.
    """

    needs_forces = True
    TARGETS = {"labels": "label_forces", "reference": "forces"}
    WEIGHTINGS = ("uniform", "inverse_variance")

    def __init__(self, target: str, weight: float = 1.0, warmup_epochs: int = 0,
                 weighting: str = "uniform", variance_floor: float = 1.0):
        super().__init__(weight, warmup_epochs)
        if target not in self.TARGETS:
            raise ConfigError(f"loss.forces.target={target!r}: use one of {sorted(self.TARGETS)}")
        if weighting not in self.WEIGHTINGS:
            raise ConfigError(f"loss.forces.weighting={weighting!r}: use one of {list(self.WEIGHTINGS)}")
        self.target = target
        self.weighting = weighting
        self.variance_floor = variance_floor

    def __call__(self, energies: Tensor, forces: Tensor | None, batch) -> Tensor:
        reference = getattr(batch, self.TARGETS[self.target])
        squared = ((forces - reference) * KCAL) ** 2  # (n_atoms, 3)
        valid = torch.isfinite(squared).all(dim=-1)
        per_atom = torch.where(valid, squared.sum(-1) / 3, torch.zeros_like(squared[:, 0]))
        weights = valid.to(per_atom.dtype)
        if self.weighting == "inverse_variance":
            variance = torch.nan_to_num(batch.label_force_var * KCAL**2, nan=float("inf"))
            weights = weights / variance.clamp(min=self.variance_floor)
        norm = weights.sum().clamp(min=1e-12)
        if "weight" in batch:  # per-conformation weights, on top of the mean over atoms
            weights = weights * batch.weight[batch.batch].to(weights.dtype)
        return (weights * per_atom).sum() / norm


RENAMED_KEYS = {
    "loss.energy_weight": "loss.energy.weight", "loss.force_weight": "loss.forces.weight",
    "loss.force_target": "stage=student|oracle (loss.forces.target=labels|reference)",
    "loss.force_loss": "loss.forces.weighting=uniform|inverse_variance",
    "loss.variance_floor": "loss.forces.variance_floor",
    "loss.force_warmup_epochs": "loss.forces.warmup_epochs",
    "distill.force_loss": "loss.forces.weighting=uniform|inverse_variance",
    "model.arch": "model._target_ (the model class, e.g. ekd_lightning.models.ani.ANIModel)",
    "model.kwargs": "model.<argument> (a model's arguments sit beside its _target_)",
}
"""Config keys of the layout before configs instantiated objects, and their replacements."""


def renamed_key(key: str) -> str | None:
    """Why a dotted config key (``loss.force_weight``, ``model.kwargs.hidden``) is no longer
    valid: ``"<key> was replaced by <new>"``; None for a valid key."""
    for old, new in RENAMED_KEYS.items():
        if key == old or key.startswith(old + "."):
            return f"{key} was replaced by {new}"
    return None


def build_loss_terms(spec: Mapping | None) -> dict[str, LossTerm]:
    """The terms of a ``loss`` mapping ``{name: {_target_: a LossTerm class, **kwargs}}`` (null
    entries skipped), built with :func:`hydra.utils.instantiate`; ConfigError for an entry that
    is not a term (a key of the flat layout before terms, such as ``loss.force_weight``, names
    its replacement)."""
    from ..core.instantiate import instantiate_checked

    terms = {}
    for name, entry in (spec or {}).items():
        if (renamed := renamed_key(f"loss.{name}")) is not None:
            raise ConfigError(renamed)
        if entry is not None:
            terms[name] = instantiate_checked(entry, LossTerm, f"loss.{name}")
    return terms


def loss_targets(spec: Mapping | None) -> set[str]:
    """The data targets (``labels``, ``reference``) that a ``loss`` mapping's terms name,
    read from the config alone (no instantiation): what the data module and the run's config
    hash need to know."""
    return {entry.get("target") for entry in (spec or {}).values()
            if isinstance(entry, Mapping) and entry.get("target")}


def loss_file(spec: Mapping | None) -> str | None:
    """The data file that a term of a ``loss`` mapping reads itself (its ``labels`` argument:
    :class:`~ekd_lightning.distill.hessian.HessianLoss`'s HVP labels), or None; read from the
    config alone, for the run's provenance and reuse checks."""
    return next((entry["labels"] for entry in (spec or {}).values()
                 if isinstance(entry, Mapping) and entry.get("labels")), None)
