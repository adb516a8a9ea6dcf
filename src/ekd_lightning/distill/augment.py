"""Teacher-labelled extra geometries around the training conformations (issue 12's lever).

Around each conformation of the TRAINING split (never a validation or held-out one), ``copies``
new geometries are made by random Cartesian displacements, each coordinate moved by
N(0, ``displacement``²) Å, and labelled with the teacher ensemble's mean energy and mean forces
(never the reference), keeping the ensemble's spread. A student trains on the union: the
dataset's training conformations (reference energies + distilled forces) and these (teacher
energies + teacher forces), each extra geometry weighted by teacher agreement
(:func:`agreement_weights`).

The file format and its reader live in :mod:`ekd_lightning.data.extra_geometries`;
:func:`make_extra_geometries` caches the file in a folder under the name
``extra-<fingerprint[:10]>.h5`` (written atomically) and reuses it when it exists.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

from ..core.files import atomic_path
from ..core.hashing import cached_sha256
from ..data.extra_geometries import FORMAT, VERSION, agreement_weights, read_extra_geometries  # noqa: F401
from ..data.labels import UNITS
from ..data.readers import MoleculeRecord, open_h5

log = logging.getLogger(__name__)

SPLIT_KEYS = ("val_fraction", "test_fraction", "split_by", "seed", "train_fraction",
              "train_subset_seed")
"""Data-module settings that fix the training split the geometries are made around."""


# ----------------------------------------------------------------------------- generation
def displaced_geometries(records: Sequence[MoleculeRecord], train_rows: np.ndarray, copies: int,
                         displacement: float, seed: int) -> list[tuple[MoleculeRecord, np.ndarray]]:
    """Random Cartesian displacements of the training conformations.

    Args:
        records: the dataset's molecules (as the data module reads them).
        train_rows: (n, 2) rows (record, position among the record's kept conformations) of the
            training split.
        copies: geometries per training conformation.
        displacement: standard deviation of each coordinate's displacement, Å.
        seed: of the random displacements.

    Returns:
        Per record with training conformations: a record of the new geometries (coordinates
        float32-rounded, energies 0 until labelled) and (n,) the dataset conformation index
        each was displaced from.
    """
    if copies < 1 or displacement <= 0:
        raise ValueError(f"copies {copies} must be >= 1 and displacement {displacement} Å > 0")
    rng = np.random.default_rng(seed)
    out = []
    train_rows = np.asarray(train_rows, dtype=np.int64).reshape(-1, 2)
    for m in np.unique(train_rows[:, 0]):
        record = records[m]
        positions = np.repeat(np.sort(train_rows[train_rows[:, 0] == m, 1]), copies)
        base = record.coordinates[positions]
        coords = (base + rng.normal(0.0, displacement, base.shape)).astype(np.float32)
        out.append((MoleculeRecord(key=record.key, atomic_numbers=record.atomic_numbers,
                                   coordinates=coords.astype(np.float64),
                                   energies=np.zeros(len(coords))),
                    np.asarray(record.conf_index)[positions]))
    return out


def md_geometries(records: Sequence[MoleculeRecord], train_rows: np.ndarray, copies: int,
                  teachers, temperature: float, steps: int, seed: int,
                  batch_molecules: int = 1024) -> list[tuple[MoleculeRecord, np.ndarray]]:
    """Short Langevin MD on the teacher ensemble's mean potential from each training conformation.

    Each of ``copies`` replicas per training conformation starts there with Maxwell-Boltzmann
    velocities at ``temperature`` (K) and runs ``steps`` BAOAB steps of 0.5 fs (friction
    0.01/fs, :func:`ekd_lightning.analysis.batched_md.baoab_step`); its last frame is the new geometry.
    Replicas run ``batch_molecules`` at a time. Arguments and return value as
    :func:`displaced_geometries` (``teachers``: a teacher specification).
    """
    import torch
    from ase import Atoms, units

    from ..dynamics.replicas import baoab_step, make_replicas, potential
    from ..inference.members import load_members
    from ..inference.teachers import load_teachers, resolve_teachers
    from .run import is_sources

    if copies < 1 or steps < 1 or temperature <= 0:
        raise ValueError(f"copies {copies} and steps {steps} must be >= 1, temperature "
                         f"{temperature} K > 0")
    members = load_members(load_teachers(teachers if is_sources(teachers) else resolve_teachers(teachers)))
    generator = torch.Generator().manual_seed(int(seed))
    train_rows = np.asarray(train_rows, dtype=np.int64).reshape(-1, 2)
    out = []
    for m in np.unique(train_rows[:, 0]):
        record = records[m]
        positions = np.repeat(np.sort(train_rows[train_rows[:, 0] == m, 1]), copies)
        frames = []
        for start in range(0, len(positions), batch_molecules):
            chosen = positions[start:start + batch_molecules]
            atoms = [Atoms(numbers=record.atomic_numbers, positions=record.coordinates[c])
                     for c in chosen]
            state, _ = make_replicas(atoms, [temperature], 1, generator)

            def force_fn(pos, state=state):
                return potential(members, state.z, pos, state.batch, state.n)

            _, forces = force_fn(state.pos)
            for _ in range(steps):
                _, forces = baoab_step(state, forces, force_fn, 0.5 * units.fs, 0.01 / units.fs,
                                       generator)
            frames.append(state.pos.numpy().reshape(len(chosen), -1, 3))
        coords = np.concatenate(frames).astype(np.float32)
        out.append((MoleculeRecord(key=record.key, atomic_numbers=record.atomic_numbers,
                                   coordinates=coords.astype(np.float64),
                                   energies=np.zeros(len(coords))),
                    np.asarray(record.conf_index)[positions]))
    return out


def label_geometries(records: Sequence[MoleculeRecord], teachers, batch_size: int = 64,
                     accelerator: str = "cpu") -> dict[str, np.ndarray]:
    """The teacher ensemble's predictions on every conformation of ``records``, in order, with
    the distillation's predict step (:class:`~ekd_lightning.distill.run.DistillModule`,
    :func:`~ekd_lightning.distill.run.summarize`) in one process.

    Returns :func:`summarize`'s arrays concatenated: ``energy``, ``energy_std`` (N,) Hartree,
    ``forces``, ``forces_std`` (n_atoms_total, 3) Hartree/Å, ...
    """
    import pytorch_lightning as pl

    from ..data.packed import PackedConformations, PackedSplit
    from ..inference.teachers import load_teachers
    from .ensemble import TeacherEnsemble
    from .run import DistillModule

    packed = PackedConformations(records)
    index = np.arange(len(packed))
    loader = PackedSplit(packed, index, gidx=index).loader(batch_size)
    trainer = pl.Trainer(accelerator=accelerator, devices=1, logger=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=False, inference_mode=False)
    parts = trainer.predict(DistillModule(TeacherEnsemble(load_teachers(teachers))), loader)
    return {k: np.concatenate([p[k].cpu().numpy() for p in parts], axis=1 if k.startswith("teacher_") else 0)
            for k in parts[0]}


METHODS = {"cartesian": ("displacement",), "md": ("temperature", "steps")}
"""Ways of making the geometries and the settings each takes."""


def identity(data: Mapping, teachers: Sequence[dict], method: str, settings: Mapping,
             copies: int, seed: int) -> dict:
    """What fixes an extra-geometry file's content (its name and ``fingerprint``)."""
    return {"format_version": VERSION, "dataset_sha256": cached_sha256(data["path"]),
            "energy_key": data["energy_key"], "file_format": data.get("file_format", "auto"),
            "elements": list(data.get("elements") or []),
            "split": {k: data.get(k) for k in SPLIT_KEYS},
            "teachers": [t["sha256"] for t in teachers], "method": method,
            **{k: float(settings[k]) for k in METHODS[method]}, "copies": int(copies),
            "seed": int(seed)}


def make_extra_geometries(data: Mapping, teachers, out_dir: str | Path, method: str = "cartesian",
                          copies: int = 1, seed: int = 0, accelerator: str = "cpu",
                          **settings) -> Path:
    """Make (or find) the extra-geometry file of ``data``'s training split.

    Args:
        data: the data config (``cfg.data`` as a dict: path, energy_key, split settings, ...).
        teachers: teacher specification (:func:`~ekd_lightning.inference.teachers.resolve_teachers`).
        out_dir: where the file is cached, named ``extra-<fingerprint[:10]>.h5``.
        method: ``cartesian`` (:func:`displaced_geometries`; setting ``displacement``, Å) or
            ``md`` (:func:`md_geometries`; settings ``temperature``, K, and ``steps``).
        copies: geometries per training conformation; ``seed``: of the randomness.

    Returns:
        The file's path.
    """
    from ..core.provenance import code_version, creation_time
    from ..data import EKDDataModule
    from ..inference.teachers import resolve_teachers, teacher_identities

    if method not in METHODS or any(k not in settings for k in METHODS[method]):
        raise ValueError(f"extra_geometries.method '{method}': use one of "
                         f"{ {k: list(v) for k, v in METHODS.items()} } with its settings")
    sources = resolve_teachers(teachers)
    ident = identity(data, teacher_identities(sources), method, settings, copies, seed)
    fingerprint = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    out = Path(out_dir) / f"extra-{fingerprint[:10]}.h5"
    if out.is_file():
        with open_h5(out) as f:
            if f.attrs.get("fingerprint") == fingerprint:
                log.info("%s: extra geometries found (same settings and teachers)", out)
                return out
    keys = ("path", "energy_key", "force_key", "file_format", "elements", "batch_size",
            "forces_are_gradients", *SPLIT_KEYS)
    datamodule = EKDDataModule(**{k: data[k] for k in keys if k in data})
    datamodule.setup("fit")
    train = datamodule.splits["train"]
    if method == "cartesian":
        made = displaced_geometries(datamodule.records, train, copies,
                                    float(settings["displacement"]), seed)
    else:
        made = md_geometries(datamodule.records, train, copies, sources,
                             float(settings["temperature"]), int(settings["steps"]), seed)
    records = [r for r, _ in made]
    labels = label_geometries(records, sources, int(data.get("batch_size", 64)), accelerator)
    metadata = {**UNITS, "format": FORMAT, "version": VERSION, "forces_convention": "-dE/dx",
                "dataset_path": str(Path(data["path"]).resolve()),
                "dataset_sha256": ident["dataset_sha256"],
                "teachers": json.dumps(teacher_identities(sources)), "method": method,
                **{k: float(settings[k]) for k in METHODS[method]}, "copies": int(copies),
                "seed": int(seed),
                "split": json.dumps(ident["split"]), "identity": json.dumps(ident, sort_keys=True),
                "fingerprint": fingerprint, "created": creation_time(),
                "code_version": code_version()}
    _write(out, made, labels, metadata)
    log.info("%s: %d extra geometries (%s %s) labelled by %d teachers", out,
             sum(r.num_conformations for r in records), method, settings, len(sources))
    return out


def _write(out: Path, made, labels: Mapping[str, np.ndarray], metadata: Mapping) -> None:
    """Write the file atomically (temporary file in the same folder, then rename)."""
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update(dict(metadata))
        conf = atom = 0
        for record, source in made:
            n, n_atoms = record.num_conformations, len(record.atomic_numbers)
            rows, atoms = slice(conf, conf + n), slice(atom, atom + n * n_atoms)
            group = f.create_group(record.key)
            group["atomic_numbers"] = record.atomic_numbers.astype(np.int64)
            group["coordinates"] = record.coordinates.astype(np.float32)
            group["source_conformation"] = source.astype(np.int64)
            group["energy"] = labels["energy"][rows].astype(np.float64)
            group["energy_std"] = labels["energy_std"][rows].astype(np.float64)
            for name in ("forces", "forces_std"):
                group[name] = labels[name][atoms].reshape(n, n_atoms, 3).astype(np.float32)
            conf, atom = conf + n, atom + n * n_atoms
