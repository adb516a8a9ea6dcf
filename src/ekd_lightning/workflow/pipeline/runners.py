"""Runners: train the pipeline's jobs in this process, in worker processes or as submitit jobs;
a finished run (same config hash) is found, not trained again.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ...train.training import run_training
from .runs import Job, Run

log = logging.getLogger(__name__)


def finished_run(job: Job) -> Run | None:
    """The run of ``job`` when ``run_dir/metrics.json`` says it already finished (the folder is
    named by the config's hash, so a finished run there is this run), else None."""
    done = job.run_dir / "metrics.json"
    if not done.is_file():
        return None
    metrics = json.loads(done.read_text())
    return Run(job.spec, job.run_dir, Path(metrics["best_checkpoint"]), metrics)


def run_job(job: Job, threads: int | None = None, quiet: bool = False) -> Run:
    """Train one run unless it finished before (:func:`finished_run`), in this process, a
    worker process or a submitit job: ``threads`` torch threads (None: torch's default),
    ``quiet`` without progress bar and Lightning's info lines (the pipeline's progress display
    reports the run instead)."""
    if (run := finished_run(job)) is not None:
        log.info("%s: finished before, reusing %s", job.name, job.run_dir)
        return run
    if threads:
        torch.set_num_threads(threads)
    cfg = OmegaConf.create(job.cfg)
    if quiet:
        cfg.trainer.enable_progress_bar = False
        cfg.trainer.enable_model_summary = False
        for name in ("pytorch_lightning", "lightning_fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
    metrics = run_training(cfg, job.run_dir, command=job.command)
    return Run(job.spec, job.run_dir, Path(metrics["best_checkpoint"]), metrics)


class Runner:
    """``pipeline.runner=local``: runs training jobs in this process when the pipeline waits for
    them, or ``workers`` at a time in spawned processes (each with ``cpu_count // workers`` torch
    threads): on a CPU, two small trainings side by side finish sooner than one after the other
    with two threads each."""

    def __init__(self, workers: int = 1):
        self.workers = max(1, int(workers))
        self.pool = None
        if self.workers > 1:
            context = multiprocessing.get_context("spawn")
            self.pool = ProcessPoolExecutor(self.workers, mp_context=context)
            self.threads = max(1, (os.cpu_count() or 1) // self.workers)

    def submit(self, jobs: Sequence[Job]) -> dict[str, object]:
        """``{job name: future}`` of each job's :class:`Run`."""
        if self.pool is None:
            return submit_unfinished(jobs, _Deferred)
        return submit_unfinished(jobs, lambda j: self.pool.submit(run_job, j, self.threads, True))

    def map(self, fn, items):
        """``map(fn, items)``, in the worker processes when there are several."""
        return map(fn, items) if self.pool is None else self.pool.map(fn, items)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


class _Deferred:
    """A job of the one-process runner in the shape of a future: it trains (quiet) the first
    time it is asked whether it is done, so runs train in the order the pipeline waits."""

    def __init__(self, job: Job):
        self.job, self.run = job, None

    def done(self) -> bool:
        if self.run is None:
            self.run = run_job(self.job, quiet=True)
        return True

    def result(self) -> Run:
        self.done()
        return self.run


class SubmititRunner:
    """``pipeline.runner=submitit``: each training run is a job of submitit's
    ``AutoExecutor`` (SLURM where ``sbatch`` is found, else local processes; or
    ``pipeline.submitit.cluster=local|slurm|debug``), with the pipeline's run store and config
    hashes: a run already finished in the store is not submitted again, and two jobs wanting
    the same run share it (the run folder's lock, :func:`ekd_lightning.train.training.run_lock`).
    The pipeline waits for the jobs; its other steps (labelling, evaluation, MD) run in this
    process. Job logs go to ``pipeline.submitit.folder`` (default ``<store>/submitit``).

    Args:
        spec: ``pipeline.submitit``: ``cluster``, ``folder`` and ``parameters`` (submitit's
            ``update_parameters``: ``timeout_min``, ``cpus_per_task`` (also the job's torch
            threads), ``gpus_per_node``, ``slurm_partition``, ...; None values are left out).
        store: the run store.
    """

    def __init__(self, spec: Mapping, store: Path):
        import submitit

        folder = spec.get("folder") or Path(store) / "submitit"
        self.executor = submitit.AutoExecutor(folder=str(folder), cluster=spec.get("cluster"))
        parameters = {k: v for k, v in dict(spec.get("parameters") or {}).items() if v is not None}
        self.executor.update_parameters(**parameters)
        self.threads = parameters.get("cpus_per_task")
        self.workers = 1
        self.submitted: list = []

    def submit(self, jobs: Sequence[Job]) -> dict[str, object]:
        return submit_unfinished(jobs, self._start)

    def _start(self, job: Job):
        self.executor.update_parameters(name=job.run_dir.name)
        self.submitted.append(self.executor.submit(run_job, job, self.threads, True))
        return self.submitted[-1]

    def map(self, fn, items):
        return map(fn, items)

    def close(self) -> None:
        for job in self.submitted:
            if not job.done():
                job.cancel(check=False)


@dataclass
class _Finished:
    """A run found finished in the store, in the shape of a future."""

    value: Run

    def done(self) -> bool:
        return True

    def result(self) -> Run:
        return self.value


def submit_unfinished(jobs: Sequence[Job], start) -> dict[str, object]:
    """``{job name: future}``: runs already finished in the store as they are (nothing is
    started for them), the others as ``start(job)`` returns them."""
    futures = {}
    for j in jobs:
        if (run := finished_run(j)) is not None:
            log.info("%s: finished before, reusing %s", j.name, j.run_dir)
            futures[j.name] = _Finished(run)
        else:
            futures[j.name] = start(j)
    return futures


def make_runner(cfg: DictConfig):
    """The runner ``pipeline.runner`` names: ``local`` (default) or ``submitit``."""
    p = cfg.pipeline
    kind = p.get("runner", "local")
    if kind == "local":
        return Runner(p.workers)
    if kind == "submitit":
        return SubmititRunner(p.get("submitit") or {}, Path(p.store))
    raise ValueError(f"pipeline.runner={kind}: use local or submitit")
