"""Training-step throughput: ekd-lightning's ``ani2x`` vs torchani's ANI-2x, same batches.

Both models have the ANI-2x architecture over its 7 elements (1008-feature AEV, published layer
sizes), random weights, float32, AdamW. One step = energies, forces by autograd
(create_graph), loss, backward, optimizer step (``--energy-only`` drops the force term). The two
are timed alternately on identical conformations after warm-up; medians and the ratio are
printed. ekd-lightning takes flat PyG-style batches; torchani takes padded (n_mol, max_atoms)
tensors; the padding is built once, outside the timing, for both.

    python benchmarks/bench_train_step.py --set bundled        # small molecules (3-18 atoms)
    python benchmarks/bench_train_step.py --set large          # 20-60 atoms
    python benchmarks/bench_train_step.py --set bundled --energy-only
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from ekd_lightning.bundled import ENERGY_KEY, FORCE_KEY, TEST_FILE, TRAIN_FILE
from ekd_lightning.data import read_molecules
from ekd_lightning.models.ani import ANIModel

ELEMENTS = ["H", "C", "N", "O", "S", "F", "Cl"]


def pick_conformations(which: str, n: int, seed: int = 0):
    """``n`` (atomic_numbers, coordinates Å, energy Ha, forces Ha/Å) tuples from the bundled data."""
    if which == "bundled":
        records, _ = read_molecules(TRAIN_FILE, ENERGY_KEY, FORCE_KEY)
    else:  # larger out-of-sample molecules, 20-60 atoms
        records, _ = read_molecules(TEST_FILE, "energies", "forces")
        records = [r for r in records if 20 <= len(r.atomic_numbers) <= 60]
    rows = [(m, c) for m, r in enumerate(records) for c in range(r.num_conformations)]
    rng = np.random.default_rng(seed)
    chosen = [rows[i] for i in rng.choice(len(rows), n, replace=len(rows) < n)]
    return [(records[m].atomic_numbers, records[m].coordinates[c], records[m].energies[c],
             records[m].forces[c]) for m, c in chosen]


def flat_batch(confs):
    z = torch.cat([torch.from_numpy(c[0]) for c in confs])
    pos = torch.cat([torch.from_numpy(c[1]).float() for c in confs])
    batch = torch.repeat_interleave(torch.arange(len(confs)), torch.tensor([len(c[0]) for c in confs]))
    energy = torch.tensor([c[2] for c in confs], dtype=torch.float64)
    forces = torch.cat([torch.from_numpy(c[3]).float() for c in confs])
    return z, pos, batch, energy, forces


def padded_batch(confs):
    width = max(len(c[0]) for c in confs)
    species = torch.full((len(confs), width), -1, dtype=torch.long)
    coords = torch.zeros(len(confs), width, 3)
    forces = torch.zeros(len(confs), width, 3)
    for i, (z, x, _, f) in enumerate(confs):
        species[i, : len(z)] = torch.from_numpy(z)
        coords[i, : len(z)] = torch.from_numpy(x).float()
        forces[i, : len(z)] = torch.from_numpy(f).float()
    energy = torch.tensor([c[2] for c in confs], dtype=torch.float64)
    return species, coords, energy, forces


def torchani_ani2x():
    """One ANI-2x member with random weights, assembled as ``torchani.models.ANI2x`` does."""
    from torchani.arch import Assembler

    asm = Assembler(periodic_table_index=True)
    asm.set_symbols(ELEMENTS)
    asm.set_global_cutoff_fn("cosine")
    asm.set_aev_computer(radial="ani2x", angular="ani2x", strategy="pyaev")
    asm.set_atomic_networks(ctor="ani2x")
    asm.set_neighborlist("all_pairs")
    asm.set_zeros_as_self_energies()
    return asm.assemble(1)


def ours_step(model, optimizer, data, with_forces):
    z, pos, batch, energy, forces = data
    pos = pos.detach().requires_grad_(with_forces)
    pred = model(z, pos, batch, len(energy))
    loss = ((pred - energy) ** 2).mean().float()
    if with_forces:
        (grad,) = torch.autograd.grad(pred.sum(), pos, create_graph=True)
        loss = loss + ((-grad - forces) ** 2).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def torchani_step(model, optimizer, data, with_forces):
    species, coords, energy, forces = data
    coords = coords.detach().requires_grad_(with_forces)
    pred = model((species, coords)).energies.double()
    loss = ((pred - energy) ** 2).mean().float()
    if with_forces:
        (grad,) = torch.autograd.grad(pred.sum(), coords, create_graph=True)
        loss = loss + ((-grad - forces) ** 2)[species >= 0].mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=["bundled", "large"], default="bundled")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--energy-only", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    confs = pick_conformations(args.set, args.batch)
    n_atoms = sum(len(c[0]) for c in confs)
    ours, theirs = ANIModel(ELEMENTS), torchani_ani2x()
    runs = {
        "ekd-lightning": (ours, torch.optim.AdamW(ours.parameters(), 1e-4), flat_batch(confs), ours_step),
        "torchani": (theirs, torch.optim.AdamW(theirs.parameters(), 1e-4), padded_batch(confs), torchani_step),
    }
    with_forces = not args.energy_only
    for model, opt, data, step in runs.values():  # warm-up
        for _ in range(3):
            step(model, opt, data, with_forces)
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, (model, opt, data, step) in runs.items():
            times[name].append(timed(lambda: step(model, opt, data, with_forces)))
    kind = "energy-only" if args.energy_only else "energy+forces"
    print(f"# {kind} training step, {args.set} set: {args.batch} conformations, {n_atoms} atoms; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, med in medians.items():
        print(f"{name:14s} {med * 1e3:8.1f} ms  {args.batch / med:8.0f} conformations/s  "
              f"{n_atoms / med:9.0f} atoms/s")
    print(f"ratio (ekd-lightning throughput / torchani): {medians['torchani'] / medians['ekd-lightning']:.2f}x")


if __name__ == "__main__":
    main()
