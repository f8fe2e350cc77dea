"""Configuration of the RECAST tuner."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import safetensors
from peft.config import PeftConfig

from . import config_checks as checks
from .presets import RECAST_PRESETS
from .registration import RECAST

# Config fields that decide a layer's basis and mixing, or how its coefficients act: adapters that differ in any of
# them are not vectors of one space. The base model is compared apart (`base_fingerprint`, with its tolerance).
GROUPING_FIELDS = (
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "layers_per_group", "num_groups",
    "num_templates", "coefficient_blocks", "coefficient_scale", "coefficient_bound", "coefficient_sharing",
    "share_across_module_types", "fused_modules", "template_bank", "weight_form", "channels", "module_gates",
    "gate_threshold", "inactive_modules", "template_family",
)


def differing_field(
    first: "RecastConfig", other: "RecastConfig", fields: tuple[str, ...] = GROUPING_FIELDS
) -> Optional[str]:
    """The first of ``fields`` on which two configs differ (``None``: they agree): adapters that agree on
    :data:`GROUPING_FIELDS` share every layer's basis and mixing."""
    return next((name for name in fields if getattr(first, name) != getattr(other, name)), None)


def config_list(value: Optional[Union[str, int, list, set]]) -> list:
    """A ``layers_pattern`` or ``layers_to_transform`` value as a list: ``None`` -> ``[]``, ``"h"`` -> ``["h"]``,
    ``3`` -> ``[3]``."""
    if value is None:
        return []
    return [value] if isinstance(value, (str, int)) else list(value)


@dataclass
class RecastConfig(PeftConfig):
    """Configuration for RECAST (Tasnim & Plummer, ICLR 2025): weights rebuilt from shared, frozen templates.

    Target modules with the same role (e.g. every layer's ``query``) and the same weight shape are split into
    *groups* of consecutive layers. Each group of ``m`` modules gets ``n = min(num_templates, m)`` templates
    ``T_1..T_n`` (unit Frobenius norm) fitted to the group's pretrained weights by closed-form Neural Mimicry,
    and each module ``l`` trains ``K x n x B`` coefficients ``theta_l`` (``K`` = ``num_coefficient_sets``, ``B`` =
    ``coefficient_blocks``); on the output rows of block ``b``:

        W_l = W_l^pre + s ||W_l^pre||_F / sqrt(n) * sum_k mean_K(theta_l)[k, b] T_k   (shapes: (out, in); s = coefficient_scale)

    The defaults (query/value, 2 layers per group, 2 templates, 2 blocks) train 48 numbers on a 6-layer BERT.

    ``theta = 0`` is the pretrained model. With AdamW a step moves ``theta`` by about the learning rate whatever the
    gradient's size, so ``s`` sets which learning rates work: the default puts the best one near 1e-2. The templates are rebuilt from the base weights when an
    adapter is loaded; ``base_fingerprint`` (filled in when the adapter is created) makes loading onto another base
    model fail loudly.

    Args:
        target_modules (`Optional[Union[list[str], str]]`, *optional*, defaults to `None`):
            Module names (list, suffix match), a regex (str), or ``"all-linear"``. ``None`` uses the default for the
            model type (query/value projections, as for LoRA).
        exclude_modules (`Optional[Union[list[str], str]]`, *optional*, defaults to `None`):
            Modules not to adapt (list or regex).
        layers_to_transform (`Optional[Union[list[int], int]]`, *optional*, defaults to `None`):
            Layer indices to adapt (the others keep their pretrained weights).
        layers_pattern (`Optional[Union[list[str], str]]`, *optional*, defaults to `None`):
            Name of the layer list (e.g. ``"layers"``), used with ``layers_to_transform``.
        modules_to_save (`Optional[list[str]]`, *optional*, defaults to `None`):
            Extra modules trained and saved in full (e.g. a new classifier head).
        init_weights (`bool`, defaults to `True`):
            ``True``: coefficients start at 0, the adapted model equals the base model. ``False``: a random
            non-identity start (for tests).
        bias (`str`, defaults to `"none"`):
            ``"none"``, ``"all"`` or ``"recast_only"``: which biases are trained.
        fan_in_fan_out (`bool`, defaults to `False`):
            ``True`` for layers storing weights as ``(in, out)`` (GPT-2's ``Conv1D``; set automatically).
        layers_per_group (`Optional[int]`, *optional*, defaults to `None`, meaning 2):
            Consecutive layers of one role that share their templates (a template group). Mutually exclusive with
            ``num_groups``.
        num_groups (`Optional[int]`, *optional*, defaults to `None`):
            Split each role's layers into this many contiguous groups instead (the paper's ``G``).
        num_templates (`int`, defaults to `2`):
            Templates per group (the paper's ``n``); capped at the group size and the numerical rank of the group's
            weights.
        num_coefficient_sets (`int`, defaults to `1`):
            Coefficient sets per module (the paper's ``K``); the layer uses their mean, so ``K > 1`` changes the
            number of coefficients and the initial point only.
        coefficient_scale (`float`, defaults to `10.0`):
            ``s`` above: moving all ``n`` coefficients of a layer by ``c`` moves its weight by ``c s`` times its own
            Frobenius norm, whatever ``n`` is. Stored with the adapter, so files keep their meaning.
        coefficient_bound (`Optional[float]`, *optional*, defaults to `None`):
            ``b``: the layer uses ``b tanh(mean_K(theta) / b)`` in place of ``mean_K(theta)``, so no coefficient
            moves its weight by more than ``b s`` times the weight's norm however far training pushes ``theta``
            (near 0 the two agree to first order). ``None``: no bound. Residual form only.
        coefficient_sharing (`str`, defaults to `"module"`):
            ``"module"``: every module trains its own ``K x n x B`` coefficients, so the count grows with depth (48 on
            MiniLM-L6, 240 for q/v of a 30-layer model). ``"position"``: the modules of one role at the same position
            of their groups (e.g. the first query of every pair of layers) share one coefficient tensor, each group
            applying it to its own templates: ``roles x layers_per_group x K x n x B`` numbers whatever the depth
            (q/v, 2 layers per group, 2 templates, 6 blocks: 48 on any model). A group with fewer templates uses the
            first ``n`` of its shared coefficients.
        coefficient_blocks (`int`, defaults to `2`):
            ``B``: cut each module's output rows (``out`` of ``(out, in)``) into ``B`` contiguous blocks (e.g. one
            per attention head), each with its own ``K x n`` coefficients: ``delta_W`` rows of block ``b`` use
            ``theta[:, :, b]``. ``K x n x B`` coefficients per module. Blocks are equal when ``B`` divides ``out``,
            else they differ by one row (as ``torch.tensor_split``); a module with fewer than ``B`` rows gets one
            block per row. ``1``: one coefficient per template, as in the paper.
        channels (`Optional[dict[str, list[int]]]`, *optional*, defaults to `None`):
            Output rows (channels) that get coefficients of their own, by module key (as in ``named_modules()`` of
            the base model), usually the rows :func:`peft_recast.rank_channels` ranks most important on the user's
            data. Each listed row of a module leaves its row block and trains ``K x n`` coefficients over the group's
            templates: ``delta_W[r] = s ||W||_F / sqrt(n) * sum_k theta[k, B + i] T_k[r]`` for the ``i``-th listed row
            ``r``, so a module with ``c`` listed rows trains ``K x n x (B + c)`` numbers. Not with
            ``coefficient_sharing="position"`` or ``fused_modules``.
        module_gates (`bool`, defaults to `False`):
            TAPS gates (Wallingford et al., arXiv 2203.16708): each module learns a score ``g`` and uses
            ``1[g >= gate_threshold] * delta_W`` (straight-through gradient: ``d gate / d g = 1``), while
            ``gate_penalty`` pushes every ``|g|`` down, so modules the task does not need switch off.
            :func:`peft_recast.prune_gates` then drops the closed modules' coefficients (``inactive_modules``) and the
            scores, so the saved adapter holds and counts only the open modules. Not with
            ``coefficient_sharing="position"`` or ``fused_modules``.
        gate_init (`float`, defaults to `0.15`):
            Initial score of every gate (TAPS' released code: 0.15, open).
        gate_threshold (`float`, defaults to `0.1`):
            A gate is open while its score is at least this.
        gate_penalty (`float`, defaults to `0.0`):
            ``lambda``: the training loss is taken as ``L + lambda * sum_l |g_l| / M`` over the adapter's ``M`` gated
            modules. The penalty enters as its gradient (``lambda sign(g) / M`` added to each score's gradient in every
            backward pass), so it works in any training loop without changing the reported loss.
        gate_warmup_steps (`int`, defaults to `0`):
            Training forward passes (with gradients) of each module before the penalty starts (TAPS: two epochs):
            the coefficients start at 0, where the task gives the scores no gradient yet.
        inactive_modules (`Optional[list[str]]`, *optional*, defaults to `None`):
            Module keys that keep their place in their template group (their pretrained weights still span the
            group's templates) but hold no coefficients: the pretrained layer. Written by :func:`prune_gates`.
        share_across_module_types (`bool`, defaults to `False`):
            ``True``: all target modules of a group of layers that have the same weight shape (e.g. query, key,
            value and attention output) share one template group, so each module mixes templates built from all of them;
            ``False``: one template group per module type.
        base_fingerprint (`Optional[dict[str, list[float]]]`, *optional*, defaults to `None`):
            Singular values of every group's stacked pretrained weights, written when the adapter is created and
            checked when it is loaded. Leave it ``None``.
        recast_version (`Optional[str]`, *optional*, defaults to `None`, filled in):
            Version of ``peft_recast`` that wrote the config. Loading a config written by a newer version raises
            ``ValueError``, since its fields may mean something this version cannot honour.
        fused_modules (`Optional[list[str]]`, *optional*, defaults to `None`):
            Target names whose modules in one layer form one weight, as the paper's fused ``qkv``: their weights are
            concatenated (flattened) per layer, share templates and one ``K x n`` coefficient tensor (e.g.
            ``["query", "key", "value"]``).
        template_family (`str`, defaults to `"group_span"`):
            Which templates a module's coefficients combine. ``"group_span"``: the top singular directions of the
            group's stacked pretrained weights (above). ``"own_spectrum"``: rank-one ``u_i v_j^T`` from the module's own
            top singular pairs (``num_templates = r^2``: an ``r x r`` core, as LoRA-XS; :mod:`peft_recast.spectrum`).
            ``"spectral_bands"``: its own weight cut into bands of its spectrum of equal energy (:mod:`peft_recast.bands`).
            Groups then only decide which modules share coefficients. Not with ``template_bank``, ``fused_modules``,
            ``share_across_module_types`` or ``weight_form="replace"``.
        template_bank (`Optional[str]`, *optional*, defaults to `None`):
            Path or Hub id of a template bank written by :func:`peft_recast.bank.save_template_bank` (gradient Neural
            Mimicry, as in the paper). ``None``: closed-form templates rebuilt from the base.
        weight_form (`str`, defaults to `"residual"`):
            ``"residual"``: ``W_l = W_pre + update``, exactly the base model at init. ``"replace"``: the paper's
            ``W_l = sum_k mean_K(theta_l)_k T_k`` with ``theta`` starting at the mimicked coefficients (equal to the
            base model only as far as the mimicry is exact).
        preset (`Optional[str]`, *optional*, defaults to `None`):
            The paper variant this config was made from (:meth:`from_preset`); target modules are resolved per model
            type at injection when ``target_modules`` is ``None``.
        trainable_token_indices (`Optional[Union[list[int], dict[str, list[int]]]]`, *optional*, defaults to `None`):
            Token ids whose rows of the input embedding train beside the coefficients and are saved with the adapter
            (e.g. tokens a chat template adds), as in PEFT's LoRA: a list targets the input embedding, a dict maps
            embedding module names to ids.

    Example:

        ```py
        >>> import peft_recast
        >>> from peft import get_peft_model
        >>> from transformers import BertConfig, BertModel

        >>> base = BertModel(BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64))
        >>> model = get_peft_model(base, peft_recast.RecastConfig())  # query/value, 2 layers per group
        >>> model.get_nb_trainable_parameters()[0]  # q, v x 4 layers x (2 templates x 2 row blocks)
        32

        ```
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
        default=None, metadata={"help": "Consecutive layers sharing their templates (default 2)."}
    )
    num_groups: Optional[int] = field(
        default=None, metadata={"help": "Number of contiguous groups per module role (alternative to layers_per_group)."}
    )
    num_templates: int = field(default=2, metadata={"help": "Templates per group."})
    num_coefficient_sets: int = field(default=1, metadata={"help": "Coefficient sets per module (their mean is used)."})
    coefficient_scale: float = field(
        default=10.0, metadata={"help": "A unit coefficient moves the weight by this many times its norm."}
    )
    coefficient_bound: Optional[float] = field(
        default=None, metadata={"help": "Squash each coefficient to (-b, b) with b tanh(theta / b); None: no bound."}
    )
    coefficient_sharing: Literal["module", "position"] = field(
        default="module",
        metadata={"help": "'module': coefficients per module. 'position': one tensor per role and position in a group, "
                  "shared by every group, so the count does not grow with depth."},
    )
    coefficient_blocks: int = field(
        default=2, metadata={"help": "Blocks of output rows (e.g. attention heads) with coefficients of their own."}
    )
    channels: Optional[dict[str, list[int]]] = field(
        default=None,
        metadata={"help": "Output rows with coefficients of their own, by module key (see peft_recast.rank_channels)."},
    )
    module_gates: bool = field(default=False, metadata={"help": "TAPS: a learned on/off gate per module."})
    gate_init: float = field(default=0.15, metadata={"help": "Initial gate score (open when >= gate_threshold)."})
    gate_threshold: float = field(default=0.1, metadata={"help": "A gate is open while its score is at least this."})
    gate_penalty: float = field(default=0.0, metadata={"help": "lambda of the sparsity penalty lambda sum|g| / M."})
    gate_warmup_steps: int = field(default=0, metadata={"help": "Training forward passes before the penalty acts."})
    inactive_modules: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules in a template group without coefficients (written by prune_gates)."}
    )
    share_across_module_types: bool = field(
        default=False, metadata={"help": "One template group for all target modules of a layer group with the same shape."}
    )
    base_fingerprint: Optional[dict[str, list[float]]] = field(
        default=None, metadata={"help": "Filled in by RECAST: singular values of each group's pretrained weights."}
    )
    recast_version: Optional[str] = field(
        default=None, metadata={"help": "peft_recast version that wrote this config; leave empty to auto-fill."}
    )
    fused_modules: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Target names (e.g. query, key, value) whose modules in one layer act as one fused weight."},
    )
    template_family: Literal["group_span", "own_spectrum", "spectral_bands"] = field(
        default="group_span",
        metadata={"help": "'group_span': templates from the group's stacked weights. 'own_spectrum': rank-one "
                  "templates from each module's own singular vectors. 'spectral_bands': bands of its own spectrum."},
    )
    template_bank: Optional[str] = field(
        default=None,
        metadata={"help": "Path or Hub id of a template bank from gradient mimicry (None: closed-form templates)."},
    )
    weight_form: Literal["residual", "replace"] = field(
        default="residual",
        metadata={"help": "'residual': W_pre + update (identity at init). 'replace': the paper's sum_k theta_k T_k."},
    )
    preset: Optional[str] = field(
        default=None, metadata={"help": "Paper variant whose target modules are resolved per model type."}
    )
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None,
        metadata={"help": "Token ids whose input-embedding rows train and are saved with the adapter (PEFT's meaning)."},
    )

    @classmethod
    def from_preset(cls, preset: str, **kwargs: Any) -> "RecastConfig":
        """A config for one of the paper's variants (see :data:`RECAST_PRESETS`), with ``kwargs`` overriding it.

        ``"attention"``, ``"mlp"`` and ``"attention+mlp"`` follow the official ViT code (``G = 6`` groups, ``n = 2``
        templates, ``K = 2`` coefficient sets; q/k/v fused as the paper's single ``qkv`` weight); ``"conv"`` follows
        its ResNet-34 (one template group per stage and conv position over the blocks after the first, ``n`` = blocks - 1,
        ``K = 2``). ``"ladder-24"`` to ``"ladder-1000"`` are the budget ladder; ``"bands-24-qv-mlp"``,
        ``"bands-48-qv-mlp"`` and ``"bands-144-qv-mlp"`` put spectral bands on each query, value and MLP layer (24, 48
        or 144 numbers on MiniLM-L6). Target modules are filled in per model type when the adapter is injected. Passing
        ``layers_per_group`` replaces the preset's ``num_groups``.
        """
        if preset not in RECAST_PRESETS:
            raise ValueError(f"Unknown RECAST preset {preset!r}; choose one of {sorted(RECAST_PRESETS)}.")
        values = dict(RECAST_PRESETS[preset])
        if "layers_per_group" in kwargs:
            values.pop("num_groups", None)
        values.update(kwargs)
        return cls(preset=preset, **values)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = RECAST
        checks.check_recast_version(self)  # first: a newer config may hold values this version rejects or misreads
        checks.check_types(self)
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        indices = config_list(self.layers_to_transform)
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices):
            raise ValueError(
                f"`layers_to_transform` must be a layer index or a list of layer indices (integers >= 0, counted "
                f"from the first layer), got {self.layers_to_transform!r}."
            )
        checks.check_choices_and_counts(self)
        if self.fused_modules is not None:
            self.fused_modules = list(self.fused_modules)
        clashes = [name for name, value in (("template_bank", self.template_bank), ("fused_modules", self.fused_modules),
                   ("share_across_module_types", self.share_across_module_types),
                   ("weight_form='replace'", self.weight_form == "replace")) if value]
        if self.template_family != "group_span" and clashes:
            raise ValueError(f"template_family={self.template_family!r} builds each module's templates from its own "
                             f"weight, which {clashes[0]} contradicts; use template_family='group_span' with it.")
        checks.check_channels(self)
        checks.check_gates(self)
        checks.check_scales(self)
        if self.coefficient_sharing != "module" and self.weight_form != "residual" and self.base_fingerprint is None:
            # a new adapter only: one written before (it has a fingerprint) holds trained coefficients and still loads
            raise ValueError("coefficient_sharing='position' gives several modules one tensor, which cannot start at "
                             "each module's own mimicked coefficients as weight_form='replace' needs (the model would "
                             "not start at the base model); use weight_form='residual' or coefficient_sharing='module'.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs: Any):
        """PEFT's ``from_pretrained``; for a local adapter folder the header of the weight file beside the config is
        checked first (safetensors validates every tensor's dtype, shape and offsets against the file's size without
        reading the data), so that ``PeftModel.from_pretrained`` and ``load_adapter`` refuse a damaged file (with
        ``ValueError``) before any module of the model is wrapped."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = os.path.join(str(pretrained_model_name_or_path), subfolder or "")
        path = os.path.join(folder, "adapter_model.safetensors")
        if os.path.isfile(path):
            try:
                with safetensors.safe_open(path, framework="pt"):
                    pass
            except Exception as error:  # safetensors raises its own types for truncated or corrupted files
                raise ValueError(
                    f"Cannot load the RECAST adapter {folder}: {path} is damaged or not a safetensors file "
                    f"({type(error).__name__}: {error}). Nothing was changed; save the adapter again or restore "
                    "the file."
                ) from error
        return config

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """Fields read from a saved ``adapter_config.json``: a file without ``coefficient_blocks`` holds one block per
        module, so it is read as 1 (not the default 2)."""
        kwargs = super().check_kwargs(**kwargs)
        kwargs.setdefault("coefficient_blocks", 1)
        return kwargs
