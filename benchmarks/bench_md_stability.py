"""MD stability benchmark (Fu et al., "Forces are not enough", TMLR 2023) of trained checkpoints,
judged against GFN2-xTB run under the same test.

Batched Langevin MD (:mod:`ekd_lightning.analysis.batched_md`: every replica of every molecule in one
model call per step, on the model's device: ``--device auto`` is CUDA where visible) of each
model at each temperature, ``--replicas`` trajectories per molecule and temperature; failure
when a bond leaves its initial length by more than 0.5 Å (or the project's other criteria,
:data:`ekd_lightning.analysis.md.FU_CRITERIA`). GFN2-xTB (tblite through ASE) runs
``--reference-replicas`` trajectories per molecule and temperature under the same test (same
criteria, time step, friction, steps, record interval), cached in ``--reference-cache`` keyed
by everything that determines them. The table (:func:`ekd_lightning.analysis.stability.stability_table`)
writes to ``--out``: ``survival.csv`` / ``survival.png`` (Kaplan-Meier curves with 95%
intervals per model and temperature; each model against ``--reference`` and against GFN2-xTB
with the log-rank p-value and the difference in survival with its 95% interval),
``survival_by_molecule.csv`` (per model, molecule and temperature: survival, log-rank against
GFN2-xTB, failure modes and failed bonds, h(r) error), ``failures/`` (the geometry at each
failure, extxyz), ``barriers.csv`` (X-H bond-stretch barriers against GFN2-xTB's curve),
``stability.csv`` / ``.json``, and prints the tables with the wall time. Each (checkpoint,
temperature) run is cached beside its checkpoint (``md-batched-<key>.json``).

The full test of the issue (64 trajectories per model and temperature, 10 ps, 300/600/1000 K):

    python benchmarks/bench_md_stability.py --checkpoints student=A.ckpt baseline=B.ckpt \\
        --reference baseline --out runs/md-bench

The reference alone (no checkpoint), e.g. its survival at 1000 K:

    python benchmarks/bench_md_stability.py --temperatures 1000 --replicas 4 --steps 20000

Smaller: ``--replicas 4 --steps 2000`` (16 trajectories of 1 ps per temperature for the four
default molecules); ``--structures file.xyz`` to run your own molecules instead of ASE g2 ones.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from ekd_lightning.analysis.evaluate import format_table, parse_named
from ekd_lightning.analysis.md import DEFAULT_MOLECULES, default_molecules, molecules_from_file
from ekd_lightning.analysis.stability import stability_table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoints", nargs="*", default=[], metavar="[NAME=]CKPT",
                        help="none: the GFN2-xTB reference alone")
    parser.add_argument("--reference", default="baseline", help="model the others are tested against")
    parser.add_argument("--molecules", nargs="+", default=list(DEFAULT_MOLECULES), help="ASE g2 names")
    parser.add_argument("--structures", nargs="+", default=None, metavar="FILE",
                        help="ASE-readable structure files instead of --molecules")
    parser.add_argument("--temperatures", nargs="+", type=float, default=[300.0, 600.0, 1000.0])
    parser.add_argument("--replicas", type=int, default=16,
                        help="per molecule and temperature (16 × 4 molecules = 64)")
    parser.add_argument("--steps", type=int, default=20000, help="0.5 fs each (20000: 10 ps)")
    parser.add_argument("--nve-steps", type=int, default=2000)
    parser.add_argument("--reference-replicas", type=int, default=None,
                        help="GFN2-xTB trajectories per molecule and temperature under the same "
                        "test (default: --replicas; 0: only --reference-steps for h(r))")
    parser.add_argument("--reference-steps", type=int, default=None,
                        help="GFN2-xTB steps per trajectory (default: --steps)")
    parser.add_argument("--reference-cache", default="runs/md-reference")
    parser.add_argument("--barriers", action="store_true",
                        help="X-H bond-stretch barriers of each model against GFN2-xTB's")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--device", default="auto", help="torch device of the models (auto: "
                        "cuda where visible, else cpu)")
    parser.add_argument("--workers", type=int, default=1, help="processes, one (model, T) each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/md-bench")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    molecules = ([a for f in args.structures for a in molecules_from_file(f)] if args.structures
                 else default_molecules(args.molecules))
    reference_replicas = args.replicas if args.reference_replicas is None else args.reference_replicas
    start = time.perf_counter()
    pool = None
    if args.workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(args.workers)
    try:
        rows, survival = stability_table(
            parse_named(args.checkpoints), molecules, args.temperatures, engine="batched",
            replicas=args.replicas, steps=args.steps, nve_steps=args.nve_steps,
            reference=args.reference, reference_replicas=reference_replicas,
            reference_steps=args.steps if args.reference_steps is None else args.reference_steps,
            reference_cache=args.reference_cache, barriers=args.barriers, out_dir=Path(args.out),
            map_fn=pool.map if pool else map, cache=True, seed=args.seed, dtype=args.dtype,
            device=args.device)
    finally:
        if pool:
            pool.shutdown()
    print(format_table(rows))
    print()
    print(format_table(survival, list(dict.fromkeys(k for r in survival for k in r))))
    print(f"\nwall {time.perf_counter() - start:.0f} s; {len(molecules)} molecules × "
          f"{args.replicas} replicas × {len(args.temperatures)} temperatures × {args.steps} steps "
          f"per model; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
