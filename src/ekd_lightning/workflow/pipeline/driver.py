"""The pipeline's driver: every step in order into one folder (:func:`run_pipeline`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig

from ..progress import PipelineProgress
from .composition import checked_command, make_jobs, teacher_specs, variant_specs
from .report import log_to_wandb, training_record, write_report
from .runners import make_runner
from .steps import distill, evaluate, extra_geometries, hessian_labels, md_stability, named_models


def run_pipeline(cfg: DictConfig, out_dir: str | Path, overrides: Sequence[str] | None = None) -> dict:
    """Run every step into ``out_dir`` (see the module docstring); returns the report dict.
    ``overrides``: those ``cfg`` was composed with, from which every run is composed (None:
    the running Hydra app's, ``ekd-train experiment=ekd ...``)."""
    out = Path(out_dir)
    timings: dict[str, float] = {}

    def timed(step, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        timings[step] = timings.get(step, 0.0) + time.perf_counter() - start
        return result

    p = cfg.pipeline
    store = Path(p.store)
    command = checked_command(cfg, overrides)
    stages = ["baseline"] + (["oracle"] if p.oracle and cfg.data.get("force_key") else [])
    runner = make_runner(cfg)
    if runner.workers > 1:  # the main process labels while the workers train
        torch.set_num_threads(1)
    n_runs = len(p.teachers.models) + 2 * len(p.seeds) + (len(p.oracle_seeds) if "oracle" in stages else 0)
    try:
        with PipelineProgress(n_runs) as progress:
            start = time.perf_counter()
            progress.step("teachers")
            specs = teacher_specs(p.teachers)
            teacher_futures = progress.track(runner.submit(make_jobs(cfg, specs, store, command)))
            # baselines and oracles do not need the teachers: they train alongside them
            other_futures = {}
            for stage in stages:
                stage_specs = variant_specs(cfg, stage)
                specs += stage_specs
                other_futures[stage] = progress.track(runner.submit(
                    make_jobs(cfg, stage_specs, store, command)))
            teachers = progress.wait(teacher_futures)
            timings["teachers"] = time.perf_counter() - start
            progress.step("distill")
            labels = timed("distill", distill, cfg, teachers, store)
            extra = None
            if p.get("extra_geometries"):
                extra = timed("extra_geometries", extra_geometries, cfg, teachers, store)
            hessian = timed("hessian", hessian_labels, cfg, teachers, store) if p.get("hessian") else None
            progress.step("students")
            student_specs = variant_specs(cfg, "student", labels, extra, hessian)
            specs += student_specs
            student_futures = progress.track(runner.submit(
                make_jobs(cfg, student_specs, store, command)))
            variants = {"student": progress.wait(student_futures)}
            variants.update({stage: progress.wait(f) for stage, f in other_futures.items()})
            timings["train"] = time.perf_counter() - start
            progress.step("evaluate")
            models = named_models(teachers, variants)
            results = timed("evaluate", evaluate, cfg, models, labels, out / "report", specs)
            runs = [run for stage_runs in variants.values() for run in stage_runs]
            if p.md.steps:
                progress.step("md")
                md_rows = timed("md", md_stability, cfg, runs, out / "report", runner)
            else:
                md_rows = []
            progress.step("report")
    finally:
        runner.close()
    trained = [*teachers, *(run for stage_runs in variants.values() for run in stage_runs)]
    report = write_report(cfg, results, md_rows, timings, out / "report", specs,
                          training_record(trained))
    log_to_wandb(cfg, report, out / "report", trained)
    print((out / "report" / "summary.md").read_text())
    return report
