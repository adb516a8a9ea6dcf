"""Teachers: which checkpoints (or published torchani ensembles) label a dataset.

A teacher specification, as given on the command line (``teachers=...`` in ``distill.py``,
``distill.teachers=...`` in ``train.py``), is any of

- a list of entries, each a checkpoint file (``run1/checkpoints/last.ckpt``), a folder (searched
  as below) or a pretrained name;
- one such entry as a string;
- a mapping ``{dir: runs/teachers, pattern: "**/*.ckpt"}``.

A folder is searched for ``pattern`` (default ``**/*.ckpt``), sorted; where a folder holds both
``best.ckpt`` and ``last.ckpt`` (a ``train.py`` run), only ``best.ckpt`` is used, so that each run
counts once (pass ``pattern: "**/last.ckpt"`` to use the last ones instead).

Pretrained names ``torchani_ani1x``, ``torchani_ani1ccx`` and ``torchani_ani2x`` expand to the 8
members of the published torchani ensembles, converted to :class:`~ekd_lightning.models.ani.ANIModel`
(weights read from the local torchani data folder; nothing is downloaded).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ..core.errors import CheckpointError, LabelMismatchError
from ..core.hashing import cached_sha256
from ..data.labels import read_label_metadata
from ..models.ani import ANIModel
from ..models.base import AtomisticModel
from ..task.checkpoint import load_potential

DEFAULT_PATTERN = "**/*.ckpt"

ANI1X_AEV = {
    "radial_cutoff": 5.2, "radial_eta": 16.0, "radial_start": 0.9, "radial_num_shifts": 16,
    "angular_cutoff": 3.5, "angular_eta": 8.0, "angular_zeta": 32.0, "angular_start": 0.9,
    "angular_num_shifts": 4, "angular_num_sections": 8,
}
"""ANI-1x AEV constants (as :meth:`~ekd_lightning.models.aev.ANIAEV.like_1x`)."""

PRETRAINED = {
    "torchani_ani1x": ("ANI1x", "ani1x", ("H", "C", "N", "O"), ANI1X_AEV),
    "torchani_ani1ccx": ("ANI1ccx", "ani1x", ("H", "C", "N", "O"), ANI1X_AEV),
    "torchani_ani2x": ("ANI2x", "ani2x", ("H", "C", "N", "O", "S", "F", "Cl"), {}),
}
"""Pretrained name -> (torchani model, AEV/network preset, elements, AEV constants)."""
ENSEMBLE_SIZE = 8


@dataclass(frozen=True)
class TeacherSource:
    """One teacher: a checkpoint, or member ``member`` of a published torchani ensemble.

    Attributes:
        name: what the label file records as the teacher's path: the checkpoint's absolute
            path, or e.g. ``torchani_ani2x[3]``.
        path: the file whose SHA-256 identifies the teacher (checkpoint or state dict).
        pretrained: the pretrained name, or None for a checkpoint.
        member: ensemble member index of a pretrained teacher.
    """

    name: str
    path: Path
    pretrained: str | None = None
    member: int | None = None

    def sha256(self) -> str:
        """Hex SHA-256 of the teacher's file (cached while the file is unchanged)."""
        return cached_sha256(self.path)


def torchani_weights_path(pretrained: str) -> Path:
    """Where torchani keeps the state dict of a published model (nothing is created)."""
    try:
        from torchani.paths import data_dir
    except ImportError as exc:
        raise CheckpointError(
            f"teacher '{pretrained}' needs torchani: install the [ani] extra "
            "(pip install 'ekd-lightning[ani]')"
        ) from exc
    preset = PRETRAINED[pretrained][0].lower()
    return data_dir() / "StateDicts" / f"{preset}_state_dict.pt"


def _pretrained_sources(pretrained: str) -> list[TeacherSource]:
    path = torchani_weights_path(pretrained)
    if not path.is_file():
        model = PRETRAINED[pretrained][0]
        raise CheckpointError(
            f"teacher '{pretrained}': the published torchani {model} weights are not in the local "
            f"torchani data folder ({path} is missing) and ekd-lightning never downloads them. "
            f"To get them, on a machine with internet run "
            f"`python -c \"import torchani; torchani.models.{model}()\"` (it caches "
            f"{path.name} under $TORCHANI_DATA_DIR, default ~/.local/share/Torchani/StateDicts), "
            f"or download {path.name} from https://huggingface.co/roitberg-group/{model.lower()} "
            f"into {path.parent}; set TORCHANI_DATA_DIR to use another folder"
        )
    return [TeacherSource(f"{pretrained}[{i}]", path, pretrained, i) for i in range(ENSEMBLE_SIZE)]


def _checkpoints_in(folder: Path, pattern: str) -> list[Path]:
    found = sorted(p for p in folder.glob(pattern) if p.is_file())
    chosen = [p for p in found if not (p.name == "last.ckpt" and (p.parent / "best.ckpt") in found)]
    if not chosen:
        raise CheckpointError(f"teachers.dir {folder}: no checkpoint matches '{pattern}'")
    return chosen


def _entry_sources(entry: str, pattern: str) -> list[TeacherSource]:
    if entry in PRETRAINED:
        return _pretrained_sources(entry)
    if entry.startswith("torchani_"):
        raise CheckpointError(
            f"unknown pretrained teacher '{entry}'; known: {sorted(PRETRAINED)}"
        )
    path = Path(entry).expanduser()
    if path.is_dir():
        return [TeacherSource(str(p.resolve()), p.resolve()) for p in _checkpoints_in(path, pattern)]
    if not path.is_file():
        raise CheckpointError(f"teacher {entry}: no such checkpoint file or folder")
    return [TeacherSource(str(path.resolve()), path.resolve())]


def resolve_teachers(spec) -> list[TeacherSource]:
    """Teacher sources, in order, from a specification (see the module docstring).

    Raises CheckpointError when the specification is empty or names something missing.
    """
    if spec is None:
        raise CheckpointError(
            "no teachers given: pass teachers=[run1/last.ckpt,...], teachers.dir=runs/teachers "
            "or teachers=torchani_ani2x"
        )
    pattern = DEFAULT_PATTERN
    if isinstance(spec, Mapping):
        pattern = spec.get("pattern") or DEFAULT_PATTERN
        entries = [spec["dir"]] if spec.get("dir") else []
        entries += list(spec.get("paths") or [])
    elif isinstance(spec, str | os.PathLike):
        entries = [spec]
    elif isinstance(spec, Sequence):
        entries = list(spec)
    else:
        raise CheckpointError(f"teachers: cannot use {spec!r} (a list, a path, a name or {{dir: ...}})")
    sources = [s for entry in entries for s in _entry_sources(str(entry), pattern)]
    if not sources:
        raise CheckpointError(f"teachers {spec!r}: no teacher found")
    return sources


def teacher_identities(sources: Sequence[TeacherSource], models: Sequence[AtomisticModel] | None = None) -> list[dict]:
    """What a label file records per teacher: ``{path, sha256, model}`` (model name if known)."""
    out = []
    for i, src in enumerate(sources):
        entry = {"path": src.name, "sha256": src.sha256()}
        if models is not None:
            entry["model"] = getattr(models[i], "model_name", type(models[i]).__name__)
        out.append(entry)
    return out


def load_teacher(source: TeacherSource) -> AtomisticModel:
    """The teacher's model (float32 or as trained), in eval mode with frozen weights."""
    if source.pretrained is None:
        module = load_potential(source.path)
        model = module.model
        model.model_name = module.model_name
    else:
        model = _torchani_member(source.pretrained, str(source.path), source.member)
        model.model_name = "ani"
    return model.eval().requires_grad_(False)


def load_teachers(sources: Sequence[TeacherSource]) -> list[AtomisticModel]:
    """All teachers' models, in order."""
    return [load_teacher(s) for s in sources]


@lru_cache(maxsize=4)
def _torchani_ensemble(pretrained: str, path: str):
    """The published torchani ensemble, assembled as torchani.models does, weights from ``path``."""
    from torchani.arch import Assembler

    _, preset, elements, _ = PRETRAINED[pretrained]
    asm = Assembler(periodic_table_index=True)
    asm.set_symbols(elements)
    asm.set_global_cutoff_fn("cosine")
    asm.set_aev_computer(radial=preset, angular=preset, strategy="pyaev")
    asm.set_atomic_networks(ctor=preset)
    asm.set_neighborlist("all_pairs")
    asm.set_zeros_as_self_energies()
    model = asm.assemble(ENSEMBLE_SIZE)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # a corrupt or foreign file
        raise CheckpointError(f"teacher '{pretrained}': cannot load {path}: {exc}") from exc
    return model


def _check_aev_constants(pretrained: str, ours, theirs) -> None:
    pairs = {
        "radial shifts": (ours.radial_shifts, theirs.radial.shifts),
        "angular shifts": (ours.angular_shifts, theirs.angular.shifts),
        "angular sections": (ours.angular_sections, theirs.angular.sections),
        "radial eta": (torch.tensor([ours.radial_eta]), theirs.radial.eta),
        "angular eta": (torch.tensor([ours.angular_eta]), theirs.angular.eta),
        "angular zeta": (torch.tensor([ours.angular_zeta]), theirs.angular.zeta),
    }
    for what, (a, b) in pairs.items():
        if not torch.allclose(a.double(), b.double().flatten(), atol=1e-6):
            raise CheckpointError(f"teacher '{pretrained}': AEV {what} differ from torchani's")


def _torchani_member(pretrained: str, path: str, member: int) -> ANIModel:
    """Member ``member`` of a published ensemble as an ANIModel (scale 1, torchani's SAE)."""
    ensemble = _torchani_ensemble(pretrained, path)
    _, _, elements, aev = PRETRAINED[pretrained]
    networks = ensemble.neural_networks.members[member].atomics
    hidden = {e: [layer.out_features for layer in networks[e].layers] for e in elements}
    model = ANIModel(elements, aev=aev, hidden=hidden)
    _check_aev_constants(pretrained, model.aev, ensemble.aev_computer)
    with torch.no_grad():
        for e in elements:
            ours = [m for m in model.networks[e] if isinstance(m, torch.nn.Linear)]
            theirs = [*networks[e].layers, networks[e].final_layer]
            for a, b in zip(ours, theirs, strict=True):
                a.weight.copy_(b.weight)
                a.bias.copy_(b.bias)
    model.set_energy_statistics(ensemble.energy_shifter.self_energies.double().tolist(), 1.0)
    return model


def verify_teachers(path: str | Path, teachers, metadata: Mapping | None = None) -> None:
    """Refuse (LabelMismatchError) a label file distilled from other teachers.

    Args:
        path: the label file.
        teachers: a teacher specification as ``distill.py`` takes it (checkpoint paths, a
            folder, a pretrained name, ``{dir: ...}``) or a list of
            :class:`TeacherSource`. Teachers are compared by the
            SHA-256 of their files, in order.
    """
    metadata = read_label_metadata(path) if metadata is None else metadata
    recorded = metadata.get("teachers")
    if not recorded:
        raise LabelMismatchError(f"{path}: the label file records no teachers to compare with")
    if isinstance(teachers, Sequence) and teachers and isinstance(teachers[0], TeacherSource):
        sources = list(teachers)
    else:
        sources = resolve_teachers(teachers)
    given = [(s.name, s.sha256()) for s in sources]
    if [h for _, h in given] != [t.get("sha256") for t in recorded]:
        def show(items):
            return ", ".join(f"{Path(name).name} ({sha[:8]})" for name, sha in items)

        raise LabelMismatchError(
            f"{path}: labels were distilled from {len(recorded)} teacher(s) "
            f"[{show((t.get('path', '?'), t.get('sha256', '')) for t in recorded)}], not from the "
            f"{len(given)} given [{show(given)}] (compared by file SHA-256, in order); re-run "
            "distill.py with these teachers"
        )
