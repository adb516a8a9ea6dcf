"""The energy-only ``ani2x`` step with the ZBL repulsion prior: computed from positions at every
step against held per conformation (``FeatureCache``), and without a prior, same batch.

One step = energies from AEVs computed beforehand (as teachers and baselines train from the
second epoch on), loss, backward, AdamW step; ``prior from positions`` adds the prior's pair
energies as the feature cache did before it held them, ``prior held`` adds the energies held for
the batch. Timed alternately on identical conformations of the bundled training set after
warm-up, one torch thread; medians and ratios to the step without a prior are printed.

    python benchmarks/bench_prior_cache.py [--batch 64] [--repeats 30]
"""

from __future__ import annotations

import argparse

import benchlib
import torch

from ekd_lightning.models import instantiate_model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="conformations per step")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    z, pos, batch, energy, _ = benchlib.flat_batch(benchlib.bundled_conformations(args.batch))
    n = len(energy)
    torch.manual_seed(0)
    model = instantiate_model({"_target_": "ekd_lightning.models.ani.ANIModel", "repulsion": "zbl"},
                              ["H", "C", "N", "O"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    features = model.features(z, pos, batch)
    species = model.species(z)
    with torch.no_grad():
        held = model.prior_energies(species, pos, batch, n)

    def step(prior) -> None:
        pred = model.energies_from_features(z, features, batch, n, prior())
        loss = ((pred - energy) ** 2).mean().float()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def without_prior() -> None:
        pred = model.sum_energies(species, model.atomic_contributions(species, None, batch,
                                                                      features=features), batch, n)
        loss = ((pred - energy) ** 2).mean().float()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    times = benchlib.alternate({
        "no prior": without_prior,
        "prior from positions": lambda: step(lambda: model.prior_energies(species, pos, batch, n)),
        "prior held": lambda: step(lambda: held),
    }, args.repeats)
    print(f"energy-only ani2x step from cached AEVs, {n} bundled conformations, {len(z)} atoms, "
          f"1 thread, {benchlib.cpu_model()}")
    benchlib.print_ratios(times, "no prior")


if __name__ == "__main__":
    main()
