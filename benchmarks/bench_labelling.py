"""Labelling throughput: 8 ANI teachers' energies and per-teacher forces on the same batches.

Compares, alternating after warm-up (median over rounds of the per-batch time):

- ``batched``: :class:`ekd_lightning.distill.TeacherEnsemble` (AEV once per batch, stacked
  weights, hand-written MLP backward, one AEV vector-Jacobian product for the 8 teachers);
- ``loop``: a plain Python loop of ``energy_and_forces`` over the 8 models;
- ``torchani``: torchani's own 8-member ensemble of the same architecture (random weights,
  assembled as ``torchani.models.ANI2x`` does) with ``members_forces`` (AEV once, 8 backward
  passes), on the padded batch torchani expects.

Two element sets: ``hcno`` (the project's ``model=ani2x`` on H/C/N/O data: 384 AEV features) and
``ani2x`` (H, C, N, O, S, F, Cl: the published 1008-feature architecture). Molecules are ASE g2
molecules (>= 6 atoms) with random displacements; random weights.

    python benchmarks/bench_labelling.py [--batch-size 64] [--rounds 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

os.environ.setdefault("TORCHANI_NO_WARN_EXTENSIONS", "1")

ELEMENTS = {"hcno": ("H", "C", "N", "O"), "ani2x": ("H", "C", "N", "O", "S", "F", "Cl")}
N_TEACHERS = 8


def molecules(elements, n: int, seed: int):
    """``n`` displaced g2 molecules made of ``elements`` (cycling through the collection)."""
    from ase.collections import g2

    names = [m for m in g2.names
             if set(g2[m].get_chemical_symbols()) <= set(elements) and len(g2[m]) >= 6]
    if set(elements) > {"H", "C", "N", "O"}:  # make sure S, F and Cl are well represented
        names = sorted(names, key=lambda m: not set(g2[m].get_chemical_symbols()) - set("HCNO"))
        names = names[: max(8, len(names) // 2)]
    rng = np.random.default_rng(seed)
    mols = []
    for i in range(n):
        atoms = g2[names[(i * 7 + seed) % len(names)]].copy()
        atoms.positions += rng.normal(0.0, 0.05, atoms.positions.shape)
        mols.append(atoms)
    return mols


def flat_batch(mols):
    """z (n_atoms,), pos (n_atoms, 3) float32 Å, batch (n_atoms,) as PyG batches them."""
    z = torch.tensor(np.concatenate([m.numbers for m in mols]))
    pos = torch.tensor(np.concatenate([m.positions for m in mols]), dtype=torch.float32)
    batch = torch.repeat_interleave(torch.arange(len(mols)), torch.tensor([len(m) for m in mols]))
    return z, pos, batch


def padded_batch(mols):
    """Atomic numbers (-1 padding) and coordinates (n_mol, max_atoms, 3), torchani's layout."""
    width = max(len(m) for m in mols)
    numbers = torch.full((len(mols), width), -1)
    coords = torch.zeros(len(mols), width, 3)
    for i, m in enumerate(mols):
        numbers[i, : len(m)] = torch.tensor(m.numbers)
        coords[i, : len(m)] = torch.tensor(m.positions, dtype=torch.float32)
    return numbers, coords


def our_teachers(elements):
    from ekd_lightning.models.ani import ANIModel

    models = []
    for seed in range(N_TEACHERS):
        torch.manual_seed(seed)
        model = ANIModel(elements)
        model.set_energy_statistics([-0.5 - i for i in range(len(elements))], 0.02)
        models.append(model.eval().requires_grad_(False))
    return models


def torchani_ensemble(elements):
    """An 8-member torchani ensemble of the ANI-2x architecture over ``elements`` (random)."""
    try:
        from torchani.arch import Assembler
    except ImportError:
        return None
    asm = Assembler(periodic_table_index=True)
    asm.set_symbols(elements)
    asm.set_global_cutoff_fn("cosine")
    asm.set_aev_computer(radial="ani2x", angular="ani2x", strategy="pyaev")
    asm.set_atomic_networks(ctor="ani2x")
    asm.set_neighborlist("all_pairs")
    asm.set_zeros_as_self_energies()
    torch.manual_seed(0)
    return asm.assemble(N_TEACHERS).eval().requires_grad_(False)


def run(name: str, args) -> dict[str, float]:
    from ekd_lightning.distill import TeacherEnsemble
    from ekd_lightning.models.base import energy_and_forces

    elements = ELEMENTS[name]
    models = our_teachers(elements)
    ensemble = TeacherEnsemble(models)
    reference = None if args.no_torchani else torchani_ensemble(elements)
    batches = [molecules(elements, args.batch_size, seed) for seed in range(args.batches)]
    flat = [flat_batch(b) for b in batches]
    padded = [padded_batch(b) for b in batches]
    n_atoms = np.mean([len(f[0]) for f in flat])

    def batched(i):
        z, pos, batch = flat[i]
        return ensemble(z, pos, batch, args.batch_size)

    def loop(i):
        z, pos, batch = flat[i]
        results = [energy_and_forces(m, z, pos, batch, args.batch_size) for m in models]
        return torch.stack([e for e, _ in results]), torch.stack([f for _, f in results])

    def torchani(i):
        numbers, coords = padded[i]
        return reference.members_forces((numbers, coords.clone()))

    methods = {"batched": batched, "loop": loop}
    if reference is not None:
        methods["torchani"] = torchani
    # same numbers (before timing)
    e1, f1 = batched(0)
    e2, f2 = loop(0)
    error = float((f1 - f2).abs().max() / f2.abs().max())
    times = {k: [] for k in methods}
    for _ in range(args.warmup):
        for fn in methods.values():
            fn(0)
    for r in range(args.rounds):
        order = list(methods)[r % len(methods):] + list(methods)[: r % len(methods)]
        for i in range(args.batches):
            for key in order:
                start = time.perf_counter()
                methods[key](i)
                times[key].append(time.perf_counter() - start)
    median = {k: float(np.median(v)) for k, v in times.items()}
    print(f"\n[{name}] {len(elements)} elements, {models[0].aev.out_dim} AEV features, "
          f"{N_TEACHERS} teachers, batches of {args.batch_size} conformations "
          f"({n_atoms:.0f} atoms), {args.batches} batches x {args.rounds} rounds; "
          f"max |F_batched - F_loop| / max |F| = {error:.1e}")
    for key, t in median.items():
        print(f"  {key:9s} {1e3 * t:8.1f} ms/batch  {args.batch_size / t:8.0f} conformations/s")
    print(f"  batched vs loop: {median['loop'] / median['batched']:.2f}x", end="")
    if "torchani" in median:
        print(f"; batched vs torchani: {median['torchani'] / median['batched']:.2f}x; "
              f"torchani vs loop: {median['loop'] / median['torchani']:.2f}x")
    else:
        print()
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=4, help="distinct batches per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--elements", choices=[*ELEMENTS, "both"], default="both")
    parser.add_argument("--no-torchani", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    for name in ELEMENTS if args.elements == "both" else [args.elements]:
        run(name, args)


if __name__ == "__main__":
    main()
