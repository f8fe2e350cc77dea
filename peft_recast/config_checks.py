"""Validation of :class:`~peft_recast.config.RecastConfig` values: each check takes the config being built, refuses a
bad field with a ``ValueError`` that names it and says what it must be; the few that normalise a value (``channels``,
``inactive_modules``, the scales) store a new object on the config, never the caller's. (The config module imports
this one, so the checks take the config untyped rather than import its class.)"""

from __future__ import annotations

import math
from typing import Any, Callable, Union

from packaging.version import InvalidVersion, Version

from ._version import __version__
from .presets import RECAST_PRESETS

# The largest count a config field may hold (templates, sets, blocks, layers per group): far above any real model.
MAX_COUNT = 2**20
# Fields with a fixed set of values.
CHOICES = {
    "bias": ("none", "all", "recast_only"),
    "weight_form": ("residual", "replace"),
    "coefficient_sharing": ("module", "position"),
    "template_family": ("group_span", "own_spectrum", "spectral_bands"),
}


def _all(value: Any, kind: Union[type, tuple[type, ...]]) -> bool:
    """Whether ``value`` is a list, tuple or set of ``kind`` (bools are not numbers here)."""
    return isinstance(value, (list, tuple, set)) and all(
        isinstance(item, kind) and not isinstance(item, bool) for item in value)


def _names_or_regex(value: Any) -> bool:
    return isinstance(value, str) or _all(value, str)


def _fingerprint(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(name, str) and _all(values, (int, float)) and all(math.isfinite(v) for v in values)
        for name, values in value.items()
    )


def check_recast_version(config: Any) -> None:
    """Fill in ``recast_version``, or refuse a config written by a newer ``peft_recast``."""
    if config.recast_version is None:
        config.recast_version = __version__
        return
    try:
        newer = Version(str(config.recast_version)) > Version(__version__)
    except InvalidVersion as error:
        raise ValueError(
            f"`recast_version` must be a version string such as {__version__!r}, got {config.recast_version!r}; "
            "the adapter_config.json is damaged (remove the field to load it as written by this version)."
        ) from error
    if newer:
        raise ValueError(
            f"This RECAST adapter config was written by peft_recast {config.recast_version}, but peft_recast "
            f"{__version__} is installed, which may not understand it. Upgrade with "
            f"`pip install -U 'peft-recast>={config.recast_version}'`."
        )


def check_types(config: Any) -> None:
    """Refuse a field of the wrong type (an edited or damaged ``adapter_config.json``) with a message that names it,
    before any other check could fail on it less clearly."""
    expected: dict[str, tuple[str, Callable[[Any], bool]]] = {
        "target_modules": ("a module name, a list of names or a regex", _names_or_regex),
        "exclude_modules": ("a module name, a list of names or a regex", _names_or_regex),
        "layers_pattern": ("a name or a list of names", _names_or_regex),
        "layers_to_transform": ("a layer index or a list of them",
                                lambda v: isinstance(v, (int, list, tuple, set)) and not isinstance(v, bool)),
        "modules_to_save": ("a list of module names", lambda v: _all(v, str)),
        "fused_modules": ("a list of module names", lambda v: _all(v, str)),
        "preset": ("a preset name", lambda v: isinstance(v, str)),
        "template_bank": ("a path or Hub id", lambda v: isinstance(v, str)),
        "base_fingerprint": ("a dict of group names to lists of singular values", _fingerprint),
        "inactive_modules": ("a list of module keys", lambda v: _all(v, str)),
        "trainable_token_indices": ("a non-empty list of token ids or a dict of module names to such lists",
                                    lambda v: bool(v) and (_all(v, int) or isinstance(v, dict) and all(
                                        isinstance(k, str) and ids and _all(ids, int) for k, ids in v.items()))),
    }
    for name, (description, valid) in expected.items():
        value = getattr(config, name)
        if value is not None and not valid(value):
            raise ValueError(f"`{name}` must be {description} (or None), got {value!r}.")
    for name in ("init_weights", "fan_in_fan_out", "module_gates", "share_across_module_types", "inference_mode"):
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"`{name}` must be True or False, got {getattr(config, name)!r}.")


def check_choices_and_counts(config: Any) -> None:
    """The fields of :data:`CHOICES` hold one of their values; counts are positive integers up to :data:`MAX_COUNT`;
    a preset is known; layers are grouped one way only."""
    for name, choices in CHOICES.items():
        if getattr(config, name) not in choices:
            words = " or ".join([", ".join(repr(choice) for choice in choices[:-1]), repr(choices[-1])])
            raise ValueError(f"`{name}` must be {words}, got {getattr(config, name)!r}.")
    if config.layers_per_group is not None and config.num_groups is not None:
        raise ValueError(
            f"Set either `layers_per_group` ({config.layers_per_group}) or `num_groups` ({config.num_groups}), "
            "not both: they are two ways to say how layers are grouped into template groups."
        )
    for name in ("layers_per_group", "num_groups", "num_templates", "num_coefficient_sets", "coefficient_blocks"):
        value = getattr(config, name)
        optional = name in ("layers_per_group", "num_groups")
        if (value is not None or not optional) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if value is not None and value > MAX_COUNT:
            raise ValueError(f"`{name}` must be at most {MAX_COUNT}, got {value!r}.")
    if config.preset is not None and config.preset not in RECAST_PRESETS:
        raise ValueError(f"Unknown RECAST preset {config.preset!r} (`preset`); choose one of {sorted(RECAST_PRESETS)}.")


def check_scales(config: Any) -> None:
    """``coefficient_scale`` (and ``coefficient_bound`` unless ``None``) are positive finite numbers up to 1e6, stored
    as floats; a bound needs the residual weight form."""
    for name in ("coefficient_scale", "coefficient_bound"):
        value = getattr(config, name)
        if value is None and name == "coefficient_bound":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(f"`{name}` must be a positive finite number, got {value!r}.")
        if value > 1e6:
            raise ValueError(f"`{name}` must be at most 1e6, got {value!r}.")
        setattr(config, name, float(value))
    if config.coefficient_bound is not None and config.weight_form != "residual":
        raise ValueError("`coefficient_bound` bounds the change from the pretrained weight, which the 'replace' "
                         "weight form does not have; use weight_form='residual' or coefficient_bound=None.")


def check_channels(config: Any) -> None:
    """Validate ``channels`` and store it as a new dict of sorted row lists (the caller's dict is not touched)."""
    if config.channels is None:
        return
    if not isinstance(config.channels, dict) or not all(isinstance(key, str) for key in config.channels):
        raise ValueError(
            f"`channels` must map module keys (str) to lists of output rows, e.g. "
            f"{{'encoder.layer.0.attention.self.query': [3, 17]}}, got {config.channels!r}."
        )
    checked = {}
    for key, rows in config.channels.items():
        rows = list(rows) if isinstance(rows, (list, tuple, set)) else rows
        if (not isinstance(rows, list) or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in rows)
                or len(set(rows)) != len(rows)):
            raise ValueError(f"`channels[{key!r}]` must be a list of distinct row indices (integers >= 0), got "
                             f"{config.channels[key]!r}.")
        if rows:
            checked[key] = sorted(rows)
    if config.coefficient_sharing != "module" or config.fused_modules:
        raise ValueError("`channels` gives single modules coefficients of their own, which modules that share "
                         "one coefficient tensor (coefficient_sharing='position' or fused_modules) cannot have; "
                         "use coefficient_sharing='module' and no fused_modules with channels.")
    config.channels = checked


def check_gates(config: Any) -> None:
    """Validate the TAPS gate fields; ``inactive_modules`` is stored as a sorted list."""
    for name in ("gate_init", "gate_threshold", "gate_penalty"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float(
                "inf") or (name == "gate_penalty" and value < 0):
            raise ValueError(f"`{name}` must be a finite number{' >= 0' if name == 'gate_penalty' else ''}, "
                             f"got {value!r}.")
    steps = config.gate_warmup_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"`gate_warmup_steps` must be an integer >= 0, got {steps!r}.")
    if config.module_gates and (config.coefficient_sharing != "module" or config.fused_modules):
        raise ValueError("`module_gates` switches single modules on and off, which modules that share one "
                         "coefficient tensor (coefficient_sharing='position' or fused_modules) cannot be; use "
                         "coefficient_sharing='module' and no fused_modules with module_gates.")
    if config.inactive_modules is not None:
        if isinstance(config.inactive_modules, str) or not all(isinstance(k, str) for k in config.inactive_modules):
            raise ValueError(f"`inactive_modules` must be a list of module keys, got {config.inactive_modules!r}.")
        if config.coefficient_sharing != "module" or config.fused_modules:
            raise ValueError("`inactive_modules` needs coefficient_sharing='module' and no fused_modules.")
        config.inactive_modules = sorted(set(config.inactive_modules)) or None
