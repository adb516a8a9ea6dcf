"""Figures of the evaluation and the pipeline report, grouped by role.

A model's role is given (``roles``: ``{name: role}``, the pipeline's run records) or read from
its name (:func:`role_of`, names chosen on ``ekd-evaluate``'s command line): ``teacherN`` →
teacher, ``ensemble``, ``<stage>-seed<S>`` → that stage (baseline, student, oracle). Every figure draws a role in one
colour (:data:`ROLE_COLOURS`), pools the seeds (and teachers) of a role into one panel, line or
histogram, and lays panels out in a grid of at most :data:`GRID_COLUMNS` columns. Energies in
kcal/mol, forces in kcal/mol/Å; predictions and references come in Hartree, Hartree/Å.
All figures are PNG (Agg, no display), written atomically; each function returns its Figure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..core.units import HARTREE_TO_KCALMOL as KCAL

ROLES = ("teacher", "ensemble", "baseline", "student", "oracle")
ROLE_COLOURS = {"teacher": "#7f7f7f", "ensemble": "#9467bd", "baseline": "#d62728",
                "student": "#1f77b4", "oracle": "#2ca02c", "other": "#ff7f0e"}
"""One colour per role (grey teachers, purple ensemble, red baseline, blue student, green oracle)."""
GRID_COLUMNS = 3
PANEL_INCHES = 3.6


def role_of(name: str) -> str:
    """``teacher`` for ``teacher0``..., ``ensemble``, the stage of ``<stage>-seed<S>``, else ``other``."""
    stem = name.split("-seed")[0]
    if stem.startswith("teacher") and stem[len("teacher"):].isdigit():
        return "teacher"
    return stem if stem in ROLES else "other"


def by_role(names: Sequence[str], roles: Mapping[str, str] | None = None) -> dict[str, list[str]]:
    """``{role: [names]}`` in :data:`ROLES` order (then ``other``), roles without a name left out;
    a name's role from ``roles`` when given (``other`` if absent there), else :func:`role_of`."""
    groups: dict[str, list[str]] = {}
    for role in (*ROLES, "other"):
        mine = [n for n in names if _role(n, roles) == role]
        if mine:
            groups[role] = mine
    return groups


def _role(name: str, roles: Mapping[str, str] | None) -> str:
    role = role_of(name) if roles is None else roles.get(name, "other")
    return role if role in ROLES else "other"


def grid_figure(n_panels: int):
    """A Figure with ``n_panels`` square-ish axes in rows of at most :data:`GRID_COLUMNS`
    (unused grid cells removed); returns ``(fig, axes)``."""
    from matplotlib.figure import Figure

    cols = max(1, min(GRID_COLUMNS, n_panels))
    rows = max(1, math.ceil(n_panels / cols))
    fig = Figure(figsize=(PANEL_INCHES * cols, PANEL_INCHES * rows + 0.3), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.remove()
    return fig, list(axes[:n_panels])


def save_figure(fig, path: str | Path) -> None:
    """Write ``fig`` as PNG (120 dpi) atomically."""
    from ..core.files import write_atomic

    write_atomic(Path(path), lambda handle: fig.savefig(handle, format="png", dpi=120))


def _pooled(predictions: Mapping, names: Sequence[str], records: Sequence, quantity: str):
    """Reference and predicted values of ``names`` pooled, in kcal/mol (energy, relative to each
    molecule's mean reference energy) or kcal/mol/Å (force components)."""
    ref, pred = [], []
    for name in names:
        for k, r in enumerate(records):
            if quantity == "energy":
                centre = r.energies.mean()
                ref.append((r.energies - centre) * KCAL)
                pred.append((predictions[name].energies[k] - centre) * KCAL)
            else:
                ref.append(r.forces.ravel() * KCAL)
                pred.append(predictions[name].forces[k].ravel() * KCAL)
    ref, pred = np.concatenate(ref), np.concatenate(pred)
    keep = np.isfinite(ref) & np.isfinite(pred)
    return ref[keep], pred[keep]


def _diagonal(ax, low: float, high: float) -> None:
    ax.plot([low, high], [low, high], color="k", lw=0.8)
    ax.set(xlim=(low, high), ylim=(low, high), aspect="equal")


def plot_energy_parity(predictions: Mapping, records: Sequence, path: str | Path,
                       roles: Mapping[str, str] | None = None):
    """Energy parity, one panel per role (seeds pooled) in the role's colour, panels in a grid.

    Axes in kcal/mol relative to the mean *reference* energy of each molecule, so molecules of
    different size share one scale while a per-molecule offset of the prediction stays visible.
    """
    groups = by_role(list(predictions), roles)
    fig, axes = grid_figure(len(groups))
    for ax, (role, names) in zip(axes, groups.items(), strict=True):
        ref, pred = _pooled(predictions, names, records, "energy")
        ax.scatter(ref, pred, s=3, alpha=0.35, color=ROLE_COLOURS[role], rasterized=True)
        _diagonal(ax, min(ref.min(), pred.min()), max(ref.max(), pred.max()))
        ax.set(title=f"{role} ({len(names)}): MAE {np.abs(pred - ref).mean():.2f}",
               xlabel="reference E − ⟨E_ref⟩_mol (kcal/mol)",
               ylabel="predicted (kcal/mol)")
    save_figure(fig, path)
    return fig


def plot_force_parity(predictions: Mapping, records: Sequence, path: str | Path,
                      roles: Mapping[str, str] | None = None):
    """Force parity per Cartesian component as a density (hexbin, log counts), one panel per
    role (seeds pooled), panels in a grid; the panel title gives the role's pooled MAE."""
    from matplotlib.colors import LinearSegmentedColormap

    groups = by_role(list(predictions), roles)
    fig, axes = grid_figure(len(groups))
    for ax, (role, names) in zip(axes, groups.items(), strict=True):
        ref, pred = _pooled(predictions, names, records, "force")
        low, high = np.quantile(np.concatenate([ref, pred]), [0.001, 0.999])
        cmap = LinearSegmentedColormap.from_list(role, ["white", ROLE_COLOURS[role]])
        ax.hexbin(ref, pred, gridsize=60, bins="log", cmap=cmap, mincnt=1,
                  extent=(low, high, low, high), rasterized=True)
        _diagonal(ax, low, high)
        ax.set(title=f"{role} ({len(names)}): MAE {np.abs(pred - ref).mean():.2f}",
               xlabel="reference F (kcal/mol/Å)", ylabel="predicted F (kcal/mol/Å)")
    save_figure(fig, path)
    return fig


def plot_force_errors(predictions: Mapping, records: Sequence, path: str | Path,
                      roles: Mapping[str, str] | None = None):
    """Histogram of |F_pred − F_ref| per Cartesian component (kcal/mol/Å), one line per role
    (seeds pooled, counts per model) in the role's colour."""
    groups = by_role(list(predictions), roles)
    errors = {role: np.abs(np.subtract(*_pooled(predictions, names, records, "force")))
              for role, names in groups.items()}
    positive = np.concatenate([e[e > 0] for e in errors.values()])
    low, high = (1e-3, 1.0) if positive.size == 0 else (np.quantile(positive, 1e-3), positive.max())
    bins = np.geomspace(max(low, 1e-4), max(high, low * 10), 60)
    fig, (ax,) = grid_figure(1)
    fig.set_size_inches(6.0, 4.2)
    for role, e in errors.items():
        weights = np.full(e.shape, 1.0 / len(groups[role]))
        ax.hist(np.clip(e, bins[0], bins[-1]), bins=bins, weights=weights, histtype="step", lw=1.6,
                color=ROLE_COLOURS[role], label=f"{role} ({len(groups[role])}), MAE {e.mean():.2f}")
    ax.set(xscale="log", xlabel="|force error| per component (kcal/mol/Å)",
           ylabel="count per model", title="force errors")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return fig


def plot_learning_curves(histories: Mapping[str, Sequence[Mapping]], path: str | Path,
                         roles: Mapping[str, str] | None = None):
    """Validation force MAE and energy MAE per epoch (log scale), one thin line per run in its
    role's colour (``histories``: ``{run name: history.json entries}``; ``roles``: as
    :func:`by_role`), one legend entry per role."""
    from matplotlib.ticker import FormatStrFormatter

    fig, axes = grid_figure(2)
    for ax, key, label in zip(axes, ("val/force_mae", "val/energy_mae"),
                              ("val force MAE (kcal/mol/Å)", "val energy MAE (kcal/mol)"), strict=True):
        shown = set()
        for name, history in histories.items():
            points = [(h["epoch"], h[key]) for h in history if key in h]
            if not points:
                continue
            role = _role(name, roles)
            epochs, values = zip(*points, strict=True)
            ax.plot(epochs, values, color=ROLE_COLOURS[role], lw=1.0, alpha=0.8,
                    label=None if role in shown else role)
            shown.add(role)
        ax.set(yscale="log", xlabel="epoch", ylabel=label)
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        if shown:
            ax.legend(fontsize=8)
    save_figure(fig, path)
    return fig
