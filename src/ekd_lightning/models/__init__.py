"""Models: each maps a batch (z, pos, batch) to per-molecule energies in Hartree.

A model config (``conf/model/*.yaml``) names the model class in ``_target_`` beside its keyword
arguments, and ``name`` (``ani2x``, ``ani1x``, ``schnet_small``, ...) names its runs;
:func:`instantiate_model` is the one place that builds a model from it. Checkpoints store the
model config (hparam ``model``), so they rebuild the model alone. Any
:class:`~ekd_lightning.models.base.AtomisticModel` subclass taking ``elements`` is a model:
adding one is a module and a YAML file (docs/add-a-model.md).
"""

from collections.abc import Mapping, Sequence

from ..core.errors import CheckpointError, ConfigError
from .base import AtomisticModel, energy_and_forces
from .repulsion import build_repulsion

NOT_ARGUMENTS = ("name",)
"""Keys of a model config that name its runs and are not the model class's arguments."""


def model_arguments(model_cfg: Mapping) -> dict:
    """The model config as a plain dict without :data:`NOT_ARGUMENTS` (``_target_`` and kwargs)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(model_cfg):
        model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
    return {k: v for k, v in dict(model_cfg).items() if k not in NOT_ARGUMENTS}


def instantiate_model(model_cfg: Mapping, elements: Sequence[str]) -> AtomisticModel:
    """The model of a model config (``{_target_: an AtomisticModel class, **its kwargs}``;
    ``name`` is ignored) for ``elements``, built with :func:`hydra.utils.instantiate`
    (ConfigError for a ``_target_`` that is not a model class), with the pair repulsion prior
    named by ``repulsion`` (absent or null: none; :mod:`~ekd_lightning.models.repulsion`)."""
    from ..core.instantiate import instantiate_checked
    from .losses import renamed_key

    arguments = model_arguments(model_cfg)
    for key in ("arch", "kwargs"):  # a model config of the layout before _target_
        if key in arguments:
            raise ConfigError(f"model config {model_cfg.get('name')!r}: {renamed_key(f'model.{key}')}")
    repulsion = arguments.pop("repulsion", None)
    model = instantiate_checked(arguments, AtomisticModel, "model", elements=list(elements))
    model.repulsion = build_repulsion(repulsion, model.elements)
    return model


LEGACY_TARGETS = {
    "ani": "ekd_lightning.models.ani.ANIModel",
    "ani2x": "ekd_lightning.models.ani.ANIModel",  # 0.1.0 stored the config's name
    "schnet": "ekd_lightning.models.schnet.SchNetModel",
}
"""Model classes of checkpoints written before model configs had ``_target_``: they stored the
architecture (hparam ``model_name``) and its kwargs (``model_kwargs``)."""


def legacy_model_config(model_name: str, model_kwargs: Mapping | None) -> dict:
    """The model config of a checkpoint of the previous layout (``model_name``, ``model_kwargs``)."""
    if model_name not in LEGACY_TARGETS:
        raise CheckpointError(f"unknown model architecture '{model_name}'; known: {sorted(LEGACY_TARGETS)}")
    return {"_target_": LEGACY_TARGETS[model_name], **dict(model_kwargs or {})}


__all__ = ["AtomisticModel", "energy_and_forces", "instantiate_model", "legacy_model_config",
           "model_arguments"]
