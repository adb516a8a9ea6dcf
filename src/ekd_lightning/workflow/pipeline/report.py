"""The pipeline's report: mean ± spread over seeds, the fraction of the force-error gap closed,
training and inference cost, ``report/summary.md`` and ``summary.json``, W&B.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ...analysis.evaluate import ALL, format_table
from ...core.files import json_safe, write_json_atomic, write_text_atomic
from ...train.training import logger_arguments
from ..wandb_runs import IDENTITY_KEYS
from .runs import Run, RunSpec

FORCE_MAE = "force_mae"


SEEDED = ("baseline", "student", "oracle")
"""The roles trained with several seeds and summarised over them."""


def seed_summary(rows: Sequence[Mapping], runs: Sequence[RunSpec], subset: str = ALL) -> list[dict]:
    """Mean and spread (standard deviation, ddof=0) over seeds of each role's metrics.

    ``rows`` are evaluation rows of models named by their runs (``runs``: :attr:`RunSpec.name`);
    the rows of baselines, students and oracles (:data:`SEEDED`) are summarised per role, in that
    order; other rows (teachers, the ensemble) are passed through with n_seeds 1.
    """
    role_of = {run.name: run.role for run in runs if run.role in SEEDED}
    summary = []
    for role in SEEDED:
        mine = [r for r in rows if r["subset"] == subset and role_of.get(r["model"]) == role]
        if not mine:
            continue
        entry = {"model": role, "n_seeds": len(mine)}
        for key in ("energy_mae", "de_mae", "force_mae", "force_rmse"):
            values = np.array([r[key] for r in mine], dtype=float)
            entry[key] = float(values.mean())
            entry[f"{key}_std"] = float(values.std())
        summary.append(entry)
    for r in rows:
        if r["subset"] == subset and r["model"] not in role_of:
            summary.append({"model": r["model"], "n_seeds": 1,
                            **{k: r[k] for k in ("energy_mae", "de_mae", "force_mae", "force_rmse")}})
    return summary


def gap_verdict(summary: Sequence[Mapping], metric: str = FORCE_MAE) -> tuple[float, str]:
    """``(gap closed, why)``: (baseline − student) / (baseline − oracle) of a metric's seed
    means, or NaN and the reason when it would mislead: no oracle, or an oracle not clearly
    better than the baseline (baseline − oracle ≤ 2 × the seeds' spread, √(std_b² + std_o²)),
    where the ratio divides by noise (it once read 229%)."""
    by = {r["model"]: r for r in summary}
    if not {"baseline", "student", "oracle"} <= set(by):
        return math.nan, "n/a: needs baseline, student and oracle"
    base, oracle = by["baseline"], by["oracle"]
    gap = base[metric] - oracle[metric]
    noise = math.hypot(base.get(f"{metric}_std", 0.0), oracle.get(f"{metric}_std", 0.0))
    if gap <= 0 or gap <= 2 * noise:
        return math.nan, (f"n/a: the oracle is not clearly better than the baseline (gap "
                          f"{gap:.2f} ≤ 2 × seed std {noise:.2f})")
    return (base[metric] - by["student"][metric]) / gap, ""


def gap_closed(summary: Sequence[Mapping], metric: str = FORCE_MAE) -> float:
    """The figure of :func:`gap_verdict` (NaN when it has none)."""
    return gap_verdict(summary, metric)[0]


def format_mean_spread(entry: Mapping, key: str) -> str:
    value = entry.get(key)
    if value is None or not math.isfinite(value):
        return "—"
    std = entry.get(f"{key}_std")
    return f"{value:.2f} ± {std:.2f}" if std is not None else f"{value:.2f}"


def markdown_table(summary: Sequence[Mapping]) -> str:
    """Seed-summary rows as a Markdown table (kcal/mol, kcal/mol/Å)."""
    head = ("| model | seeds | energy MAE | ΔE MAE | force MAE | force RMSE |\n"
            "|---|---|---|---|---|---|")
    lines = [f"| {e['model']} | {e['n_seeds']} | {format_mean_spread(e, 'energy_mae')} | {format_mean_spread(e, 'de_mae')} | "
             f"{format_mean_spread(e, 'force_mae')} | {format_mean_spread(e, 'force_rmse')} |" for e in summary]
    return "\n".join([head, *lines])


def best_teacher(training: Mapping[str, Mapping], runs: Sequence[RunSpec]) -> str | None:
    """The teacher (of ``runs``) with the lowest best validation loss in ``training``: the single
    model a user would pick without looking at held-out or test data."""
    teachers = {run.name for run in runs if run.role == "teacher"}
    scores = {name: t["best_val_loss"] for name, t in training.items()
              if name in teachers and t.get("best_val_loss") is not None}
    return min(scores, key=scores.get) if scores else None


def training_record(runs: Sequence[Run]) -> dict[str, dict]:
    """``{run name: epochs, best_epoch, best_val_loss, stopped_early, max_epochs, train_time_s,
    history}`` from each run's ``metrics.json`` and ``history.json`` (missing keys: None)."""
    record = {}
    for run in runs:
        path = run.run_dir / "history.json"
        history = json.loads(path.read_text()) if path.is_file() else []
        losses = [h["val/loss"] for h in history if math.isfinite(h.get("val/loss", math.nan))]
        record[run.name] = {
            **{k: run.metrics.get(k) for k in ("epochs", "best_epoch", "stopped_early",
                                               "max_epochs", "train_time_s")},
            "best_val_loss": min(losses) if losses else None, "history": history}
    return record


def convergence_note(training: Mapping[str, Mapping]) -> str:
    """``converged``: every run ended by its stopping rule; else ``budget-matched, not
    converged: k of n runs reached the cap of N epochs (names)``, or, when the caps differ
    (``pipeline.baseline_max_epochs``), ``not converged: ...``, naming the runs that converged;
    ``unknown`` without records."""
    capped = [name for name, t in training.items() if t.get("stopped_early") is False]
    if not training:
        return "unknown: no training records"
    if not capped:
        return "converged: every run ended by early stopping"
    caps = sorted({t.get("max_epochs") for t in training.values() if t.get("max_epochs")})
    note = (f"{len(capped)} of {len(training)} runs reached the cap of "
            f"{'/'.join(map(str, caps))} epochs ({', '.join(capped)})")
    if len(caps) < 2:
        return f"budget-matched, not converged: {note}"
    stopped = [name for name, t in training.items() if t.get("stopped_early")]
    return (f"not converged: {note}; ended by the rule: {', '.join(stopped) or 'none'}")


def inference_cost(models: Mapping[str, object], records, names: Sequence[str],
                   repeats: int = 3) -> dict[str, float]:
    """Seconds per conformation to predict energies and forces of ``records`` (best of
    ``repeats`` passes after a warm-up), for each of ``names`` (a model or an ensemble), all
    measured in this process with its threads, so the figures compare."""
    from ...analysis.evaluate import predict

    n_conf = sum(r.num_conformations for r in records)
    cost = {}
    for name in (n for n in names if n in models):
        predict(models[name], records[:1])
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            predict(models[name], records)
            times.append(time.perf_counter() - start)
        cost[name] = min(times) / n_conf
    return cost


def _split_section(split: str, title: str, rows, runs: Sequence[RunSpec], report: dict) -> list[str]:
    """One split's table, the comparison with best teacher and ensemble, and the gap closed."""
    summary = seed_summary(rows, runs)
    closed, why = gap_verdict(summary)
    report[split] = {"summary": summary, "force_gap_closed": closed, "force_gap_note": why}
    by = {e["model"]: e for e in summary}
    text = [f"## {title}", "", markdown_table(summary), ""]
    student = by.get("student")
    best = report["best_teacher"]
    if student:
        for other, label in (("baseline", "baseline"),
                             (best, f"best single teacher ({best}, lowest val loss)"),
                             ("ensemble", "teacher ensemble"), ("oracle", "oracle")):
            if other in by:
                change = student[FORCE_MAE] / by[other][FORCE_MAE] - 1
                text.append(f"- student vs {label}: force MAE {student[FORCE_MAE]:.2f} vs "
                            f"{by[other][FORCE_MAE]:.2f} ({change:+.0%}), energy MAE "
                            f"{student['energy_mae']:.2f} vs {by[other]['energy_mae']:.2f}")
    gap = f"**{closed:.0%}**" if math.isfinite(closed) else why
    text += ["", "Force-error gap closed by the student, (baseline − student) / (baseline − "
             f"oracle), every model under the same stopping rule ({report['convergence']}): {gap}", ""]
    if student and (baseline_cap := capped_against_converged(report)):
        text += ["The students stopped at their epoch cap while the baselines ran to convergence: "
                 "this compares a budget-limited student with a converged baseline. For converged "
                 f"students under the same rule, rerun with `pipeline.max_epochs={baseline_cap}` "
                 "(or `experiment=ekd_best`, the best recipe measured).", ""]
    return text


def capped_against_converged(report: Mapping) -> int | None:
    """The baselines' epoch cap when every student reached its cap and every baseline ended by
    the rule (``pipeline.baseline_max_epochs``: a capped student against a converged baseline),
    else None."""
    def records(role: str) -> list[Mapping]:
        return [report["training"][name] for name, run in report["runs"].items()
                if run["role"] == role and name in report["training"]]

    students, baselines = records("student"), records("baseline")
    caps = [int(t["max_epochs"]) for t in baselines if t.get("max_epochs")]
    if (students and caps and all(t.get("stopped_early") is False for t in students)
            and all(t.get("stopped_early") for t in baselines)):
        return max(caps)
    return None


def _training_section(cfg, training: Mapping[str, Mapping], inference: Mapping[str, float],
                      timings: Mapping, runs: Sequence[RunSpec]) -> list[str]:
    """Stop epochs and training time per run, and the cost side (training and inference)."""
    stop = (cfg.get("callbacks") or {}).get("early_stopping")
    rule = (f"early stopping on `{stop.monitor}` (fixed force weight), patience {stop.patience} "
            f"epochs" if stop else "no early stopping")
    baseline_cap = cfg.pipeline.get("baseline_max_epochs")
    cap = (f"at most {cfg.pipeline.max_epochs} epochs" if not baseline_cap else
           f"at most {cfg.pipeline.max_epochs} epochs, the baselines {baseline_cap} (a converged "
           "reference: the others are compared with it at their own cap)")
    text = ["## Training: one stopping rule", "",
            f"Every model: {rule}, {cap}, best checkpoint (lowest val loss).", "",
            "| run | epochs | best epoch | stopped early | train time (s) |", "|---|---|---|---|---|"]
    for name, t in training.items():
        time_s = t.get("train_time_s")
        text.append(f"| {name} | {t.get('epochs', '—')} | {t.get('best_epoch', '—')} | "
                    f"{ {True: 'yes', False: 'no (cap)'}.get(t.get('stopped_early'), '—')} | "
                    f"{'—' if time_s is None else f'{time_s:.0f}'} |")
    text.append("")

    roles = {run.name: run.role for run in runs}

    def total(role: str) -> float:
        return sum(t.get("train_time_s") or 0.0 for n, t in training.items() if roles.get(n) == role)

    n_students = sum(roles.get(n) == "student" for n in training) or 1
    n_baselines = sum(roles.get(n) == "baseline" for n in training) or 1
    text += ["## Cost", "",
             f"- training: teachers {total('teacher'):.0f} s in all, distillation "
             f"{timings.get('distill', math.nan):.0f} s, student {total('student') / n_students:.0f} s "
             f"per seed, baseline {total('baseline') / n_baselines:.0f} s per seed (wall time of "
             "each run's own epochs, runs side by side in worker processes)"]
    if inference:
        cells = ", ".join(f"{name} {1e3 * s:.2f} ms" for name, s in inference.items())
        text.append(f"- inference (energies and forces, held-out split, one process): {cells} "
                    "per conformation")
        student = next((s for n, s in inference.items() if roles.get(n) == "student"), None)
        if student and "ensemble" in inference:
            text.append(f"- the teacher ensemble takes {inference['ensemble'] / student:.1f}x the "
                        "student's time per conformation")
    return [*text, ""]


FIGURES = (("learning_curves.png", "Learning curves (validation, one colour per role)"),
           ("heldout/force_parity.png", "Held-out force parity"),
           ("test/force_parity.png", "Test-file force parity"),
           ("test/energy_parity.png", "Test-file energy parity"),
           ("heldout/force_errors.png", "Held-out force errors"))
"""Figures shown in summary.md (relative links), when they exist."""


def write_report(cfg: DictConfig, results: Mapping, md_rows: Sequence[Mapping], timings: Mapping,
                 out: Path, runs: Sequence[RunSpec], training: Mapping[str, Mapping] | None = None
                 ) -> dict:
    """Step 6: ``summary.md`` (with figures), ``summary.json`` and ``learning_curves.png`` in
    ``out``; ``runs`` are the records of the models (named by :attr:`RunSpec.name` in
    ``results`` and ``md_rows``), ``training`` is :func:`training_record` of every run; returns
    the summary (with ``runs``: ``{name: record}``, less the variant's overrides, which name
    files: they are in each run's ``run_info.json``)."""
    from ...analysis.plots import plot_learning_curves

    training = dict(training or {})
    inference = dict(results.get("inference_s_per_conformation", {}))
    report = {"timings_s": dict(timings), "md": list(md_rows),
              "training": {n: {k: v for k, v in t.items() if k != "history"}
                           for n, t in training.items()},
              "best_teacher": best_teacher(training, runs), "inference_s_per_conformation": inference,
              "runs": {run.name: {k: v for k, v in dataclasses.asdict(run).items() if k != "variant"}
                       for run in runs}}
    report["convergence"] = convergence_note(training)
    text = [f"# EKD pipeline report: {cfg.run_name}", "",
            "Energies in kcal/mol, forces in kcal/mol/Å; mean ± standard deviation over seeds "
            f"{list(cfg.pipeline.seeds)}.", ""]
    for split, title in (("heldout", f"Held-out conformations ({cfg.pipeline.heldout_split} "
                                     "split of the training molecules)"),
                         ("test", "Out-of-sample molecules (test file, all subsets)")):
        if split in results:
            text += _split_section(split, title, results[split], runs, report)
    if "test" in results:
        subsets = sorted({r["subset"] for r in results["test"]} - {ALL})
        text += ["## Test file per subset (force MAE, kcal/mol/Å; seed means)", "",
                 "| model | " + " | ".join(subsets) + " |", "|---" * (len(subsets) + 1) + "|"]
        by_subset = {subset: {e["model"]: e for e in seed_summary(results["test"], runs, subset)}
                     for subset in subsets}
        for role in SEEDED:
            cells = [format_mean_spread(by_subset[subset][role], FORCE_MAE) if role in by_subset[subset] else "—"
                     for subset in subsets]
            if any(c != "—" for c in cells):
                text.append(f"| {role} | " + " | ".join(cells) + " |")
        text.append("")
    if "labels" in results:
        q = results["labels"]
        report["labels"] = q
        text += ["## Distilled labels vs true forces (every labelled conformation)", "",
                 f"force MAE {q['force_mae']:.2f}, RMSE {q['force_rmse']:.2f} kcal/mol/Å; RMS "
                 f"teacher spread {q['label_std_rms']:.2f} kcal/mol/Å over "
                 f"{q['n_conformations']} conformations", ""]
    if training:
        text += _training_section(cfg, training, inference, timings, runs)
    if md_rows:
        extra = [k for k in md_rows[0] if k.startswith(("survival_", "hr_error_"))]
        text += ["## MD stability (batched Langevin, per model)", "", format_table(
            md_rows, ["model", "n_trajectories", "stable_fraction", *extra, "p_logrank",
                      *[k for k in ("p_logrank_vs_xtb", "failure_modes", "barrier_error_kcal_mol")
                        if k in md_rows[0]],
                      "mean_time_to_failure_fs", "failures", "nve_drift_meV_atom_ps"]), "",
                 "survival_<T>: fraction intact at the end (Kaplan-Meier, 95% CI); p_logrank: "
                 "log-rank test against the baseline, stratified by temperature (p_logrank_vs_xtb: "
                 "against GFN2-xTB run under the same test); hr_error: "
                 "∫|h(r) − h_xTB(r)| dr against GFN2-xTB MD (0..2); survival curves in "
                 "md/survival.png, table in md/survival.csv, per molecule with the failed bonds in "
                 "md/survival_by_molecule.csv, failure geometries in md/failures/.", ""]
    text += ["## Wall time (s)", "", " · ".join(f"{k} {v:.0f}" for k, v in timings.items()), ""]
    out.mkdir(parents=True, exist_ok=True)
    histories = {n: t["history"] for n, t in training.items() if t.get("history")}
    if histories:
        plot_learning_curves(histories, out / "learning_curves.png",
                             {run.name: run.role for run in runs})
    text += ["## Figures", ""] + [f"![{title}]({name})" for name, title in FIGURES
                                  if (out / name).is_file()] + [""]
    write_text_atomic("\n".join(text), out / "summary.md")
    write_json_atomic(json_safe(report), out / "summary.json")
    return report


def log_to_wandb(cfg: DictConfig, report: Mapping, out: Path, trained: Sequence[Run] = ()) -> None:
    """The report's tables as one W&B run (offline unless ``logger.mode=online``), in the
    pipeline's group (:mod:`ekd_lightning.workflow.wandb_runs`), job type ``report``, with a
    ``members`` table linking the ``trained`` runs: name, stage, W&B run id, folder."""
    if cfg.logger.name != "wandb":
        return
    import wandb

    shown = logger_arguments({k: cfg.logger.get(k) for k in IDENTITY_KEYS}, cfg.run_name)
    shown["name"] = f"{cfg.run_name}-report"
    run = wandb.init(project=cfg.logger.project, mode=cfg.logger.mode, dir=str(out),
                     config=OmegaConf.to_container(cfg, resolve=True),
                     **{"job_type": "report", **shown})
    run.log({"members": wandb.Table(columns=["run", "stage", "wandb_run_id", "folder"], data=[
        [r.name, r.spec.stage, r.metrics.get("wandb_run_id"), str(r.run_dir)] for r in trained])})
    for split in ("heldout", "test"):
        if split in report:
            rows = report[split]["summary"]
            columns = list(dict.fromkeys(k for r in rows for k in r))
            run.log({f"{split}/summary": wandb.Table(
                columns=columns, data=[[r.get(c) for c in columns] for r in rows])})
            run.summary[f"{split}/force_gap_closed"] = report[split]["force_gap_closed"]
            run.summary[f"{split}/force_gap_note"] = report[split].get("force_gap_note", "")
    training = report.get("training") or {}
    if training:
        columns = ["run", "epochs", "best_epoch", "stopped_early", "train_time_s"]
        run.log({"training": wandb.Table(columns=columns, data=[
            [name, *(t.get(c) for c in columns[1:])] for name, t in training.items()])})
    for name, seconds in (report.get("inference_s_per_conformation") or {}).items():
        run.summary[f"inference_s_per_conformation/{name}"] = seconds
    if (out / "learning_curves.png").is_file():
        run.log({"learning_curves": wandb.Image(str(out / "learning_curves.png"))})
    run.finish()
