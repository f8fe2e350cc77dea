"""RECAST for Hugging Face PEFT: adapt a pretrained model with a few dozen coefficients per task.

``import peft_recast`` registers RECAST with PEFT, after which ``get_peft_model``, ``PeftModel.from_pretrained``
and the rest of PEFT's API accept :class:`RecastConfig` adapters.
"""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import register_peft_method

from ._version import __version__ as __version__
from .channels import add_channels, rank_channels
from .config import RECOMMENDED_LR, RecastConfig
from .fsdp import check_fsdp_wrapping, fsdp_auto_wrap_policy
from .model import RecastModel
from .pruning import prune_gates
from .registration import NAME, RECAST
from .serving import hotswap_adapter, load_adapters
from .summary import RecastSummary, recast_summary


def register() -> None:
    """Register RECAST with PEFT (idempotent: re-importing the package is harmless)."""
    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(RECAST)
    if registered is RecastConfig:
        return
    if registered is not None:
        raise RuntimeError(
            f"PEFT already has a method registered as {NAME} ({registered.__module__}.{registered.__name__}); "
            "peft_recast cannot register its own. Uninstall the other package or upgrade peft_recast."
        )
    register_peft_method(name=NAME.lower(), config_cls=RecastConfig, model_cls=RecastModel, prefix="recast_")


register()

__all__ = [
    "RECAST", "RECOMMENDED_LR", "RecastConfig", "RecastModel", "RecastSummary", "add_channels", "check_fsdp_wrapping",
    "fsdp_auto_wrap_policy", "hotswap_adapter", "load_adapters", "prune_gates", "rank_channels", "recast_summary",
]
