"""Student against baseline, seed by seed and over seeds, from MD benchmark runs.

Reads the per-trajectory rows (``stability_runs.csv``) that ``bench_md_stability.py`` writes and
pairs every model named ``student<tag>`` with ``baseline<tag>`` at each temperature: intact
counts and the log-rank p of each pair, then, with ``--pool``, one log-rank test over all pairs
stratified by pair (seed), with the total intact counts. This is where the per-seed and
"over the 3 seeds" p values of docs/md-stability-results.md come from::

    python benchmarks/md_logrank.py runs_s0/stability_runs.csv runs_s12/stability_runs.csv --pool
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict

from ekd_lightning.analysis.survival import logrank


def read_runs(paths) -> dict[tuple[str, str], list[tuple[float, bool]]]:
    """(model, temperature K) -> [(time to failure fs, failed)] over every file."""
    runs: dict[tuple[str, str], list[tuple[float, bool]]] = defaultdict(list)
    for path in paths:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                runs[(row["model"], row["temperature_K"])].append(
                    (float(row["time_to_failure_fs"]), row["stable"] != "True"))
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="stability_runs.csv files")
    parser.add_argument("--pool", action="store_true", help="also one test stratified by pair")
    args = parser.parse_args(argv)
    runs = read_runs(args.runs)
    pooled: dict[str, list] = defaultdict(list)  # temperature -> [(pair, student, baseline)]
    for (model, temperature), student in sorted(runs.items()):
        baseline = runs.get((model.replace("student", "baseline", 1), temperature))
        if not model.startswith("student") or baseline is None:
            continue
        test = logrank(*zip(*student, strict=True), *zip(*baseline, strict=True))
        print(f"{model} vs its baseline at {temperature} K: intact "
              f"{sum(not f for _, f in student)}/{len(student)} vs "
              f"{sum(not f for _, f in baseline)}/{len(baseline)}, log-rank p = {test['p']:.2g}")
        pooled[temperature].append((model, student, baseline))
    if args.pool:
        for temperature, pairs in pooled.items():
            student = [(pair, t, f) for pair, rows, _ in pairs for t, f in rows]
            baseline = [(pair, t, f) for pair, _, rows in pairs for t, f in rows]
            (ss, ts, fs), (sb, tb, fb) = zip(*student, strict=True), zip(*baseline, strict=True)
            test = logrank(ts, fs, tb, fb, ss, sb)
            print(f"over the pairs at {temperature} K (stratified by pair): intact "
                  f"{fs.count(False)}/{len(fs)} vs {fb.count(False)}/{len(fb)}, "
                  f"log-rank p = {test['p']:.2g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
