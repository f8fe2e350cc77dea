"""RECAST for Hugging Face PEFT: adapt a pretrained model with a few dozen coefficients per task.

``import peft_recast`` registers RECAST with PEFT, after which ``get_peft_model``, ``PeftModel.from_pretrained``
and the rest of PEFT's API accept :class:`RecastConfig` adapters.
"""

__version__ = "0.1.0"  # before the imports: config.py reads it (saved as `recast_version`)

from .config import RecastConfig
from .model import RecastModel, RecastSummary, recast_summary
from .registration import RECAST, register

register()

__all__ = ["RECAST", "RecastConfig", "RecastModel", "RecastSummary", "recast_summary"]
