"""Eager against compiled (``compile=true``) energy-only ViSNet teachers: training time and errors.

For each seed, trains a ``visnet_small`` teacher on the bundled data twice at the same time, in
two processes of one torch thread each (as the pipeline's two workers run), eager and compiled
(``torch.compile`` of the representation in training mode,
:meth:`~ekd_lightning.models.visnet.ViSNetModel.compile_for_training`), under the pipeline's
stopping rule with an epoch cap, so that both see the same load; prints each run's epochs,
training time, median time per epoch and test-split errors, and the compiled/eager ratio of
the median time per epoch (the compile is in the compiled run's first epoch)::

    python benchmarks/bench_compile.py [--seeds 104 105 106] [--max-epochs 30] [--out DIR]

The default cap is the quick start's (scripts/ekd.sh), the seeds those of its ViSNet teachers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command(seed: int, compiled: bool, max_epochs: int, run_dir: Path) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "stage=teacher", "model=visnet_small",
            f"seed={seed}", "callbacks=early_stopping", f"trainer.max_epochs={max_epochs}",
            "logger=csv", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            f"compile={str(compiled).lower()}", "resume=false", f"hydra.run.dir={run_dir}"]


def result(seed: int, compiled: bool, run_dir: Path) -> dict:
    """A finished run's epochs, times (s) and test-split errors (kcal/mol, kcal/mol/Å)."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = json.loads((run_dir / "history.json").read_text())
    epochs = [b["time_s"] - a["time_s"] for a, b in zip(history, history[1:], strict=False)]
    return {"seed": seed, "compiled": compiled, "epochs": metrics["epochs"],
            "stopped_early": metrics["stopped_early"], "train_time_s": metrics["train_time_s"],
            "first_epoch_s": history[0]["time_s"], "median_epoch_s": statistics.median(epochs),
            "test_force_mae": metrics["test/force_mae"], "test_energy_mae": metrics["test/energy_mae"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[104, 105, 106])
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None, help="run folders (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.max_epochs < 2:
        parser.error("--max-epochs must be at least 2: the time per epoch is taken after the first")
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_compile-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    rows = []
    for seed in args.seeds:
        dirs = {c: out / f"visnet-seed{seed}-{'compiled' if c else 'eager'}" for c in (False, True)}
        jobs = []
        for compiled, run_dir in dirs.items():
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir.with_suffix(".log"), "w") as log:  # the child keeps its own handle
                jobs.append(subprocess.Popen(command(seed, compiled, args.max_epochs, run_dir),
                                             env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log))
        if any([job.wait() for job in jobs]):  # a list: wait for both before failing
            raise SystemExit(f"a run failed: see {out}/*.log")
        rows += [result(seed, c, d) for c, d in dirs.items()]
    print("| seed | compiled | epochs | training time s | first epoch s | median epoch s | test force MAE | test energy MAE |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['compiled']} | {r['epochs']} | {r['train_time_s']:.0f} | "
              f"{r['first_epoch_s']:.1f} | {r['median_epoch_s']:.2f} | {r['test_force_mae']:.2f} | "
              f"{r['test_energy_mae']:.2f} |")
    ratios = [c["median_epoch_s"] / e["median_epoch_s"] for e, c in zip(rows[0::2], rows[1::2], strict=True)]
    print(f"# compiled / eager median time per epoch: {', '.join(f'{x:.2f}' for x in ratios)} "
          f"(mean {statistics.mean(ratios):.2f})")
    (out / "bench_compile.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
