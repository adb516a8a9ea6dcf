"""X-H bond-stretch scans of trained checkpoints against GFN2-xTB: why hot MD fails.

For every X-H bond of the given ASE g2 molecules, the H is moved out along its bond by
d = 0 .. ``--max-stretch`` Å and E(d) − E(0) (kcal/mol) is computed by each model and by
GFN2-xTB (tblite). A model whose curve turns over has a spurious dissociation barrier: its top
(the highest E(d) of the scan) and where it lies are printed per bond and summarised per model
(mean and lowest barrier over bonds). The MD benchmark's failure criterion (a bond 0.5 Å off
its initial length) sits at these barriers. It first prints how far the training data
stretch their X-H bonds (``--data``, default the bundled training file): the models have seen
nothing beyond that. The MD benchmark reports the same barriers per molecule
(``--barriers``, :func:`ekd_lightning.analysis.md_reference.stretch_barriers`).

    python benchmarks/bond_stretch_scan.py --checkpoints student=A.ckpt baseline=B.ckpt \
        teachers=T1.ckpt,T2.ckpt,T3.ckpt   # comma-separated: the ensemble mean
"""

from __future__ import annotations

import argparse

import numpy as np
from ase.build import molecule

from ekd_lightning.analysis.evaluate import parse_named
from ekd_lightning.analysis.md_reference import reference_calculator, stretch_curve, xh_bonds
from ekd_lightning.bundled import DATA_DIR
from ekd_lightning.data.readers import read_molecules
from ekd_lightning.inference.calculator import EKDCalculator


def data_stretches(path: str, energy_key: str) -> np.ndarray:
    """X-H bond lengths minus each bond's median length (Å) over every conformation of an
    HDF5 dataset, bonds taken from each molecule's first conformation: (n_bonds × n_conf,)."""
    from ase import Atoms

    stretches = []
    for record in read_molecules(path, energy_key)[0]:
        bonds = xh_bonds(Atoms(numbers=record.atomic_numbers, positions=record.coordinates[0]))
        for heavy, hydrogen in bonds:
            length = np.linalg.norm(record.coordinates[:, hydrogen] - record.coordinates[:, heavy], axis=-1)
            stretches.append(length - np.median(length))
    return np.concatenate(stretches)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoints", nargs="+", required=True, metavar="[NAME=]CKPT")
    parser.add_argument("--molecules", nargs="+", default=["CH3OH", "CH3CH2OH", "CH3CHO", "CH3CONH2"])
    parser.add_argument("--max-stretch", type=float, default=1.0, help="Å")
    parser.add_argument("--step", type=float, default=0.05, help="Å")
    parser.add_argument("--data", default=str(DATA_DIR / "xtb_train.h5"), help="training HDF5 file")
    parser.add_argument("--energy-key", default="gfn2_xtb.energy")
    args = parser.parse_args(argv)
    seen = data_stretches(args.data, args.energy_key)
    print(f"{args.data}: X-H bonds stretched beyond their median length by at most {seen.max():.2f} Å "
          f"(99.9%: {np.percentile(seen, 99.9):.2f} Å) over {seen.size} bond conformations")
    calcs = {name: EKDCalculator.from_checkpoints(paths.split(","))  # a,b,...: their ensemble mean
             for name, paths in parse_named(args.checkpoints).items()}
    calcs["GFN2-xTB"] = reference_calculator()
    stretches = np.round(np.arange(0.0, args.max_stretch + 1e-9, args.step), 6)
    curves: dict[str, list[np.ndarray]] = {name: [] for name in calcs}
    for name in args.molecules:
        atoms = molecule(name)
        for bond in xh_bonds(atoms):
            for model, calc in calcs.items():
                curves[model].append(stretch_curve(atoms, bond, calc, stretches))
            label = f"{atoms[bond[0]].symbol}{bond[0]}-H{bond[1]}"
            print(name, label, "  ".join(f"{m} {c[-1].max():.1f} at {stretches[c[-1].argmax()]:.2f} Å"
                                         for m, c in curves.items()))
    print("\nbarrier = highest E(d) − E(0) of the scan, kcal/mol, over every X-H bond:")
    for model, rows in curves.items():
        tops = np.array([row.max() for row in rows])
        where = np.array([stretches[row.argmax()] for row in rows])
        print(f"{model:12s} mean {tops.mean():5.1f}  lowest {tops.min():5.1f}  at {where.mean():.2f} Å on average")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
