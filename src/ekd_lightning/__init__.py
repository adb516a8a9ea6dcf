"""ekd-lightning: ensemble knowledge distillation for machine-learned interatomic potentials."""

from .core import moved
from .core.provenance import __version__

moved.install()  # old module paths (ekd_lightning.evaluate, ...) keep working

__all__ = ["EKDCalculator", "__version__"]


def __getattr__(name: str):
    """``EKDCalculator`` on first use, so that ``import ekd_lightning`` stays light (no torch)."""
    if name == "EKDCalculator":
        from .inference.calculator import EKDCalculator

        return EKDCalculator
    raise AttributeError(f"module 'ekd_lightning' has no attribute {name!r}")
