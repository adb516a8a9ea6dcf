"""How good are the teachers' labels on extra geometries? (issue 12's lever, a diagnostic.)

For each extra-geometry file (:mod:`ekd_lightning.distill.augment`, e.g.
``<store>/extra-*.h5``) of the bundled GFN2-xTB data, ``--sample`` random geometries are
recomputed with GFN2-xTB (tblite, as the bundled data were made) and compared with the labels
the students train on: the teacher-ensemble mean force (MAE per component, kcal/mol/Å) and
energy (mean signed error and MAE after removing it, kcal/mol), with the RMS teacher spread and
its correlation with the per-geometry error (what the agreement weights rely on). With
``--labels`` the distilled labels of the dataset at the same geometries' source conformations
are compared with the dataset's reference forces, the yardstick the extra labels should meet.
The reference is used here only to judge the labels, never to train.

    python benchmarks/extra_geometry_labels.py <store>/extra-*.h5 --labels <store>/labels-*.h5
"""

from __future__ import annotations

import argparse
import time

import h5py
import numpy as np

from ekd_lightning.bundled import DATA_DIR
from ekd_lightning.bundled.build import FORCE_KEY, xtb_energy_forces
from ekd_lightning.core.units import HARTREE_TO_KCALMOL as KCAL


def check(path: str, sample: int, seed: int, labels: str | None, dataset: str) -> str:
    """One line of figures for the extra-geometry file ``path``."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "r") as f:
        items = [(key, i) for key in f for i in range(len(f[key]["energy"]))]
        errors, spreads, energy_errors, label_errors = [], [], [], []
        start = time.perf_counter()
        for j in rng.choice(len(items), min(sample, len(items)), replace=False):
            key, i = items[j]
            group = f[key]
            energy, forces = xtb_energy_forces(group["atomic_numbers"][()],
                                               group["coordinates"][i].astype(np.float64))
            errors.append(np.abs(forces - group["forces"][i]).mean() * KCAL)
            spreads.append(np.sqrt((group["forces_std"][i].astype(float) ** 2).mean()) * KCAL)
            energy_errors.append((group["energy"][i] - energy) * KCAL)
            if labels:
                source = int(group["source_conformation"][i])
                with h5py.File(labels, "r") as lab, h5py.File(dataset, "r") as data:
                    label_errors.append(np.abs(lab[key]["forces"][source]
                                               - data[key][FORCE_KEY][source]).mean() * KCAL)
        seconds = time.perf_counter() - start
        settings = {k: f.attrs[k] for k in ("method", "displacement", "temperature", "steps")
                    if k in f.attrs}
    e = np.array(energy_errors)
    line = (f"{path} {settings}: teacher-mean force MAE vs GFN2-xTB {np.mean(errors):.2f} "
            f"kcal/mol/Å, RMS teacher spread {np.sqrt(np.mean(np.square(spreads))):.2f}, "
            f"corr(spread, error) {np.corrcoef(spreads, errors)[0, 1]:.2f}; energy error mean "
            f"{e.mean():.2f}, MAE about it {np.abs(e - e.mean()).mean():.2f} kcal/mol")
    if labels:
        line += f"; distilled labels at their sources: force MAE {np.mean(label_errors):.2f}"
    return line + f" ({len(errors)} geometries, {seconds:.0f} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="extra-geometry files")
    parser.add_argument("--sample", type=int, default=150, help="geometries per file")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--labels", help="the dataset's label file (distilled by the same teachers)")
    parser.add_argument("--dataset", default=str(DATA_DIR / "xtb_train.h5"))
    args = parser.parse_args()
    for path in args.files:
        print(check(path, args.sample, args.seed, args.labels, args.dataset), flush=True)


if __name__ == "__main__":
    main()
