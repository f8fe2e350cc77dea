"""RECAST for Hugging Face PEFT: adapt a pretrained model with a few dozen coefficients per task.

``import peft_recast`` registers RECAST with PEFT, after which ``get_peft_model``, ``PeftModel.from_pretrained``
and the rest of PEFT's API accept :class:`RecastConfig` adapters.

The ``peft-recast`` command line (:mod:`peft_recast_launcher`) imports this package with ``DEFER_IMPORTS_ENV`` set, so
that ``--help`` answers without importing torch, PEFT and transformers (seconds): the public names below are then
imported on first access (PEP 562), which also registers RECAST, and the command line calls :func:`register` before
it runs a command.
"""

import os
from typing import TYPE_CHECKING

from ._version import __version__ as __version__

# Set (to "1") only while the command line imports the package: see the module's docstring.
DEFER_IMPORTS_ENV = "_PEFT_RECAST_DEFER_IMPORTS"

__all__ = [
    "RECAST", "RECOMMENDED_LR", "RecastConfig", "RecastModel", "RecastSummary", "add_channels", "check_fsdp_wrapping",
    "fsdp_auto_wrap_policy", "hotswap_adapter", "load_adapters", "prune_gates", "rank_channels", "recast_summary",
    "recommended_lr", "save_adapters",
]
# The module of each public name, for the deferred imports (the eager imports below name the same).
_SOURCES = {
    "RECAST": "registration", "RECOMMENDED_LR": "presets", "RecastConfig": "config", "RecastModel": "model",
    "RecastSummary": "summary", "add_channels": "channels", "check_fsdp_wrapping": "fsdp",
    "fsdp_auto_wrap_policy": "fsdp", "hotswap_adapter": "serving", "load_adapters": "serving",
    "prune_gates": "pruning", "rank_channels": "channels", "recast_summary": "summary", "recommended_lr": "presets",
    "save_adapters": "serving",
}


def register() -> None:
    """Register RECAST with PEFT (idempotent: re-importing the package is harmless)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    from .config import RecastConfig
    from .model import RecastModel
    from .registration import NAME, RECAST

    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(RECAST)
    if registered is RecastConfig:
        return
    if registered is not None:
        raise RuntimeError(
            f"PEFT already has a method registered as {NAME} ({registered.__module__}.{registered.__name__}); "
            "peft_recast cannot register its own. Uninstall the other package or upgrade peft_recast."
        )
    register_peft_method(name=NAME.lower(), config_cls=RecastConfig, model_cls=RecastModel, prefix="recast_")


if TYPE_CHECKING or os.environ.get(DEFER_IMPORTS_ENV) != "1":
    from .channels import add_channels, rank_channels
    from .config import RecastConfig
    from .fsdp import check_fsdp_wrapping, fsdp_auto_wrap_policy
    from .model import RecastModel
    from .presets import RECOMMENDED_LR, recommended_lr
    from .pruning import prune_gates
    from .registration import RECAST
    from .serving import hotswap_adapter, load_adapters, save_adapters
    from .summary import RecastSummary, recast_summary

    register()
else:

    def __getattr__(name: str) -> object:
        """A public name, imported on first access (the command line's deferred start); RECAST is registered first."""
        if name not in _SOURCES:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        import importlib

        register()
        value = getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *__all__})
