"""How W&B shows a training run: its group, job type, tags and display name.

``conf/logger/wandb.yaml`` has the keys ``group``, ``job_type``, ``tags`` and ``display_name``;
each left null is filled in by :func:`fill_identity` from what the run is:

* a plain run (``ekd-train stage=student ...``): group ``run_name``, job type the stage, tags its
  command-line overrides, name ``run_name``;
* a job of a ``-m`` sweep: group ``sweep: <the sweep's overrides>`` (the same for every job of
  the sweep), name ``run_name`` plus the swept values of this job
  (``student-ani2x-seed0 loss.forces.weight=0.1``), so jobs differ by name and group together;
* a run of a pipeline (``experiment=ekd``, an ablation variant): group the pipeline's
  ``run_name`` (``ablation-force_weight``), job type its stage, name ``<pipeline>/<run>``
  (``ablation-force_weight/student-seed0``), set by :func:`pipeline_run_identity`; the report
  run has job type ``report`` and lists its members' W&B runs.

These keys change how a run is shown, never what it computes (``logger`` is among
:data:`ekd_lightning.train.training.SHOWN_ONLY`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from .compose import parse

GROUP_LIMIT = 128
"""W&B's longest group name (characters)."""
TAG_LIMIT = 64
"""W&B's longest tag (characters)."""
IDENTITY_KEYS = ("group", "job_type", "tags", "display_name")
"""The keys of ``conf/logger/wandb.yaml`` that say how a run is shown."""


def clipped(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, a cut one ending in a short hash of the whole
    (so two long texts that differ only at their ends stay apart)."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{text[: limit - 10]}~{digest}"


def shown_overrides(overrides: Sequence[str], excluded: Sequence[str]) -> list[str]:
    """``overrides`` without those of the ``excluded`` keys (Hydra's ``override_dirname``
    exclusions: file paths, the logger), as typed."""
    return [o.input_line for o in parse(overrides) if o.key_or_group not in set(excluded)]


def sweep_overrides(sweep_dir: str | Path) -> list[str] | None:
    """The overrides of the ``-m`` command that launched the sweep in ``sweep_dir`` (Hydra's
    ``multirun.yaml`` there, written before the first job), or None when it is not there."""
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return None
    return list(OmegaConf.load(path).hydra.overrides.task)


def swept_keys(overrides: Sequence[str]) -> list[str]:
    """The keys that ``overrides`` sweep over (``key=a,b``, ``key=range(...)``, ...)."""
    return [o.key_or_group for o in parse(overrides) if o.is_sweep_override()]


def cli_identity(cfg: DictConfig, hydra_cfg) -> dict:
    """The W&B identity (:data:`IDENTITY_KEYS`) of the run or pipeline that ``ekd-train``
    launched with the Hydra runtime config ``hydra_cfg`` (``HydraConfig.get()``)."""
    from hydra.types import RunMode

    excluded = list(hydra_cfg.job.config.override_dirname.exclude_keys)
    overrides = shown_overrides(hydra_cfg.overrides.task, excluded)
    tags = [clipped(o, TAG_LIMIT) for o in overrides]
    is_pipeline = cfg.get("pipeline") is not None
    job_type = "report" if is_pipeline else cfg.stage.name
    if hydra_cfg.mode != RunMode.MULTIRUN or is_pipeline:
        return {"group": clipped(cfg.run_name, GROUP_LIMIT), "job_type": job_type,
                "tags": tags, "display_name": cfg.run_name}
    sweep = sweep_overrides(hydra_cfg.sweep.dir)
    swept = set(swept_keys(sweep)) if sweep is not None else set()
    values = [o for o in overrides if _key(o) in swept]
    suffix = " ".join(values) or hydra_cfg.job.override_dirname or str(hydra_cfg.job.num)
    group = "sweep: " + " ".join(shown_overrides(sweep, excluded) if sweep else [hydra_cfg.sweep.dir])
    return {"group": clipped(group, GROUP_LIMIT), "job_type": job_type, "tags": tags,
            "display_name": f"{cfg.run_name} {suffix}"}


def _key(override: str) -> str:
    return parse([override])[0].key_or_group


def pipeline_run_identity(pipeline_cfg: DictConfig, role_name: str, stage: str,
                          variant: Sequence[str]) -> dict:
    """The W&B identity of the pipeline run ``role_name`` (``teacher0``, ``student-seed0``) of
    stage ``stage``: the pipeline's group and tags plus the run's ``variant`` overrides, name
    ``<pipeline run_name>/<role_name>``."""
    logger = pipeline_cfg.logger
    tags = [*(logger.get("tags") or []), *(clipped(v, TAG_LIMIT) for v in variant)]
    return {"group": logger.get("group") or clipped(pipeline_cfg.run_name, GROUP_LIMIT),
            "job_type": stage, "tags": list(dict.fromkeys(tags)),
            "display_name": f"{pipeline_cfg.run_name}/{role_name}"}


def fill_identity(cfg: DictConfig, identity: dict) -> DictConfig:
    """``cfg`` with the W&B logger's null :data:`IDENTITY_KEYS` set from ``identity`` (in
    place; a given value is kept); nothing for another logger."""
    if cfg.get("logger") is None or cfg.logger.get("name") != "wandb":
        return cfg
    with open_dict(cfg):
        for key in IDENTITY_KEYS:
            if cfg.logger.get(key) is None:
                cfg.logger[key] = identity[key]
    return cfg
