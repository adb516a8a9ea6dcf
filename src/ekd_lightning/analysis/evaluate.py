"""Evaluation of trained potentials (single models and ensembles) on COMP6-style benchmarks.

Metrics are reported in kcal/mol (energies) and kcal/mol/Å (forces), per COMP6 subset (the
first component of a record's HDF5 path, e.g. ``s66x8``) and over the whole file (``all``):

- ``energy_mae`` / ``energy_rmse``: errors of the total energy of each conformation.
- ``de_mae`` / ``de_rmse``: errors of conformer energy differences ΔE_ij = E_i − E_j over all
  pairs i < j of conformations of the same molecule (the ANI papers' COMP6 ΔE). Molecules with
  one conformation contribute no pair.
- ``force_mae`` / ``force_rmse``: errors per Cartesian force component over all atoms (NaN when
  the file has no reference forces or no ``force_key`` is given).
- ``energy_shifted_mae`` / ``energy_shifted_rmse``: total-energy errors after a per-element
  linear shift fitted on the whole benchmark (:func:`element_shift`: least squares of the
  reference minus the prediction on the element counts, one offset per element, the same for
  every subset). A model trained at another level of theory (CCSD(T)*/CBS for ANI-1ccx against
  COMP6's wB97X/6-31G(d)) differs by such offsets; ΔE and forces do not see them.

``--data`` takes a file, a folder (every ``*.h5`` in it, sorted: all of COMP6 v1 in one
command) or several of either; their molecules are pooled, so ``all`` is the whole benchmark
and each COMP6 subset gets its row (:func:`read_benchmark`).

Records of an ANI-1x-layout file have no subset (``record.subset == ""``); they count in ``all``
only. An ensemble's prediction is the mean energy and the mean force over its members.

Reference forces must be F = −dE/dx: :func:`force_energy_consistency` checks that against the
energies (COMP6 v1 files store the gradient under ``forces``; evaluation warns about it and records
the check in ``metrics.json``).

The metric functions (:func:`error_stats`, :func:`conformer_pair_differences`,
:func:`compute_metrics`, :func:`metrics_by_subset`) are pure functions of arrays in Hartree and
Hartree/Å. :func:`evaluate_models` runs named models on a file and writes ``metrics.csv``,
``metrics.json``, ``energy_parity.png``, ``force_parity.png`` and ``force_errors.png``
(:mod:`ekd_lightning.analysis.plots`: one colour and panel per role, panels in a grid). CLI::

    python -m ekd_lightning.evaluate --checkpoints t0=a.ckpt t1=b.ckpt student=s.ckpt \\
        --ensemble ensemble=t0,t1 --data s66x8_wb97x6-31gd.h5 --out eval/
    python -m ekd_lightning.evaluate --checkpoints student=s.ckpt --data path/to/comp6v1/
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..core.errors import DataError, EKDError
from ..core.files import json_safe, write_csv_atomic, write_json_atomic
from ..core.outputs import (
    OutputError,
    check_writable,
    is_write_error,
    os_error_message,
    user_error_line,
)
from ..core.units import HARTREE_TO_KCALMOL as KCAL
from ..data.packed import records_loader
from ..data.readers import MoleculeRecord, read_molecules
from ..inference.members import member_list
from .plots import plot_energy_parity, plot_force_errors, plot_force_parity

log = logging.getLogger(__name__)

METRIC_COLUMNS = (
    "energy_mae", "energy_rmse", "de_mae", "de_rmse", "force_mae", "force_rmse",
)
"""Metric columns of a result row (kcal/mol for energy and ΔE, kcal/mol/Å for forces)."""
SHIFTED_COLUMNS = ("energy_shifted_mae", "energy_shifted_rmse")
"""Total-energy errors after the per-element shift fitted on the benchmark (kcal/mol)."""
ROW_COLUMNS = ("model", "subset", "n_molecules", "n_conformations", "n_pairs", *METRIC_COLUMNS)
"""The columns of a result row in table order (rows also carry :data:`SHIFTED_COLUMNS`)."""
BENCHMARK_COLUMNS = ("model", "subset", "n_molecules", "n_conformations", "n_pairs",
                     "de_mae", "de_rmse", "force_mae", "force_rmse", "energy_mae", "energy_rmse",
                     *SHIFTED_COLUMNS)
"""Columns of the CLI table: ΔE and forces first (the headline across levels of theory)."""
UNITS = {"energy": "kcal/mol", "de": "kcal/mol", "force": "kcal/mol/Å"}
ALL = "all"
"""Subset name of the row over every record of the file."""


# --------------------------------------------------------------------------- prediction
@dataclass
class Prediction:
    """Predictions aligned with a list of records (one array per record, kept conformations).

    Attributes:
        energies: per record, (n_conf,) float64 Hartree.
        forces: per record, (n_conf, n_atoms, 3) float64 Hartree/Å.
    """

    energies: list[np.ndarray]
    forces: list[np.ndarray]


def _predict_member(module, loader: DataLoader, records: Sequence[MoleculeRecord]) -> Prediction:
    """One model's energies and forces over the loader (records in order, conformations in order)."""
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    energies, forces = [], []
    try:
        for batch in loader:
            e, f = module(batch.to(device))
            energies.append(e.detach().cpu().double())
            forces.append(f.detach().cpu().double())
    finally:
        module.train(was_training)
    all_e, all_f = torch.cat(energies).numpy(), torch.cat(forces).numpy()
    out_e, out_f, i, a = [], [], 0, 0
    for r in records:
        n_conf, n_atoms = r.num_conformations, len(r.atomic_numbers)
        out_e.append(all_e[i:i + n_conf])
        out_f.append(all_f[a:a + n_conf * n_atoms].reshape(n_conf, n_atoms, 3))
        i, a = i + n_conf, a + n_conf * n_atoms
    return Prediction(out_e, out_f)


def mean_prediction(predictions: Sequence[Prediction]) -> Prediction:
    """Ensemble prediction: the mean energy and mean force over members."""
    if not predictions:
        raise ValueError("mean_prediction needs at least one prediction")
    n_records = len(predictions[0].energies)
    energies = [np.mean([p.energies[k] for p in predictions], axis=0) for k in range(n_records)]
    forces = [np.mean([p.forces[k] for p in predictions], axis=0) for k in range(n_records)]
    return Prediction(energies, forces)


def predict(models, records: Sequence[MoleculeRecord], batch_size: int = 64,
            _cache: dict | None = None) -> Prediction:
    """Energies (Hartree) and forces (Hartree/Å) for every kept conformation of ``records``.

    Args:
        models: a :class:`~ekd_lightning.task.module.PotentialModule` or a sequence of them (an
            ensemble, possibly of different architectures): the mean energy and force over members.
        records: molecules from :func:`~ekd_lightning.data.read_molecules`.
        batch_size: conformations per forward pass.
    """
    members = member_list(models)
    loader = records_loader(records, batch_size)
    predictions = []
    for module in members:
        key = id(module)
        if _cache is not None and key in _cache:
            predictions.append(_cache[key])
            continue
        prediction = _predict_member(module, loader, records)
        if _cache is not None:
            _cache[key] = prediction
        predictions.append(prediction)
    return predictions[0] if len(predictions) == 1 else mean_prediction(predictions)


# --------------------------------------------------------------------------- metrics (pure)
def error_stats(pred, ref) -> tuple[float, float]:
    """(MAE, RMSE) of ``pred - ref`` over all elements, in the inputs' unit; NaN when empty."""
    diff = np.asarray(pred, dtype=np.float64) - np.asarray(ref, dtype=np.float64)
    if diff.size == 0:
        return math.nan, math.nan
    return float(np.abs(diff).mean()), float(np.sqrt((diff**2).mean()))


def conformer_pair_differences(energies) -> np.ndarray:
    """E_i − E_j for all pairs i < j of one molecule's conformations: (n(n−1)/2,), row-major."""
    energies = np.asarray(energies, dtype=np.float64)
    i, j = np.triu_indices(len(energies), k=1)
    return energies[i] - energies[j]


def compute_metrics(
    pred_energies: Sequence[np.ndarray], ref_energies: Sequence[np.ndarray],
    pred_forces: Sequence[np.ndarray] | None = None, ref_forces: Sequence[np.ndarray] | None = None,
) -> dict:
    """Metrics over a group of molecules (one array per molecule, Hartree and Hartree/Å).

    Args:
        pred_energies, ref_energies: per molecule (n_conf,) Hartree.
        pred_forces, ref_forces: per molecule (n_conf, n_atoms, 3) Hartree/Å, or None.

    Returns:
        ``n_molecules``, ``n_conformations``, ``n_pairs`` and :data:`METRIC_COLUMNS` in kcal/mol
        and kcal/mol/Å (force metrics NaN when forces are not given).
    """
    if len(pred_energies) != len(ref_energies):
        raise ValueError(f"{len(pred_energies)} predicted vs {len(ref_energies)} reference molecules")
    for p, r in zip(pred_energies, ref_energies, strict=True):
        if np.shape(p) != np.shape(r):
            raise ValueError(f"energy shapes differ: predicted {np.shape(p)}, reference {np.shape(r)}")
    e_pred = np.concatenate([np.ravel(p) for p in pred_energies]) if pred_energies else np.zeros(0)
    e_ref = np.concatenate([np.ravel(r) for r in ref_energies]) if ref_energies else np.zeros(0)
    de_pred = [conformer_pair_differences(p) for p in pred_energies]
    de_ref = [conformer_pair_differences(r) for r in ref_energies]
    de_pred = np.concatenate(de_pred) if de_pred else np.zeros(0)
    de_ref = np.concatenate(de_ref) if de_ref else np.zeros(0)
    out = {"n_molecules": len(pred_energies), "n_conformations": int(e_pred.size),
           "n_pairs": int(de_pred.size)}
    out["energy_mae"], out["energy_rmse"] = error_stats(e_pred * KCAL, e_ref * KCAL)
    out["de_mae"], out["de_rmse"] = error_stats(de_pred * KCAL, de_ref * KCAL)
    out["force_mae"] = out["force_rmse"] = math.nan
    if pred_forces is not None and ref_forces is not None:
        f_pred = [np.ravel(f) for f in pred_forces]
        f_ref = [np.ravel(f) for f in ref_forces]
        if [f.size for f in f_pred] != [f.size for f in f_ref]:
            raise ValueError("predicted and reference forces have different shapes")
        if f_pred:
            out["force_mae"], out["force_rmse"] = error_stats(
                np.concatenate(f_pred) * KCAL, np.concatenate(f_ref) * KCAL)
    return out


def metrics_by_subset(
    subsets: Sequence[str], pred_energies, ref_energies, pred_forces=None, ref_forces=None,
) -> dict[str, dict]:
    """:func:`compute_metrics` over everything (``"all"``, first) and per non-empty subset name.

    ``subsets[k]`` names molecule k's subset; ``""`` (no subset) counts in ``all`` only.
    """
    groups: dict[str, list[int]] = {}
    for k, subset in enumerate(subsets):
        if subset:
            groups.setdefault(subset, []).append(k)

    def pick(arrays, index):
        return None if arrays is None else [arrays[k] for k in index]

    out = {ALL: compute_metrics(pred_energies, ref_energies, pred_forces, ref_forces)}
    for subset in sorted(groups):
        index = groups[subset]
        out[subset] = compute_metrics(pick(pred_energies, index), pick(ref_energies, index),
                                      pick(pred_forces, index), pick(ref_forces, index))
    return out


def force_energy_consistency(records: Sequence[MoleculeRecord]) -> float:
    """Do the stored forces behave as −dE/dx? Slope of ΔE_work against ΔE over consecutive
    conformations of each molecule: ≈ +1 for forces, ≈ −1 for gradients stored as "forces".

    For consecutive conformations a, b of a molecule, ΔE_work = −½ (F_a + F_b) · (x_b − x_a)
    (trapezoid work) estimates E_b − E_a when F = −dE/dx. Returns the least-squares slope
    Σ ΔE_work·ΔE / Σ ΔE² (NaN without forces or pairs). COMP6 v1 files store the energy gradient
    under ``forces`` (isayev/COMP6 issue #2), which this check reveals as a slope near −1.
    """
    work, delta = [], []
    for r in records:
        if r.forces is None or r.num_conformations < 2:
            continue
        dx = np.diff(r.coordinates, axis=0)
        work.append(-0.5 * ((r.forces[1:] + r.forces[:-1]) * dx).sum(axis=(1, 2)))
        delta.append(np.diff(r.energies))
    if not delta:
        return math.nan
    work, delta = np.concatenate(work), np.concatenate(delta)
    denominator = float((delta**2).sum())
    return float((work * delta).sum() / denominator) if denominator > 0 else math.nan


def element_shift(records: Sequence[MoleculeRecord], pred_energies: Sequence[np.ndarray]
                  ) -> dict[int, float]:
    """Per-element offsets b_Z (Hartree) minimising Σ (E_ref − E_pred − Σ_Z n_Z b_Z)² over every
    conformation of ``records`` (least squares on the element counts n_Z of each molecule)."""
    numbers = sorted({int(z) for r in records for z in r.atomic_numbers})
    counts = np.array([[np.sum(r.atomic_numbers == z) for z in numbers] for r in records], float)
    rows = np.repeat(counts, [r.num_conformations for r in records], axis=0)
    residual = np.concatenate([r.energies - p for r, p in zip(records, pred_energies, strict=True)])
    offsets, *_ = np.linalg.lstsq(rows, residual, rcond=None)
    return dict(zip(numbers, offsets.tolist(), strict=True))


def metric_rows(name: str, prediction: Prediction, records: Sequence[MoleculeRecord]) -> list[dict]:
    """Result rows (:data:`ROW_COLUMNS` and :data:`SHIFTED_COLUMNS`) of one named model's
    prediction on ``records``."""
    has_forces = all(r.forces is not None for r in records)
    subsets, ref = [r.subset for r in records], [r.energies for r in records]
    by_subset = metrics_by_subset(
        subsets, prediction.energies, ref,
        prediction.forces if has_forces else None,
        [r.forces for r in records] if has_forces else None,
    )
    offsets = element_shift(records, prediction.energies)
    shifted = [p + sum(offsets[int(z)] for z in r.atomic_numbers)
               for r, p in zip(records, prediction.energies, strict=True)]
    for subset, metrics in metrics_by_subset(subsets, shifted, ref).items():
        by_subset[subset]["energy_shifted_mae"] = metrics["energy_mae"]
        by_subset[subset]["energy_shifted_rmse"] = metrics["energy_rmse"]
    return [{"model": name, "subset": subset, **metrics} for subset, metrics in by_subset.items()]


# --------------------------------------------------------------------------- tables
def format_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None, digits: int = 3) -> str:
    """A markdown table of ``rows`` (floats with ``digits`` decimals)."""
    columns = list(columns or (rows[0].keys() if rows else []))

    def cell(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.{digits}f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- evaluation
def benchmark_files(data: str | Path | Sequence[str | Path]) -> list[Path]:
    """The HDF5 files of ``data``: a file, a folder (its ``*.h5`` files, sorted) or a list of
    either; DataError when a path is missing or a folder holds no ``.h5`` file."""
    items = [data] if isinstance(data, str | Path) else list(data)
    files = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(item.glob("*.h5"))
            if not found:
                raise DataError(f"{item}: folder holds no .h5 file; pass HDF5 files or their folder")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise DataError(f"{item}: no such file or folder")
    if not files:
        raise DataError("no benchmark file given")
    return files


def read_benchmark(
    data, energy_key: str = "energies", force_key: str | None = "forces", file_format: str = "auto",
    elements: Sequence[str] | None = None, forces_are_gradients: bool | None = None,
) -> tuple[list[MoleculeRecord], dict]:
    """The molecules of every file of ``data`` (:func:`benchmark_files`), pooled in file order,
    and what each read dropped (``{file: {"nonfinite": n, "elements": n}}``)."""
    records, dropped = [], {}
    for path in benchmark_files(data):
        part, report = read_molecules(path, energy_key, force_key, file_format, elements,
                                      forces_are_gradients=forces_are_gradients)
        records += part
        dropped[str(path)] = {"nonfinite": report.dropped_nonfinite,
                              "elements": report.dropped_elements}
    keys = [r.key for r in records]
    if len(set(keys)) < len(keys):
        twice = sorted({k for k in keys if keys.count(k) > 1})[:3]
        raise DataError(f"{data}: groups {twice} appear in more than one file: pass each file once")
    return records, dropped


def _common_elements(models: Mapping[str, object]) -> list[str]:
    """Elements every member of every model knows (the order of the first model)."""
    element_lists = [list(m.hparams.elements) for v in models.values() for m in member_list(v)]
    first = element_lists[0]
    return [e for e in first if all(e in other for other in element_lists)]


def evaluate_models(
    models: Mapping[str, object],
    path: str | Path,
    energy_key: str = "energies",
    force_key: str | None = "forces",
    file_format: str = "auto",
    elements: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    batch_size: int = 64,
    plots: bool = True,
    forces_are_gradients: bool | None = None,
    roles: Mapping[str, str] | None = None,
) -> list[dict]:
    """Evaluate several named models side by side on a benchmark (one or several HDF5 files).

    Args:
        models: ``{name: PotentialModule or sequence of PotentialModule (ensemble)}``; an
            ensemble's members already evaluated under another name are not evaluated again.
        path: dataset (COMP6 or ANI-1x layout): a file, a folder of them or a list (all of
            COMP6 v1: its folder), see :func:`read_benchmark`.
        energy_key, force_key: dataset names (Hartree, Hartree/Å); ``force_key=None``: no forces.
        file_format: ``comp6``, ``ani1x`` or ``auto``.
        elements: keep molecules made of these elements; None: the elements all models know.
        out_dir: if given, write ``metrics.csv``, ``metrics.json`` and (``plots``)
            ``energy_parity.png``, ``force_parity.png`` and ``force_errors.png`` there (atomic
            writes).
        batch_size: conformations per forward pass.
        forces_are_gradients: as :func:`~ekd_lightning.data.read_molecules` (None: each file's
            attribute, else gradients for the COMP6 layout).
        roles: ``{name: role}`` of the models in the plots (None: read from the names,
            :func:`ekd_lightning.analysis.plots.role_of`).

    Returns:
        Rows (dicts with :data:`ROW_COLUMNS` and :data:`SHIFTED_COLUMNS`): for each model,
        ``all`` then each subset.
    """
    if not models:
        raise ValueError("evaluate_models needs at least one model")
    elements = list(elements) if elements is not None else _common_elements(models)
    records, dropped = read_benchmark(path, energy_key, force_key, file_format, elements,
                                      forces_are_gradients)
    consistency = force_energy_consistency(records) if force_key else math.nan
    if consistency < 0:
        log.warning(
            "%s: the '%s' dataset looks like the energy gradient, not the forces (work/energy "
            "slope %.2f, expected +1; COMP6 v1 files store gradients): force metrics compare "
            "against the wrong sign", path, force_key, consistency)
    about = {
        "dataset": str(path) if isinstance(path, str | Path) else [str(p) for p in path],
        "energy_key": energy_key, "force_key": force_key,
        "elements": elements, "units": UNITS, "force_energy_consistency": consistency,
        "energy_shift": "energy_shifted_*: after per-element offsets fitted on the benchmark",
        "dropped_conformations": _dropped_total(dropped) if len(dropped) == 1 else dropped,
    }
    return evaluate_records(models, records, out_dir, batch_size, plots, about, roles)


def _dropped_total(dropped: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    return {k: sum(d[k] for d in dropped.values()) for k in ("nonfinite", "elements")}


def evaluate_records(
    models: Mapping[str, object], records: Sequence[MoleculeRecord],
    out_dir: str | Path | None = None, batch_size: int = 64, plots: bool = True,
    about: Mapping | None = None, roles: Mapping[str, str] | None = None,
) -> list[dict]:
    """:func:`evaluate_models` on molecules already read (e.g. a data module's held-out split,
    :meth:`~ekd_lightning.data.EKDDataModule.split_records`); ``about`` goes into metrics.json."""
    cache: dict = {}
    predictions = {name: predict(m, records, batch_size, _cache=cache) for name, m in models.items()}
    rows = [row for name, p in predictions.items() for row in metric_rows(name, p, records)]
    if out_dir is not None:
        try:
            _write_results(rows, predictions, records, Path(out_dir), plots, about, roles)
        except OSError as exc:
            if not is_write_error(exc):
                raise
            raise UnwrittenResults(os_error_message(exc), rows) from exc
    return rows


class UnwrittenResults(OutputError):
    """Writing the results failed (disk full, ...) after they were computed: ``rows`` holds
    them, so that the command still prints them."""

    def __init__(self, message: str, rows: list[dict]):
        super().__init__(message)
        self.rows = rows


def _write_results(rows, predictions, records, out_dir: Path, plots: bool, about, roles) -> None:
    """metrics.csv, metrics.json and the plots of :func:`evaluate_records` (atomic writes)."""
    write_csv_atomic(rows, out_dir / "metrics.csv", (*ROW_COLUMNS, *SHIFTED_COLUMNS))
    write_json_atomic(json_safe({**(about or {}), "rows": rows}), out_dir / "metrics.json")
    if plots:
        plot_energy_parity(predictions, records, out_dir / "energy_parity.png", roles)
        if all(r.forces is not None for r in records):
            plot_force_errors(predictions, records, out_dir / "force_errors.png", roles)
            plot_force_parity(predictions, records, out_dir / "force_parity.png", roles)


# --------------------------------------------------------------------------- label quality
def _force_stats(pred: list[np.ndarray], ref: list[np.ndarray]) -> tuple[float, float]:
    if not pred:
        return math.nan, math.nan
    return error_stats(np.concatenate([p.ravel() for p in pred]) * KCAL,
                       np.concatenate([r.ravel() for r in ref]) * KCAL)


def label_quality(
    label_file: str | Path, dataset_path: str | Path, energy_key: str = "energies",
    force_key: str = "forces", file_format: str = "auto", elements: Sequence[str] | None = None,
) -> dict:
    """How close distilled force labels are to the dataset's true forces.

    Args:
        label_file: an ``ekd-labels`` file (:mod:`ekd_lightning.data.labels`) made for ``dataset_path``.
        dataset_path, energy_key, force_key, file_format, elements: the dataset as read for
            distillation (``force_key`` must name the true forces, Hartree/Å).

    Returns:
        ``n_conformations`` (labelled, compared), ``n_unlabelled`` (skipped), ``force_mae`` and
        ``force_rmse`` (kcal/mol/Å, per component), ``label_std_rms`` (kcal/mol/Å, RMS of the
        teachers' per-component spread), and ``by_subset`` with the same keys per subset.
    """
    from ..data.labels import read_labels

    if not force_key:
        raise DataError(f"{dataset_path}: label_quality needs the dataset's true forces (force_key)")
    records, _ = read_molecules(dataset_path, energy_key, force_key, file_format,
                                None if elements is None else list(elements))
    labels = read_labels(label_file, records, dataset_path=dataset_path)
    groups: dict[str, dict[str, list]] = {}
    for record, label in zip(records, labels, strict=True):
        labelled = np.isfinite(label["forces"]).all(axis=(1, 2))
        for name in {ALL, record.subset} - {""}:
            g = groups.setdefault(name, {"pred": [], "ref": [], "var": [], "skipped": 0})
            g["pred"].append(label["forces"][labelled].astype(np.float64))
            g["ref"].append(record.forces[labelled])
            g["var"].append(label["force_var"][labelled])
            g["skipped"] += int((~labelled).sum())

    def summary(g) -> dict:
        mae, rmse = _force_stats(g["pred"], g["ref"])
        var = np.concatenate([v.ravel() for v in g["var"]])
        return {"n_conformations": int(sum(len(p) for p in g["pred"])), "n_unlabelled": g["skipped"],
                "force_mae": mae, "force_rmse": rmse,
                "label_std_rms": float(np.sqrt(var.mean())) * KCAL if var.size else math.nan}

    out = summary(groups[ALL])
    out["by_subset"] = {name: summary(groups[name]) for name in sorted(groups) if name != ALL}
    return out


# --------------------------------------------------------------------------- CLI
def parse_named(items: Sequence[str]) -> dict[str, str]:
    """``["t0=a.ckpt", "runs/x/checkpoints/best.ckpt"]`` -> ``{"t0": "a.ckpt", "x": ...}``.

    Without ``NAME=``, the name is the file stem, or the run folder for ``best``/``last`` in a
    ``checkpoints`` folder; repeated names get ``_2``, ``_3``... appended.
    """
    named: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            path, p = item, Path(item)
            name = p.parent.parent.name if p.parent.name == "checkpoints" and p.parent.parent.name else p.stem
        base, k = name, 2
        while name in named:
            name, k = f"{base}_{k}", k + 1
        named[name] = path
    return named


def load_named_models(checkpoints: Sequence[str], ensembles: Sequence[str] = ()) -> dict[str, object]:
    """Load ``--checkpoints`` and ``--ensemble NAME=a,b`` items (a member is a name or a path)."""
    from ..task.checkpoint import load_potential

    loaded: dict[str, object] = {}
    by_path: dict[str, object] = {}

    def load(path: str):
        if path not in by_path:
            by_path[path] = load_potential(path)
        return by_path[path]

    for name, path in parse_named(checkpoints).items():
        loaded[name] = load(path)
    for item in ensembles:
        name, sep, members = item.partition("=")
        if not sep:
            name, members = "ensemble", item
        paths = [m for m in members.split(",") if m]
        if not paths:
            raise ValueError(f"--ensemble '{item}' lists no member")
        loaded[name] = [member for m in paths
                        for member in (member_list(loaded[m]) if m in loaded else [load(m)])]
    if not loaded:
        raise ValueError("no model given: pass --checkpoints and/or --ensemble")
    return loaded


RESULTS_BYTES = 1 << 20
"""Free space asked for metrics.csv and metrics.json (MiB); four times as much with plots."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ekd_lightning.evaluate",
        description="Evaluate checkpoints (and ensembles of them) on a COMP6/ANI-1x HDF5 file.",
    )
    parser.add_argument("--checkpoints", nargs="*", default=[], metavar="[NAME=]CKPT",
                        help="checkpoints to evaluate, each optionally named")
    parser.add_argument("--ensemble", action="append", default=[], metavar="NAME=A,B,...",
                        help="an ensemble (mean energy and forces) of checkpoint names or paths")
    parser.add_argument("--data", required=True, nargs="+",
                        help="HDF5 file(s) (COMP6 or ANI-1x layout) or a folder of them (all of "
                             "COMP6 v1: its folder)")
    parser.add_argument("--energy-key", default="energies")
    parser.add_argument("--force-key", default="forces", help="'none' for no force metrics")
    parser.add_argument("--format", default="auto", choices=["auto", "comp6", "ani1x"])
    parser.add_argument("--forces-are-gradients", default=None, choices=["true", "false"],
                        help="the force datasets hold dE/dx (true) or -dE/dx (false); default: "
                             "the file's forces_convention attribute, else true for COMP6")
    parser.add_argument("--elements", nargs="*", default=None, help="default: the models' elements")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--labels", default=None, help="also report this label file's force quality")
    parser.add_argument("--out", default=None, help="folder for metrics.csv/json and plots")
    parser.add_argument("--no-plots", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    force_key = None if args.force_key.lower() == "none" else args.force_key
    try:
        if args.out:  # a read-only or full folder is found before the work, not after it
            check_writable(args.out, RESULTS_BYTES * (4 if not args.no_plots else 1), "results")
        models = load_named_models(args.checkpoints, args.ensemble)
        gradients = None if args.forces_are_gradients is None else args.forces_are_gradients == "true"
        data = args.data[0] if len(args.data) == 1 else args.data
        rows = evaluate_models(models, data, args.energy_key, force_key, args.format,
                               args.elements, args.out, args.batch_size, not args.no_plots,
                               gradients)
        print(f"units: energy/ΔE kcal/mol, force kcal/mol/Å ({' '.join(args.data)}); ΔE and "
              "forces are the headline; energy_shifted_*: total energy after per-element "
              "offsets fitted on the whole benchmark, energy_*: unshifted")
        print(format_table(rows, BENCHMARK_COLUMNS))
        if args.labels:
            if len(args.data) > 1 or Path(args.data[0]).is_dir():
                raise ValueError("--labels needs --data to be the one dataset file they label")
            quality = label_quality(args.labels, args.data[0], args.energy_key, force_key, args.format,
                                    args.elements)
            print(f"\nlabel quality of {args.labels} (kcal/mol/Å):")
            flat = [{"subset": ALL, **{k: v for k, v in quality.items() if k != "by_subset"}}]
            flat += [{"subset": s, **q} for s, q in quality["by_subset"].items()]
            print(format_table(flat))
            if args.out:
                write_json_atomic(json_safe(quality), Path(args.out) / "label_quality.json")
    except UnwrittenResults as exc:  # computed but not written: the table is not lost
        print(format_table(exc.rows, BENCHMARK_COLUMNS))
        print(f"error: {exc} (the results are printed above)", file=sys.stderr)
        return 2
    except (EKDError, ValueError, OSError) as exc:
        message = str(exc) if isinstance(exc, ValueError) else user_error_line(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
