"""The energy-only training step of teacher architectures, side by side: the cost column of
issue 24's teacher levers.

Each model config (``conf/model/<name>.yaml``, random weights, float32) takes the same batch of
bundled training conformations (the teachers' batch of 64 by default) through one energy-only
step as ``stage=teacher`` trains it from positions (energies, loss, backward, AdamW; an ANI
teacher's AEV cache, ``feature_cache_mb``, is not used, so every architecture does the same
work). The steps of all models alternate in one process after warm-up, one torch thread;
medians and ratios to the first model are printed.

    python benchmarks/bench_teacher_step.py [--models ani2x visnet_small mace_small] [--batch 64] [--repeats 20]
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import benchlib
import torch
from bench_train_step import ours_step
from omegaconf import OmegaConf

import ekd_lightning.conf
from ekd_lightning.models import instantiate_model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ani2x", "visnet_small", "mace_small"])
    parser.add_argument("--batch", type=int, default=64, help="conformations per step")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="The TorchScript type system")  # e3nn's codegen
    flat = benchlib.flat_batch(benchlib.bundled_conformations(args.batch))
    conf = Path(ekd_lightning.conf.__file__).parent / "model"
    steps = {}
    for name in args.models:
        torch.manual_seed(0)
        model = instantiate_model(OmegaConf.load(conf / f"{name}.yaml"), ["H", "C", "N", "O"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        steps[name] = lambda m=model, o=optimizer: ours_step(m, o, flat, with_forces=False)
    times = benchlib.alternate(steps, args.repeats)
    print(f"energy-only step, {len(flat[3])} bundled conformations, {len(flat[0])} atoms, 1 thread, "
          f"{benchlib.cpu_model()}")
    benchlib.print_ratios(times, args.models[0])


if __name__ == "__main__":
    main()
