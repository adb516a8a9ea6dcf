"""The pipeline's runs keep their store hashes (issue 17): every job of ``experiment=ekd``, of each
``+ablation=...`` variant and of the default teacher ensemble (``ekd-train stage=student``)
composes to the config whose ``config_sha256`` is frozen in ``tests/data/run_hashes.json``, so
a run store filled before (runs named ``<run_name>-<sha>``) is reused, not retrained.

The frozen hashes were computed by main's code before the pipeline composed its runs with Hydra
(it merged group files by hand). After an intended change of what runs compute (a stage or model
file, a new key in train.yaml), refresh them with one line and say so in the commit:

    PYTHONPATH=src python tests/test_run_hashes.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra import initialize_config_module
from omegaconf import OmegaConf

from ekd_lightning.bundled import DATA_DIR
from ekd_lightning.train.training import config_sha256
from ekd_lightning.workflow.compose import CONFIG_MODULE, compose_train
from ekd_lightning.workflow.pipeline import (
    default_teacher_jobs,
    make_jobs,
    teacher_specs,
    variant_specs,
)

FROZEN = Path(__file__).resolve().parent / "data" / "run_hashes.json"
STORE = Path("runs/store")
LABELS = STORE / "labels.h5"  # the students' label file (its name depends on the teachers' hashes)


def ablations() -> list[str]:
    from ekd_lightning.conf import __file__ as conf_init

    return sorted(p.stem for p in (Path(conf_init).parent / "ablation").glob("*.yaml"))


def _hash(job) -> list[str]:
    """``[run_name, config_sha256]`` with the bundled data's folder written ``<bundled>`` (the
    resolved path, and so the hash, depends on where the package is installed)."""
    cfg = dict(job.cfg)
    cfg["data"] = dict(cfg["data"], path=cfg["data"]["path"].replace(str(DATA_DIR), "<bundled>"))
    return [job.cfg["run_name"], config_sha256(OmegaConf.create(cfg))]


def commands() -> list[str]:
    """Every pipeline variant (``experiment=ekd``, each ablation) and the default ensemble's
    student, ``stage=student``."""
    return ["experiment=ekd", *(f"experiment=ekd +ablation={a}" for a in ablations()), "stage=student"]


CHECKED = ("experiment=ekd", "experiment=ekd +ablation=force_weight", "experiment=ekd +ablation=mixed",
           "experiment=ekd +ablation=subsets", "experiment=ekd +ablation=uncertainty", "stage=student")
"""Composed by the test (each way a run differs: epoch caps and force overrides, a teacher of
another model, teacher data subsets, student overrides, the default ensemble); the others, alike,
were checked once with the refresh (about 0.2 s per composed run)."""


def run_hashes(chosen=None) -> dict[str, dict[str, list[str]]]:
    """``{command: {run name: [run_name, sha]}}`` of the jobs of each of ``chosen`` (default:
    :func:`commands`)."""
    hashes = {}
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        for line in chosen or commands():
            command = line.split()
            cfg = compose_train(command)
            if "pipeline" not in cfg:  # a student of the default teacher ensemble
                jobs = default_teacher_jobs(cfg, command)
            else:
                specs = [*teacher_specs(cfg.pipeline.teachers), *variant_specs(cfg, "baseline"),
                         *variant_specs(cfg, "oracle"), *variant_specs(cfg, "student", LABELS)]
                jobs = make_jobs(cfg, specs, STORE, command)
            hashes[line] = {j.name: _hash(j) for j in jobs}
    return hashes


def test_pipeline_jobs_keep_their_store_hashes():
    frozen = json.loads(FROZEN.read_text())
    assert sorted(frozen) == sorted(commands())  # refreshed for every variant
    now = run_hashes(CHECKED)
    for command in CHECKED:
        assert now[command] == frozen[command], command


if __name__ == "__main__":  # refresh tests/data/run_hashes.json
    from ekd_lightning.train.training import register_resolvers

    register_resolvers()
    FROZEN.write_text(json.dumps(run_hashes(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {FROZEN}", file=sys.stderr)
