"""Training-step throughput: ekd-lightning's ``ani2x`` vs torchani's ANI-2x, same batches.

Both models have the ANI-2x architecture over its 7 elements (H, C, N, O, S, F, Cl: 1008 AEV
features, published layer sizes), random weights, float32, AdamW. One step = energies, forces
by autograd (``create_graph``), loss, backward, optimizer step, as ``stage=student`` trains
(``--mode energy`` drops the force term, as ``stage=teacher`` trains; it also times
ekd-lightning's step from AEVs computed beforehand, as teachers train from the second epoch on:
``feature_cache_mb``). They are timed alternately on identical conformations after warm-up;
medians and the ratios to torchani are printed.
ekd-lightning takes flat PyG-style batches; torchani takes padded (n_mol, max_atoms) tensors
(its own format; padded to the largest molecule of the batch); both layouts are built once,
outside the timing.

Sets: ``bundled`` = the bundled training molecules (``xtb_train.h5``, 3-18 atoms, real xTB
labels); ``large`` = 28 drug-like and chain molecules of 20-59 atoms embedded with RDKit and
randomly displaced (``benchlib.DRUG_LIKE``, random targets).

    python benchmarks/bench_train_step.py                      # both sets, both modes, 1 thread
    python benchmarks/bench_train_step.py --set large --mode forces --repeats 9
    python benchmarks/bench_train_step.py --threads 2
"""

from __future__ import annotations

import argparse

import benchlib
import torch

from ekd_lightning.models.ani import ANIModel


def ours_step(model, optimizer, data, with_forces: bool) -> None:
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


def cached_step(model, optimizer, data, features) -> None:
    """The energy-only step from AEVs computed beforehand (``feature_cache_mb``: teachers and
    baselines keep each training conformation's AEV across epochs)."""
    z, _, batch, energy, _ = data
    pred = model.energies_from_features(z, features, batch, len(energy))
    loss = ((pred - energy) ** 2).mean().float()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def torchani_step(model, optimizer, data, with_forces: bool) -> None:
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


def conformations(which: str, n: int):
    if which == "bundled":
        return benchlib.bundled_conformations(n)
    return benchlib.drug_like_conformations(n)


def run(which: str, mode: str, args) -> dict:
    confs = conformations(which, args.batch)
    n_atoms = sum(len(c[0]) for c in confs)
    torch.manual_seed(0)
    ours, theirs = ANIModel(benchlib.ANI2X_ELEMENTS), benchlib.torchani_ani2x()
    opt_ours = torch.optim.AdamW(ours.parameters(), 1e-4)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), 1e-4)
    flat, padded = benchlib.flat_batch(confs), benchlib.padded_batch(confs)
    with_forces = mode == "forces"
    methods = {
        "ekd-lightning": lambda: ours_step(ours, opt_ours, flat, with_forces),
        "torchani": lambda: torchani_step(theirs, opt_theirs, padded, with_forces),
    }
    if not with_forces:
        features = ours.features(*flat[:3])
        methods["ekd-lightning, cached AEVs"] = lambda: cached_step(ours, opt_ours, flat, features)
    times = benchlib.alternate(methods, repeats=args.repeats, warmup=args.warmup)
    med = {name: benchlib.median(t) for name, t in times.items()}
    sizes = [len(c[0]) for c in confs]
    return {"set": which, "mode": mode, "atoms": n_atoms, "sizes": (min(sizes), max(sizes)),
            "padded": padded[0].numel(), "median": med,
            "ratio": med["torchani"] / med["ekd-lightning"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=["bundled", "large", "both"], default="both")
    parser.add_argument("--mode", choices=["forces", "energy", "both"], default="both")
    parser.add_argument("--batch", type=int, default=256, help="conformations per batch")
    parser.add_argument("--repeats", type=int, default=11, help="timed rounds (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sets = ["bundled", "large"] if args.set == "both" else [args.set]
    modes = ["forces", "energy"] if args.mode == "both" else [args.mode]
    results = []
    for which in sets:
        for mode in modes:
            result = run(which, mode, args)
            results.append(result)
            print(f"{which:8s} {mode:7s} done: ratio {result['ratio']:.2f}x", flush=True)
    print(f"\n# Training step, batch of {args.batch} conformations, ANI-2x architecture (7 "
          f"elements), float32, AdamW; median of {args.repeats} alternating rounds")
    print(f"# {benchlib.machine_line()}")
    rows = []
    for r in results:
        step = "energy+forces" if r["mode"] == "forces" else "energy only"
        for name, t in r["median"].items():
            rows.append([f"{r['set']} ({r['sizes'][0]}-{r['sizes'][1]} atoms)", step, name,
                         f"{t * 1e3:.0f}", f"{args.batch / t:.0f}", f"{r['atoms'] / t:.0f}",
                         "" if name == "torchani" else f"{r['median']['torchani'] / t:.2f}x"])
    print(benchlib.table(["set", "step", "code", "ms/step", "conformations/s", "atoms/s",
                          "speed-up vs torchani"], rows))
    for r in {r["set"]: r for r in results}.values():
        print(f"# {r['set']}: {r['atoms']} atoms per batch; torchani pads to {r['padded']} "
              f"atom slots ({r['padded'] / r['atoms']:.2f}x)")


if __name__ == "__main__":
    main()
