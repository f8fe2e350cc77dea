"""Presets: the paper's variants and the budget ladder, as ``RecastConfig`` field values
(:meth:`~peft_recast.config.RecastConfig.from_preset`), and the target modules each variant takes per model type."""

from __future__ import annotations

from typing import Any, Optional

_PAPER = {"num_templates": 2, "num_coefficient_sets": 2, "coefficient_blocks": 1}
RECAST_PRESETS: dict[str, dict[str, Any]] = {
    "attention": {"num_groups": 6, **_PAPER},
    "mlp": {"num_groups": 6, **_PAPER},
    "attention+mlp": {"num_groups": 6, **_PAPER},
    "conv": {"num_groups": 1, **_PAPER, "num_templates": 64},
}
# The budget ladder: RECAST settings from ~24 to ~650 trained numbers (counts for a 6-layer, 384-wide BERT such as
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
}
RECAST_PRESETS.update(RECAST_LADDER)
# Per model type: (regex of the attention projections, names fused into one weight, regex of the MLP layers).
PRESET_TARGETS: dict[str, tuple[str, Optional[list[str]], str]] = {
    "vit": (r".*\.attention\.(q_proj|k_proj|v_proj)", ["q_proj", "k_proj", "v_proj"], r".*\.mlp\.(fc1|fc2)"),
    "bert": (
        r".*\.attention\.self\.(query|key|value)",
        ["query", "key", "value"],
        r".*\.layer\.\d+\.(intermediate|output)\.dense",
    ),
    "llama": (
        r".*\.self_attn\.(q_proj|k_proj|v_proj)",
        ["q_proj", "k_proj", "v_proj"],
        r".*\.mlp\.(gate_proj|up_proj|down_proj)",
    ),
    "gpt2": (r".*\.attn\.c_attn", None, r".*\.mlp\.(c_fc|c_proj)"),
}
PRESET_TARGETS["roberta"] = PRESET_TARGETS["bert"]
PRESET_TARGETS["mistral"] = PRESET_TARGETS["qwen2"] = PRESET_TARGETS["llama"]


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
    attention, fused, mlp = PRESET_TARGETS[model_type]
    if preset == "attention":
        return {"target_modules": attention, "fused_modules": fused}
    if preset == "mlp":
        return {"target_modules": mlp}
    return {"target_modules": f"(?:{attention})|(?:{mlp})", "fused_modules": fused}
