"""Console commands ``ekd-train`` and ``ekd-distill``: Hydra mains on the packaged configs.

``ekd-train model=ani2x stage=teacher`` is ``python train.py model=ani2x stage=teacher`` (the
root scripts call these functions); both compose ``pkg://ekd_lightning.conf``, so they work from
an installed wheel in any folder. Your own config folders join through Hydra's search path:
``ekd-train hydra.searchpath=[file:///path/to/my_conf] model=my_model`` finds
``my_conf/model/my_model.yaml``. An error ekd-lightning raises on purpose (:class:`EKDError`: bad
input, a run folder holding another run, ...) ends the command with its one-line message and
exit code 2, without a traceback.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .core.errors import EKDError
from .core.outputs import user_error_line
from .train.training import register_resolvers
from .workflow.compose import CONFIG_MODULE, command_overrides, train_command
from .workflow.wandb_runs import cli_identity, fill_identity

CONFIG_PATH = f"pkg://{CONFIG_MODULE}"


def _exit_on_ekd_error(fn, *args):
    """``fn(*args)``; an EKDError, or an OSError of a write (disk full, read-only file system,
    ...: :func:`~ekd_lightning.core.outputs.user_error_line`), becomes ``error: <message>`` on stderr
    and exit code 2. Files are written atomically, so what was finished before stays intact."""
    try:
        return fn(*args)
    except (EKDError, OSError) as exc:
        message = user_error_line(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _train_or_pipeline(cfg: DictConfig) -> float:
    out_dir = HydraConfig.get().runtime.output_dir
    fill_identity(cfg, cli_identity(cfg, HydraConfig.get()))  # W&B group, job type, tags, name
    if cfg.get("pipeline") is not None:
        from .workflow.pipeline import run_pipeline

        # each run composed from this command's overrides; returns the held-out gap closed
        report = run_pipeline(cfg, out_dir)
        return report.get("heldout", {}).get("force_gap_closed", float("nan"))
    from .train.training import run_training
    from .workflow.pipeline import default_teacher_labels

    command = train_command([*command_overrides(), f"hydra.run.dir={out_dir}"])
    metrics = run_training(cfg, out_dir, command=command, default_labels=default_teacher_labels)
    return metrics.get("val/loss", float("nan"))


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _train(cfg: DictConfig) -> float:
    return _exit_on_ekd_error(_train_or_pipeline, cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="distill")
def _distill(cfg: DictConfig) -> None:
    from .distill import run_from_config

    print(f"labels: {_exit_on_ekd_error(run_from_config, cfg)}")


def refuse_renamed_keys(argv: list[str]) -> None:
    """Exit (code 2) with one line for an override of a key that was renamed when configs
    became ``_target_`` entries (``loss.force_weight=1`` -> ``loss.forces.weight=1``), which
    Hydra would refuse without saying what replaced it."""
    from .models.losses import renamed_key

    for arg in argv[1:]:
        if "=" in arg and (renamed := renamed_key(arg.split("=", 1)[0].lstrip("+~"))):
            print(f"error: {renamed}", file=sys.stderr, flush=True)
            raise SystemExit(2)


def train() -> None:
    """``ekd-train``: train one model, or the whole pipeline with ``experiment=ekd``."""
    register_resolvers()
    refuse_renamed_keys(sys.argv)
    _train()


def distill() -> None:
    """``ekd-distill``: label a dataset with a teacher ensemble (see ``distill.py``)."""
    from .distill import teachers_override_argv

    register_resolvers()
    sys.argv = teachers_override_argv(sys.argv)
    _distill()
