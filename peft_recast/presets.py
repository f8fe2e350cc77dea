"""Presets: the paper's variants and the budget ladder, as ``RecastConfig`` field values
(:meth:`~peft_recast.config.RecastConfig.from_preset`), the target modules each variant takes per model type, the
measured learning rates, and the paper's gradient-mimicry settings. Standard library only: the command line reads these
defaults without importing torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Optional

# The peak AdamW learning rate of the coefficients for the default config (coefficient_scale s = 10), the one rate
# README, the examples and `peft-recast train` use; docs/benchmarks.md gives the measurements behind it.
RECOMMENDED_LR = 1e-2
# The rate measured best over the tuning tasks for adapters of every linear layer (ladder-216, ladder-648), and for
# template_family="own_spectrum" (48 and 972 numbers on query/value).
ALL_LINEAR_LR = 3e-3
# The peak AdamW learning rate of a new classifier head trained beside the coefficients (and of a linear probe).
HEAD_LR = 3e-3

_PAPER = {"num_templates": 2, "num_coefficient_sets": 2, "coefficient_blocks": 1}
RECAST_PRESETS: dict[str, dict[str, Any]] = {
    "attention": {"num_groups": 6, **_PAPER},
    "mlp": {"num_groups": 6, **_PAPER},
    "attention+mlp": {"num_groups": 6, **_PAPER},
    "conv": {"num_groups": 1, **_PAPER, "num_templates": 64},
}
# The budget ladder: RECAST settings from ~24 to ~1,000 trained numbers (counts for a 6-layer, 384-wide BERT such as
# MiniLM-L6; measured in docs/benchmarks.md). Model-independent: targets are PEFT's defaults (query/value) or all linear
# layers, so `from_preset` fills in nothing per model type for them.
RECAST_LADDER: dict[str, dict[str, Any]] = {
    "ladder-24": {"coefficient_blocks": 1},  # query/value, 2 layers per group, 2 templates, one block of rows
    "ladder-48": {},  # the default: ladder-24 with 2 blocks of output rows, the best measured under 50 numbers
    "ladder-144": {"coefficient_blocks": 6},  # ladder-24 with 6 blocks of output rows (MiniLM: one per head)
    "ladder-216": {"target_modules": "all-linear", "layers_per_group": 6, "num_templates": 6, "coefficient_blocks": 1},
    "ladder-648": {
        "target_modules": "all-linear",
        "layers_per_group": 6,
        "num_templates": 24,
        "coefficient_blocks": 1,
        "share_across_module_types": True,
    },
    "ladder-1000": {"coefficient_blocks": 41},  # ladder-24 with 41 blocks of output rows: 984 numbers on MiniLM
}
RECAST_PRESETS.update(RECAST_LADDER)
# Spectral bands on the query/value projections and the MLP layers (4 modules a layer on a BERT; counts on MiniLM-L6):
# one band, the module's own weight scaled by one number, or two bands of equal energy, on one block of rows or three.
# The most accuracy measured at 24, 48 and 144 numbers (docs/benchmarks.md).
BANDS_PRESETS: dict[str, dict[str, Any]] = {
    "bands-24-qv-mlp": {"template_family": "spectral_bands", "num_templates": 1, "coefficient_blocks": 1},
    "bands-48-qv-mlp": {"template_family": "spectral_bands", "coefficient_blocks": 1},
    "bands-144-qv-mlp": {"template_family": "spectral_bands", "coefficient_blocks": 3},
}
RECAST_PRESETS.update(BANDS_PRESETS)
# Presets whose measured rate is not their family's (recommended_lr): bands-24-qv-mlp's validation accuracy at 3e-3 and
# 1e-2 is the same number of correct answers, and the benchmark takes the smaller rate of a tie.
PRESET_LR: dict[str, float] = {"bands-24-qv-mlp": 3e-3}


class PresetTargets(NamedTuple):
    """A model type's target modules for the presets that name them.

    Attributes:
        attention: regex of the query, key and value projections (the paper's ``attention`` variants).
        fused: their names, fused into one ``qkv`` weight; ``None`` where the model already stores them as one.
        mlp: regex of the MLP (feed-forward) layers.
        query_value: regex of the query and value projections (the ``bands-*-qv-mlp`` presets, with ``mlp``).
    """

    attention: str
    fused: Optional[list[str]]
    mlp: str
    query_value: str


PRESET_TARGETS: dict[str, PresetTargets] = {
    "vit": PresetTargets(r".*\.attention\.(q_proj|k_proj|v_proj)", ["q_proj", "k_proj", "v_proj"],
                         r".*\.mlp\.(fc1|fc2)", r".*\.attention\.(q_proj|v_proj)"),
    "bert": PresetTargets(r".*\.attention\.self\.(query|key|value)", ["query", "key", "value"],
                          r".*\.layer\.\d+\.(intermediate|output)\.dense", r".*\.attention\.self\.(query|value)"),
    "llama": PresetTargets(r".*\.self_attn\.(q_proj|k_proj|v_proj)", ["q_proj", "k_proj", "v_proj"],
                           r".*\.mlp\.(gate_proj|up_proj|down_proj)", r".*\.self_attn\.(q_proj|v_proj)"),
    "gpt2": PresetTargets(r".*\.attn\.c_attn", None, r".*\.mlp\.(c_fc|c_proj)", r".*\.attn\.c_attn"),
}
PRESET_TARGETS["roberta"] = PRESET_TARGETS["bert"]
PRESET_TARGETS["mistral"] = PRESET_TARGETS["qwen2"] = PRESET_TARGETS["llama"]
# The PresetTargets fields each model-typed preset adapts (the union of their regexes); q/k/v are fused where
# "attention" is among them.
PRESET_PARTS: dict[str, tuple[str, ...]] = {
    "attention": ("attention",),
    "mlp": ("mlp",),
    "attention+mlp": ("attention", "mlp"),
    **{name: ("query_value", "mlp") for name in BANDS_PRESETS},
}


def preset_fields(preset: str, model_config: dict[str, Any]) -> dict[str, Any]:
    """The config fields ``preset`` fills in for a transformers model (``model_config``: its config as a dict).

    ``"conv"`` (transformers' ResNet names): every conv of the blocks after the first of each stage
    (``layers_pattern="layers"``, ``layers_to_transform = 1 .. max(depths) - 1``); one group per stage and conv
    position, since the layer index of a group is read after ``layers_pattern``.
    """
    if preset in RECAST_LADDER:
        return {}
    model_type = model_config.get("model_type")
    if preset == "conv":
        depths = model_config.get("depths")
        if not depths:
            raise ValueError(
                "The RECAST preset 'conv' reads the blocks per stage from the model config's `depths` (transformers "
                "ResNet); for other models pass `target_modules`, `layers_pattern` and `layers_to_transform`."
            )
        # a stage of b blocks has b - 1 modules per conv position, hence at most b - 1 templates (the paper's n)
        return {
            "target_modules": {"convolution"},
            "layers_pattern": "layers",
            "layers_to_transform": list(range(1, max(depths))),
            "num_templates": min(model_config.get("num_templates", 64), max(depths) - 1),
        }
    if model_type not in PRESET_TARGETS:
        raise ValueError(
            f"The RECAST preset {preset!r} has no target modules for model type {model_type!r} (known: "
            f"{sorted(PRESET_TARGETS)}); pass `target_modules` (and `fused_modules`) yourself."
        )
    targets = PRESET_TARGETS[model_type]
    regexes = [getattr(targets, part) for part in PRESET_PARTS[preset]]
    fields: dict[str, Any] = {
        "target_modules": regexes[0] if len(regexes) == 1 else "|".join(f"(?:{regex})" for regex in regexes)
    }
    if "attention" in PRESET_PARTS[preset]:
        fields["fused_modules"] = targets.fused
    return fields


def recommended_lr(config: Any) -> float:
    """The one peak AdamW learning rate of the coefficients measured for ``config``'s preset or family (head first; the
    records are in docs/benchmarks.md): a preset's own rate where :data:`PRESET_LR` has one (``3e-3`` for
    ``bands-24-qv-mlp``); ``3e-3`` for adapters of every linear layer (``target_modules="all-linear"``, as
    ``ladder-216`` and ``ladder-648``) and for ``template_family="own_spectrum"``; :data:`RECOMMENDED_LR` (``1e-2``)
    otherwise (the group span's q,v rungs and ``"spectral_bands"``). All assume the default ``coefficient_scale`` of
    10; the rate scales inversely with it.

    Args:
        config (`RecastConfig`): The adapter's config (a preset's, or your own).

    Example:

        ```py
        >>> import peft_recast
        >>> peft_recast.recommended_lr(peft_recast.RecastConfig())
        0.01
        >>> peft_recast.recommended_lr(peft_recast.RecastConfig.from_preset("ladder-648"))
        0.003

        ```
    """
    lower = getattr(config, "target_modules", None) == "all-linear" or getattr(
        config, "template_family", "group_span") == "own_spectrum"
    rate = PRESET_LR.get(getattr(config, "preset", None), ALL_LINEAR_LR if lower else RECOMMENDED_LR)
    return rate * 10.0 / getattr(config, "coefficient_scale", 10.0)


@dataclass(frozen=True)
class MimicrySettings:
    """Hyper-parameters of gradient Neural Mimicry (:mod:`peft_recast.gradient_mimicry`), recorded in every bank; the
    defaults are the official ViT settings."""

    steps: int = 1000
    lr: float = 0.1
    lr_step: int = 200
    lr_gamma: float = 0.1
    noise_std: float = 1e-4
    clip_norm: float = 1.0
    loss_weight: float = 2.0
    smooth_l1_beta: float = 1.0
    seed: int = 42

    @classmethod
    def resnet(cls, **kwargs: Any) -> "MimicrySettings":
        """The official ResNet-34 settings (lr 0.2, StepLR(500, 0.1), 3000 steps, no coefficient noise)."""
        return replace(cls(steps=3000, lr=0.2, lr_step=500, noise_std=0.0), **kwargs)

    def __post_init__(self) -> None:
        for name in ("steps", "lr_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        for name in ("lr", "lr_gamma", "clip_norm", "loss_weight", "smooth_l1_beta"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"`{name}` must be a positive finite number, got {getattr(self, name)!r}.")
        if not 0 <= self.noise_std < math.inf:
            raise ValueError(f"`noise_std` must be a finite number >= 0, got {self.noise_std!r}.")
