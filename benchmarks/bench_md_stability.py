"""MD stability benchmark (Fu et al., "Forces are not enough", TMLR 2023) of trained checkpoints.

Batched Langevin MD (:mod:`ekd_lightning.analysis.batched_md`: every replica of every molecule in one
model call per step) of each model at each temperature, ``--replicas`` trajectories per
molecule and temperature; failure when a bond leaves its initial length by more than 0.5 Å (or
the project's other criteria, :class:`ekd_lightning.analysis.md.StabilityCriteria`). Writes to ``--out``:
``survival.csv`` / ``survival.png`` (Kaplan-Meier curves with 95% intervals per model and
temperature, and each model against ``--reference`` with the log-rank p-value and the
difference in survival at the end with its 95% interval), ``stability.csv`` / ``.json`` (every
trajectory, h(r) histograms and their error against GFN2-xTB MD of the same molecules, cached
in ``--reference-cache``), and prints the tables with the wall time. Each (checkpoint,
temperature) run is cached beside its checkpoint (``md-batched-<key>.json``, keyed by the
checkpoint's bytes, the molecules and every setting), so a model already run is not run again.

The full test of the issue (64 trajectories per model and temperature, 10 ps, 300/600/1000 K):

    python benchmarks/bench_md_stability.py --checkpoints student=A.ckpt baseline=B.ckpt \\
        --reference baseline --out runs/md-bench

Smaller: ``--replicas 4 --steps 2000`` (16 trajectories of 1 ps per temperature for the four
default molecules); ``--structures file.xyz`` to run your own molecules instead of ASE g2 ones.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from ekd_lightning.analysis.batched_md import batched_stability_table
from ekd_lightning.analysis.evaluate import format_table, parse_named
from ekd_lightning.analysis.md import default_molecules, molecules_from_file

MOLECULES = ("CH3OH", "CH3CH2OH", "CH3CHO", "CH3CONH2")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoints", nargs="+", required=True, metavar="[NAME=]CKPT")
    parser.add_argument("--reference", default="baseline", help="model the others are tested against")
    parser.add_argument("--molecules", nargs="+", default=list(MOLECULES), help="ASE g2 names")
    parser.add_argument("--structures", nargs="+", default=None, metavar="FILE",
                        help="ASE-readable structure files instead of --molecules")
    parser.add_argument("--temperatures", nargs="+", type=float, default=[300.0, 600.0, 1000.0])
    parser.add_argument("--replicas", type=int, default=16,
                        help="per molecule and temperature (16 × 4 molecules = 64)")
    parser.add_argument("--steps", type=int, default=20000, help="0.5 fs each (20000: 10 ps)")
    parser.add_argument("--nve-steps", type=int, default=2000)
    parser.add_argument("--reference-steps", type=int, default=20000,
                        help="GFN2-xTB MD steps per molecule and temperature for h(r) (0: none)")
    parser.add_argument("--reference-cache", default="runs/md-reference")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--workers", type=int, default=1, help="processes, one (model, T) each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/md-bench")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    molecules = ([a for f in args.structures for a in molecules_from_file(f)] if args.structures
                 else default_molecules(args.molecules))
    start = time.perf_counter()
    pool = None
    if args.workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(args.workers)
    try:
        rows, survival = batched_stability_table(
            parse_named(args.checkpoints), molecules, args.temperatures, args.replicas, args.steps,
            nve_steps=args.nve_steps, reference=args.reference,
            reference_steps=args.reference_steps, reference_cache=args.reference_cache,
            out_dir=Path(args.out), map_fn=pool.map if pool else map, cache=True, seed=args.seed,
            dtype=args.dtype)
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
