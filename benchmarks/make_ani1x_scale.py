"""Write synthetic files in the exact ANI-1x release and COMP6 v1 layouts at their real sizes.

Nothing is downloaded. ``ani1x_scale.h5`` has the ANI-1x release layout and size: 3,114 formula
groups, 4,956,005 conformations, of which 489,571 (about 10%, spread over the groups at random)
have a finite ``ccsd(t)_cbs.energy``, the rest NaN. Each group holds ``atomic_numbers``
(n_atoms,) uint8, ``coordinates`` (n_conf, n_atoms, 3) float32 Å, ``ccsd(t)_cbs.energy``,
``wb97x_dz.energy``, ``wb97x_tz.energy``, ``hf_dz.energy`` (n_conf,) float64 Hartree and
``wb97x_dz.forces`` (n_conf, n_atoms, 3) float32 Hartree/Å. Molecules are H/C/N/O with 1-8 heavy
atoms (skewed to 6-8 like ANI-1x, whose GDB-11 part grows with size; 2-26 atoms);
geometries are random bonded trees of heavy atoms (1.45 Å bonds) with hydrogens (1.09 Å),
displaced by 0.06 Å per coordinate per conformation. Energies are a smooth, cheap function:
self energies plus a Morse term over every atom pair (r0 from covalent radii), forces its exact
negative gradient, so a model can learn them. The DFT levels add per-element offsets.

``comp6_scale/`` holds six COMP6 v1-layout files (``subset/molNNNNN`` groups with ``species``
bytes, float32 ``coordinates``, float64 ``energies``, float32 ``forces`` storing the *gradient*
dE/dx as the real files do) with the COMP6 conformation counts: GDB07to09 36,000, GDB10to13
47,670, DrugBank 13,379, Tripeptides 1,984, ANI-MD 1,791, S66x8 528.

    python benchmarks/make_ani1x_scale.py --out /tmp/scale [--fraction 0.25] [--no-comp6]

``--fraction`` scales the numbers of groups and conformations (the benchmark checks its
extrapolation at two sizes). The full-size files take about 2.3 GB; delete them after use.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import h5py
import numpy as np

GROUPS, CONFORMATIONS, CC_CONFORMATIONS = 3114, 4_956_005, 489_571
COMP6_SIZES = {"gdb07to09": 36_000, "gdb10to13": 47_670, "drugbank": 13_379,
               "tripeptides": 1_984, "ani_md": 1_791, "s66x8": 528}
COMP6_HEAVY = {"gdb07to09": (7, 9), "gdb10to13": (10, 13), "drugbank": (8, 30),
               "tripeptides": (16, 25), "ani_md": (6, 30), "s66x8": (2, 12)}
"""Heavy-atom ranges per COMP6 subset (roughly the real ones)."""
VALENCE = {6: 4, 7: 3, 8: 2}
RADIUS = {1: 0.31, 6: 0.76, 7: 0.71, 8: 0.66}
SAE = {1: -0.5, 6: -37.8, 7: -54.6, 8: -75.0}
DFT_SHIFT = {"wb97x_dz.energy": {1: 0.0012, 6: -0.031, 7: -0.045, 8: -0.062},
             "wb97x_tz.energy": {1: 0.0009, 6: -0.036, 7: -0.051, 8: -0.070},
             "hf_dz.energy": {1: 0.021, 6: 0.31, 7: 0.42, 8: 0.55}}
MORSE_D, MORSE_A, NOISE = 0.08, 1.8, 0.06


def molecule(rng: np.random.Generator, n_heavy: int) -> tuple[np.ndarray, np.ndarray]:
    """Atomic numbers (n_atoms,) and a plausible geometry (n_atoms, 3) Å: a random tree of
    C/N/O atoms (1.45 Å bonds, no two atoms closer than 1.0 Å), then hydrogens filling the
    free valences (1.09 Å)."""
    heavy = rng.choice([6, 7, 8], size=n_heavy, p=[0.7, 0.15, 0.15])
    pos, free = [np.zeros(3)], [VALENCE[int(heavy[0])]]
    numbers = [int(heavy[0])]
    for z in heavy[1:]:
        for _ in range(100):
            parents = [k for k, f in enumerate(free) if f > 0] or [len(pos) - 1]
            parent = int(rng.choice(parents))
            direction = rng.normal(size=3)
            candidate = pos[parent] + 1.45 * direction / np.linalg.norm(direction)
            if min(np.linalg.norm(candidate - p) for p in pos) > 1.2:
                break
        free[parent] = max(0, free[parent] - 1)
        pos.append(candidate)
        free.append(VALENCE[int(z)] - 1)
        numbers.append(int(z))
    for k in range(n_heavy):
        for _ in range(free[k]):
            for _ in range(50):
                direction = rng.normal(size=3)
                candidate = pos[k] + 1.09 * direction / np.linalg.norm(direction)
                if min(np.linalg.norm(candidate - p) for p in pos) > 0.95:
                    break
            pos.append(candidate)
            numbers.append(1)
    return np.array(numbers, np.uint8), np.array(pos)


def energies_forces(numbers: np.ndarray, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Self energies + Morse over all pairs: energies (n_conf,) Hartree and forces -dE/dx
    (n_conf, n_atoms, 3) Hartree/Å for coordinates (n_conf, n_atoms, 3) Å."""
    i, j = np.triu_indices(len(numbers), k=1)
    r0 = np.array([RADIUS[int(z)] for z in numbers])
    r0 = r0[i] + r0[j]
    diff = coords[:, i] - coords[:, j]  # (n_conf, n_pairs, 3)
    r = np.linalg.norm(diff, axis=-1)
    x = np.exp(-MORSE_A * (r - r0))
    energy = (MORSE_D * ((1 - x) ** 2 - 1)).sum(1) + sum(SAE[int(z)] for z in numbers)
    dv_dr = 2 * MORSE_D * MORSE_A * (1 - x) * x  # dV/dr
    pair_force = -(dv_dr / r)[..., None] * diff  # force on atom i
    incidence = np.zeros((len(i), len(numbers)))  # +1 on atom i, -1 on atom j of each pair
    incidence[np.arange(len(i)), i], incidence[np.arange(len(i)), j] = 1.0, -1.0
    return energy, np.einsum("cpk,pa->cak", pair_force, incidence, optimize=True)


def heavy_atom_counts(rng: np.random.Generator, n: int, low: int = 1, high: int = 8) -> np.ndarray:
    """Heavy-atom counts skewed to the large end (weights growing 1.6x per atom), as in ANI-1x."""
    sizes = np.arange(low, high + 1)
    weights = 1.6 ** (sizes - low)
    return rng.choice(sizes, size=n, p=weights / weights.sum())


def split_total(rng: np.random.Generator, total: int, n: int) -> np.ndarray:
    """``n`` positive lognormal group sizes summing to ``total``."""
    raw = rng.lognormal(0, 1.3, n)
    sizes = np.maximum(1, np.floor(raw / raw.sum() * total)).astype(np.int64)
    sizes[np.argmax(sizes)] += total - sizes.sum()
    return sizes


def write_ani1x(path: Path, fraction: float, seed: int = 0) -> dict:
    """The ANI-1x-layout file at ``fraction`` of the real size; returns its counts."""
    rng = np.random.default_rng(seed)
    n_groups = max(1, round(GROUPS * fraction))
    sizes = split_total(rng, round(CONFORMATIONS * fraction), n_groups)
    cc = np.zeros(sizes.sum(), bool)
    cc[rng.choice(len(cc), round(CC_CONFORMATIONS * fraction), replace=False)] = True
    starts = np.concatenate([[0], np.cumsum(sizes)])
    tmp = path.with_name(path.name + ".tmp")
    atoms = 0
    with h5py.File(tmp, "w") as f:
        for g, n_heavy in enumerate(heavy_atom_counts(rng, n_groups)):
            numbers, base = molecule(rng, int(n_heavy))
            coords = base + rng.normal(0, NOISE, (int(sizes[g]), *base.shape))
            energy, forces = energies_forces(numbers, coords)
            name = f"G{g:04d}_" + "".join(f"{s}{(numbers == z).sum()}" for s, z in
                                           (("C", 6), ("H", 1), ("N", 7), ("O", 8)))
            group = f.create_group(name)
            group["atomic_numbers"] = numbers
            group["coordinates"] = coords.astype(np.float32)
            mask = cc[starts[g]:starts[g + 1]]
            group["ccsd(t)_cbs.energy"] = np.where(mask, energy + 0.0, np.nan)
            for key, shift in DFT_SHIFT.items():
                group[key] = energy + sum(shift[int(z)] for z in numbers)
            group["wb97x_dz.forces"] = forces.astype(np.float32)
            atoms += coords.shape[0] * coords.shape[1]
    tmp.replace(path)
    return {"groups": n_groups, "conformations": int(sizes.sum()), "cc": int(cc.sum()),
            "atoms": atoms}


def write_comp6(folder: Path, fraction: float = 1.0, seed: int = 1) -> dict:
    """Six COMP6 v1-layout files (gradients under ``forces``); returns conformations per file."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = {1: b"H", 6: b"C", 7: b"N", 8: b"O"}
    counts = {}
    for subset, total in COMP6_SIZES.items():
        total = max(8, round(total * fraction))
        n_mol = max(1, total // (8 if subset == "s66x8" else 40))
        sizes = np.full(n_mol, total // n_mol)
        sizes[: total - sizes.sum()] += 1
        low, high = COMP6_HEAVY[subset]
        path = folder / f"{subset}_wb97x6-31gd.h5"
        tmp = path.with_name(path.name + ".tmp")
        with h5py.File(tmp, "w") as f:
            for m, n_heavy in enumerate(rng.integers(low, high + 1, n_mol)):
                numbers, base = molecule(rng, int(n_heavy))
                coords = base + rng.normal(0, NOISE, (int(sizes[m]), *base.shape))
                energy, forces = energies_forces(numbers, coords)
                group = f.create_group(f"{subset}/mol{m:05d}")
                group["species"] = np.array([symbols[int(z)] for z in numbers], dtype="S1")
                group["coordinates"] = coords.astype(np.float32)
                group["energies"] = energy + sum(DFT_SHIFT["wb97x_dz.energy"][int(z)] for z in numbers)
                group["forces"] = (-forces).astype(np.float32)  # gradients, like real COMP6 v1
        tmp.replace(path)
        counts[subset] = int(sizes.sum())
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--fraction", type=float, default=1.0)
    parser.add_argument("--no-comp6", action="store_true")
    parser.add_argument("--no-ani1x", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.no_ani1x:
        start = time.perf_counter()
        counts = write_ani1x(args.out / "ani1x_scale.h5", args.fraction)
        size = (args.out / "ani1x_scale.h5").stat().st_size / 2**30
        print(f"ani1x_scale.h5: {counts}, {size:.2f} GiB, {time.perf_counter() - start:.0f} s")
    if not args.no_comp6:
        print("comp6_scale/:", write_comp6(args.out / "comp6_scale"))


if __name__ == "__main__":
    main()
