"""Where the time of one ``ani2x`` training step goes (torch.profiler, CPU, 1 thread).

Profiles the energy+forces step of ``bench_train_step.py`` (batch of 256 bundled
conformations, 7-element ANI-2x architecture) after warm-up and prints the operators with the
largest self CPU time, plus the share of the element networks' matrix products (``addmm``,
``mm``, ``bmm``: work that is the same in any ANI implementation).

    python benchmarks/profile_train_step.py [--mode energy] [--steps 5] [--top 15]
"""

from __future__ import annotations

import argparse

import benchlib
import torch
from bench_train_step import ours_step
from torch.profiler import ProfilerActivity, profile

from ekd_lightning.models.ani import ANIModel

MATMUL = ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["forces", "energy"], default="forces")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ANIModel(benchlib.ANI2X_ELEMENTS)
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
    print(f"# {args.mode} step, {args.batch} bundled conformations, 1 thread, {benchlib.machine_line()}")
    print(f"# {total / args.steps / 1e3:.0f} ms/step profiled; matrix products "
          f"{matmul / total:.0%} of self CPU time")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
