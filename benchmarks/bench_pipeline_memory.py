"""Peak memory (RSS) of the one-command pipeline, ``python train.py experiment=ekd``.

Runs the pipeline as a child process, in a reduced variant by default (every stage runs, with
fewer epochs, one seed and short MD; see ``REDUCED``), under its own run name and store
(``runs/<run-name>``, deleted afterwards unless ``--keep``), and samples the memory of the whole
process tree (the pipeline trains in ``pipeline.workers`` spawned processes) every
``--interval`` seconds with psutil:

- peak RSS of the main process and of the largest single process (the kernel's own maximum,
  ``getrusage(RUSAGE_CHILDREN).ru_maxrss``, is printed as well: it sees every peak, however
  short);
- peak sum of RSS over the tree (counts shared pages, e.g. the torch libraries, once per
  process: an upper bound) and peak sum of PSS (shared pages split between the processes
  that map them: what the tree really occupies; slower to sample).

    python benchmarks/bench_pipeline_memory.py                  # reduced pipeline
    python benchmarks/bench_pipeline_memory.py --full           # python train.py experiment=ekd
    python benchmarks/bench_pipeline_memory.py -- pipeline.workers=1   # extra overrides
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
REDUCED = [
    "pipeline.teachers.max_epochs=2",
    "pipeline.max_epochs=2",
    "pipeline.seeds=[0]",
    "pipeline.oracle_seeds=[0]",
    "pipeline.md.steps=100",
    "pipeline.md.nve_steps=50",
]
GIB = 1024**3


def tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def sample(procs: list[psutil.Process], with_pss: bool) -> tuple[list[int], int]:
    """RSS of each process (bytes) and the summed PSS (0 when not sampled)."""
    rss, pss = [], 0
    for p in procs:
        try:
            if with_pss:
                info = p.memory_full_info()
                rss.append(info.rss)
                pss += info.pss
            else:
                rss.append(p.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return rss, pss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-name", default="memtest")
    parser.add_argument("--full", action="store_true", help="no reduction (hours on 2 CPU cores)")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("--pss-every", type=int, default=5, help="sample PSS every N samples")
    parser.add_argument("--keep", action="store_true", help="keep runs/<run-name> afterwards")
    parser.add_argument("--store", default=None,
                        help="pipeline.store (default: runs/<run-name>/store, a fresh one)")
    parser.add_argument("--log", default=None, help="pipeline output file (default: discarded)")
    parser.add_argument("--trace", default=None,
                        help="CSV of every PSS sample (seconds, processes, main RSS, largest RSS, "
                             "sum of RSS, sum of PSS; GiB): where in the run the peak falls")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides (after --)")
    args = parser.parse_args()

    run_dir = ROOT / "runs" / args.run_name
    if run_dir.exists():
        sys.exit(f"{run_dir} exists: remove it or choose another --run-name")
    command = [sys.executable, "train.py", "experiment=ekd", f"run_name={args.run_name}",
               f"pipeline.store={args.store or f'runs/{args.run_name}/store'}",
               *([] if args.full else REDUCED), *args.overrides]
    print("$", " ".join(command[1:]), flush=True)
    log = open(args.log, "w") if args.log else subprocess.DEVNULL  # noqa: SIM115
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    main_proc = psutil.Process(child.pid)
    peak = {"main": 0, "largest": 0, "sum_rss": 0, "sum_pss": 0, "processes": 0}
    n = 0
    trace = open(args.trace, "w") if args.trace else None  # noqa: SIM115
    if trace:
        trace.write("seconds,processes,main_rss,largest_rss,sum_rss,sum_pss\n")
    try:
        while child.poll() is None:
            procs = tree(main_proc)
            rss, pss = sample(procs, with_pss=n % args.pss_every == 0)
            if rss and trace and pss:
                trace.write(f"{time.perf_counter() - start:.1f},{len(rss)},{rss[0] / GIB:.3f},"
                            f"{max(rss) / GIB:.3f},{sum(rss) / GIB:.3f},{pss / GIB:.3f}\n")
            if rss:
                peak["main"] = max(peak["main"], rss[0])
                peak["largest"] = max(peak["largest"], max(rss))
                peak["sum_rss"] = max(peak["sum_rss"], sum(rss))
                peak["sum_pss"] = max(peak["sum_pss"], pss)
                peak["processes"] = max(peak["processes"], len(rss))
            n += 1
            time.sleep(args.interval)
    finally:
        if child.poll() is None:
            child.terminate()
        child.wait()
        if args.log:
            log.close()
        if trace:
            trace.close()
    wall = time.perf_counter() - start
    kernel_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    ok = child.returncode == 0
    print(f"# pipeline {'(reduced: ' + ' '.join(REDUCED) + ')' if not args.full else '(full)'}"
          f"{' ' + ' '.join(args.overrides) if args.overrides else ''}")
    print(f"# exit code {child.returncode}, {wall:.0f} s wall, {n} samples every {args.interval} s, "
          f"up to {peak['processes']} processes, {os.cpu_count()} CPUs")
    print(f"{'measure':44s} {'GiB':>7s}")
    rows = [
        ("peak RSS, main process", peak["main"]),
        ("peak RSS, largest single process (sampled)", peak["largest"]),
        ("peak RSS, largest single process (kernel)", kernel_peak),
        ("peak sum of RSS over the process tree", peak["sum_rss"]),
        ("peak sum of PSS over the process tree", peak["sum_pss"]),
    ]
    for label, value in rows:
        print(f"{label:44s} {value / GIB:7.2f}")
    verdict = max(peak["sum_pss"], kernel_peak)
    print(f"target < 2 GiB: {'met' if verdict < 2 * GIB else 'MISSED'} "
          f"(max of tree PSS and largest process: {verdict / GIB:.2f} GiB)")
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"removed {run_dir.relative_to(ROOT)}")
    if not ok:
        sys.exit(f"the pipeline failed (exit code {child.returncode}); rerun with --log FILE --keep")


if __name__ == "__main__":
    main()
