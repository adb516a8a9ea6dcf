"""Train one model from a composed Hydra config (used by ``train.py`` and the pipeline)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from ..core.errors import ConfigError
from ..core.files import write_json_atomic
from ..core.hashing import cached_sha256
from ..core.moved import with_old_targets
from ..core.outputs import check_writable, exclusive
from ..core.provenance import __version__, git_revision
from ..data import EKDDataModule
from ..distill import labels_for_training
from ..models.losses import loss_file, loss_targets, renamed_key
from ..task.checkpoint import AtomicCheckpointIO
from ..task.module import PotentialModule
from .callbacks import TrainingHistory, robustness_callbacks

# Lightning 2.6 with torch >= 2.10 warns once per process from its own internals (not from a call
# of ours); in the pipeline every worker process printed it. Only that message is silenced.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

log = logging.getLogger(__name__)


def register_resolvers() -> None:
    """``${bundled:NAME}``: path of a file shipped in ``ekd_lightning/bundled/data``."""
    if not OmegaConf.has_resolver("bundled"):
        from ..bundled import DATA_DIR

        OmegaConf.register_new_resolver("bundled", lambda name: str(DATA_DIR / name))


POSITIVE_SETTINGS = {
    "data.batch_size": ("a positive whole number of conformations per batch", 64, int, 1, None),
    "optim.lr": ("a learning rate >= 0 (0 freezes the weights)", 1e-3, float, None, None),
    "optim.weight_decay": ("a weight decay >= 0", 1e-5, float, None, None),
    "optim.lr_factor": ("a factor between 0 and 1", 0.5, float, 0.0, 1.0),
    "optim.lr_patience": ("a whole number of epochs >= 0", 5, int, None, None),
    "trainer.max_epochs": ("a positive whole number of epochs", 10, int, 1, None),
}
"""Numeric settings checked before a run starts: ``{key: (what it must be, an example value,
type, exclusive lower bound or inclusive minimum for int (None: >= 0), exclusive upper bound)}``."""


def check_settings(cfg: DictConfig) -> None:
    """ConfigError (one line: the key, its value, what it must be, an example) for a numeric
    setting of :data:`POSITIVE_SETTINGS` that cannot train, before any file is read."""
    import math

    for key, (what, example, kind, low, high) in POSITIVE_SETTINGS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if ok and kind is int:
            ok = float(value).is_integer() and value >= (low if low is not None else 0)
        elif ok:
            ok = (value > low if low is not None else value >= 0) and (high is None or value < high)
        if not ok:
            raise ConfigError(f"{key}={value!r}: must be {what}, e.g. {key}={example}")


def build_datamodule(cfg: DictConfig) -> EKDDataModule:
    """The data module of a run; labels only when a loss term's target is ``labels``."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    targets = loss_targets(OmegaConf.to_container(cfg.loss, resolve=True))
    labels = cfg.distill.labels if "labels" in targets else None
    if "labels" in targets and labels is None:
        raise ConfigError(
            f"stage={cfg.stage.name} trains on distilled forces: pass distill.labels=labels.h5 "
            "(made by distill.py), or distill.teachers=[...] to distil them before the first epoch"
        )
    if "reference" in targets and not data.get("force_key"):
        raise ConfigError(f"stage={cfg.stage.name} trains on reference forces: set data.force_key")
    return EKDDataModule(**data, labels=labels)


def build_module(cfg: DictConfig, datamodule: EKDDataModule) -> PotentialModule:
    """A fresh model for ``cfg`` with the self energies fitted on the data's training split:
    the model and the loss terms are built from their configs' ``_target_`` entries
    (``cfg.model``, ``cfg.loss``), and saved as they are in the checkpoint."""
    if (cfg.get("distill") or {}).get("force_loss") is not None:  # e.g. from pipeline overrides
        raise ConfigError(renamed_key("distill.force_loss"))
    return PotentialModule(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        elements=datamodule.elements,
        self_energies=datamodule.self_energies.tolist(),
        energy_scale=datamodule.energy_scale,
        stage=cfg.stage.name,
        loss=OmegaConf.to_container(cfg.loss, resolve=True),
        **OmegaConf.to_container(cfg.optim, resolve=True),
        feature_cache_mb=float(cfg.get("feature_cache_mb", 0.0)),
        compile=bool(cfg.get("compile", False)),
    )


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The callbacks of the ``callbacks`` config group: one ``_target_`` entry per callback
    (``conf/callbacks/early_stopping.yaml``, ``lr_monitor.yaml``; several files at once with
    ``callbacks=[early_stopping,lr_monitor]``), built with :func:`hydra.utils.instantiate`."""
    from hydra.utils import instantiate

    specs = cfg.get("callbacks") or {}
    return [instantiate(spec) for spec in specs.values() if spec is not None and "_target_" in spec]


def stopping_summary(trainer: pl.Trainer, history: TrainingHistory) -> dict:
    """``epochs`` trained, ``best_epoch``, ``train_time_s`` and ``stopped_early`` (an
    EarlyStopping callback ended the run before ``trainer.max_epochs``)."""
    from pytorch_lightning.callbacks import EarlyStopping

    stops = [c for c in trainer.callbacks if isinstance(c, EarlyStopping)]
    summary = history.summary()
    summary["stopped_early"] = any(c.stopped_epoch > 0 for c in stops)
    summary["max_epochs"] = trainer.max_epochs
    return summary


def logger_arguments(logger_cfg: dict, run_name: str) -> dict:
    """The keyword arguments of the logger class from its config (``conf/logger/*.yaml``, a
    plain dict without ``name``): W&B's ``display_name`` becomes its ``name`` (default
    ``run_name``), a null key is dropped; another logger gets ``name=run_name``."""
    spec = dict(logger_cfg)
    spec["name"] = spec.pop("display_name", None) or run_name
    for key in ("group", "job_type", "tags"):
        if key in spec and spec[key] is None:
            del spec[key]
    return spec


def build_logger(cfg: DictConfig, run_dir: Path):
    """The ``logger`` group's logger (``conf/logger/*.yaml``: ``_target_`` and its arguments;
    ``name`` says which logger it is and is not one), built with :func:`hydra.utils.instantiate`
    and the run-time values ``save_dir`` (the run folder) and ``name`` (``run_name``, or W&B's
    ``display_name``: :mod:`ekd_lightning.workflow.wandb_runs`); a logger
    class that takes extra keywords (W&B: passed to ``wandb.init``) also gets the run's resolved
    config as ``config``."""
    import inspect

    from hydra.utils import get_class, instantiate

    os.environ.setdefault("WANDB_SILENT", "true")
    spec = {k: v for k, v in OmegaConf.to_container(cfg.logger, resolve=True).items() if k != "name"}
    spec = logger_arguments(spec, cfg.run_name)  # W&B: group, job_type, tags, display name
    spec.update(save_dir=str(run_dir))
    parameters = inspect.signature(get_class(spec["_target_"])).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        spec["config"] = OmegaConf.to_container(cfg, resolve=True)
    # not recursive: the run's config holds _target_ entries (model, loss) to log, not build
    return instantiate(spec, _recursive_=False, _convert_="all")


def finish_logger(logger) -> None:
    """End a W&B logger's run after its training, so that the next training in the same process
    (pipeline workers train several runs one after another) starts a run of its own instead of
    logging into this one."""
    if type(logger).__name__ == "WandbLogger" and getattr(logger, "_experiment", None) is not None:
        logger.experiment.finish()


def wandb_run_id(logger) -> str | None:
    """The W&B run id of a W&B logger's run, else None."""
    if type(logger).__name__ != "WandbLogger" or getattr(logger, "_experiment", None) is None:
        return None
    return logger.experiment.id


def provenance(cfg: DictConfig, datamodule: EKDDataModule) -> dict:
    """What is needed to reproduce a run: config, versions, git revision, input hashes."""
    versions = {}
    for package in ("torch", "pytorch-lightning", "torch-geometric", "hydra-core", "h5py", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    revision = git_revision()
    labels = datamodule.labels_path
    hvp = loss_file(OmegaConf.to_container(cfg.loss, resolve=True))  # loss.hessian's (if any)
    return {
        "ekd_lightning": __version__, "versions": versions, "git_revision": revision,
        "dataset": str(datamodule.path), "dataset_sha256": cached_sha256(datamodule.path),
        "labels": labels, "labels_sha256": cached_sha256(labels) if labels else None,
        **({"hvp_labels": hvp, "hvp_labels_sha256": cached_sha256(hvp)} if hvp else {}),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


SHOWN_ONLY = ("resume", "logger", "trainer.enable_progress_bar", "trainer.enable_model_summary",
              "distill.out", "distill.store", "callbacks.lr_monitor")
"""Config keys that change how a run is shown, logged or where a file goes, never its result."""
ABSENT_AT_DEFAULT = {"compile": False}
"""Keys added after runs were stored, left out of the hash at these values (the runs before
them computed the same), in it at any other (a compiled run differs in float rounding)."""


def computed_config(cfg: DictConfig) -> dict:
    """What a run computes: the resolved config as JSON data (``_target_`` paths as named before
    issue 25 moved modules, :func:`~ekd_lightning.core.moved.with_old_targets`) without
    :data:`SHOWN_ONLY` and :data:`ABSENT_AT_DEFAULT` at their defaults, without
    ``distill`` for a stage that trains on no distilled labels, and without
    ``distill.default_teachers`` once labels or teachers are given."""
    container = json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True), default=str))
    container = with_old_targets(container)  # a moved module is no change of what a run computes
    for key in SHOWN_ONLY:
        *parents, leaf = key.split(".")
        node = container
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    for key, default in ABSENT_AT_DEFAULT.items():
        if container.get(key, default) == default:
            container.pop(key, None)
    distill = container.get("distill")
    if "labels" not in loss_targets(container.get("loss")):
        container.pop("distill", None)
    elif isinstance(distill, dict) and (distill.get("labels") or distill.get("teachers")):
        distill.pop("default_teachers", None)
    return container


def config_sha256(cfg: DictConfig) -> str:
    """SHA-256 of :func:`computed_config`: identifies what a run computes."""
    return hashlib.sha256(json.dumps(computed_config(cfg), sort_keys=True).encode()).hexdigest()


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def differences(old: dict, new: dict) -> dict[str, tuple]:
    """``{dotted key: (old value, new value)}`` of two nested dicts (``None`` where absent)."""
    a, b = _flat(old), _flat(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


INPUTS = (("dataset", "dataset_sha256"), ("labels", "labels_sha256"),
          ("hvp_labels", "hvp_labels_sha256"))
"""The input files a run records in ``run_info.json``: (path key, SHA-256 key)."""


def changed_inputs(recorded: dict, current: dict | None = None) -> dict[str, tuple]:
    """Input files whose content differs from what ``recorded`` (a ``run_info.json``) says:
    ``{sha key: (recorded, now)}``; ``current`` is the new run's provenance (default: the files
    at the recorded paths as they are now, ``missing`` if gone)."""
    changed = {}
    for path_key, sha_key in INPUTS:
        if current is not None:
            now = current.get(sha_key)
        else:
            path = recorded.get(path_key)
            now = (cached_sha256(path) if Path(path).is_file() else "missing") if path else None
        if recorded.get(sha_key) != now:
            changed[sha_key] = (recorded.get(sha_key), now)
    return changed


def finished_metrics(cfg: DictConfig, run_dir: Path) -> dict | None:
    """The metrics of a run that already finished in ``run_dir`` with the same config and input
    files (dataset, labels: same SHA-256 as its ``run_info.json`` records), else None."""
    metrics = _read_json(Path(run_dir) / "metrics.json")
    info = _read_json(Path(run_dir) / "run_info.json")
    if metrics is None or metrics.get("config_sha256") != config_sha256(cfg):
        return None
    return metrics if info is None or not changed_inputs(info) else None


def _refuse(run_dir: Path, what: str, changes: dict[str, tuple]) -> ConfigError:
    shown = [f"{k}: {old} -> {new}" for k, (old, new) in list(changes.items())[:6]]
    more = f", and {len(changes) - 6} more" if len(changes) > 6 else ""
    return ConfigError(
        f"{run_dir} holds a run made with {what} ({', '.join(shown)}{more}): give this run "
        f"another run_name=... (or hydra.run.dir=...), or remove {run_dir} to start over"
    )


def check_same_run(cfg: DictConfig, run_dir: Path) -> int | None:
    """Refuse (ConfigError) to reuse ``run_dir`` when it holds a run (``checkpoints/last.ckpt``
    or ``metrics.json``) that computes something else: a config differing in any key but
    :data:`SHOWN_ONLY`, ``trainer.max_epochs`` aside: raising it extends the run (it resumes
    from ``last.ckpt`` and trains the extra epochs). Returns the recorded max_epochs when the
    run is extended, else None."""
    run_dir = Path(run_dir)
    if not ((run_dir / "checkpoints" / "last.ckpt").is_file() or (run_dir / "metrics.json").is_file()):
        return None
    info = _read_json(run_dir / "run_info.json")
    if info is None or not isinstance(info.get("config"), dict):
        raise _refuse(run_dir, "an unknown config", {"run_info.json": ("missing", "needed")})
    recorded = info.get("computed_config") or computed_config(OmegaConf.create(info["config"]))
    changes = differences(recorded, computed_config(cfg))
    epochs = changes.pop("trainer.max_epochs", None)
    if changes or (epochs and not epochs[1] > epochs[0]):
        raise _refuse(run_dir, "another config", {**changes, **({"trainer.max_epochs": epochs} if epochs else {})})
    return epochs[0] if epochs else None


@contextmanager
def run_lock(run_dir: Path):
    """Hold ``run_dir/.lock`` (:func:`~ekd_lightning.outputs.exclusive`) while a run is trained
    in ``run_dir``, so that a second job wanting the same run (same folder: same config hash in
    the pipeline's store) waits for the first and then reuses its ``metrics.json``. Only rank 0
    of a distributed run locks; the ranks it launched train inside its lock."""
    with exclusive(Path(run_dir) / ".lock", f"{run_dir} (a training run)"):
        yield


def run_training(cfg: DictConfig, run_dir: str | Path, callbacks=(), command: str | None = None,
                 default_labels: Callable[[DictConfig], Path] | None = None) -> dict[str, float]:
    """Fit a model as ``cfg`` says, test the best checkpoint, return the final metrics.

    The run folder receives ``checkpoints/{best,last}.ckpt``, ``metrics.json`` and
    ``run_info.json`` (provenance, with :func:`computed_config`, and ``command``, the
    ``ekd-train ...`` line that composes ``cfg`` into this folder, run from ``cwd``; None when
    not known). With ``cfg.resume`` a run
    whose ``metrics.json`` records the same config (``config_sha256``) and whose input files are
    unchanged is not run again: its metrics are returned (so a restarted multirun sweep skips
    finished jobs); an existing ``last.ckpt`` is resumed when it was made by the same config
    (or one with a higher ``trainer.max_epochs``: the run is extended); a folder holding a run
    of another config or other input files is refused (:func:`check_same_run`, ConfigError).
    ``resume=false`` trains afresh in the folder, whatever it holds.
    The folder also receives ``history.json`` (per-epoch validation metrics,
    :class:`TrainingHistory`), and ``metrics.json`` records the epochs trained, the best epoch,
    the training wall time and whether early stopping ended the run.
    Concurrent jobs on the same folder are serialised by :func:`run_lock`: the second returns
    the first one's metrics. ``default_labels``: the labels of a stage that trains on distilled
    forces with neither ``distill.labels`` nor ``distill.teachers``
    (:func:`~ekd_lightning.distill.config.labels_for_training`).
    """
    run_dir = Path(run_dir)
    check_settings(cfg)
    with run_lock(run_dir):
        if cfg.get("resume", True) and (done := finished_metrics(cfg, run_dir)) is not None:
            log.info("%s already finished with this config (metrics.json): skipping", run_dir)
            return done
        return _fit(cfg, run_dir, callbacks, command, default_labels)


def checkpoint_bytes(module: PotentialModule) -> int:
    """About the free space a run needs before its first epoch: ``best.ckpt`` and ``last.ckpt``
    (weights and AdamW's two moments each) and the temporary copy of one while it is replaced,
    plus 1 MiB for the JSON files and the log."""
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    return 3 * 3 * weights + 2**20


def snapshot_checkpoints(cfg: DictConfig, checkpoint_dir: Path) -> list[ModelCheckpoint]:
    """With ``optim.lr_cycle_epochs`` (cyclic cosine LR, absent by default), a checkpoint at
    the end of every cycle, ``snapshot-<epoch>.ckpt`` (0-based epoch: ``snapshot-049.ckpt``
    ends a 50-epoch cycle): the members a snapshot-ensemble teacher contributes
    (``pipeline.Run.members``)."""
    cycle = cfg.optim.get("lr_cycle_epochs")
    if not cycle:
        return []
    return [ModelCheckpoint(dirpath=checkpoint_dir, filename="snapshot-{epoch:03d}",
                            auto_insert_metric_name=False, every_n_epochs=int(cycle),
                            save_top_k=-1, save_on_train_epoch_end=True)]


def _fit(cfg: DictConfig, run_dir: Path, callbacks, command: str | None,
         default_labels: Callable[[DictConfig], Path] | None) -> dict[str, float]:
    """The training of :func:`run_training`: check the folder, fit, test the best checkpoint,
    write the files (rank 0)."""
    fingerprint, requested = config_sha256(cfg), computed_config(cfg)
    resume = cfg.get("resume", True)
    extended_from = check_same_run(cfg, run_dir) if resume else None
    if extended_from is not None:
        log.info("%s: extending the run from %s to %s epochs", run_dir, extended_from,
                 cfg.trainer.max_epochs)
    cfg = labels_for_training(cfg, run_dir, default_labels)  # teachers without labels: label now
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    module = build_module(cfg, datamodule)
    check_writable(run_dir, checkpoint_bytes(module), "checkpoints and metrics")
    history = TrainingHistory(run_dir / "history.json")
    checkpoint_dir = run_dir / "checkpoints"
    checkpointing = ModelCheckpoint(
        dirpath=checkpoint_dir, filename="best", monitor="val/loss", save_last=True
    )
    trainer = pl.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        inference_mode=False, logger=build_logger(cfg, run_dir),
        callbacks=[checkpointing, *snapshot_checkpoints(cfg, checkpoint_dir), history,
                   *build_callbacks(cfg), *robustness_callbacks(), *callbacks],
        plugins=[AtomicCheckpointIO()], default_root_dir=str(run_dir),
    )
    info = {**provenance(cfg, datamodule), "config_sha256": fingerprint, "computed_config": requested,
            "command": command, "cwd": os.getcwd()}
    last = checkpoint_dir / "last.ckpt"
    resume_from = str(last) if resume and last.is_file() else None
    recorded = _read_json(run_dir / "run_info.json")
    if resume_from and recorded and (changed := changed_inputs(recorded, info)):
        raise _refuse(run_dir, "other input files", changed)
    if trainer.is_global_zero:
        write_json_atomic(info, run_dir / "run_info.json")
    if resume_from:
        log.info("resuming from %s", resume_from)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics.update(stopping_summary(trainer, history))
    # the best checkpoint of `checkpointing` (what ckpt_path="best" picks, without the warning
    # that snapshot checkpoints, a second ModelCheckpoint, would bring)
    results = trainer.test(module, datamodule=datamodule, ckpt_path=checkpointing.best_model_path,
                           verbose=False)
    metrics.update({k: float(v) for k, v in (results[0] if results else {}).items()})
    metrics["best_checkpoint"] = checkpointing.best_model_path
    metrics["config_sha256"] = fingerprint
    if (wandb_id := wandb_run_id(trainer.logger)) is not None:
        metrics["wandb_run_id"] = wandb_id  # the pipeline's report run lists its members'
    if trainer.is_global_zero:
        write_json_atomic(metrics, run_dir / "metrics.json")
    finish_logger(trainer.logger)
    return metrics
