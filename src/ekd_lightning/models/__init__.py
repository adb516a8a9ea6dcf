"""Models: each maps a batch (z, pos, batch) to per-molecule energies in Hartree.

``build_model(name, elements, **kwargs)`` is the one place that turns a config's model name
into a module; checkpoints store that name and kwargs so they can rebuild the model alone.
"""

from collections.abc import Sequence

from ..errors import CheckpointError
from .base import AtomisticModel, energy_and_forces


def _registry() -> dict[str, type[AtomisticModel]]:
    from .ani import ANIModel
    from .schnet import SchNetModel

    return {"ani2x": ANIModel, "schnet": SchNetModel}


MODEL_NAMES = ("ani2x", "schnet")


def build_model(name: str, elements: Sequence[str], **kwargs) -> AtomisticModel:
    """Instantiate model ``name`` (one of MODEL_NAMES) for ``elements`` with its kwargs."""
    registry = _registry()
    if name not in registry:
        raise CheckpointError(f"unknown model '{name}'; known models: {sorted(registry)}")
    return registry[name](elements=list(elements), **kwargs)


__all__ = ["AtomisticModel", "MODEL_NAMES", "build_model", "energy_and_forces"]
