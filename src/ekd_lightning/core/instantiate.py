"""Objects from ``_target_`` entries (model configs, loss terms), checked before anything runs.

Model and loss configs travel inside checkpoints, and a checkpoint may come from elsewhere: so
an entry is built only when its ``_target_`` is a class derived from the expected base class
and its arguments are plain values (no nested ``_target_``, no ``_args_``/``_partial_``), which
keeps :func:`hydra.utils.instantiate` from calling anything else while loading a file.
"""

from __future__ import annotations

from collections.abc import Mapping

from .errors import ConfigError


def _special_keys(value, path: str) -> list[str]:
    """Dotted paths of every key starting with ``_`` inside ``value`` (mappings and lists)."""
    found = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            where = f"{path}.{key}"
            if str(key).startswith("_"):
                found.append(where)
            found += _special_keys(item, where)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found += _special_keys(item, f"{path}[{i}]")
    return found


def instantiate_checked(entry: Mapping, base: type, where: str, **runtime):
    """``hydra.utils.instantiate(entry, **runtime)`` for a plain mapping ``entry`` whose
    ``_target_`` names a subclass of ``base``; ConfigError naming ``where`` (the config key)
    otherwise, before any object is built."""
    from hydra.utils import get_class, instantiate

    target = entry.get("_target_") if isinstance(entry, Mapping) else None
    if not isinstance(target, str):
        raise ConfigError(f"{where}: needs a _target_ (a {base.__name__} class, as a dotted path)")
    special = _special_keys({k: v for k, v in entry.items() if k != "_target_"}, where)
    if special:
        raise ConfigError(f"{where}: arguments must be plain values; remove {', '.join(special)}")
    try:
        cls = get_class(target)
    except Exception as exc:  # hydra raises ImportError or ValueError, with the reason
        raise ConfigError(f"{where}: _target_ {target} is not an importable class: {exc}") from exc
    if not issubclass(cls, base):
        raise ConfigError(f"{where}: _target_ {target} is not a {base.__name__}")
    try:
        return instantiate(dict(entry), **runtime, _convert_="all")
    except Exception as exc:  # hydra wraps the class's own error (a bad keyword, ...)
        raise ConfigError(f"{where}: cannot build {target}: {exc}") from exc
