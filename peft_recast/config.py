"""Configuration of the RECAST tuner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from .registration import RECAST


@dataclass
class RecastConfig(PeftConfig):
    """Configuration for RECAST (Tasnim & Plummer, ICLR 2025): weights rebuilt from shared, frozen templates.

    Target modules with the same role (e.g. every layer's ``query``) and the same weight shape are split into
    *groups* of consecutive layers. Each group of ``m`` modules gets ``n = min(num_templates, m)`` templates
    ``T_1..T_n`` (unit Frobenius norm) fitted to the group's pretrained weights by closed-form Neural Mimicry,
    and each module ``l`` trains ``K x n`` coefficients ``theta_l`` (``K`` = ``num_coefficient_sets``):

        W_l = W_l^pre + s * ||W_l^pre||_F * sum_k mean_K(theta_l)[k] * T_k      (shapes: (out, in); s = coefficient_scale)

    ``theta = 0`` is the pretrained model. With AdamW a step moves ``theta`` by about the learning rate whatever the
    gradient's size, so ``s`` sets which learning rates work: the default puts the best one near 1e-2. The templates are rebuilt from the base weights when an
    adapter is loaded; ``base_fingerprint`` (filled in when the adapter is created) makes loading onto another base
    model fail loudly.

    Args:
        target_modules: Module names (list, suffix match), a regex (str), or ``"all-linear"``. ``None`` uses the
            default for the model type (query/value projections, as for LoRA).
        exclude_modules: Modules not to adapt (list or regex).
        layers_to_transform: Layer indices to adapt (the others keep their pretrained weights).
        layers_pattern: Name of the layer list (e.g. ``"layers"``), used with ``layers_to_transform``.
        modules_to_save: Extra modules trained and saved in full (e.g. a new classifier head).
        init_weights: ``True``: coefficients start at 0, the adapted model equals the base model. ``False``: a
            random non-identity start (for tests).
        bias: ``"none"``, ``"all"`` or ``"recast_only"``: which biases are trained.
        fan_in_fan_out: ``True`` for layers storing weights as ``(in, out)`` (GPT-2's ``Conv1D``; set
            automatically).
        layers_per_group: Consecutive layers of one role that share a template bank (default 2). Mutually
            exclusive with ``num_groups``.
        num_groups: Split each role's layers into this many contiguous groups instead (the paper's ``G``).
        num_templates: Templates per group (the paper's ``n``); capped at the group size and the numerical rank
            of the group's weights.
        num_coefficient_sets: Coefficient sets per module (the paper's ``K``); the layer uses their mean, so
            ``K > 1`` changes parameter count and initial point only.
        coefficient_scale: ``s`` above: a unit coefficient moves the layer's weight by ``s`` times its own
            Frobenius norm along a template. Stored with the adapter, so files keep their meaning.
        base_fingerprint: Singular values of every group's stacked pretrained weights, written when the adapter
            is created and checked when it is loaded. Leave it ``None``.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names, a regex or 'all-linear' to adapt."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to exclude."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Indices of the layers to adapt."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list, used with layers_to_transform."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules besides RECAST layers to train and save."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "True: identity at init (coefficients 0). False: random coefficients."}
    )
    bias: Literal["none", "all", "recast_only"] = field(default="none", metadata={"help": "Which biases to train."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "True if the layer stores its weight as (in, out)."})
    layers_per_group: Optional[int] = field(
        default=None, metadata={"help": "Consecutive layers sharing a template bank (default 2)."}
    )
    num_groups: Optional[int] = field(
        default=None, metadata={"help": "Number of contiguous groups per module role (alternative to layers_per_group)."}
    )
    num_templates: int = field(default=2, metadata={"help": "Templates per group."})
    num_coefficient_sets: int = field(default=1, metadata={"help": "Coefficient sets per module (their mean is used)."})
    coefficient_scale: float = field(
        default=10.0, metadata={"help": "A unit coefficient moves the weight by this many times its norm."}
    )
    base_fingerprint: Optional[dict[str, list[float]]] = field(
        default=None, metadata={"help": "Filled in by RECAST: singular values of each group's pretrained weights."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = RECAST
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        if self.bias not in ("none", "all", "recast_only"):
            raise ValueError(f"`bias` must be 'none', 'all' or 'recast_only', got {self.bias!r}.")
        if self.layers_per_group is not None and self.num_groups is not None:
            raise ValueError(
                f"Set either `layers_per_group` ({self.layers_per_group}) or `num_groups` ({self.num_groups}), "
                "not both: they are two ways to say how layers are grouped into template banks."
            )
        for name in ("layers_per_group", "num_groups", "num_templates", "num_coefficient_sets"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if isinstance(self.coefficient_scale, bool) or not isinstance(self.coefficient_scale, (int, float)) or not (
            0 < self.coefficient_scale < float("inf")
        ):
            raise ValueError(f"`coefficient_scale` must be a positive finite number, got {self.coefficient_scale!r}.")

    @property
    def group_size(self) -> Optional[int]:
        """Layers per group when grouping by size (``None`` when ``num_groups`` is set)."""
        if self.num_groups is not None:
            return None
        return 2 if self.layers_per_group is None else self.layers_per_group
