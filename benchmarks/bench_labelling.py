"""Labelling throughput: 8 ANI teachers' energies and per-teacher forces on the same batches.

Compares, alternating after warm-up (median over rounds of the per-batch time):

- ``batched``: :class:`ekd_lightning.distill.TeacherEnsemble` (AEV once per batch, stacked
  weights, hand-written MLP backward, one AEV vector-Jacobian product for the 8 teachers);
- ``loop``: a plain Python loop of ``energy_and_forces`` over the 8 models;
- ``torchani``: torchani's own 8-member ensemble of the same architecture (random weights,
  assembled as ``torchani.models.ANI2x`` does) with ``members_forces`` (AEV once, 8 backward
  passes), on the padded batch torchani expects;
- ``networks alone``: only the 8 teachers' element networks, forward and gradient with respect
  to the AEV, on AEVs computed beforehand, with the batched ensemble's kernels and (``networks
  alone, loop``) with each teacher's own modules and autograd. This is work that every method
  must do (the same matrix products), so ``loop / networks alone`` (the faster of the two) is
  the most that any batching can gain over the loop (the ceiling printed).

Each method produces what distillation stores: every teacher's energies and forces, the mean
force (the label) and the per-atom spread (standard deviation over teachers).

Two element sets: ``hcno`` (the project's ``model=ani2x`` on H/C/N/O data: 384 AEV features) and
``ani2x`` (H, C, N, O, S, F, Cl: the published 1008-feature architecture). Molecules are ASE g2
molecules (>= 6 atoms) with random displacements; random weights.

    python benchmarks/bench_labelling.py                  # both element sets, 1 thread
    python benchmarks/bench_labelling.py [--batch-size 64] [--rounds 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import benchlib
import numpy as np
import torch

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


def conformations(mols) -> list[benchlib.Conformation]:
    """ASE molecules as benchmark conformations (no reference energies or forces needed)."""
    return [(m.numbers, m.positions, 0.0, np.zeros_like(m.positions)) for m in mols]


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
        import torchani  # noqa: F401
    except ImportError:
        return None
    torch.manual_seed(0)
    return benchlib.torchani_ani2x(elements, N_TEACHERS).eval().requires_grad_(False)


def labels(energies, forces):
    """What a label file stores besides the per-teacher values: mean force and spread."""
    return energies.mean(0), energies.std(0), forces.mean(0), forces.std(0)


def network_inputs(group, z, pos, batch):
    """What :meth:`StackedANI.networks` takes for a batch (as ``StackedANI.forward`` makes it)."""
    with torch.no_grad():
        aev, _, _, sizes, first_layers = group.features(group.species(z), pos, batch)
    return aev, group.energy_scale.to(aev.dtype), sizes, first_layers


def run(name: str, args) -> dict[str, float]:
    from ekd_lightning.distill import TeacherEnsemble
    from ekd_lightning.models.ani import network_on_columns
    from ekd_lightning.models.base import energy_and_forces

    elements = ELEMENTS[name]
    models = our_teachers(elements)
    ensemble = TeacherEnsemble(models)
    reference = None if args.no_torchani else torchani_ensemble(elements)
    batches = [molecules(elements, args.batch_size, seed) for seed in range(args.batches)]
    flat = [benchlib.flat_batch(conformations(b))[:3] for b in batches]  # z, pos, batch
    padded = [benchlib.padded_batch(conformations(b))[:2] for b in batches]  # numbers, coords
    n_atoms = np.mean([len(f[0]) for f in flat])
    (group,) = ensemble.groups  # one StackedANI of the 8 teachers
    inputs = [network_inputs(group, *f) for f in flat]

    def batched(i):
        z, pos, batch = flat[i]
        energies, forces = ensemble(z, pos, batch, args.batch_size)
        labels(energies, forces)
        return energies, forces

    def loop(i):
        z, pos, batch = flat[i]
        results = [energy_and_forces(m, z, pos, batch, args.batch_size) for m in models]
        energies = torch.stack([e.detach() for e, _ in results])
        forces = torch.stack([f for _, f in results])
        labels(energies, forces)
        return energies, forces

    def torchani(i):
        numbers, coords = padded[i]
        result = reference.members_forces((numbers, coords.clone()))
        labels(result.energies, result.forces)
        return result

    def networks_alone(i):
        return group.networks(*inputs[i])

    def networks_alone_loop(i):
        aev, _, sizes, _ = inputs[i]
        columns = group.aev.restricted(tuple(s for s, n in enumerate(sizes) if n))[2]
        for model in models:
            for net, x in zip(model.networks.values(), aev.split(sizes), strict=True):
                if len(x):
                    x = x.detach().requires_grad_(True)
                    torch.autograd.grad(network_on_columns(net, x, columns).sum(), x)

    methods = {"batched": batched, "loop": loop, "networks": networks_alone,
               "networks_loop": networks_alone_loop}
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
    print(f"[{name}] done: max |F_batched - F_loop| / max |F| = {error:.1e}", flush=True)
    return {"name": name, "elements": len(elements), "features": models[0].aev.out_dim,
            "atoms": n_atoms, "median": median, "error": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=4, help="distinct batches per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--elements", choices=[*ELEMENTS, "both"], default="both")
    parser.add_argument("--no-torchani", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [run(name, args) for name in (ELEMENTS if args.elements == "both" else [args.elements])]
    print(f"\n# Labelling: {N_TEACHERS} ani2x teachers, energies + forces of each, mean force and "
          f"spread; batches of {args.batch_size} conformations (g2 molecules), median over "
          f"{args.batches} batches x {args.rounds} alternating rounds")
    print(f"# {benchlib.machine_line()}")
    rows = []
    for r in results:
        med = r["median"]
        for key, label in (("batched", "ekd batched ensemble"), ("loop", "plain loop over 8"),
                           ("torchani", "torchani ensemble"), ("networks", "networks alone"),
                           ("networks_loop", "networks alone, loop")):
            if key not in med:
                continue
            t = med[key]
            rows.append([f"{r['name']} ({r['elements']} el., {r['features']} feat., "
                         f"{r['atoms']:.0f} atoms)", label, f"{1e3 * t:.1f}",
                         f"{args.batch_size / t:.0f}", f"{med['loop'] / t:.2f}x",
                         f"{med['torchani'] / t:.2f}x" if "torchani" in med else "-"])
    print(benchlib.table(["set", "method", "ms/batch", "conformations/s", "vs loop",
                          "vs torchani"], rows))
    for r in results:
        med = r["median"]
        floor = min(med["networks"], med["networks_loop"])
        print(f"# {r['name']}: max |F_batched - F_loop| / max |F| = {r['error']:.1e}; the networks "
              f"alone take {med['networks'] / med['batched']:.0%} of the batched ensemble's time: "
              f"ceiling of any batching over the loop {med['loop'] / floor:.2f}x")


if __name__ == "__main__":
    main()
