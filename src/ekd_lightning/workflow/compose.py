"""Training configs composed by Hydra from recorded overrides, and the command that reproduces one.

A training run is fully described by the overrides of ``conf/train.yaml`` it was composed with
(``stage=student model=ani2x seed=1 ...``): the pipeline composes each of its runs with
:func:`compose_train` from its own command's overrides (:func:`command_overrides`) plus the run's,
and records ``ekd-train <overrides> hydra.run.dir=<run folder>`` (:func:`train_command`) in the
run's ``run_info.json``: that line, run from the same folder, composes the same config.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from ..core.errors import ConfigError

CONFIG_MODULE = "ekd_lightning.conf"
"""The packaged config tree of ``train.py`` / ``ekd-train`` (``pkg://ekd_lightning.conf``)."""


def parse(overrides: Sequence[str]) -> list:
    """Hydra's parsed form of override strings (``key_or_group``, ``value()``, ...)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(overrides))


def compose_train(overrides: Sequence[str]) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides`` (a ``hydra.searchpath=[...]`` among them
    adds the user's config folders), as ``ekd-train <overrides>`` composes it: with Hydra's
    compose API, inside a running Hydra app (or an initialised compose context) directly, else
    in a context on the packaged config module."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from ..train.training import register_resolvers

    register_resolvers()
    if GlobalHydra.instance().is_initialized():
        return compose("train", overrides=list(overrides))
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def command_overrides(overrides: Sequence[str] | None = None) -> list[str]:
    """The overrides the current command's config was composed with: ``overrides`` when given,
    else the running Hydra app's (``hydra.overrides.task``, after its ``hydra.searchpath``).

    Raises:
        ConfigError: neither given nor under a Hydra app (``ekd-train``, ``train.py``).
    """
    from hydra.core.hydra_config import HydraConfig

    if overrides is not None:
        return list(overrides)
    if not HydraConfig.initialized():
        raise ConfigError("the pipeline composes its runs from the command's overrides: outside "
                          "ekd-train / train.py pass overrides=[...], the list the config was "
                          "composed with")
    recorded = HydraConfig.get().overrides
    search = [o.input_line for o in parse(recorded.hydra) if o.key_or_group == "hydra.searchpath"]
    return [*search, *recorded.task]


def override_value(value) -> str:
    """``value`` (None, bool, number, string, list, mapping) in Hydra's override grammar, a string
    quoted only where needed; checked by parsing it back (ConfigError if it cannot be written)."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, str):
        text = value if _reads_back(value, value) else "'" + value.replace("'", "\\'") + "'"
    elif isinstance(value, Mapping):
        text = "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    elif isinstance(value, Sequence):
        text = "[" + ",".join(override_value(v) for v in value) + "]"
    else:
        text = str(value)
    if not _reads_back(text, value):
        raise ConfigError(f"{value!r} cannot be written as a Hydra override value")
    return text


def _reads_back(text: str, value) -> bool:
    """Whether Hydra parses ``k=<text>`` back to ``value`` (same type for a scalar)."""
    try:
        parsed = parse([f"k={text}"])[0].value()
    except Exception:  # noqa: BLE001 - Hydra's grammar errors: not writable this way
        return False
    if isinstance(value, float) and value != value:  # NaN
        return isinstance(parsed, float) and parsed != parsed
    if value is None or isinstance(value, (str, bool, int, float)):
        return type(parsed) is type(value) and parsed == value
    return parsed == (list(value) if isinstance(value, tuple) else value)


def as_overrides(tree: Mapping, prefix: str = "") -> list[str]:
    """A nested mapping of settings as ``++dotted.key=value`` overrides, one per leaf (lists
    and scalars are leaves; an empty mapping sets nothing), what merging the mapping into the
    config does: ``{loss: {forces: {weight: 1.0}}}`` -> ``["++loss.forces.weight=1.0"]`` (``++``:
    set, adding the key when the config lacks it)."""
    if OmegaConf.is_config(tree):
        tree = OmegaConf.to_container(tree)
    out = []
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out += as_overrides(value, dotted)
        else:
            out.append(f"++{dotted}={override_value(value)}")
    return out


def train_command(overrides: Sequence[str]) -> str:
    """The shell line ``ekd-train <overrides>`` (each override shell-quoted)."""
    return " ".join(["ekd-train", *(shlex.quote(o) for o in overrides)])
