"""Shared pieces of the benchmarks: molecules, batch layouts, torchani models, timing, machine.

Nothing here is timed itself. Molecule sets:

- :func:`bundled_conformations`: conformations of the bundled training set (``xtb_train.h5``,
  H/C/N/O molecules of 3-18 atoms, xTB energies and forces);
- :func:`drug_like_conformations`: :data:`DRUG_LIKE`, 28 molecules of 20-59 atoms (H, C, N, O,
  S, F, Cl) embedded with RDKit (ETKDG + MMFF, fixed seeds) and randomly displaced (random
  energy and force targets: the cost does not depend on them);
- :func:`alkane`: all-trans linear alkanes C_nH_2n+2 (3n + 2 atoms) built analytically.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

os.environ.setdefault("TORCHANI_NO_WARN_EXTENSIONS", "1")

ANI2X_ELEMENTS = ("H", "C", "N", "O", "S", "F", "Cl")

DRUG_LIKE: dict[str, str] = {
    "paracetamol": "CC(=O)Nc1ccc(O)cc1",
    "methionine": "CSCC[C@H](N)C(=O)O",
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O",
    "citric acid": "OC(=O)CC(O)(CC(=O)O)C(=O)O",
    "caffeine": "CN1C=NC2=C1C(=O)N(C(=O)N2C)C",
    "glucose": "OC[C@H]1OC(O)[C@H](O)[C@@H](O)[C@@H]1O",
    "triglycine": "NCC(=O)NCC(=O)NCC(=O)O",
    "phenanthrene": "c1ccc2c(c1)ccc1ccccc12",
    "nicotine": "CN1CCC[C@H]1c1cccnc1",
    "N-(2-hydroxyethyl)-4-CF3-benzamide": "FC(F)(F)c1ccc(cc1)C(=O)NCCO",
    "ethyl 4-methylsulfonylbenzoate": "CS(=O)(=O)c1ccc(cc1)C(=O)OCC",
    "DDT": "Clc1ccc(cc1)C(c1ccc(Cl)cc1)C(Cl)(Cl)Cl",
    "flufenamic acid": "O=C(O)c1ccccc1Nc1cccc(c1)C(F)(F)F",
    "tetraglycine": "NCC(=O)NCC(=O)NCC(=O)NCC(=O)O",
    "Ala-Leu": "CC(C)C[C@H](NC(=O)[C@H](C)N)C(=O)O",
    "ibuprofen": "CC(C)Cc1ccc(cc1)C(C)C(=O)O",
    "procaine": "CCN(CC)CCOC(=O)c1ccc(N)cc1",
    "salbutamol": "CC(C)(C)NCC(O)c1ccc(O)c(CO)c1",
    "chlorpromazine": "CN(C)CCCN1c2ccccc2Sc2ccc(Cl)cc21",
    "propranolol": "CC(C)NCC(O)COc1cccc2ccccc12",
    "sucrose": "OC[C@H]1O[C@@](CO)(O[C@H]2O[C@H](CO)[C@@H](O)[C@H](O)[C@H]2O)[C@@H](O)[C@@H]1O",
    "testosterone": "CC12CCC3C(CCC4=CC(=O)CCC34C)C1CCC2O",
    "palmitic acid": "CCCCCCCCCCCCCCCC(=O)O",
    "penta-alanine": "C[C@H](N)C(=O)N[C@@H](C)C(=O)N[C@@H](C)C(=O)N[C@@H](C)C(=O)N[C@@H](C)C(=O)O",
    "stearic acid": "CCCCCCCCCCCCCCCCCC(=O)O",
    "octadecane": "CCCCCCCCCCCCCCCCCC",
    "donepezil": "COc1cc2c(cc1OC)C(=O)C(CC1CCN(Cc3ccccc3)CC1)C2",
    "nonadecane": "CCCCCCCCCCCCCCCCCCC",
}
"""Drug-like and chain molecules of 20-59 atoms with hydrogens (SMILES)."""

Conformation = tuple[np.ndarray, np.ndarray, float, np.ndarray]
"""(atomic numbers (n,), coordinates (n, 3) Å, energy Ha, forces (n, 3) Ha/Å)."""


# ----------------------------------------------------------------------------- molecules
def bundled_conformations(n: int, seed: int = 0) -> list[Conformation]:
    """``n`` random conformations of the bundled training set (xTB energies and forces)."""
    from ekd_lightning.bundled import ENERGY_KEY, FORCE_KEY, TRAIN_FILE
    from ekd_lightning.data import read_molecules

    records, _ = read_molecules(TRAIN_FILE, ENERGY_KEY, FORCE_KEY)
    rows = [(m, c) for m, r in enumerate(records) for c in range(r.num_conformations)]
    rng = np.random.default_rng(seed)
    chosen = [rows[i] for i in rng.choice(len(rows), n, replace=len(rows) < n)]
    return [(records[m].atomic_numbers, records[m].coordinates[c], float(records[m].energies[c]),
             records[m].forces[c]) for m, c in chosen]


def embed(smiles: str, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Atomic numbers and an RDKit ETKDG + MMFF geometry (Å) of ``smiles`` with hydrogens."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    if AllChem.EmbedMolecule(mol, randomSeed=seed) != 0:
        raise RuntimeError(f"RDKit could not embed {smiles}")
    AllChem.MMFFOptimizeMolecule(mol)
    numbers = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    return numbers, mol.GetConformer().GetPositions()


def displaced(molecules: Sequence[tuple[np.ndarray, np.ndarray]], n: int, seed: int = 0,
              sigma: float = 0.05) -> list[Conformation]:
    """``n`` conformations cycling through ``molecules``, each displaced by N(0, sigma) Å per
    coordinate, with random targets (energy about -50 Ha per heavy atom scale, forces N(0, 0.02))."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        numbers, positions = molecules[i % len(molecules)]
        coords = positions + rng.normal(0.0, sigma, positions.shape)
        energy = float(-40.0 * np.sum(numbers > 1) + rng.normal(0.0, 0.01))
        out.append((numbers, coords, energy, rng.normal(0.0, 0.02, positions.shape)))
    return out


def drug_like_conformations(n: int, seed: int = 0) -> list[Conformation]:
    """``n`` displaced conformations of the :data:`DRUG_LIKE` molecules (20-59 atoms)."""
    molecules = [embed(smiles) for smiles in DRUG_LIKE.values()]
    return displaced(molecules, n, seed)


def alkane(n_carbons: int) -> tuple[np.ndarray, np.ndarray]:
    """All-trans linear alkane C_nH_2n+2: atomic numbers and coordinates (Å), built from ideal
    bond lengths (C-C 1.54, C-H 1.09 Å) and tetrahedral angles."""
    cc, ch = 1.54, 1.09
    half = np.deg2rad(109.47) / 2
    carbons = np.array([[i * cc * np.sin(half), (i % 2) * cc * np.cos(half), 0.0]
                        for i in range(n_carbons)])
    hydrogens = []
    z_axis = np.array([0.0, 0.0, 1.0])
    tet = np.arccos(-1.0 / 3.0)  # 109.47 degrees
    for i, c in enumerate(carbons):
        bonded = [carbons[j] - c for j in (i - 1, i + 1) if 0 <= j < n_carbons]
        units = [b / np.linalg.norm(b) for b in bonded]
        if len(units) == 2:  # CH2: two H in the plane normal to the chain plane
            bisector = -(units[0] + units[1])
            bisector /= np.linalg.norm(bisector)
            angle = tet / 2
            for sign in (1, -1):
                hydrogens.append(c + ch * (np.cos(angle) * bisector + sign * np.sin(angle) * z_axis))
        elif len(units) == 1:  # CH3: three H around the C-C axis, one in the chain plane
            u = units[0]
            a = np.cross(z_axis, u)
            a /= np.linalg.norm(a)
            if np.dot(a, c - carbons.mean(0)) < 0 and n_carbons > 1:
                a = -a
            b = np.cross(u, a)
            for phi in (0.0, 2 * np.pi / 3, 4 * np.pi / 3):
                d = np.cos(tet) * u + np.sin(tet) * (np.cos(phi) * a + np.sin(phi) * b)
                hydrogens.append(c + ch * d)
        else:  # methane
            for d in ([1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]):
                hydrogens.append(c + ch * np.array(d) / np.sqrt(3.0))
    numbers = np.array([6] * n_carbons + [1] * len(hydrogens), dtype=np.int64)
    return numbers, np.concatenate([carbons, np.array(hydrogens)])


# ----------------------------------------------------------------------------- batch layouts
def flat_batch(confs: Sequence[Conformation], dtype=torch.float32):
    """PyG-style flat batch: z, pos (n_atoms, 3), batch, energy (n_mol,) float64, forces."""
    z = torch.cat([torch.from_numpy(np.asarray(c[0])) for c in confs])
    pos = torch.cat([torch.as_tensor(c[1], dtype=dtype) for c in confs])
    batch = torch.repeat_interleave(torch.arange(len(confs)), torch.tensor([len(c[0]) for c in confs]))
    energy = torch.tensor([c[2] for c in confs], dtype=torch.float64)
    forces = torch.cat([torch.as_tensor(c[3], dtype=dtype) for c in confs])
    return z, pos, batch, energy, forces


def padded_batch(confs: Sequence[Conformation], dtype=torch.float32):
    """torchani's layout: atomic numbers (n_mol, max_atoms) with -1 padding, coordinates
    (n_mol, max_atoms, 3), energy (n_mol,) float64, forces (n_mol, max_atoms, 3)."""
    width = max(len(c[0]) for c in confs)
    numbers = torch.full((len(confs), width), -1, dtype=torch.long)
    coords = torch.zeros(len(confs), width, 3, dtype=dtype)
    forces = torch.zeros(len(confs), width, 3, dtype=dtype)
    for i, (z, x, _, f) in enumerate(confs):
        numbers[i, : len(z)] = torch.from_numpy(np.asarray(z))
        coords[i, : len(z)] = torch.as_tensor(x, dtype=dtype)
        forces[i, : len(z)] = torch.as_tensor(f, dtype=dtype)
    energy = torch.tensor([c[2] for c in confs], dtype=torch.float64)
    return numbers, coords, energy, forces


# ----------------------------------------------------------------------------- models
def torchani_ani2x(elements: Sequence[str] = ANI2X_ELEMENTS, members: int = 1):
    """torchani ANI-2x architecture over ``elements`` (``members`` > 1: an ensemble), random
    weights, assembled as ``torchani.models.ANI2x`` does (pyaev AEV, all-pairs neighbours)."""
    from torchani.arch import Assembler

    asm = Assembler(periodic_table_index=True)
    asm.set_symbols(list(elements))
    asm.set_global_cutoff_fn("cosine")
    asm.set_aev_computer(radial="ani2x", angular="ani2x", strategy="pyaev")
    asm.set_atomic_networks(ctor="ani2x")
    asm.set_neighborlist("all_pairs")
    asm.set_zeros_as_self_energies()
    return asm.assemble(members)


# ----------------------------------------------------------------------------- timing
def alternate(methods: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Times (s) of each method: ``warmup`` untimed calls each, then ``repeats`` rounds calling
    every method once in turn (the starting method rotates each round)."""
    for _ in range(warmup):
        for fn in methods.values():
            fn()
    names = list(methods)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            methods[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def print_ratios(times: dict[str, list[float]], base: str) -> None:
    """One line per method of :func:`alternate`'s times: median in ms and ratio to ``base``'s."""
    reference = median(times[base])
    width = max(len(name) for name in times)
    for name, values in times.items():
        print(f"  {name:{width}s} {1e3 * median(values):8.2f} ms  {median(values) / reference:6.2f}x")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    """CPU model and count, torch version, torch threads, date: one line for result tables."""
    return (f"{cpu_model()} ({os.cpu_count()} CPUs), torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch thread(s), {datetime.date.today().isoformat()}")


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
             for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
