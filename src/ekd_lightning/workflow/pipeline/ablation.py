"""The ablation table: one row per pipeline report under a folder
(``python -m ekd_lightning.workflow.pipeline ablation FOLDER``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from ...core.files import write_text_atomic
from .report import FORCE_MAE, format_mean_spread


def _entry(summary: Sequence[Mapping], model: str) -> Mapping:
    return next((e for e in summary if e["model"] == model), {})


def ablation_row(name: str, report: Mapping) -> dict:
    """One ablation-table row from a pipeline's ``summary.json``."""
    row: dict[str, object] = {"variant": name}
    for split in ("heldout", "test"):
        if split not in report:
            continue
        summary = report[split]["summary"]
        student, baseline = _entry(summary, "student"), _entry(summary, "baseline")
        row[f"{split}_student_force"] = format_mean_spread(student, FORCE_MAE)
        row[f"{split}_baseline_force"] = format_mean_spread(baseline, FORCE_MAE)
        row[f"{split}_ensemble_force"] = format_mean_spread(_entry(summary, "ensemble"), FORCE_MAE)
        if report.get("best_teacher"):
            row[f"{split}_best_teacher_force"] = format_mean_spread(_entry(summary, report["best_teacher"]),
                                                      FORCE_MAE)
        row[f"{split}_gap_closed"] = report[split]["force_gap_closed"]
        if student and baseline:
            row[f"{split}_energy_ratio"] = student["energy_mae"] / baseline["energy_mae"]
    runs = report.get("runs") or {}  # older reports have no run records: no MD columns
    for md in report.get("md", []):
        if md["model"] in runs:
            row[f"md_stable_{runs[md['model']]['role']}"] = md["stable_fraction"]
    return row


ABLATION_COLUMNS = {
    "variant": "variant",
    "heldout_student_force": "held-out F student",
    "heldout_baseline_force": "F baseline",
    "heldout_best_teacher_force": "F best teacher",
    "heldout_ensemble_force": "F teacher ensemble",
    "heldout_gap_closed": "gap closed",
    "heldout_energy_ratio": "E student/baseline",
    "test_student_force": "test-set F student",
    "test_baseline_force": "F baseline",
    "test_gap_closed": "gap closed",
    "test_energy_ratio": "E student/baseline",
    "md_stable_student": "MD stable student",
    "md_stable_baseline": "baseline",
}


def ablation_table(folder: str | Path) -> str:
    """Markdown table of every pipeline report under ``folder`` (``*/report/summary.json``)."""
    rows = []
    for path in sorted(Path(folder).glob("*/report/summary.json")):
        rows.append(ablation_row(path.parents[1].name, json.loads(path.read_text())))
    if not rows:
        raise FileNotFoundError(f"{folder}: no */report/summary.json (run scripts/ablation.sh)")

    def cell(value) -> str:
        if isinstance(value, float):
            return "—" if not math.isfinite(value) else (f"{value:.0%}" if abs(value) <= 5 else f"{value:.2f}")
        return "—" if value is None else str(value)

    lines = ["| " + " | ".join(ABLATION_COLUMNS.values()) + " |",
             "|" + "---|" * len(ABLATION_COLUMNS)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in ABLATION_COLUMNS) + " |" for r in rows]
    note = ("Forces: MAE in kcal/mol/Å, mean ± std over student/baseline seeds; gap closed = "
            "(baseline − student) / (baseline − oracle), every model under one stopping rule, "
            "— when the oracle is not clearly better than the baseline; E ratio = student / baseline energy MAE; "
            "MD: fraction of stable Langevin trajectories.")
    return "\n".join([*lines, "", note])


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ekd_lightning.workflow.pipeline ablation FOLDER [--out FILE]``: print the ablation
    table (and write it to FILE atomically)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ekd_lightning.workflow.pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    table = sub.add_parser("ablation", help="table of the pipeline reports under a folder")
    table.add_argument("folder")
    table.add_argument("--out", help="also write the table to this file (atomically)")
    args = parser.parse_args(argv)
    text = ablation_table(args.folder)
    if args.out:
        write_text_atomic(text + "\n", Path(args.out))
    print(text)
    return 0
