"""Distilling more than forces: rows of the teacher ensemble's energy Hessian (Amin et al.,
"Towards fast, specialized machine learning force fields: distilling foundation models via
energy Hessians", ICLR 2025).

1. **Directions**: per conformation, K unit vectors v (n_atoms, 3): random Hessian rows
   (``kind=rows``: one-hot on K distinct Cartesian coordinates, as Amin et al. sample rows) or
   random Gaussian directions (``kind=gaussian``), drawn from ``(seed, group key, conformation
   index in the file)`` alone (:func:`directions`), so they do not depend on batching.
2. **Teacher labels**: the Hessian-vector products H v of the ensemble's *mean* energy
   (:func:`ensemble_hvp`: autograd double backward through every teacher; H v of the mean is the
   mean of the teachers' H v), Hartree/Å², stored with the directions in an HDF5 file
   (:func:`write_hvp_labels`, atomic; layout below), cached in the run store by a hash of the
   teachers' runs and the settings (:func:`ekd_lightning.workflow.pipeline.distill`'s naming).
3. **Student term** (:class:`HessianLoss`, a loss term: ``loss.hessian``): in each training
   step a random fraction of the batch's molecules, each with one of its K directions, and the
   squared error of the student's own H v (double backward with ``create_graph``) against the
   teachers', in (kcal/mol/Å²)², times a weight, added to the training loss. Validation loss
   (early stopping, best checkpoint) is left as the plain student's, so the stopping rule
   compares the same quantity.

File layout (format ``ekd-hvp``, version 1): one group per dataset molecule group (same path),
``directions`` and ``hvp`` (n_conf, K, n_atoms, 3) float32 over the group's conformations *as
stored in the dataset file* (NaN where not labelled), ``labelled`` (n_conf,) bool; root
attributes ``format``, ``version``, ``kind``, ``directions`` (K), ``seed``, ``dataset_sha256``,
``teachers`` (JSON), ``units_hvp`` = Hartree/Angstrom^2.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor

from ..core.errors import ConfigError, DataError
from ..core.units import HARTREE_TO_KCALMOL as KCAL
from ..data.packed import PackedConformations, PackedSplit
from ..data.readers import MoleculeRecord, open_h5
from ..models.losses import LossTerm

HVP_FORMAT = "ekd-hvp"
HVP_VERSION = 1
KINDS = ("rows", "gaussian")


# ----------------------------------------------------------------------------- directions
def directions(seed: int, key: str, conf: int, n_atoms: int, k: int, kind: str = "rows") -> np.ndarray:
    """K unit directions (k, n_atoms, 3) float32 for one conformation, a function of
    ``(seed, key, conf)`` only: ``rows`` one-hot on k distinct Cartesian coordinates (Hessian
    rows), ``gaussian`` normal vectors scaled to unit norm."""
    if kind not in KINDS:
        raise ValueError(f"hessian kind '{kind}' is not one of {KINDS}")
    if kind == "rows" and k > 3 * n_atoms:
        raise ValueError(f"{key}: {k} Hessian rows asked of a molecule with {3 * n_atoms} "
                         "coordinates; lower pipeline.hessian.directions")
    rng = np.random.default_rng([int(seed), zlib.crc32(key.encode()), int(conf)])
    if kind == "rows":
        out = np.zeros((k, 3 * n_atoms), np.float32)
        out[np.arange(k), rng.choice(3 * n_atoms, size=k, replace=False)] = 1.0
    else:
        out = rng.standard_normal((k, 3 * n_atoms))
        out = (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)
    return out.reshape(k, n_atoms, 3)


# ----------------------------------------------------------------------------- teachers
def ensemble_hvp(models: Sequence[torch.nn.Module], z: Tensor, pos: Tensor, batch: Tensor,
                 num_molecules: int, v: Tensor) -> Tensor:
    """Hessian-vector products (K, n_atoms, 3), Hartree/Å², of the teachers' mean energy.

    Args:
        models: the teachers (energies (num_molecules,) Hartree from ``(z, pos, batch, n)``).
        z, pos, batch, num_molecules: a batch of molecules (pos in Å).
        v: (K, n_atoms, 3) directions; molecules are independent (the Hessian of the summed
            energies is block diagonal), so row k holds every molecule's own H v_k.
    """
    pos = pos.detach().requires_grad_(True)
    with torch.enable_grad():
        energy = sum(m(z, pos, batch, num_molecules) for m in models) / len(models)
        (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=True)
        rows = [torch.autograd.grad((grad * vk.to(grad.dtype)).sum(), pos, retain_graph=True)[0]
                for vk in v]
    return torch.stack(rows).detach()


def hvp_labels(models: Sequence[torch.nn.Module], records: Sequence[MoleculeRecord],
               file_conformations: Mapping[str, int], k: int, seed: int, kind: str,
               batch_size: int = 64) -> dict[str, dict[str, np.ndarray]]:
    """Directions and teacher HVPs of every conformation of ``records``: ``{group key:
    {directions, hvp: (n_file_conf, K, n_atoms, 3) float32 (NaN where absent), labelled}}``."""
    packed = PackedConformations(records)
    out = {}
    for r in records:
        shape = (file_conformations[r.key], k, len(r.atomic_numbers), 3)
        out[r.key] = {"directions": np.full(shape, np.nan, np.float32),
                      "hvp": np.full(shape, np.nan, np.float32),
                      "labelled": np.zeros(shape[0], bool)}
    for batch in PackedSplit(packed, np.arange(len(packed)), labels=False).loader(batch_size):
        counts = torch.bincount(batch.batch, minlength=batch.num_graphs).tolist()
        keys = [records[int(m)].key for m in batch.mol]
        dirs = [directions(seed, key, int(c), n, k, kind) for key, c, n in zip(keys, batch.conf, counts, strict=True)]
        v = torch.from_numpy(np.concatenate(dirs, axis=1))  # (K, n_atoms, 3)
        hv = ensemble_hvp(models, batch.z, batch.pos, batch.batch, batch.num_graphs, v)
        for key, c, d, h in zip(keys, batch.conf.tolist(), dirs, hv.split(counts, dim=1), strict=True):
            group = out[key]
            group["directions"][c], group["hvp"][c], group["labelled"][c] = d, h.float().numpy(), True
    return out


def write_hvp_labels(path: str | Path, groups: Mapping[str, Mapping[str, np.ndarray]],
                     metadata: Mapping) -> Path:
    """Write :func:`hvp_labels`' arrays and ``metadata`` (JSON for lists/dicts) atomically."""
    from ..core.files import write_atomic

    def write(handle) -> None:
        with h5py.File(handle, "w") as f:
            f.attrs.update({"format": HVP_FORMAT, "version": HVP_VERSION,
                            "units_hvp": "Hartree/Angstrom^2"})
            for name, value in metadata.items():
                f.attrs[name] = json.dumps(value) if isinstance(value, list | tuple | dict) else value
            for key, arrays in groups.items():
                group = f.create_group(key)
                for name, array in arrays.items():
                    group.create_dataset(name, data=array)

    path = Path(path)
    write_atomic(path, write)
    return path


def label_teachers(checkpoints: Sequence[str | Path], dataset: str | Path, energy_key: str,
                   out: str | Path, k: int, seed: int, kind: str, file_format: str = "auto",
                   elements: Sequence[str] | None = None, batch_size: int = 64) -> Path:
    """The HVP label file of the teachers ``checkpoints`` for ``dataset`` (kept when ``out``
    already exists: its name is a hash of the teachers and the settings)."""
    from ..inference.teachers import load_teachers, teacher_identities
    from .run import make_job

    out = Path(out)
    if out.is_file():
        return out
    job = make_job(dataset, energy_key, out, [str(c) for c in checkpoints], file_format, elements, batch_size)
    models = load_teachers(job.sources)
    groups = hvp_labels(models, job.records, job.file_conformations, k, seed, kind, batch_size)
    return write_hvp_labels(out, groups, {
        "kind": kind, "directions": int(k), "seed": int(seed), "energy_key": energy_key,
        "dataset_path": str(job.dataset.resolve()), "dataset_sha256": job.dataset_sha256,
        "teachers": teacher_identities(job.sources, models)})


# ----------------------------------------------------------------------------- student
class HessianLoss(LossTerm):
    """The student's Hessian term, ``loss.hessian`` (absent by default; ``+ablation=hessian``):
    the mean squared error, (kcal/mol/Å²)², of the student's own H v (double backward through
    the model, ``create_graph`` so that it trains) against the teachers' on a random
    ``fraction`` of each batch's molecules, one of their stored directions each.

    Training only (:attr:`validated` False): ``val/loss``, watched by the best checkpoint, early
    stopping and the LR schedule, stays the plain student's, so the stopping rule compares the
    same quantity. Built from the config alone (a checkpoint rebuilds it without the file); the
    labels are read in :meth:`setup`, when a fit starts.

    Args:
        labels: the HVP label file (:func:`write_hvp_labels`; the pipeline's ``pipeline.hessian``
            step passes ``<store>/hvp-<sha>.h5``).
        weight, warmup_epochs: see :class:`~ekd_lightning.models.losses.LossTerm`.
        fraction: share of each batch's molecules whose H v is matched (at least one).
        seed: of the term's own random generator (molecules and directions drawn per step), so
            that the data order stays the plain student's; its state is saved in checkpoints
            (:meth:`state_dict`), so a resumed run draws what an uninterrupted one would.
    """

    needs_model = True
    validated = False

    def __init__(self, labels: str | None = None, weight: float = 1e-3, fraction: float = 1.0,
                 seed: int = 0, warmup_epochs: int = 0):
        super().__init__(weight, warmup_epochs)
        if not 0 < fraction <= 1:
            raise ConfigError(f"loss.hessian.fraction={fraction}: must be in (0, 1]")
        self.labels, self.fraction, self.seed = labels, float(fraction), int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.directions = self.hvp = None

    def state_dict(self) -> dict:
        """The generator's state (which molecules and directions the next steps draw)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def setup(self, datamodule) -> None:
        """Read the labels of every packed conformation of ``datamodule`` (after its setup):
        ``directions`` and ``hvp`` (K, n_atoms_total, 3) in the packed atom order, NaN for
        conformations the file does not hold (extra geometries)."""
        if not self.labels:
            raise ConfigError("loss.hessian.labels: the term needs an HVP label file; the pipeline "
                              "makes one (python train.py experiment=ekd +ablation=hessian)")
        if datamodule is None or getattr(datamodule, "packed", None) is None:
            raise ConfigError("loss.hessian: the term reads its labels from the run's data module "
                              "(trainer.fit(module, datamodule=...))")
        from ..core.hashing import cached_sha256

        path, records, packed = Path(self.labels), datamodule.records, datamodule.packed
        dirs, hvp = [], []
        with open_h5(path) as f:
            if f.attrs.get("format") != HVP_FORMAT:
                raise DataError(f"{path}: not an HVP label file (root attribute format != "
                                f"'{HVP_FORMAT}'); make it with the pipeline's pipeline.hessian")
            recorded = f.attrs.get("dataset_sha256")
            if recorded and recorded != cached_sha256(datamodule.path):
                raise DataError(f"{path}: HVP labels made for another dataset than {datamodule.path} "
                                "(dataset_sha256 differs); remove the file to label again")
            for r in records:
                if r.key not in f or f[r.key]["hvp"].shape[2] != len(r.atomic_numbers):
                    raise DataError(f"{path}: no group '{r.key}' with {len(r.atomic_numbers)} atoms: "
                                    "the HVP labels were made for another dataset; remove the file "
                                    "to label again")
                for out, name in ((dirs, "directions"), (hvp, "hvp")):
                    array = f[r.key][name][()][r.conf_index]  # (n_conf, K, n_atoms, 3)
                    out.append(array.transpose(1, 0, 2, 3).reshape(array.shape[1], -1, 3))
        k, extra = dirs[0].shape[0], len(packed.z) - sum(d.shape[1] for d in dirs)
        missing = np.full((k, extra, 3), np.nan, np.float32)  # extra geometries: not labelled
        self.directions = torch.from_numpy(np.concatenate([*dirs, missing], axis=1))
        self.hvp = torch.from_numpy(np.concatenate([*hvp, missing], axis=1))
        self.atom_start = torch.from_numpy(packed.atom_start)
        self.position = {(int(m), int(c)): g for g, (m, c) in enumerate(zip(packed.mol, packed.conf, strict=True))}

    def __call__(self, energies: Tensor, forces: Tensor | None, batch, model=None) -> Tensor:
        """Mean squared error (kcal/mol/Å²)² of ``model``'s H v against the teachers' on a
        random ``fraction`` of the batch's molecules, one random stored direction each."""
        if self.hvp is None:
            raise ConfigError("loss.hessian: labels not read; the Lightning module's setup hook "
                              "reads them when a fit starts (or call term.setup(datamodule))")
        n = batch.num_graphs
        chosen = torch.randperm(n, generator=self.generator)[: max(1, round(self.fraction * n))].sort().values
        device = batch.pos.device
        atoms = torch.isin(batch.batch, chosen.to(device))
        sub_batch = torch.searchsorted(chosen.to(device), batch.batch[atoms])
        g = torch.tensor([self.position[(m, c)] for m, c in
                          zip(batch.mol[chosen].tolist(), batch.conf[chosen].tolist(), strict=True)])
        rows = torch.cat([torch.arange(int(self.atom_start[i]), int(self.atom_start[i + 1])) for i in g])
        counts = self.atom_start[g + 1] - self.atom_start[g]
        which = torch.repeat_interleave(torch.randint(self.directions.shape[0], (len(chosen),),
                                                      generator=self.generator), counts)
        v = self.directions[which, rows].to(device)
        target = self.hvp[which, rows].to(device)
        pos = batch.pos[atoms].detach().requires_grad_(True)
        with torch.enable_grad():
            energy = model(batch.z[atoms], pos, sub_batch, len(chosen))
            (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=True)
            (hv,) = torch.autograd.grad((grad * v.to(grad.dtype)).sum(), pos, create_graph=True)
        squared = ((hv - target) * KCAL) ** 2
        valid = torch.isfinite(squared).all(-1)
        return squared[valid].mean().float() if bool(valid.any()) else hv.sum() * 0.0
