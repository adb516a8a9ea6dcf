"""Models: each maps a batch (z, pos, batch) to per-molecule energies in Hartree.

``build_model(arch, elements, **kwargs)`` is the one place that turns a model config's ``arch``
(the architecture class: ``ani``, ``schnet``) into a module; checkpoints store it (hparam
``model_name``) and the kwargs so they can rebuild the model alone. A model config's ``name``
(``ani2x``, ``ani1x``, ``schnet_small``, ...) names its runs only.
"""

from collections.abc import Sequence

from ..errors import CheckpointError
from .base import AtomisticModel, energy_and_forces


def _registry() -> dict[str, type[AtomisticModel]]:
    from .ani import ANIModel
    from .schnet import SchNetModel

    return {"ani": ANIModel, "schnet": SchNetModel}


ARCHS = ("ani", "schnet")
LEGACY_ARCHS = {"ani2x": "ani"}
"""Architecture names of checkpoints written before model configs had ``arch`` (0.1.0 stored
the config's ``name``, ``ani2x`` for every ANI model)."""


def canonical_arch(arch: str) -> str:
    """``arch`` with a legacy checkpoint's name (``ani2x``) mapped to today's (``ani``)."""
    return LEGACY_ARCHS.get(arch, arch)


def build_model(arch: str, elements: Sequence[str], **kwargs) -> AtomisticModel:
    """Instantiate architecture ``arch`` (one of ARCHS, or a legacy name) for ``elements``."""
    registry = _registry()
    if canonical_arch(arch) not in registry:
        raise CheckpointError(f"unknown model architecture '{arch}'; known: {sorted(registry)}")
    return registry[canonical_arch(arch)](elements=list(elements), **kwargs)


__all__ = ["ARCHS", "AtomisticModel", "build_model", "canonical_arch", "energy_and_forces"]
