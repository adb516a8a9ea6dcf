"""Labelling a dataset with a teacher ensemble: one Lightning predict loop and a writer callback,
used by ``distill.py`` and by ``train.py`` (labels made on the fly before a student's first epoch).

How a run goes:

- The dataset's usable conformations (records in stored order, each record's kept conformations
  in order; the order of :meth:`EKDDataModule.all_dataloader`) get a global index g = 0..N-1 and
  are cut into chunks of ``chunk_size`` consecutive conformations. Chunks depend on the dataset
  and ``chunk_size`` only, never on the number of processes.
- :class:`DistillDataModule`: rank 0 lists the complete shards already in ``<out>.shards/``
  (resume) and broadcasts them; the pending chunks are dealt round-robin, rank r taking
  ``pending[r::world_size]``. Batches never straddle chunks (``chunk_size`` is a multiple of
  ``batch_size``), so a conformation is evaluated in the same batch whatever the world size.
- :class:`DistillModule` evaluates the :class:`~ekd_lightning.distill.ensemble.TeacherEnsemble`
  on each batch; :class:`LabelShardWriter` (a ``BasePredictionWriter``) gathers the predictions
  of a chunk and writes ``chunk-NNNNNN.h5`` atomically as soon as the chunk is complete.
- After the loop (barrier), rank 0 merges the shards into the label file
  (:func:`~ekd_lightning.data.labels.write_labels`, atomic) and removes the shards.

A killed run restarted with the same arguments recomputes only the missing chunks and writes the
same file. Shards, and an existing label file, made with other arguments are refused
(LabelMismatchError) unless ``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from ..core.errors import DataError, LabelMismatchError
from ..core.files import atomic_path, write_json_atomic
from ..core.hashing import cached_sha256
from ..core.outputs import check_writable, exclusive, launched_rank_zero
from ..core.provenance import code_version, creation_time
from ..data.labels import COMPACT_VERSION, OPTIONAL_ARRAYS, read_label_metadata, write_labels
from ..data.packed import PackedConformations, PackedSplit
from ..data.readers import MoleculeRecord, detect_format, open_h5, read_molecules
from ..inference.calculator import torch_threads
from ..inference.teachers import TeacherSource, load_teachers, resolve_teachers, teacher_identities
from .ensemble import TeacherEnsemble

log = logging.getLogger(__name__)

TARGET_CHUNK = 4096
"""Conformations per chunk when none is given (rounded to a multiple of the batch size)."""
STOP_ENV = "EKD_DISTILL_STOP_AFTER_CHUNKS"
"""Test hook: a process raises DistillInterrupted after writing this many shards."""
IDENTITY_VERSION = 1
"""Version of how the label *values* are made (a run's ``format_version`` identity key, which
was also the file layout's version while both were 1). The compact layout (label files version
2) holds the same values as the dense version 1, so this stays 1: a dense file of the same run
is current and read as it is, and shards of an unfinished run still resume. Bump it when the
values change."""
TRAINER_KEYS = ("accelerator", "devices", "strategy", "num_nodes", "enable_progress_bar")
"""Keys of a trainer config used by the predict loop (precision, epochs, ... do not apply)."""


class DistillInterrupted(RuntimeError):
    """Raised by the test hook to simulate a run killed after some chunks."""


def auto_chunk_size(batch_size: int, chunk_size: int | None) -> int:
    """``chunk_size``, checked to be a multiple of ``batch_size``, or the multiple nearest to
    :data:`TARGET_CHUNK` when None."""
    if chunk_size is None:
        return batch_size * max(1, round(TARGET_CHUNK / batch_size))
    if chunk_size <= 0 or batch_size <= 0 or chunk_size % batch_size:
        raise ValueError(
            f"chunk_size {chunk_size} must be a positive multiple of batch_size {batch_size}, so "
            f"that batches never straddle chunks: e.g. chunk_size={batch_size * max(1, chunk_size // batch_size)}"
        )
    return chunk_size


@dataclass
class DistillJob:
    """Everything one labelling run needs; build it with :func:`make_job`.

    Attributes:
        dataset: the dataset HDF5 file; ``energy_key``, ``file_format`` (resolved, not auto) and
            ``elements`` select its records exactly as the data module does.
        out: the label file to write; shards go to ``<out>.shards/``.
        sources: the teachers, in order.
        batch_size, chunk_size: conformations per batch and per chunk (a multiple of it).
        records: the molecules; ``starts`` (n_records + 1,) the global index of each record's
            first conformation; ``file_conformations`` the conformation count of each group in
            the file (the label arrays' length).
        teachers: ``{path, sha256[, model]}`` per teacher, as recorded in the file.
        stop_after_chunks: test hook, see :data:`STOP_ENV`.
        member_forces: also keep each teacher's forces in the file (``teacher_forces``; about
            (2 + n_teachers) / 2 times the size); the mean, spread and each teacher's energy
            are always kept.
    """

    dataset: Path
    energy_key: str
    file_format: str
    elements: list[str] | None
    out: Path
    sources: list[TeacherSource]
    batch_size: int
    chunk_size: int
    records: list[MoleculeRecord]
    file_conformations: dict[str, int]
    dataset_sha256: str
    teachers: list[dict]
    overwrite: bool = False
    keep_shards: bool = False
    stop_after_chunks: int | None = None
    member_forces: bool = False
    starts: np.ndarray = field(init=False)
    packed: PackedConformations = field(init=False, repr=False)

    def __post_init__(self):
        self.packed = PackedConformations(self.records)
        self.starts = self.packed.record_start

    @property
    def n_conformations(self) -> int:
        return int(self.starts[-1])

    @property
    def n_chunks(self) -> int:
        return -(-self.n_conformations // self.chunk_size)

    @property
    def shard_dir(self) -> Path:
        return self.out.with_name(self.out.name + ".shards")

    def shard_path(self, chunk: int) -> Path:
        return self.shard_dir / f"chunk-{chunk:06d}.h5"

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        """Global indices [start, stop) of a chunk's conformations."""
        start = chunk * self.chunk_size
        return start, min(start + self.chunk_size, self.n_conformations)

    def identity(self) -> dict:
        """What makes two runs produce the same labels (not paths: files may move).
        ``member_forces`` counts only when asked for: a file with them also serves without."""
        identity = {
            "format_version": IDENTITY_VERSION, "dataset_sha256": self.dataset_sha256,
            "energy_key": self.energy_key, "selection": self.selection(),
            "teachers": [t["sha256"] for t in self.teachers],
            "chunk_size": self.chunk_size, "batch_size": self.batch_size,
        }
        return {**identity, "member_forces": True} if self.member_forces else identity

    def selection(self) -> str:
        """SHA-256 of the labelled conformations (group keys and conformation indices), which
        fix the chunks; the element filter and file format matter only through them."""
        digest = hashlib.sha256()
        for record in self.records:
            digest.update(record.key.encode() + b"\0")
            digest.update(np.asarray(record.conf_index, dtype=np.int64).tobytes())
        return digest.hexdigest()

    @property
    def fingerprint(self) -> str:
        return _sha256_json(self.identity())

    def serving_fingerprints(self) -> set[str]:
        """Fingerprints of the label files that hold this job's labels: its own, and, without
        ``member_forces``, that of the same file made with them."""
        return {self.fingerprint, _sha256_json({**self.identity(), "member_forces": True})}

    def locate(self, index: int) -> tuple[int, int]:
        """(record, position among the record's kept conformations) of a global index."""
        record = int(np.searchsorted(self.starts, index, side="right")) - 1
        return record, index - int(self.starts[record])

    def chunk_index(self, chunk: int) -> np.ndarray:
        """Global indices of a chunk's conformations."""
        return np.arange(*self.chunk_range(chunk), dtype=np.int64)


def _sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _file_conformations(path: Path, records: list[MoleculeRecord]) -> dict[str, int]:
    with open_h5(path) as f:
        return {r.key: int(f[r.key]["coordinates"].shape[0]) for r in records}


def make_job(
    dataset: str | Path, energy_key: str, out: str | Path, teachers, file_format: str = "auto",
    elements: list[str] | None = None, batch_size: int = 64, chunk_size: int | None = None,
    overwrite: bool = False, keep_shards: bool = False, stop_after_chunks: int | None = None,
    member_forces: bool = False,
) -> DistillJob:
    """Read the dataset, resolve and hash the teachers: a job ready for :func:`distill_labels`.

    Args:
        dataset: dataset HDF5 file (ANI-1x or COMP6 layout).
        energy_key: its energy dataset; conformations with a non-finite energy are not labelled.
        out: label file to write.
        teachers: teacher specification (see :mod:`ekd_lightning.inference.teachers`).
        file_format, elements: as the data config (``data.file_format``, ``data.elements``).
        batch_size: conformations per batch; ``chunk_size``: per shard (None: about 4096).
        overwrite: replace an existing label file (or shards) made with other arguments.
        keep_shards: leave ``<out>.shards/`` after merging.
        member_forces: also keep each teacher's forces (:class:`DistillJob`).
    """
    dataset = Path(dataset)
    fmt = detect_format(dataset) if file_format == "auto" else file_format
    records, _ = read_molecules(dataset, energy_key, None, fmt, elements)
    sources = teachers if is_sources(teachers) else resolve_teachers(teachers)
    env_stop = os.environ.get(STOP_ENV)
    return DistillJob(
        dataset=dataset, energy_key=energy_key, file_format=fmt,
        elements=None if elements is None else list(elements), out=Path(out), sources=sources,
        batch_size=int(batch_size), chunk_size=auto_chunk_size(int(batch_size), chunk_size),
        records=records, file_conformations=_file_conformations(dataset, records),
        dataset_sha256=cached_sha256(dataset), teachers=teacher_identities(sources),
        overwrite=overwrite, keep_shards=keep_shards,
        stop_after_chunks=int(env_stop) if env_stop else stop_after_chunks,
        member_forces=bool(member_forces),
    )


def is_sources(teachers) -> bool:
    return isinstance(teachers, list) and bool(teachers) and isinstance(teachers[0], TeacherSource)


# ----------------------------------------------------------------------------- checks
def _differences(recorded: Mapping, job: DistillJob) -> str:
    wanted = job.identity()
    names = [k for k in wanted if recorded.get(k) != wanted[k]]
    return ", ".join(names) or "fingerprint"


def _recorded_identity(metadata: Mapping) -> dict:
    identity = {k: metadata.get(k) for k in ("dataset_sha256", "energy_key", "selection",
                                             "chunk_size", "batch_size")}
    identity["teachers"] = [t.get("sha256") for t in metadata.get("teachers") or []]
    identity["format_version"] = metadata.get("identity_version", metadata.get("version"))
    if metadata.get("member_forces"):
        identity["member_forces"] = True
    return identity


def output_is_current(job: DistillJob) -> bool:
    """True when ``job.out`` already holds these labels; refuses one made otherwise.

    Raises LabelMismatchError (DataError for an unreadable file) unless ``job.overwrite``.
    """
    if not job.out.exists():
        return False
    try:
        metadata = read_label_metadata(job.out)
    except DataError as exc:
        if job.overwrite:
            return False
        raise DataError(f"{exc}; delete it or pass overwrite=true to replace it") from exc
    if metadata.get("fingerprint") in job.serving_fingerprints():
        if int(metadata.get("version", 0)) < COMPACT_VERSION:
            log.warning("%s holds these labels in the dense version-%s layout (every conformation, NaN "
                        "where unlabelled), read as they are; delete the file to label again into the "
                        "compact layout (labelled rows only)", job.out, metadata.get("version"))
        return True
    if job.overwrite:
        return False
    raise LabelMismatchError(
        f"{job.out} already holds labels made with other arguments (differs in: "
        f"{_differences(_recorded_identity(metadata), job)}); pass overwrite=true to replace it "
        "or choose another out"
    )


def read_manifest(job: DistillJob) -> dict | None:
    """The shard folder's manifest (identity, fingerprint, created), or None."""
    path = job.shard_dir / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable shard manifest ({exc}); delete {job.shard_dir}") from exc


def check_shards(job: DistillJob) -> None:
    """Refuse (LabelMismatchError) to resume shards made with other arguments."""
    manifest = read_manifest(job)
    if manifest is None or manifest.get("fingerprint") == job.fingerprint or job.overwrite:
        return
    raise LabelMismatchError(
        f"{job.shard_dir}: shards of an unfinished run made with other arguments (differs in: "
        f"{_differences(manifest.get('identity', {}), job)}); re-run with those arguments to "
        "finish it, pass overwrite=true to discard them, or choose another out"
    )


# ----------------------------------------------------------------------------- shards
def _shard_is_valid(job: DistillJob, chunk: int) -> bool:
    path = job.shard_path(chunk)
    try:
        with h5py.File(path, "r") as f:
            start, stop = job.chunk_range(chunk)
            return (f.attrs.get("fingerprint") == job.fingerprint
                    and int(f.attrs.get("chunk", -1)) == chunk
                    and np.array_equal(f["index"][()], np.arange(start, stop)))
    except (OSError, KeyError, ValueError):
        return False


def init_shards(job: DistillJob) -> tuple[set[int], str]:
    """Prepare the shard folder (rank 0 only); return the complete chunks and the creation time.

    Shards of other arguments are discarded (only reached with ``overwrite``), as are temporary
    files left by a killed writer and shards that cannot be read.
    """
    manifest = read_manifest(job)
    if manifest is not None and manifest.get("fingerprint") != job.fingerprint:
        log.warning("discarding shards of other arguments in %s", job.shard_dir)
        shutil.rmtree(job.shard_dir)
        manifest = None
    job.shard_dir.mkdir(parents=True, exist_ok=True)
    if manifest is None:
        manifest = {"fingerprint": job.fingerprint, "identity": job.identity(),
                    "created": creation_time(),
                    "dataset_path": str(job.dataset.resolve()), "out": str(job.out)}
        write_json_atomic(manifest, job.shard_dir / "manifest.json")
    for stale in job.shard_dir.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    done = set()
    for path in sorted(job.shard_dir.glob("chunk-*.h5")):
        chunk = int(path.stem.split("-")[1])
        if chunk < job.n_chunks and _shard_is_valid(job, chunk):
            done.add(chunk)
        else:
            log.warning("%s: unusable shard, recomputing it", path)
            path.unlink()
    log.info("%s: %d of %d chunks already labelled", job.out, len(done), job.n_chunks)
    return done, manifest["created"]


def write_shard(job: DistillJob, chunk: int, arrays: Mapping[str, np.ndarray], rank: int) -> Path:
    """Write one chunk's predictions (see :func:`summarize`) atomically."""
    path = job.shard_path(chunk)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for name, value in arrays.items():
            if job.member_forces or name not in OPTIONAL_ARRAYS:
                f.create_dataset(name, data=value)
        f.attrs.update({"fingerprint": job.fingerprint, "chunk": chunk, "rank": rank})
    return path


def _shard_blocks(job: DistillJob) -> Iterator[tuple[str, np.ndarray, dict]]:
    """(group key, conformation indices, arrays) blocks of every shard, for write_labels."""
    for chunk in range(job.n_chunks):
        if not _shard_is_valid(job, chunk):
            raise DataError(
                f"{job.shard_path(chunk)} is missing or incomplete: the labelling did not finish; "
                "run it again with the same arguments to resume"
            )
        with h5py.File(job.shard_path(chunk), "r") as f:
            shard = {name: f[name][()] for name in f}
        start, stop = job.chunk_range(chunk)
        atom_start = np.concatenate([[0], np.cumsum(shard["natoms"])])
        g = start
        while g < stop:
            m, c = job.locate(g)
            record = job.records[m]
            n = min(stop, int(job.starts[m + 1])) - g  # conformations of this record in the chunk
            lo, hi = g - start, g - start + n
            a_lo, a_hi = atom_start[lo], atom_start[hi]
            n_atoms = len(record.atomic_numbers)
            arrays = {
                "energy": shard["energy"][lo:hi], "energy_std": shard["energy_std"][lo:hi],
                "forces": shard["forces"][a_lo:a_hi].reshape(n, n_atoms, 3),
                "forces_std": shard["forces_std"][a_lo:a_hi].reshape(n, n_atoms, 3),
                "teacher_energy": shard["teacher_energy"][:, lo:hi],
            }
            if job.member_forces:
                arrays["teacher_forces"] = shard["teacher_forces"][:, a_lo:a_hi].reshape(
                    -1, n, n_atoms, 3)
            yield record.key, record.conf_index[c:c + n], arrays
            g += n


def merge_shards(job: DistillJob, created: str) -> Path:
    """Write the label file from the complete shards (atomic), then remove the shards."""
    layout = [(r.key, job.file_conformations[r.key], r.conf_index, len(r.atomic_numbers))
              for r in job.records]
    metadata = {
        "dataset_path": str(job.dataset.resolve()), "dataset_sha256": job.dataset_sha256,
        "energy_key": job.energy_key, "file_format": job.file_format,
        "elements": job.elements, "selection": job.selection(), "teachers": job.teachers,
        "n_teachers": len(job.teachers),
        "n_conformations": job.n_conformations, "created": created,
        "code_version": code_version(), "torch_version": str(torch.__version__),
        "chunk_size": job.chunk_size, "batch_size": job.batch_size, "std_ddof": 0,
        "fingerprint": job.fingerprint, "identity_version": IDENTITY_VERSION,
        "member_forces": job.member_forces,
    }
    write_labels(job.out, layout, len(job.teachers), _shard_blocks(job), metadata,
                 member_forces=job.member_forces)
    if not job.keep_shards:
        shutil.rmtree(job.shard_dir, ignore_errors=True)
    log.info("%s: labels of %d conformations by %d teachers", job.out, job.n_conformations,
             len(job.teachers))
    return job.out


# ----------------------------------------------------------------------------- Lightning
def summarize(index, batch, energies, forces) -> dict[str, torch.Tensor]:
    """One batch's predictions: per-teacher values and the ensemble mean and spread.

    Args:
        index: (n_mol,) global conformation indices; batch: (n_atoms,) molecule of each atom.
        energies: (T, n_mol) Hartree; forces: (T, n_atoms, 3) Hartree/Å.

    Returns:
        ``index``, ``natoms`` (n_mol,); ``energy``, ``energy_std`` (n_mol,) float64;
        ``forces``, ``forces_std`` (n_atoms, 3) float32 (mean and std in float64, ddof=0);
        ``teacher_energy`` (T, n_mol) float64; ``teacher_forces`` (T, n_atoms, 3) float32.
    """
    wide = forces.to(torch.float64)
    return {
        "index": index, "natoms": torch.bincount(batch, minlength=len(index)),
        "energy": energies.mean(0), "energy_std": energies.std(0, correction=0),
        "forces": wide.mean(0).float(), "forces_std": wide.std(0, correction=0).float(),
        "teacher_energy": energies.to(torch.float64), "teacher_forces": forces.float(),
    }


class DistillModule(pl.LightningModule):
    """Wraps a :class:`TeacherEnsemble` for ``Trainer.predict``; nothing is trained."""

    def __init__(self, ensemble: TeacherEnsemble):
        super().__init__()
        self.ensemble = ensemble

    def predict_step(self, batch, batch_idx):
        """On CPU on one thread: a reduction split over threads sums in another order, and the
        float32 forces would differ in their last bit with the thread count; on one thread
        the label file is the same bytes on any number of cores (measured:
        ``docs/reproducibility.md``)."""
        with torch_threads(1 if self.device.type == "cpu" else None):
            energies, forces = self.ensemble(batch.z, batch.pos, batch.batch, batch.num_graphs)
        return summarize(batch.gidx, batch.batch, energies, forces)


class DistillDataModule(pl.LightningDataModule):
    """This process's share of the pending chunks, batched without straddling chunks."""

    def __init__(self, job: DistillJob):
        super().__init__()
        self.job = job
        self.chunks: list[int] = []
        self.created: str | None = None

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        state = init_shards(self.job) if trainer.is_global_zero else None
        done, self.created = trainer.strategy.broadcast(state, src=0)
        pending = [k for k in range(self.job.n_chunks) if k not in done]
        self.chunks = pending[trainer.global_rank :: trainer.world_size]
        log.info("rank %d labels chunks %s", trainer.global_rank, self.chunks)

    def predict_dataloader(self) -> DataLoader:
        index = np.concatenate([np.zeros(0, np.int64)] + [self.job.chunk_index(k) for k in self.chunks])
        gidx = index
        if not len(index) and self.trainer.world_size > 1:
            # Lightning refuses a rank without batches while others have some: give it one
            # conformation marked gidx = -1, which the writer ignores
            index, gidx = np.zeros(1, np.int64), np.full(1, -1)
        return PackedSplit(self.job.packed, index, gidx=gidx).loader(self.job.batch_size)


class LabelShardWriter(BasePredictionWriter):
    """Collects the batches of a chunk and writes its shard as soon as it is complete."""

    def __init__(self, job: DistillJob):
        super().__init__(write_interval="batch")
        self.job = job
        self.parts: list[dict[str, np.ndarray]] = []
        self.written = 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0):
        part = {k: v.detach().cpu().numpy() for k, v in prediction.items()}
        if int(part["index"][0]) < 0:  # padding of a rank without chunks
            return
        chunk = int(part["index"][0]) // self.job.chunk_size
        if self.parts and int(self.parts[0]["index"][0]) // self.job.chunk_size != chunk:
            raise RuntimeError(f"internal error: chunk of batch {batch_idx} is not complete")
        self.parts.append(part)
        start, stop = self.job.chunk_range(chunk)
        if sum(len(p["index"]) for p in self.parts) < stop - start:
            return
        arrays = {k: np.concatenate([p[k] for p in self.parts], axis=1 if k.startswith("teacher_") else 0)
                  for k in part}
        write_shard(self.job, chunk, arrays, trainer.global_rank)
        self.parts = []
        self.written += 1
        if self.job.stop_after_chunks is not None and self.written >= self.job.stop_after_chunks:
            raise DistillInterrupted(f"stopped after {self.written} chunk(s) (test hook)")


def trainer_options(trainer_cfg: Mapping | None) -> dict:
    """The predict loop's Trainer arguments taken from a trainer config (see TRAINER_KEYS)."""
    cfg = dict(trainer_cfg or {})
    options = {k: cfg[k] for k in TRAINER_KEYS if k in cfg}
    options.setdefault("accelerator", "cpu")
    options.setdefault("devices", 1)
    options.setdefault("enable_progress_bar", False)
    return options


def distill_labels(job: DistillJob, trainer: Mapping | None = None) -> Path:
    """Label ``job.dataset`` with ``job.sources`` into ``job.out`` (resuming any shards).

    Args:
        job: from :func:`make_job`.
        trainer: trainer config (accelerator, devices, strategy, ...) for the predict loop;
            ``strategy=ddp`` spreads the chunks over processes (GPUs, or CPU processes on gloo).

    Returns:
        ``job.out``, which every process can read once this returns.
    """
    with exclusive(job.out.with_name(job.out.name + ".lock"), f"{job.out} (a label file)"):
        if output_is_current(job):
            log.info("%s already holds these labels", job.out)
            return job.out
        return _label(job, trainer)


def label_bytes(job: DistillJob) -> int:
    """About the bytes the labelling writes at its peak: the shards and the merged file, each
    float32 forces (mean, std, and one per teacher with ``member_forces``) and float64 energies."""
    n_teachers = len(job.sources)
    atoms = sum(len(r.atomic_numbers) * r.num_conformations for r in job.records)
    force_arrays = 2 + (n_teachers if job.member_forces else 0)
    one = atoms * 3 * 4 * force_arrays + job.n_conformations * 8 * (3 + n_teachers)
    return 2 * one


def _label(job: DistillJob, trainer: Mapping | None) -> Path:
    """The labelling of :func:`distill_labels`, inside its lock."""
    check_shards(job)
    if launched_rank_zero():
        check_writable(job.out.parent, label_bytes(job), f"label file {job.out.name}")
    models = load_teachers(job.sources)
    job.teachers = teacher_identities(job.sources, models)
    datamodule = DistillDataModule(job)
    runner = pl.Trainer(
        **trainer_options(trainer), callbacks=[LabelShardWriter(job)], logger=False,
        enable_checkpointing=False, enable_model_summary=False, inference_mode=False,
        use_distributed_sampler=False,
    )
    runner.predict(DistillModule(TeacherEnsemble(models)), datamodule=datamodule,
                   return_predictions=False)
    runner.strategy.barrier("ekd-distill-shards")
    if runner.is_global_zero:
        merge_shards(job, datamodule.created)
    runner.strategy.barrier("ekd-distill-merged")
    return job.out
