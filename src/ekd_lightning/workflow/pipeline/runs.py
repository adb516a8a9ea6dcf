"""Run records: what a pipeline run is (:class:`RunSpec`), a finished run (:class:`Run`) and a
run to do (:class:`Job`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunSpec:
    """One training run of the pipeline as a typed record: its role, the ``conf/stage`` and
    ``conf/model`` files, seed and epoch cap it is composed with, and ``variant``, the overrides
    of its variant (a teacher's data subset, the student's labels and loss settings). Its config
    is ``conf/train.yaml`` composed with the pipeline command's overrides and :meth:`overrides`.
    """

    role: str  # teacher | baseline | student | oracle
    stage: str
    model: str
    seed: int
    max_epochs: int
    variant: tuple[str, ...] = ()
    index: int | None = None
    """The teacher's number (``pipeline.teachers.models[index]``); None for the other roles."""

    @property
    def name(self) -> str:
        """The run's name in the report: ``teacher<index>``, else ``<role>-seed<seed>``."""
        return f"teacher{self.index}" if self.role == "teacher" else f"{self.role}-seed{self.seed}"

    def overrides(self) -> list[str]:
        """The run's own overrides (after the command's): stage, model, seed, epoch cap, run
        name (``<stage>-<model>-seed<seed>``) and the variant's."""
        return [f"stage={self.stage}", f"model={self.model}", f"seed={self.seed}",
                f"trainer.max_epochs={self.max_epochs}",
                f"run_name={self.stage}-{self.model}-seed{self.seed}", *self.variant]


@dataclass
class Run:
    """A finished training run: its record, folder, best checkpoint and final metrics."""

    spec: RunSpec
    run_dir: Path
    checkpoint: Path
    metrics: dict

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def members(self) -> list[Path]:
        """The checkpoints this run gives an ensemble: a snapshot-ensemble teacher's snapshots
        (``snapshot-*.ckpt``, one per LR cycle, in epoch order), else its best checkpoint."""
        return sorted((self.run_dir / "checkpoints").glob("snapshot-*.ckpt")) or [self.checkpoint]


def member_checkpoints(teachers: Sequence[Run]) -> list[str]:
    """The teacher ensemble's members (:attr:`Run.members`), in order, as paths."""
    return [str(path) for t in teachers for path in t.members]


@dataclass
class Job:
    """A training run to do: its record, resolved config, folder and reproducing command."""

    spec: RunSpec
    cfg: dict
    run_dir: Path
    command: str = ""

    @property
    def name(self) -> str:
        return self.spec.name
