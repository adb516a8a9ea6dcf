"""Worked example (docs/using-a-trained-model.md): a trained model in the MD engines.

    python docs/examples/water_box_md.py runs/student-ani2x-seed0/checkpoints/best.ckpt --out md_example

1. ``ekd-export`` writes the metatomic model ``<out>/model.pt`` (also the LAMMPS input's model);
2. ASE (metatomic-ase) on a periodic box of 32 waters (9.86 Å, 1 g/cm³) and on ethanol solvated
   in it gives the energies and forces EKDCalculator gives (printed side by side);
3. torch-sim runs both boxes in one batch: Langevin NVT at 300 K, 0.5 fs steps, then NVE,
   printing each system's temperature and the total-energy drift of the NVE part;
4. ``<out>/water.data`` is the water box as a LAMMPS data file for the LAMMPS input.

Needs ``pip install 'ekd-lightning[engines]'`` (metatomic-torch, metatomic-ase, torch-sim 0.3).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.build import molecule


def water_box(n: int = 32, side: float = 9.86, seed: int = 0) -> Atoms:
    """``n`` waters at random orientations on a cubic grid in a periodic cube of ``side`` Å."""
    rng = np.random.default_rng(seed)
    per_side = int(np.ceil(n ** (1 / 3)))
    box = Atoms(cell=[side] * 3, pbc=True)
    for point in list(np.ndindex(per_side, per_side, per_side))[:n]:
        water = molecule("H2O")
        water.rotate(rng.uniform(0, 360), "z")
        water.rotate(rng.uniform(0, 360), "x")
        water.positions += (np.array(point) + 0.5) * side / per_side
        box += water
    return box


def solvated_ethanol(seed: int = 1) -> Atoms:
    """Ethanol at the centre of the water box, the waters within 2.5 Å of it removed."""
    box = water_box(seed=seed)
    ethanol = molecule("CH3CH2OH")
    ethanol.positions += box.cell.diagonal() / 2
    centres = box.positions[::3]  # the oxygens
    close = np.linalg.norm(centres[:, None] - ethanol.positions[None], axis=-1).min(1) < 2.5
    keep = np.repeat(~close, 3)
    return box[keep] + ethanol


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--out", default="md_example")
    parser.add_argument("--steps", type=int, default=400, help="NVT steps, then as many NVE")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_default_dtype(torch.float64)

    from ekd_lightning import EKDCalculator
    from ekd_lightning.inference.export import main as export

    assert export([args.checkpoint, str(out / "model.pt")]) == 0

    from metatomic_ase import MetatomicCalculator

    systems = {"water box": water_box(), "solvated ethanol": solvated_ethanol()}
    reference, engine = EKDCalculator.from_checkpoint(args.checkpoint), MetatomicCalculator(out / "model.pt")
    for name, atoms in systems.items():
        ours, theirs = atoms.copy(), atoms.copy()
        ours.calc, theirs.calc = engine, reference
        print(f"{name}: {len(atoms)} atoms, metatomic-ase {ours.get_potential_energy():.6f} eV, "
              f"EKDCalculator {theirs.get_potential_energy():.6f} eV, largest force difference "
              f"{np.abs(ours.get_forces() - theirs.get_forces()).max():.1e} eV/Å")

    import ase.io
    import torch_sim as ts
    from torch_sim.units import MetalUnits

    from ekd_lightning.inference.torchsim_model import EKDTorchSimModel

    ase.io.write(out / "water.data", systems["water box"], format="lammps-data", masses=True,
                 specorder=["H", "O"])
    model = EKDTorchSimModel(args.checkpoint)
    dt = torch.tensor(0.0005 * MetalUnits.time)
    kT = torch.tensor(300 * MetalUnits.temperature)
    init, step = ts.nvt_langevin(model=model, dt=dt, kT=kT, seed=0)
    state = init(ts.initialize_state(list(systems.values()), model.device, model.dtype))
    for _ in range(args.steps):
        state = step(state, kT=kT)
    temperature = ts.calc_kT(masses=state.masses, momenta=state.momenta,
                             system_idx=state.system_idx) / MetalUnits.temperature
    print(f"after {args.steps} NVT steps (0.5 fs, 300 K): T = "
          + ", ".join(f"{t:.0f} K" for t in temperature.tolist()))
    _, nve = ts.nve(model=model, dt=dt, kT=kT)

    def total(s):
        return s.energy + ts.calc_kinetic_energy(masses=s.masses, momenta=s.momenta,
                                                 system_idx=s.system_idx)

    start = total(state)
    for _ in range(args.steps):
        state = nve(state)
    drift = (total(state) - start) / torch.bincount(state.system_idx)
    print(f"then {args.steps} NVE steps: total-energy drift per atom "
          + ", ".join(f"{d * 1000:+.3f} meV" for d in drift.tolist()))


if __name__ == "__main__":
    main()
