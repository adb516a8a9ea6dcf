"""The one MD stability table: models side by side and against the GFN2-xTB reference.

Both MD paths feed it: ``engine="ase"`` (:func:`ekd_lightning.analysis.md.run_stability`, one ASE
trajectory at a time, any ASE calculator; one task per model and molecule) and
``engine="batched"`` (:func:`ekd_lightning.analysis.batched_md.stability_runs`, every replica in one
model call per step on the model's device; one task per model and temperature). Each task's
result of a checkpoint path can be cached beside it (:func:`ekd_lightning.analysis.md.cached_result`).
Both give the same rows, so the same report follows:

- per model: the summary row (:func:`ekd_lightning.analysis.md.summarize_stability`: stable fractions,
  failure reasons and modes, NVE drift), Kaplan-Meier survival at the end per temperature with
  its 95% interval, the log-rank p-value against ``reference`` (a model, e.g. the baseline) and
  against GFN2-xTB run under the same test (``reference_replicas``), the h(r) error against
  GFN2-xTB's distance distribution and, with ``barriers``, the X-H bond-stretch barrier error
  against GFN2-xTB's curve (:mod:`ekd_lightning.analysis.md_reference`);
- per model, molecule and temperature (``survival_by_molecule.csv``): the same survival, the
  log-rank against GFN2-xTB, the failure modes (which bonds fail and how) and the h(r) error;
- every failed trajectory's geometry at its failure frame as extxyz
  (``failures/<model>/<molecule>-<T>K-<k>.extxyz``).
"""

from __future__ import annotations

import functools
import io
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np
from ase import Atoms

from ..core.files import json_safe, write_bytes_atomic, write_csv_atomic, write_json_atomic
from . import batched_md, md
from .md_reference import REFERENCE_NAME, reference_runs, stretch_barriers
from .survival import kaplan_meier, logrank, survival_at, survival_difference

log = logging.getLogger(__name__)

ENGINES = ("ase", "batched")
"""The MD paths of :func:`stability_table`."""
VS_REFERENCE = "_vs_xtb"
"""Suffix of the survival columns against GFN2-xTB."""


# --------------------------------------------------------------------------- running
def run_task(task: tuple, engine: str, cache: bool, **settings) -> dict:
    """The result (:func:`ekd_lightning.analysis.md.empty_result`) of one ``(model, molecules,
    task_settings)`` task on ``engine``; a checkpoint path's is cached beside it if ``cache``."""
    model, molecules, overrides = task
    settings = {**settings, **overrides}
    checkpoint = isinstance(model, str | Path)
    if engine == "batched":
        if cache and checkpoint:
            return batched_md.stability_runs_cached(model, molecules, **settings)
        return batched_md.stability_runs(model, molecules, **settings)
    if cache and checkpoint:
        return md.cached_result(model, molecules, settings,
                                lambda: md.run_stability(model, molecules, details=True, **settings))
    return md.run_stability(model, molecules, details=True, **settings)


def engine_tasks(engine: str, models: Mapping, molecules: Sequence[Atoms],
                 temperatures: Sequence[float], nve_steps: int) -> list[tuple]:
    """The tasks of each model, in model order: one per molecule (``ase``) or per temperature
    (``batched``; NVE at the lowest temperature only)."""
    if engine == "ase":
        return [(model, [atoms], {}) for model in models.values() for atoms in molecules]
    return [(model, molecules, {"temperatures": [t], "nve_steps": nve_steps if t == min(temperatures) else 0})
            for model in models.values() for t in temperatures]


def merge(results: Sequence[Mapping]) -> dict:
    """One result from the results of one model's tasks (failure indices renumbered)."""
    out = md.empty_result()
    for result in results:
        offset = len(out["trajectories"])
        out["trajectories"] += list(result["trajectories"])
        out["nve"] += list(result["nve"])
        for key, counts in result.get("hr", {}).items():
            out["hr"][key] = (np.asarray(out["hr"].get(key, 0.0)) + np.asarray(counts, dtype=float)).tolist()
        out["failures"] += [{**f, "trajectory": f["trajectory"] + offset}
                            for f in result.get("failures", [])]
    return out


# --------------------------------------------------------------------------- survival
def survival_table(runs: Sequence[Mapping], reference: str | None = None,
                   against: str | None = None, by_molecule: bool = False) -> list[dict]:
    """Kaplan-Meier survival per model and temperature, and each model against references.

    Args:
        runs: trajectory rows with ``model``, ``molecule``, ``temperature_K``, ``stable`` and
            ``time_to_failure_fs`` (the run length when stable).
        reference: the model the others are compared with (e.g. the baseline); None: none.
        against: a second reference (GFN2-xTB): the same columns with :data:`VS_REFERENCE`.
        by_molecule: one row per model, molecule and temperature (no pooled ``all`` row).

    Returns:
        One row per model and temperature (and ``all``, pooled): ``model`` (``molecule``),
        ``temperature``, ``n``, ``failures``, ``survival`` (KM at the end of the runs),
        ``survival_low`` / ``survival_high`` (95%), ``mean_time_fs`` (restricted mean time to
        failure, the area under the curve), and against ``reference``: ``difference`` (S − S_ref
        at the end) with its 95% interval ``difference_low`` / ``difference_high`` and the
        log-rank ``p_logrank`` (stratified by temperature for ``all``).
    """
    models = list(dict.fromkeys(r["model"] for r in runs))
    temperatures = sorted({float(r["temperature_K"]) for r in runs})
    molecules = list(dict.fromkeys(r["molecule"] for r in runs)) if by_molecule else [None]
    groups = [(m, t) for m in molecules for t in temperatures] if by_molecule else [
        (None, t) for t in [*temperatures, "all"]]

    def select(model, molecule, temperature):
        mine = [r for r in runs if r["model"] == model and molecule in (None, r["molecule"])
                and (temperature == "all" or float(r["temperature_K"]) == temperature)]
        return (np.array([r["time_to_failure_fs"] for r in mine], dtype=float),
                np.array([not r["stable"] for r in mine]),
                np.array([float(r["temperature_K"]) for r in mine]))

    def compare(curve, times, events, strata, other, molecule, temperature, suffix):
        ref_times, ref_events, ref_strata = select(other, molecule, temperature)
        if not len(ref_times):
            return {}
        end = min(float(times.max()), float(ref_times.max()))
        diff = survival_difference(curve, kaplan_meier(ref_times, ref_events), end)
        test = logrank(times, events, ref_times, ref_events, strata, ref_strata)
        return {f"difference{suffix}": diff[0], f"difference_low{suffix}": diff[1],
                f"difference_high{suffix}": diff[2], f"p_logrank{suffix}": test["p"]}

    rows = []
    for model in models:
        for molecule, temperature in groups:
            times, events, strata = select(model, molecule, temperature)
            if not len(times):
                continue
            end = float(times.max())
            curve = kaplan_meier(times, events)
            s, low, high, _ = survival_at(curve, end)
            grid = np.append(curve["time"], end)
            row = {"model": model, **({"molecule": molecule} if by_molecule else {}),
                   "temperature": temperature if temperature == "all" else f"{temperature:g}K",
                   "n": len(times), "failures": int(events.sum()), "survival": s,
                   "survival_low": low, "survival_high": high,
                   "mean_time_fs": float(np.sum(np.diff(grid) * curve["survival"]))}
            for other, suffix in ((reference, ""), (against, VS_REFERENCE)):
                if other is not None and model != other:
                    row.update(compare(curve, times, events, strata, other, molecule, temperature, suffix))
            rows.append(row)
    return rows


def plot_survival(runs: Sequence[Mapping], path: str | Path) -> None:
    """Kaplan-Meier curves with 95% bands, one panel per temperature, one colour per model (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import ROLE_COLOURS, role_of, save_figure

    temperatures = sorted({float(r["temperature_K"]) for r in runs})
    models = list(dict.fromkeys(r["model"] for r in runs))
    fig, axes = plt.subplots(1, len(temperatures), figsize=(4.5 * len(temperatures), 3.6),
                             squeeze=False, sharey=True)
    for ax, temperature in zip(axes[0], temperatures, strict=True):
        for k, model in enumerate(models):
            mine = [r for r in runs if r["model"] == model and float(r["temperature_K"]) == temperature]
            times = np.array([r["time_to_failure_fs"] for r in mine]) / 1000.0
            curve = kaplan_meier(times, [not r["stable"] for r in mine])
            t = np.append(curve["time"], times.max())
            role = role_of(model)  # pipeline names get their role colour, others the cycle
            colour = "black" if model == REFERENCE_NAME else (
                ROLE_COLOURS[role] if role != "other" else f"C{k}")
            ax.step(t, np.append(curve["survival"], curve["survival"][-1]), where="post",
                    color=colour, label=f"{model} (n={len(mine)})")
            ax.fill_between(t, np.append(curve["lower"], curve["lower"][-1]),
                            np.append(curve["upper"], curve["upper"][-1]), step="post",
                            color=colour, alpha=0.2)
        ax.set(title=f"{temperature:g} K", xlabel="time (ps)", ylim=(0, 1.02))
    axes[0][0].set_ylabel("fraction intact (Kaplan-Meier, 95% CI)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, Path(path))
    plt.close(fig)


# --------------------------------------------------------------------------- the table
def hr_errors(hr: Mapping, reference_hr: Mapping, molecules: Sequence[Atoms], temperature: float) -> list[float]:
    """h(r) errors (:func:`ekd_lightning.analysis.md.hr_error`) of each molecule at a temperature."""
    keys = [md.hr_key(md.molecule_name(a), temperature) for a in molecules]
    return [md.hr_error(hr.get(k, []), reference_hr[k]) if k in reference_hr else math.nan for k in keys]


def by_molecule_rows(runs, hr, reference_hr, molecules, against) -> list[dict]:
    """:func:`survival_table` per model, molecule and temperature, with ``failure_modes``
    (``mode:count;...``), ``failed_bonds`` (``bond:mode:count;...``) and ``hr_error``."""
    rows = survival_table(runs, against=against, by_molecule=True)
    for row in rows:
        mine = [r for r in runs if r["model"] == row["model"] and r["molecule"] == row["molecule"]
                and f"{float(r['temperature_K']):g}K" == row["temperature"] and not r["stable"]]
        modes = Counter(r.get("failure_mode") or r["reason"] for r in mine)
        bonds = Counter(b for r in mine for b in (r.get("failure_bonds") or "").split(";") if b)
        row["failure_modes"] = ";".join(f"{m}:{c}" for m, c in sorted(modes.items())) or "none"
        row["failed_bonds"] = ";".join(f"{b}:{c}" for b, c in bonds.most_common()) or "none"
        key = md.hr_key(row["molecule"], float(row["temperature"][:-1]))
        if key in reference_hr and key in hr.get(row["model"], {}):
            row["hr_error"] = md.hr_error(hr[row["model"]][key], reference_hr[key])
    return rows


def write_failures(runs: Sequence[Mapping], failures: Mapping[str, Sequence[Mapping]], folder: Path) -> None:
    """Each failed trajectory's geometry at its failure frame, ``<folder>/<model>/<molecule>-<T>K-
    <k>.extxyz`` (k: its index among the model's trajectories), with its row in ``info``."""
    from ase.io import write

    for model, model_failures in failures.items():
        mine = [r for r in runs if r["model"] == model]
        for failure in model_failures:
            row = mine[failure["trajectory"]]
            atoms = Atoms(numbers=failure["numbers"], positions=failure["positions"])
            atoms.info.update({k: v for k, v in row.items() if isinstance(v, str | int | float)})
            text = io.StringIO()
            write(text, atoms, format="extxyz")
            name = f"{row['molecule']}-{float(row['temperature_K']):g}K-{failure['trajectory']}.extxyz"
            write_bytes_atomic(text.getvalue().encode(), folder / model.replace("/", "_") /
                               name.replace("/", "_"))


def stability_table(
    models: Mapping[str, object], molecules: Sequence[Atoms] | None = None,
    temperatures: Sequence[float] = md.DEFAULT_TEMPERATURES, engine: str = "batched",
    steps: int = 1000, nve_steps: int = 0, reference: str | None = None,
    reference_replicas: int = 0, reference_steps: int | None = None,
    reference_cache: str | Path | None = None, barriers: bool = False,
    out_dir: str | Path | None = None, map_fn=map, cache: bool = False, **settings,
) -> tuple[list[dict], list[dict]]:
    """MD stability of named models side by side, judged against GFN2-xTB under the same test.

    Args:
        models: ``{name: checkpoint path | PotentialModule | ensemble}`` (``ase`` also takes
            any ASE calculator).
        molecules: starting geometries (default :func:`ekd_lightning.analysis.md.default_molecules`).
        temperatures: K; engine: ``"ase"`` or ``"batched"``.
        steps, nve_steps: Langevin steps (0.5 fs by default) per trajectory; NVE drift steps
            per molecule at the lowest temperature (0: none).
        reference: the model the others are compared with in the survival table (log-rank).
        reference_replicas: GFN2-xTB trajectories per molecule and temperature run under the
            same test (criteria, time step, friction, record interval, seeds from ``seed``),
            added as the model :data:`~ekd_lightning.analysis.md_reference.REFERENCE_NAME`, and every
            model's survival tested against theirs (0: none).
        reference_steps: GFN2-xTB steps per trajectory (None: ``steps``; 0: no reference at
            all; with ``reference_replicas`` 0, a number gives one trajectory per molecule and
            temperature for the h(r) reference alone).
        reference_cache: folder of the cached GFN2-xTB trajectories.
        barriers: also scan each model's X-H bond stretches against GFN2-xTB's.
        out_dir: if given: ``stability.csv`` / ``stability.json`` (summary, every trajectory,
            NVE, survival rows, h(r) histograms, criteria), ``stability_runs.csv``,
            ``survival.csv``, ``survival_by_molecule.csv``, ``survival.png``, ``barriers.csv``
            (with ``barriers``) and ``failures/`` (failure geometries, extxyz).
        map_fn: maps the tasks (:func:`engine_tasks`), e.g. a process pool's ``map``.
        cache: reuse the results of checkpoint paths run before with the same settings.
        settings: the engine's (``ase``: seeds, timestep_fs, friction_per_fs, criteria,
            num_threads, record_every; ``batched``: replicas, seed, timestep_fs,
            friction_per_fs, criteria, record_every, dtype, num_threads, device).

    Returns:
        (one summary row per model, with ``survival_<T>K`` ("S [low, high]"), ``p_logrank``
        against ``reference`` and ``p_logrank_vs_xtb`` against GFN2-xTB, ``hr_error_<T>K``
        (mean over molecules) and ``barrier_error_kcal_mol`` added; the survival rows).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not one of {ENGINES}")
    molecules = md.default_molecules() if molecules is None else list(molecules)
    settings.setdefault("criteria", md.FU_CRITERIA)
    run_settings = {"steps": steps, **settings}
    if engine == "ase":
        run_settings.update(temperatures=temperatures, nve_steps=nve_steps)
    tasks = engine_tasks(engine, models, molecules, temperatures, nve_steps)
    results = list(map_fn(functools.partial(run_task, engine=engine, cache=cache, **run_settings), tasks))
    per_model = len(tasks) // max(len(models), 1)
    merged = {name: merge(results[i * per_model:(i + 1) * per_model]) for i, name in enumerate(models)}
    reference_result = run_reference(molecules, temperatures, engine, steps, reference_replicas,
                                     reference_steps, reference_cache, settings)
    if reference_replicas:
        merged[REFERENCE_NAME] = reference_result
    return report(merged, molecules, temperatures, reference if reference in models else None,
                  reference_result["hr"],
                  models if barriers else None, out_dir,
                  {"engine": engine, "temperatures_K": list(temperatures), "steps": steps,
                   "nve_steps": nve_steps, "reference_replicas": reference_replicas,
                   "reference_steps": reference_steps, **settings})


def run_reference(molecules, temperatures, engine, steps, replicas, reference_steps, cache_dir,
                  settings) -> dict:
    """The GFN2-xTB result under the models' test (:func:`~ekd_lightning.analysis.md_reference.reference_runs`):
    ``replicas`` trajectories of ``reference_steps`` (None: ``steps``) per molecule and
    temperature, one for the h(r) reference alone when ``replicas`` is 0 and ``reference_steps``
    a number; nothing when ``reference_steps`` is 0."""
    n = replicas or (1 if reference_steps else 0)
    if not n or reference_steps == 0:
        return md.empty_result()
    seeds = settings.get("seeds") or [settings.get("seed", 0)]
    same = {k: settings[k] for k in ("timestep_fs", "friction_per_fs", "criteria") if k in settings}
    return reference_runs(molecules, [float(t) for t in temperatures], n,
                          steps if reference_steps is None else reference_steps,
                          seed=seeds[0], cache_dir=cache_dir,
                          record_every=settings.get("record_every", 4), **same)


def report(merged: Mapping[str, Mapping], molecules, temperatures, reference, reference_hr,
           barrier_models, out_dir, settings) -> tuple[list[dict], list[dict]]:
    """The summary and survival rows of :func:`stability_table` from each model's result,
    written to ``out_dir`` when given."""
    against = REFERENCE_NAME if REFERENCE_NAME in merged else None
    runs = [{"model": name, **t} for name, result in merged.items() for t in result["trajectories"]]
    rows = [md.summarize_stability(name, result["trajectories"], result["nve"])
            for name, result in merged.items()]
    survival = survival_table(runs, reference, against)
    for row in rows:
        for s in (s for s in survival if s["model"] == row["model"]):
            if s["temperature"] != "all":
                row[f"survival_{s['temperature']}"] = (f"{s['survival']:.2f} [{s['survival_low']:.2f}, "
                                                       f"{s['survival_high']:.2f}]")
            else:
                row.update({k: s[k] for k in ("p_logrank", "p_logrank" + VS_REFERENCE) if k in s})
        for t in temperatures if reference_hr else ():
            errors = hr_errors(merged[row["model"]]["hr"], reference_hr, molecules, float(t))
            row[f"hr_error_{float(t):g}K"] = (float(np.nanmean(errors)) if np.isfinite(errors).any()
                                              else math.nan)
    barrier_rows = []
    if barrier_models is not None:
        barrier_rows = stretch_barriers({n: md.as_calculator(m) for n, m in barrier_models.items()},
                                        molecules)
        for row in rows:
            mine = [b["barrier_error_kcal_mol"] for b in barrier_rows if b["model"] == row["model"]]
            if mine:
                row["barrier_error_kcal_mol"] = float(np.mean(mine))
    if out_dir is not None:
        hr = {name: result["hr"] for name, result in merged.items()}
        write_report(Path(out_dir), rows, survival, runs, merged, by_molecule_rows(
            runs, hr, reference_hr, molecules, against), barrier_rows, reference_hr, settings)
    return rows, survival


def write_report(out_dir: Path, rows, survival, runs, merged, by_molecule, barrier_rows,
                 reference_hr, settings) -> None:
    """The files of :func:`stability_table` (atomic writes)."""
    def columns(table):
        return list(dict.fromkeys(k for r in table for k in r))

    write_csv_atomic(rows, out_dir / "stability.csv", columns(rows))
    write_csv_atomic(runs, out_dir / "stability_runs.csv", columns(runs))
    write_csv_atomic(survival, out_dir / "survival.csv", columns(survival))
    write_csv_atomic(by_molecule, out_dir / "survival_by_molecule.csv", columns(by_molecule))
    if barrier_rows:
        write_csv_atomic(barrier_rows, out_dir / "barriers.csv", columns(barrier_rows))
    if runs:
        plot_survival(runs, out_dir / "survival.png")
    write_failures(runs, {n: r["failures"] for n, r in merged.items()}, out_dir / "failures")
    criteria = settings.get("criteria")
    write_json_atomic(json_safe({
        "criteria": asdict(criteria) if is_dataclass(criteria) else criteria,
        "settings": {k: asdict(v) if is_dataclass(v) else v for k, v in settings.items()},
        "summary": rows, "survival": survival, "survival_by_molecule": by_molecule,
        "barriers": barrier_rows, "trajectories": runs,
        "nve": [{"model": n, **x} for n, r in merged.items() for x in r["nve"]],
        "hr": {n: {k: np.asarray(v).tolist() for k, v in r["hr"].items()} for n, r in merged.items()},
        "hr_reference": {k: np.asarray(v).tolist() for k, v in reference_hr.items()},
    }), out_dir / "stability.json")
