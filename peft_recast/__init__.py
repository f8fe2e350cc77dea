"""RECAST for Hugging Face PEFT: adapt a pretrained model with a few dozen coefficients per task.

``import peft_recast`` registers RECAST with PEFT, after which ``get_peft_model``, ``PeftModel.from_pretrained``
and the rest of PEFT's API accept :class:`RecastConfig` adapters.
"""

from ._version import __version__ as __version__
from .adapters import hotswap_adapter, load_adapters
from .channels import add_channels, rank_channels
from .config import RECOMMENDED_LR, RecastConfig
from .fsdp import check_fsdp_wrapping, fsdp_auto_wrap_policy
from .gates import prune_gates
from .model import RecastModel
from .registration import RECAST, register
from .summary import RecastSummary, recast_summary

register()

__all__ = [
    "RECAST", "RECOMMENDED_LR", "RecastConfig", "RecastModel", "RecastSummary", "add_channels", "check_fsdp_wrapping",
    "fsdp_auto_wrap_policy", "hotswap_adapter", "load_adapters", "prune_gates", "rank_channels", "recast_summary",
]
