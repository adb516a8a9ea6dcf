"""Render the result tables of the docs (and the README's headline table) from JSON.

Every generated block in ``README.md`` and ``docs/*.md`` sits between two marker comments::

    <!-- rendered from results/tables/converged.json by python docs/render.py: do not edit -->
    | ... the table ... |
    <!-- end rendered -->

The path (relative to ``docs/``) names a table spec: which rows (a report, ``summary.json`` in the
pipeline's schema, and a model in it) and which columns. The figures come only from the
reports: ``docs/results/<name>/summary.json`` (what ``ekd-train experiment=ekd`` writes to
``runs/<run>/report/summary.json``) and ``docs/results/md/*.json`` (survival rows of
``ekd_lightning.analysis.batched_md.survival_table``, as ``benchmarks/bench_md_stability.py``
computes them).

Commands::

    python docs/render.py                 # rewrite every rendered block
    python docs/render.py --check         # exit 1 and name the blocks that differ
    python docs/render.py report runs/ekd/report/summary.json   # a fresh report's table

No ekd-lightning import: this is a docs tool and runs on the standard library alone.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
BLOCK = re.compile(r"(<!-- rendered from (\S+) by python docs/render\.py: do not edit -->\n)"
                   r"(.*?)(<!-- end rendered -->)", re.S)

HEADERS = {
    "epochs": "epochs (best)",
    "heldout.force_mae": "held-out force MAE",
    "heldout.energy_mae": "held-out energy MAE",
    "heldout.de_mae": "held-out ΔE MAE",
    "test.force_mae": "test-set force MAE",
    "test.energy_mae": "test-set energy MAE",
    "test.de_mae": "test-set ΔE MAE",
}
SEEDED = ("baseline", "student", "oracle")
"""Roles summarised over seeds in a pipeline report (``ekd_lightning.workflow.pipeline.SEEDED``)."""


def load(path: str | Path) -> dict:
    return json.loads((DOCS / path).read_text())


# ----------------------------------------------------------------------------- cells
def number(value, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def metric(entry: dict | None, key: str) -> str:
    """``v ± std`` (2 decimals) of a seed-summary entry; a ``[low, high]`` range as ``low-high``;
    ``—`` when absent."""
    if not entry or entry.get(key) is None:
        return "—"
    value = entry[key]
    if isinstance(value, list):
        return "-".join(f"{v:g}" for v in value)  # as recorded: no digits added
    if not math.isfinite(value):
        return "—"
    std = entry.get(f"{key}_std")
    return f"{number(value)} ± {number(std)}" if std is not None else number(value)


def epoch_cell(record: dict | None) -> str:
    """``epochs`` (``(best)`` when recorded) and ``cap`` when the run reached its epoch cap."""
    if not record or record.get("epochs") is None:
        return "—"
    text = str(record["epochs"])
    if record.get("best_epoch") is not None:
        text += f" ({record['best_epoch']})"
    if record.get("stopped_early") is False:
        text += " cap"
    return text


def run_names(report: dict, role: str) -> list[str]:
    """The report's runs of ``role`` in seed order (pipeline names: ``<role>-seed<seed>``)."""
    runs = report.get("runs") or {}
    names = [n for n, r in runs.items() if r.get("role") == role]
    return sorted(names, key=lambda n: (runs[n].get("seed") or 0, n))


def epochs(report: dict, model: str, each: bool = False) -> str:
    """The epochs of the runs behind a row: every seed of a seeded role, the range over the
    teachers for the ensemble (``each``: every teacher's), a listed ``members`` group, or the
    run itself."""
    training = report.get("training") or {}
    if model in SEEDED:
        names = run_names(report, model)
    elif model == "ensemble" and each:
        names = run_names(report, "teacher")
    elif model == "ensemble":
        found = [training[n]["epochs"] for n in run_names(report, "teacher")
                 if training.get(n, {}).get("epochs") is not None]
        return f"{min(found)}-{max(found)}" if found else "—"
    else:
        entry = find(report, "heldout", model) or find(report, "test", model) or {}
        names = entry.get("members") or [model]
    cells = [epoch_cell(training.get(n)) for n in names]
    cells = [c for c in cells if c != "—"]
    return ", ".join(cells) if cells else "—"


def find(report: dict, split: str, model: str) -> dict | None:
    return next((e for e in (report.get(split) or {}).get("summary", []) if e["model"] == model),
                None)


def md_cell(report: dict, model: str, temperature: str) -> str:
    """The survival at ``temperature`` of the row's seed-0 run in the report's MD step."""
    names = (run_names(report, model) or [f"{model}-seed0"]) if model in SEEDED else [model]
    for row in report.get("md") or []:
        if names and row.get("model") == names[0]:
            return row.get(f"survival_{temperature}", "—")
    return "—"


SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def p_value(p) -> str:
    if p is None:
        return "—"
    if p < 1e-3:  # 1.1 × 10⁻⁴
        mantissa, exponent = f"{p:.1e}".split("e")
        return f"{mantissa} × 10" + str(int(exponent)).translate(SUPERSCRIPT)
    return f"{p:.2g}"


def survival(row: dict | None, counts: bool = True) -> str:
    """``k/n, S [low, high]`` of a survival row (``counts``: with ``k/n`` where recorded);
    ``k/n intact`` alone for a row without an interval."""
    if not row or row.get("survival") is None:
        return "—"
    known = row.get("n") is not None and row.get("failures") is not None
    fraction = f"{row['n'] - row['failures']}/{row['n']}" if known else ""
    if row.get("survival_low") is None:
        return f"{fraction} intact" if known else number(row["survival"])
    text = f"{number(row['survival'])} [{number(row['survival_low'])}, {number(row['survival_high'])}]"
    return f"{fraction}, {text}" if counts and known else text


def survival_row(data: dict, model: str, temperature: str) -> dict | None:
    return next((r for r in data["survival"]
                 if r["model"] == model and r["temperature"] == temperature), None)


def signed(value: float) -> str:
    return "0" if value == 0 else f"{value:+.2f}".replace("-", "−")


def bound(value: float) -> str:
    return f"{value:.2f}".replace("-", "−")


# ----------------------------------------------------------------------------- tables
def cell(column: str, row: dict) -> str:
    """One cell of a report table: ``epochs``, ``<split>.<metric>``, ``md.<T>``, any of these
    as ``<model>@...`` (another model of the same report), or several joined by `` / ``."""
    column = (row.get("cells") or {}).get(column, column)  # a row's own spec for a column
    if column == "—":
        return column
    if " / " in column:
        return " / ".join(cell(part, row) for part in column.split(" / "))
    if column.startswith(("survival.", "survival_n.")):  # a benchmark's survival rows:
        kind, spec = column.split(".", 1)               # survival[_n].<file>:<model>:<T>
        path, name, temperature = spec.split(":")       # (_n: with the count intact/n)
        return survival(survival_row(load(path), name, temperature), counts=kind == "survival_n")
    report = load(row["report"])
    model = row["model"]
    if "@" in column:
        model, column = column.split("@", 1)
    if column == "epochs":
        return epochs(report, model, each=row.get("epochs_each", False))
    if column.startswith("vs_baseline."):  # the row's change against its baseline row
        split, key = column[len("vs_baseline."):].split(".", 1)
        base = row.get("baseline") or {"report": row["report"], "model": "baseline"}
        mine, ref = find(report, split, model), find(load(base["report"]), split, base["model"])
        if model == base["model"] or not mine or not ref or mine.get(key) is None:
            return "—"
        return f"{mine[key] / ref[key] - 1:+.0%}".replace("-", "−")
    if column.startswith("md."):
        return md_cell(report, model, column[3:])
    split, key = column.split(".", 1)
    return metric(find(report, split, model), key)


def bold_cells(row: dict, columns: list[str], cells: list[str]) -> list[str]:
    """A student's figures in bold where they beat its report's baseline (lower is better)."""
    if row.get("model") != "student" or not row.get("bold_better", True):
        return cells
    report = load(row["report"])
    out = []
    for column, text in zip(columns, cells, strict=True):
        parts = column.split(".", 1)
        if len(parts) == 2 and parts[0] in ("heldout", "test") and "@" not in column:
            mine, base = find(report, parts[0], "student"), find(report, parts[0], "baseline")
            if mine and base and mine.get(parts[1]) is not None and base.get(parts[1]) is not None \
                    and mine[parts[1]] < base[parts[1]]:
                text = f"**{text}**"
        out.append(text)
    return out


def report_table(spec: dict) -> str:
    """Rows of models from reports (``summary.json``) against columns of their figures."""
    columns = spec["columns"]
    headers = [spec.get("headers", {}).get(c, HEADERS.get(c, c)) for c in columns]
    lines = ["| " + " | ".join([spec.get("corner", "model"), *headers]) + " |",
             "|" + "---|" * (len(columns) + 1)]
    for row in spec["rows"]:
        if "section" in row:
            lines.append(f"| **{row['section']}** |" + " |" * len(columns))
            continue
        cells = bold_cells(row, columns, [cell(c, row) for c in columns])
        label = row.get("label") or row["model"]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


def survival_table(spec: dict) -> str:
    """A benchmark's survival, one row per temperature: model against reference."""
    data = load(spec["data"])
    model, reference = spec["model"], spec["reference"]
    lines = ["| T | " + " | ".join(spec["headers"]) + " |", "|" + "---|" * (len(spec["headers"]) + 1)]
    for temperature in spec["temperatures"]:
        mine, ref = survival_row(data, model, temperature), survival_row(data, reference, temperature)
        if temperature == "all":
            row = [survival(mine, counts=False), survival(ref, counts=False)]
            name = "all (stratified)"
        else:
            row = [survival(mine), survival(ref)]
            name = temperature.replace("K", " K")
        diff = mine.get("difference")
        if diff is None:
            row.append("—")
        elif mine.get("difference_low") is None:
            row.append(signed(diff))
        else:
            row.append(f"{signed(diff)} [{bound(mine['difference_low'])}, "
                       f"{bound(mine['difference_high'])}]")
        row.append(p_value(mine.get("p_logrank")))
        if temperature == "all":
            row += ["", ""]
        else:
            row.append(f"{mine['mean_time_fs'] / 1000:.2f} / {ref['mean_time_fs'] / 1000:.2f} ps")
            row.append(f"{mine['hr_error']:.3f} / {ref['hr_error']:.3f}")
        lines.append("| " + " | ".join([name, *row]) + " |")
    return "\n".join(lines)


def survival_models_table(spec: dict) -> str:
    """A benchmark's survival, one row per model: survival per temperature, the log-rank p
    against the reference (at the hottest temperature / all), against a second model
    (``versus``, from the record's ``comparisons``) and the h(r) error per temperature."""
    data = load(spec["data"])
    temps = spec["temperatures"]
    hottest = temps[-1]
    headers = [t.replace("K", " K") for t in temps] + [
        f"log-rank p vs baseline ({hottest.replace('K', ' K')} / all T)", spec["versus_header"],
        "h(r) error " + " / ".join(t.replace("K", "") for t in temps) + " K"]
    lines = ["| " + " | ".join([spec["corner"], *headers]) + " |", "|" + "---|" * (len(headers) + 1)]
    for entry in spec["rows"]:
        model = entry["model"]
        rows = [survival_row(data, model, t) for t in temps]
        cells = [survival(r, counts=False) for r in rows]
        if model == spec["reference"]:
            cells.append("")
        else:
            every = survival_row(data, model, "all") or {}
            cells.append(f"{p_value(rows[-1].get('p_logrank'))} / {p_value(every.get('p_logrank'))}")
        pair = next((c for c in data.get("comparisons", []) if c["model"] == model
                     and c["reference"] == spec["versus"]
                     and c["temperature"] == spec["versus_temperature"]), None)
        cells.append(f"{signed(pair['difference'])} [{bound(pair['difference_low'])}, "
                     f"{bound(pair['difference_high'])}], p = {p_value(pair['p_logrank'])}"
                     if pair else "")
        cells.append(" / ".join(f"{r['hr_error']:.3f}" for r in rows))
        lines.append("| " + " | ".join([entry["label"], *cells]) + " |")
    return "\n".join(lines)


def literal_table(spec: dict) -> str:
    """A benchmark's own table, recorded as it printed it (``header``, ``rows``)."""
    lines = ["| " + " | ".join(spec["header"]) + " |", "|" + "---|" * len(spec["header"])]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in spec["rows"]]
    return "\n".join(lines)


KINDS = {"report": report_table, "survival": survival_table,
         "survival_models": survival_models_table, "literal": literal_table}


def render_spec(path: str) -> str:
    spec = load(path)
    return KINDS[spec.get("kind", "report")](spec) + "\n"


def default_rows(report_path: str, report: dict) -> list[dict]:
    """Rows of a pipeline report: baseline, student, best single teacher, ensemble, oracle."""
    labels = {"baseline": "energy-only baseline", "student": "EKD student",
              "ensemble": "teacher ensemble", "oracle": "oracle (true forces)"}
    best = report.get("best_teacher")
    if best:
        labels[best] = f"best single teacher ({best}, lowest val loss)"
    present = {e["model"] for split in ("heldout", "test") for e in (report.get(split) or {}).get("summary", [])}
    order = ["baseline", "student", *([best] if best else []), "ensemble", "oracle"]
    rows = []
    for model in (m for m in order if m in present):
        n = (find(report, "heldout", model) or find(report, "test", model) or {}).get("n_seeds", 1)
        label = labels[model] + (f", {n} seeds" if n > 1 else "")
        rows.append({"report": report_path, "model": model, "label": label})
    return rows


def report_command(path: str) -> str:
    """The table of a pipeline ``summary.json`` (a fresh run's), in the docs' format."""
    path = str(Path(path).resolve())
    report = json.loads(Path(path).read_text())
    columns = ["epochs", "heldout.force_mae", "heldout.energy_mae", "test.force_mae",
               "test.de_mae", "test.energy_mae"]
    if any("survival_1000K" in r for r in report.get("md") or []):
        columns.append("md.1000K")
    return report_table({"corner": report.get("convergence", "model").split(":")[0],
                         "columns": columns, "headers": {"md.1000K": "MD intact at 1000 K"},
                         "rows": default_rows(path, report)}) + "\n"


# ----------------------------------------------------------------------------- pages
def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def rerender(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + render_spec(m.group(2)) + m.group(4), text)


def blocks(text: str) -> list[tuple[str, str]]:
    """``(spec path, block as written)`` of every rendered block in a page."""
    return [(m.group(2), m.group(3)) for m in BLOCK.finditer(text)]


def stale() -> list[str]:
    """``page: spec`` of each block whose text differs from its rendering now."""
    return [f"{page.relative_to(ROOT)}: {spec}" for page in pages()
            for spec, written in blocks(page.read_text()) if written != render_spec(spec)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python docs/render.py", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a block differs")
    sub = parser.add_subparsers(dest="command")
    one = sub.add_parser("report", help="print the table of a pipeline summary.json")
    one.add_argument("summary")
    args = parser.parse_args(argv)
    if args.command == "report":
        print(report_command(args.summary), end="")
        return 0
    if args.check:
        differ = stale()
        for name in differ:
            print(f"stale: {name} (run python docs/render.py)")
        return 1 if differ else 0
    for page in pages():
        text = page.read_text()
        new = rerender(text)
        if new != text:
            page.write_text(new)
            print(f"rendered {page.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
