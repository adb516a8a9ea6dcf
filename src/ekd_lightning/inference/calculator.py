"""The public ASE calculator of a trained potential, or of an ensemble of them.

>>> calc = EKDCalculator.from_checkpoint("runs/student-ani2x-seed0/checkpoints/best.ckpt")
>>> calc = EKDCalculator.from_checkpoints(["a.ckpt", "b.ckpt"])  # mean, plus the spread

ASE units: energies in eV, forces in eV/Å (the models work in Hartree and Å). Periodic cells
(``atoms.pbc`` along any axis) get their pairs with periodic images from vesin's neighbour list
(:func:`~ekd_lightning.models.neighbors.periodic_pairs`). An ensemble gives
the members' mean energy and forces, and their spread in ``calc.results``: ``energy_std`` (eV)
and ``forces_std`` (n_atoms, 3) eV/Å, standard deviations over the members (ddof=0, as the
distilled label files store them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch
from ase.calculators.calculator import Calculator, all_changes

from ..core.errors import DataError
from ..core.units import HARTREE_TO_EV
from ..data.readers import MIN_DISTANCE, closest_pair
from ..models.neighbors import periodic_pairs
from .members import load_members, member_outputs


def check_structure(atoms, where: str = "EKDCalculator") -> None:
    """DataError when two atoms of ``atoms`` are closer than the distance below which training
    refuses a conformation (:data:`~ekd_lightning.data.readers.MIN_DISTANCE`, 0.1 Å): the
    model's energy and forces there are meaningless (e.g. 3e7 eV/Å for an H on an O). In a
    periodic cell the distances include the periodic images (an atom on another's image)."""
    if (pair := closest_pair(atoms.positions, atoms.cell.array, atoms.pbc)) is not None:
        i, j, distance = pair
        symbols = atoms.get_chemical_symbols()
        image = " (through the periodic cell)" if atoms.pbc.any() else ""
        raise DataError(
            f"{where}: atoms {i} ({symbols[i]}) and {j} ({symbols[j]}) are {distance:.3f} Å "
            f"apart{image} (below {MIN_DISTANCE} Å: a duplicated atom?); fix the geometry")


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Temporarily run torch on ``n`` threads (None: leave as is). One thread is fastest for a
    single small molecule, and avoids oversubscribing shared cores."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class EKDCalculator(Calculator):
    """ASE calculator for a trained potential (energy in eV, forces in eV/Å).

    Args:
        model: a checkpoint path, a :class:`~ekd_lightning.task.module.PotentialModule` (or its
            ``.model``), or a sequence of them (an ensemble: mean energy and forces, and with
            two or more members ``energy_std`` and ``forces_std`` in ``results``).
        device: torch device of the computation.
        dtype: the model is evaluated in this precision on a private copy (float64 by default,
            so that forces are the exact gradient of a smooth energy: finite differences and NVE
            runs are not limited by float32 rounding); the caller's module is left untouched.
        num_threads: torch threads during each calculation (None: leave torch's setting); one
            thread is fastest for a single small molecule on CPU.

    Periodic cells: the pairs come with their periodic images (vesin); energies and forces of
    the whole cell.
    """

    implemented_properties = ["energy", "free_energy", "forces", "energy_std", "forces_std"]

    def __init__(self, model, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64,
                 num_threads: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.num_threads = num_threads
        self.device, self.dtype = torch.device(device), dtype
        self.members = load_members(model, dtype, self.device)

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs) -> EKDCalculator:
        """The calculator of one ``.ckpt`` written by training (CheckpointError if unusable);
        ``kwargs`` as in the constructor."""
        return cls(Path(path), **kwargs)

    @classmethod
    def from_checkpoints(cls, sources: Sequence[str | Path] | str | Path, **kwargs) -> EKDCalculator:
        """The calculator of an ensemble, given as distillation takes its teachers: checkpoint
        files, folders (every run's ``best.ckpt`` under them) or published ensembles
        (``torchani_ani2x``, needs the ``[ani]`` extra); see
        :mod:`ekd_lightning.inference.teachers`. ``kwargs`` as in the constructor."""
        from .teachers import load_teachers, resolve_teachers

        spec = [str(s) for s in sources] if isinstance(sources, Sequence) and not isinstance(
            sources, str) else str(sources)
        return cls(load_teachers(resolve_teachers(spec)), **kwargs)

    @property
    def elements(self) -> list[str]:
        """Element symbols every member knows (a structure may hold only these)."""
        known = [e for e in self.members[0].elements
                 if all(e in m.elements for m in self.members[1:])]
        return known

    def periodic_pairs(self, pos: torch.Tensor, batch: torch.Tensor):
        """The neighbour list with periodic images of ``self.atoms`` within the largest
        member's cutoff (Å)."""
        cell = torch.tensor(self.atoms.cell.array, dtype=self.dtype, device=self.device)
        pbc = torch.tensor(self.atoms.pbc, device=self.device)
        cutoff = max(float(m.cutoff) for m in self.members)
        return periodic_pairs(pos, batch, cell[None], pbc[None], cutoff)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        if "numbers" in system_changes:  # a new structure (not a step of a trajectory)
            check_structure(self.atoms)
        z = torch.as_tensor(self.atoms.numbers, dtype=torch.long, device=self.device)
        pos = torch.tensor(self.atoms.positions, dtype=self.dtype, device=self.device)
        batch = torch.zeros(len(z), dtype=torch.long, device=self.device)
        pairs = self.periodic_pairs(pos, batch) if self.atoms.pbc.any() else None
        with torch_threads(self.num_threads):
            energies, forces = zip(*member_outputs(self.members, z, pos, batch, 1, pairs), strict=True)
        energies = torch.cat(energies) * HARTREE_TO_EV  # (members,) eV
        forces = torch.stack(forces).cpu() * HARTREE_TO_EV  # (members, n_atoms, 3) eV/Å
        self.results["energy"] = self.results["free_energy"] = float(energies.mean())
        self.results["forces"] = forces.mean(0).numpy()
        if len(self.members) > 1:
            self.results["energy_std"] = float(energies.std(correction=0))
            self.results["forces_std"] = forces.std(0, correction=0).numpy()
