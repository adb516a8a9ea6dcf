"""The force loss's weightings (issue 28): with ``inverse_variance``, an atom where the teachers
disagree (large ``label_force_var``) weighs less than one where they agree, by exactly the ratio
of the floored variances; ``uniform`` weighs every atom alike; per-conformation weights scale
their conformations' atoms."""

from __future__ import annotations

import pytest
import torch
from torch_geometric.data import Batch

from ekd_lightning.losses import ForceLoss
from ekd_lightning.units import HARTREE_TO_KCALMOL as KCAL

AGREE, DISAGREE = 2.0, 50.0
"""The teachers' force variance (kcal/mol/Å)² of the two atoms: both above the floor (1.0)."""


def two_atoms(wrong: int, conformation_weight: list[float] | None = None) -> tuple[torch.Tensor, Batch]:
    """Predicted forces (2, 3) Hartree/Å and a batch of one two-atom conformation whose labels
    are zero but for atom ``wrong``'s predicted force, off by 1 kcal/mol/Å per component."""
    forces = torch.zeros(2, 3, dtype=torch.float64)
    forces[wrong] = 1.0 / KCAL
    var = torch.tensor([AGREE, DISAGREE], dtype=torch.float64) / KCAL**2  # (n_atoms,) Hartree²/Å²
    batch = Batch(label_forces=torch.zeros(2, 3, dtype=torch.float64), label_force_var=var,
                  batch=torch.zeros(2, dtype=torch.long))
    batch._num_graphs = 1
    if conformation_weight is not None:
        batch.weight = torch.tensor(conformation_weight, dtype=torch.float64)
    return forces, batch


def loss(weighting: str, wrong: int, **kwargs) -> float:
    term = ForceLoss("labels", weighting=weighting, variance_floor=1.0)
    forces, batch = two_atoms(wrong, **kwargs)
    return float(term(None, forces, batch))


def test_inverse_variance_weighs_atoms_where_teachers_disagree_less():
    on_agreed, on_disputed = loss("inverse_variance", 0), loss("inverse_variance", 1)
    norm = 1 / AGREE + 1 / DISAGREE
    assert on_agreed == pytest.approx((1 / AGREE) / norm, rel=1e-12)
    assert on_disputed == pytest.approx((1 / DISAGREE) / norm, rel=1e-12)
    assert on_agreed / on_disputed == pytest.approx(DISAGREE / AGREE, rel=1e-12)


def test_variance_floor_caps_the_weight_of_confident_atoms():
    term = ForceLoss("labels", weighting="inverse_variance", variance_floor=DISAGREE)
    forces, batch = two_atoms(0)
    assert float(term(None, forces, batch)) == pytest.approx(0.5, rel=1e-12)  # both floored alike


def test_uniform_weighs_every_atom_alike():
    assert loss("uniform", 0) == loss("uniform", 1) == pytest.approx(0.5, rel=1e-12)


def test_conformation_weight_scales_its_atoms():
    assert loss("uniform", 0, conformation_weight=[0.25]) == pytest.approx(0.125, rel=1e-12)
