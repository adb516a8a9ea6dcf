"""Scaling: cost per atom of the energy+forces training step for molecules of 5 to 200 atoms.

All-trans linear alkanes C_nH_2n+2 (n = 1..66, 3n + 2 atoms, built analytically, randomly
displaced by 0.05 Å), ANI-2x architecture (7 elements), float32, AdamW, the step of
``bench_train_step.py``. Each size gets batches of about ``--atoms`` atoms (whole molecules), so
the per-atom cost compares like with like; ekd-lightning and torchani alternate after warm-up.

The per-atom cost should stay near constant: once a chain is longer than the cutoffs (5.1 Å
radial, 3.5 Å angular), an atom's neighbours, and so its AEV work, stop growing. The table also
shows the neighbour pairs (radial cutoff) and angular triples per atom that explain the small
molecules' lower cost, and the share of the step spent on the neighbour search (all atom pairs of
each molecule, O(n^2) per molecule, then the cutoff).

    python benchmarks/bench_scaling.py                 # 1 thread, about 2 minutes
    python benchmarks/bench_scaling.py --sizes 5 50 200 --repeats 5
"""

from __future__ import annotations

import argparse
import time

import benchlib
import numpy as np
import torch
from bench_train_step import ours_step, torchani_step

from ekd_lightning.models.aev import angular_triples
from ekd_lightning.models.ani import ANIModel
from ekd_lightning.models.neighbors import neighbor_pairs

SIZES = [5, 8, 11, 14, 20, 29, 38, 50, 65, 80, 101, 125, 152, 176, 200]


def batch_of(n_atoms: int, target_atoms: int, seed: int):
    n_carbons = (n_atoms - 2) // 3
    molecule = benchlib.alkane(n_carbons)
    n_mol = max(1, round(target_atoms / len(molecule[0])))
    return benchlib.displaced([molecule], n_mol, seed=seed)


def neighbour_counts(flat) -> tuple[float, float, float]:
    """Pairs (radial cutoff) and triples (angular cutoff) per atom, and the neighbour search's
    time (ms, median of 5)."""
    z, pos, batch, _, _ = flat
    edges = neighbor_pairs(pos, batch, 5.1)
    close = (pos[edges[1]] - pos[edges[0]]).norm(dim=-1) < 3.5
    p, _ = angular_triples(edges[0][close], len(z))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        neighbor_pairs(pos, batch, 5.1)
        times.append(time.perf_counter() - start)
    return edges.shape[1] / len(z), p.numel() / len(z), 1e3 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES,
                        help="atoms per molecule (3n + 2)")
    parser.add_argument("--atoms", type=int, default=2000, help="atoms per batch (about)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours, theirs = ANIModel(benchlib.ANI2X_ELEMENTS), benchlib.torchani_ani2x()
    opt_ours = torch.optim.AdamW(ours.parameters(), 1e-5)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), 1e-5)
    rows, per_atom = [], {}
    for size in args.sizes:
        if (size - 2) % 3 or size < 5:
            raise SystemExit(f"alkanes have 3n + 2 atoms (5, 8, 11, ...), not {size}")
        confs = batch_of(size, args.atoms, seed=size)
        flat, padded = benchlib.flat_batch(confs), benchlib.padded_batch(confs)
        n_atoms = len(flat[0])
        times = benchlib.alternate({
            "ours": lambda flat=flat: ours_step(ours, opt_ours, flat, True),
            "torchani": lambda padded=padded: torchani_step(theirs, opt_theirs, padded, True),
        }, repeats=args.repeats, warmup=args.warmup)
        med = {k: benchlib.median(v) for k, v in times.items()}
        pairs, triples, search_ms = neighbour_counts(flat)
        per_atom[size] = {k: 1e6 * v / n_atoms for k, v in med.items()}
        rows.append([size, len(confs), n_atoms, f"{pairs:.1f}", f"{triples:.1f}",
                     f"{per_atom[size]['ours']:.1f}", f"{per_atom[size]['torchani']:.1f}",
                     f"{med['torchani'] / med['ours']:.2f}x",
                     f"{100 * search_ms / (1e3 * med['ours']):.1f}%"])
        print(f"{size:4d} atoms: {per_atom[size]['ours']:.1f} us/atom (torchani "
              f"{per_atom[size]['torchani']:.1f})", flush=True)
    reference = per_atom[min(per_atom, key=lambda s: abs(s - 50))]
    for row, size in zip(rows, args.sizes, strict=True):
        row.insert(7, f"{per_atom[size]['ours'] / reference['ours']:.2f}")
    print(f"\n# Energy+forces training step per atom, all-trans alkanes, batches of about "
          f"{args.atoms} atoms, median of {args.repeats} alternating rounds")
    print(f"# {benchlib.machine_line()}")
    print(benchlib.table(
        ["atoms/molecule", "molecules", "atoms", "pairs/atom", "triples/atom",
         "ekd us/atom", "torchani us/atom", "ekd vs 50-atom", "speed-up", "neighbour search"],
        rows))
    big = [s for s in args.sizes if s >= 50]
    if big:
        values = [per_atom[s]["ours"] for s in big]
        print(f"# ekd-lightning, >= 50 atoms: {min(values):.1f}-{max(values):.1f} us/atom "
              f"(max/min {max(values) / min(values):.2f})")


if __name__ == "__main__":
    main()
