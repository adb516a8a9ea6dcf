"""Where the time of one training step goes (torch.profiler, CPU, 1 thread).

Profiles the energy+forces step of ``bench_train_step.py`` (batch of 256 bundled
conformations, 7-element ANI-2x architecture) after warm-up and prints the operators with the
largest self CPU time, plus the share of the element networks' matrix products (``addmm``,
``mm``, ``bmm``: work that is the same in any ANI implementation).

``--model visnet_small`` profiles the ``visnet_small`` teacher (conf/model/visnet_small.yaml)
instead and also prints the share of its forward pass spent on what depends on the positions
alone (neighbour pairs, their radial and spherical-harmonic expansions): for an energy-only
teacher these are the same every epoch, so that share bounds what caching them could save.
``--compile`` then times the same step with ``torch.compile`` on the model's representation
(inductor, dynamic shapes) against eager, in this process, after warm-up (the compile time is
printed apart).

    python benchmarks/profile_train_step.py [--model visnet_small] [--mode energy] [--steps 5] [--compile]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import benchlib
import torch
from bench_train_step import ours_step
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile

import ekd_lightning.conf
from ekd_lightning.models import instantiate_model
from ekd_lightning.models.ani import ANIModel
from ekd_lightning.models.visnet import ViSNetModel

MATMUL = ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul")
GEOMETRY = ("distance", "sphere", "distance_expansion")
"""ViSNet submodules whose output depends on the positions alone."""


def compiled_ratio(make_model, flat, with_forces: bool, steps: int = 10) -> tuple[float, float, float]:
    """(eager ms/step, compiled ms/step, compile-and-warm-up s) of the training step of two
    fresh models, the second with ``torch.compile(representation, dynamic=True)``."""
    import time

    def run(model) -> tuple[float, float]:
        optimizer = torch.optim.AdamW(model.parameters(), 1e-4)
        start = time.perf_counter()
        for _ in range(3):
            ours_step(model, optimizer, flat, with_forces)
        warm = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            ours_step(model, optimizer, flat, with_forces)
        return (time.perf_counter() - start) / steps * 1e3, warm

    eager, _ = run(make_model())
    model = make_model()
    model.representation.compile(dynamic=True)
    compiled, warm = run(model)
    return eager, compiled, warm


def geometry_share(model: ViSNetModel, flat, repeats: int = 5) -> float:
    """Fraction of the forward pass's wall time spent in :data:`GEOMETRY` submodules."""
    import time

    spent = [0.0]
    starts: dict[str, float] = {}
    for name in GEOMETRY:
        module = getattr(model.representation, name)
        module.register_forward_pre_hook(lambda m, a, n=name: starts.__setitem__(n, time.perf_counter()))
        module.register_forward_hook(
            lambda m, a, o, n=name: spent.__setitem__(0, spent[0] + time.perf_counter() - starts[n]))
    z, pos, batch, energy, _ = flat
    total = 0.0
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            model(z, pos, batch, len(energy))
            total += time.perf_counter() - start
    return spent[0] / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["ani2x", "visnet_small"], default="ani2x")
    parser.add_argument("--mode", choices=["forces", "energy"], default="forces")
    parser.add_argument("--compile", action="store_true", help="visnet_small: eager vs compiled")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    def make_model():
        if args.model == "ani2x":
            return ANIModel(benchlib.ANI2X_ELEMENTS)
        config = OmegaConf.load(Path(ekd_lightning.conf.__file__).parent / "model" / "visnet_small.yaml")
        return instantiate_model(OmegaConf.to_container(config), benchlib.ANI2X_ELEMENTS)

    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4)
    flat = benchlib.flat_batch(benchlib.bundled_conformations(args.batch))
    with_forces = args.mode == "forces"
    for _ in range(3):
        ours_step(model, optimizer, flat, with_forces)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            ours_step(model, optimizer, flat, with_forces)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL)
    print(f"# {args.model} {args.mode} step, {args.batch} bundled conformations, 1 thread, "
          f"{benchlib.machine_line()}")
    print(f"# {total / args.steps / 1e3:.0f} ms/step profiled; matrix products "
          f"{matmul / total:.0%} of self CPU time")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))
    if args.model == "visnet_small":
        print(f"# forward pass: {geometry_share(model, flat):.0%} of its time in the positions-only "
              f"submodules {', '.join(GEOMETRY)}")
        if args.compile:
            eager, compiled, warm = compiled_ratio(make_model, flat, with_forces)
            print(f"# torch.compile: {compiled:.1f} ms/step against eager {eager:.1f} "
                  f"({compiled / eager:.2f}x), compile and warm-up {warm:.0f} s")


if __name__ == "__main__":
    main()
