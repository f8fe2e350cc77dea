"""RECAST layers: a frozen base weight plus a few coefficients over templates shared with sibling layers."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils.other import transpose
from torch import nn

from .cache import cached
from .combination import AdaptedCall, Operation, combine, row_blocks, shared_products, shared_products_pay
from .config import RecastConfig
from .gates import GatedLayer, GateState
from .spectrum import spectral_delta, spectral_update, spectrum_of, spectrum_update

if TYPE_CHECKING:
    from .group import RecastGroup

# Standard deviation of the coefficients when `init_weights=False`: each weight moves by about 20 % of its norm at the
# default coefficient_scale of 10 (enough to change the greedy generations of PEFT's tiny test models).
RANDOM_INIT_STD = 0.02


class RecastLayer(GatedLayer, BaseTunerLayer):
    """Per-module RECAST state.

    For adapter ``a`` with coefficients ``theta`` (``K x n x B``: sets, templates, blocks of output rows) and group
    basis ``W_1..W_m`` (the group's pretrained weights), the update is

        delta_W[rows of block b] = sum_j (R^T mean_K(theta)[:, b])_j W_j[rows of block b],
        R = s ||W_self||_F / sqrt(n) * M   (``n x m``, ``recast_mixing``)

    where ``M`` maps the group's weights to its orthonormal templates (see :mod:`peft_recast.mimicry`) and ``s`` is
    ``coefficient_scale``, so that ``delta_W = s ||W_self||_F / sqrt(n) * sum_k mean_K(theta)_k T_k``. Templates are
    never materialised: the maths is in :mod:`peft_recast.combination`.

    Without gradients (eval under ``torch.no_grad``, or coefficients that do not train) the adapted weight of the
    active adapters is cached and served again until any coefficient, mixing, base or basis tensor changes (their
    version counters are part of the key) or the active adapters change.
    """

    adapter_layer_names = ("recast_coefficients", "recast_gate_scores")
    other_param_names = (
        "recast_mixing", "recast_group", "recast_replace", "recast_tie", "recast_bound", "recast_channels",
        "recast_gate",
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.recast_coefficients = nn.ParameterDict({})
        # config.module_gates: the TAPS gate score ``g`` of each gated adapter, (1,)
        self.recast_gate_scores = nn.ParameterDict({})
        # per gated adapter: its threshold, penalty share, warm-up and forwards seen
        self.recast_gate: dict[str, GateState] = {}
        self.recast_mixing = BufferDict({}, persistent=False)
        self.recast_group: dict[str, RecastGroup] = {}
        # adapters in the paper's replacement form (delta_W = sum_k mean_K(theta)_k T_k - W_pre)
        self.recast_replace: dict[str, bool] = {}
        # fused modules (config.fused_modules): the layer whose coefficient tensor this one shares
        self.recast_tie: dict[str, RecastLayer] = {}
        # config.coefficient_bound of each adapter that has one
        self.recast_bound: dict[str, float] = {}
        # config.channels: the output rows of this module with coefficients of their own, per adapter
        self.recast_channels: dict[str, tuple[int, ...]] = {}
        # The base weight as it was before the first merge; siblings' templates and `unmerge` read it.
        self._pristine_weight: Optional[torch.Tensor] = None
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or out_features is None:
            raise TypeError(f"Unsupported layer type {type(self.get_base_layer())}")
        self.in_features = in_features
        self.out_features = out_features
        self.kwargs = kwargs
        self._row_blocks: dict[tuple, torch.Tensor] = {}
        self._weight_cache: Optional[tuple[tuple, torch.Tensor, torch.Tensor]] = None  # see peft_recast.cache
        self._mix_cache: Optional[tuple[tuple, torch.Tensor, torch.Tensor]] = None
        self._mixings: dict[tuple, torch.Tensor] = {}

    def update_layer(self, adapter_name: str, config: RecastConfig, inference_mode: bool = False) -> None:
        """Create the coefficients of ``adapter_name`` (``K x n x B``, ``B`` coefficient blocks, at most the module's
        output rows); the model attaches its template group after injection."""
        self.recast_coefficients[adapter_name] = nn.Parameter(self._new_coefficients(config))
        self._set_bound(adapter_name, config)
        self._set_gate(adapter_name, config, trainable=True)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _new_coefficients(self, config: RecastConfig) -> torch.Tensor:
        """Zeros (``init_weights``) or small random values, ``(K, n, B)``, float32 on the CPU."""
        shape = (config.num_coefficient_sets, config.num_templates, min(config.coefficient_blocks, self.out_features))
        return torch.zeros(shape) if config.init_weights else torch.randn(shape) * RANDOM_INIT_STD

    def _set_bound(self, adapter_name: str, config: RecastConfig) -> None:
        if config.coefficient_bound is not None:
            self.recast_bound[adapter_name] = float(config.coefficient_bound)

    def drop_coefficients(self, adapter_name: str) -> None:
        """Keep this module in the adapter's template group (its weight still spans the templates) without
        coefficients (``config.inactive_modules``)."""
        del self.recast_coefficients[adapter_name]
        self.recast_bound.pop(adapter_name, None)
        self.recast_channels.pop(adapter_name, None)
        self._weight_cache = self._mix_cache = None

    def add_adapter_like(self, adapter_name: str, template: str, config: RecastConfig, trainable: bool) -> None:
        """Add ``adapter_name`` on ``template``'s group, mixing and tie (same fit): no injection pass, no mimicry."""
        coefficients = self._new_coefficients(config)
        like = self.recast_coefficients.get(template, coefficients)  # an inactive module's, finish_gates drops them
        coefficients = coefficients.to(device=like.device, dtype=like.dtype)
        self.recast_coefficients[adapter_name] = nn.Parameter(coefficients, requires_grad=trainable)
        self._set_bound(adapter_name, config)
        self._set_gate(adapter_name, config, trainable)
        self.attach_group(adapter_name, self.recast_group[template], self.recast_mixing[template])
        owner = self.recast_tie.get(template)
        if owner is not None:
            self.tie_coefficients(adapter_name, owner)

    def attach_group(self, adapter_name: str, group: RecastGroup, mixing: torch.Tensor,
                     initial: Optional[torch.Tensor] = None, replace: bool = False) -> None:
        """Bind ``adapter_name`` to its template group; ``mixing`` is this layer's ``R`` (``n x m``, any float).

        ``initial`` (``K x n``) is added to every block's coefficients (the mimicked ``alpha_0`` of the replacement form);
        ``replace=True`` makes ``delta_W = sum_j (mean_K(theta) @ R)_j B_j - W_pre`` (``B`` = the group's basis).
        """
        coefficients = self.recast_coefficients[adapter_name]
        num_templates = mixing.shape[0]
        if coefficients.shape[1] != num_templates or initial is not None:
            # fewer templates than requested: the group is smaller than `num_templates` or rank deficient
            values = coefficients.data[:, :num_templates].clone()
            if initial is not None:
                values = values + initial.to(values).unsqueeze(-1)
            self.recast_coefficients[adapter_name] = nn.Parameter(values, requires_grad=coefficients.requires_grad)
        if replace:
            self.recast_replace[adapter_name] = True
        mixing = mixing.to(device=self.weight_placement()[0], dtype=torch.float32)
        # adapters of one grouping get equal mixings: keep one tensor for all of them
        self.recast_mixing[adapter_name] = self._mixings.setdefault((mixing.shape, *mixing.flatten().tolist()), mixing)
        self.recast_group[adapter_name] = group

    def add_channels(self, adapter_name: str, rows: list[int]) -> None:
        """Give each of ``rows`` (output rows, ``config.channels``) ``K x n`` coefficients of its own: the coefficient
        tensor grows from ``(K, n, B)`` to ``(K, n, B + c)``, each new entry starting as a copy of its
        row's block, so that the layer computes exactly what it did before (the identity stays the identity)."""
        if not rows:
            return
        coefficients = self.recast_coefficients[adapter_name]
        values = coefficients.data
        of_rows = row_blocks(self.out_features, values.shape[-1], values.device)[list(rows)]
        values = torch.cat([values, values[..., of_rows]], dim=-1)
        self.recast_coefficients[adapter_name] = nn.Parameter(values, requires_grad=coefficients.requires_grad)
        self.recast_channels[adapter_name] = tuple(rows)

    def tie_coefficients(self, adapter_name: str, owner: RecastLayer) -> None:
        """Share ``owner``'s coefficient tensor (one fused weight, e.g. q/k/v as the paper's ``qkv``, or
        ``coefficient_sharing="position"``)."""
        if owner.recast_coefficients[adapter_name].shape[1] < self.recast_mixing[adapter_name].shape[0]:
            raise ValueError(
                f"Cannot share the coefficients of a group with {owner.recast_coefficients[adapter_name].shape[1]} "
                f"template(s) with one of {self.recast_mixing[adapter_name].shape[0]}: with "
                "coefficient_sharing='position' the first group of a role must have the most templates. Use "
                "layers_per_group that divides the number of layers, or coefficient_sharing='module'."
            )
        self.recast_tie[adapter_name] = owner
        self.recast_coefficients[adapter_name] = owner.recast_coefficients[adapter_name]

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        super()._move_adapter_to_device_of_base_layer(adapter_name, device=device)
        owner = self.recast_tie.get(adapter_name)
        if owner is not None and adapter_name in owner.recast_coefficients:
            # loading with `assign=True` (low_cpu_mem_usage) gives every member its own tensor: share the owner's again
            self.recast_coefficients[adapter_name] = owner.recast_coefficients[adapter_name]

    def pristine_weight(self) -> torch.Tensor:
        """The base weight without any merged adapter (detached; sharing the parameter's version counter, so that an
        in-place change of the weight is seen by the weight cache)."""
        if self._pristine_weight is not None:
            return self._pristine_weight
        if self.quantization_backend is not None:
            return self.get_base_weight()
        return self.get_base_layer().weight.detach()

    def weight_placement(self) -> tuple[torch.device, torch.dtype]:
        """The device and dtype of :meth:`pristine_weight`, read without dequantizing a quantized weight."""
        plain = self._pristine_weight is None and self.quantization_backend is None
        weight = self.get_base_layer().weight if plain else self.pristine_weight()
        return weight.device, weight.dtype

    def weight_state(self) -> tuple[int, int]:
        """The pristine weight's storage and version counter: a key that changes when the weight does."""
        weight = self.pristine_weight()
        return weight.data_ptr(), weight._version

    def weight_shape(self) -> tuple[int, ...]:
        """The base weight's shape in its stored layout (a quantized layer reports its unpacked shape)."""
        return tuple(self.get_base_layer().weight.shape)

    def _blocks(self, adapter: str, num_blocks: int, device: torch.device) -> torch.Tensor:
        """The block of every output row (:func:`~peft_recast.combination.row_blocks` of the ``num_blocks - c``
        blocks; the ``i``-th of the adapter's ``c`` channels is block ``num_blocks - c + i``), computed once."""
        channels = self.recast_channels.get(adapter, ())
        key = (num_blocks, device, channels)
        if key not in self._row_blocks:
            with torch.inference_mode(False):  # kept for later calls, with gradients too: never an inference tensor
                blocks = row_blocks(self.out_features, num_blocks - len(channels), device)
                if channels:
                    first = num_blocks - len(channels)
                    blocks[list(channels)] = torch.arange(first, num_blocks, device=device)
                self._row_blocks[key] = blocks
        return self._row_blocks[key]

    def _mix(self, adapter: str) -> torch.Tensor:
        """``mean_K(theta) @ R`` (``b tanh(mean_K(theta) / b) @ R`` with a coefficient bound ``b``): the weight of each
        basis member per block of output rows, ``(m, B)`` float32."""
        owner = self.recast_tie.get(adapter, self)
        mixing = self.recast_mixing[adapter]
        # (n, B); coefficients shared with a group of more templates: their first n
        theta = owner.recast_coefficients[adapter].float().mean(0)[: mixing.shape[0]]
        bound = self.recast_bound.get(adapter)
        if bound is not None:
            theta = bound * torch.tanh(theta / bound)
        mix = torch.einsum("nb,nm->mb", theta, mixing.float())
        if adapter in self.recast_gate_scores:
            mix = mix * self._gate(adapter)
        return mix

    def _terms(self, adapters: list[str], device: torch.device) -> tuple[list, list, list, list]:
        """Per adapter: its mix (on ``device``), basis, row blocks and the weight it subtracts (replacement form)."""
        mixes, bases, blocks, subtract = [], [], [], []
        for adapter in adapters:
            mix = self._mix(adapter).to(device)
            mixes.append(mix)
            bases.append(self.recast_group[adapter].basis())
            blocks.append(self._blocks(adapter, mix.shape[1], device))
            subtract.append(self.pristine_weight() if self.recast_replace.get(adapter, False) else None)
        return mixes, bases, blocks, subtract

    @property
    def output_axis(self) -> int:
        """The axis of the stored weight that indexes output rows: 1 for a ``fan_in_fan_out`` (``Conv1D``) layout."""
        return 1 if getattr(self, "fan_in_fan_out", False) else 0

    def _compute_dtype(self, dtype: torch.dtype, device: torch.device) -> torch.dtype:
        """float32 maths for half-precision weights on the CPU, else the weights' own dtype."""
        return torch.float32 if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16) else dtype

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``delta_W`` of ``adapter`` in the base weight's layout and dtype (float32 maths for half on CPU)."""
        device, weight_dtype = self.weight_placement()
        dtype = self._compute_dtype(weight_dtype, device)
        if spectrum_of(self, adapter) is not None:
            return spectral_delta(self, adapter, device, dtype).to(weight_dtype)
        mixes, bases, blocks, subtract = self._terms([adapter], device)
        return combine(None, mixes, bases, blocks, self.output_axis, dtype, subtract).to(weight_dtype)

    def _span_adapters(self, adapters: list[str]) -> list[str]:
        """Those of ``adapters`` whose templates span a group's weights (not ``own_spectrum``)."""
        return [adapter for adapter in adapters if spectrum_of(self, adapter) is None]

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """RECAST is additive (``W + delta_W``), so ``peft.convert_to_lora`` can factor ``get_delta_weight`` by SVD;
        PEFT 0.21 does this for 2-d weights only (``Linear``, ``Conv1D``), not for convolution kernels."""
        return self.get_base_layer().weight.ndim == 2

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the active (or given) adapters' ``delta_W`` to the base weight.

        The pre-merge weight tensor is kept (not copied: the merged weight is a new tensor), so that siblings keep
        their templates and ``unmerge`` restores the base weight bit for bit.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.recast_coefficients:
                continue
            weight = self.get_base_weight()
            merged = weight + self.get_delta_weight(adapter)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            if self._pristine_weight is None:
                self._pristine_weight = weight
            self.set_base_weight(merged)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Restore the base weight as it was before the first merge."""
        if not self.merged:
            if any(name in self.recast_coefficients for name in self.active_adapters):
                # (a module an adapter keeps inactive had nothing to merge: no warning there)
                warnings.warn("Already unmerged. Nothing to do.")
            return
        current = self.get_base_weight()
        self.set_base_weight(self._pristine_weight.to(current.device))
        self._pristine_weight = None
        self.merged_adapters.clear()

    def _check_forward_args(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is None:
            return
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )


class Linear(nn.Module, RecastLayer):
    """RECAST around ``torch.nn.Linear`` or transformers' ``Conv1D`` (weight stored ``(in, out)``)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: RecastConfig, fan_in_fan_out: bool = False,
                 **kwargs: Any) -> None:
        super().__init__()
        RecastLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def _call_base(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's computation with ``weight`` (stored layout) in place of its own: one matmul."""
        x = self._cast_input_dtype(x, weight.dtype)
        return F.linear(x, transpose(weight, self.fan_in_fan_out), self.get_base_layer().bias)

    def _adapted_weight(self, adapters: list[str]) -> torch.Tensor:
        """``W + sum_a delta_W_a`` of ``adapters`` in the base weight's dtype (autograd flows to the coefficients)."""
        weight = self.get_base_layer().weight
        mixes, bases, blocks, subtract = self._terms(self._span_adapters(adapters), weight.device)
        dtype = self._compute_dtype(weight.dtype, weight.device)
        adapted = combine(weight, mixes, bases, blocks, self.output_axis, dtype, subtract)
        for adapter in adapters:
            if spectrum_of(self, adapter) is not None:
                adapted = adapted + spectral_delta(self, adapter, weight.device, dtype)
        return adapted.to(weight.dtype)

    def _cached_weight(self, adapters: list[str]) -> torch.Tensor:
        """The adapted weight of ``adapters``, rebuilt only when something it depends on changed
        (:func:`~peft_recast.cache.cached`)."""
        if torch.compiler.is_compiling():
            return self._adapted_weight(adapters)
        weight = self.get_base_layer().weight
        return cached(self, "_weight_cache", adapters, lambda: self._adapted_weight(adapters), weight.device)

    def _stacked_mixes(self, adapters: list[str], device: torch.device) -> torch.Tensor:
        """The mixes (:meth:`_mix`) of ``adapters`` stacked, then a zero mix for rows of no adapter, ``(A + 1, m, B)``
        on ``device``; cached while the coefficients do not train."""

        def build() -> torch.Tensor:
            stacked = torch.stack([self._mix(adapter).to(device) for adapter in adapters])
            return torch.cat([stacked, stacked.new_zeros(1, *stacked.shape[1:])])

        if self._trains(adapters) or torch.compiler.is_compiling():
            return build()
        return cached(self, "_mix_cache", adapters, build, device, basis=False)

    def _trains(self, adapters: list[str]) -> bool:
        """Whether this call must carry gradients to the coefficients of ``adapters``."""
        return torch.is_grad_enabled() and any(
            self.recast_tie.get(a, self).recast_coefficients[a].requires_grad
            or (a in self.recast_gate_scores and self.recast_gate_scores[a].requires_grad)
            for a in adapters
        )

    def _adapted_forward(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        """The base computation with the adapted weight of ``adapters``: cached without gradients; in training
        through :class:`~peft_recast.combination.AdaptedCall` (nothing but ``x`` and the mixes kept for backward)."""
        if not self._trains(adapters):
            return self._call_base(x, self._cached_weight(adapters))
        base_layer = self.get_base_layer()
        operation = Operation.of(base_layer, self.fan_in_fan_out)
        span = self._span_adapters(adapters)
        if operation is None or (len(span) < len(adapters) and operation.kind != "linear"):
            # a convolution with reflect padding, or own_spectrum on a convolution: autograd through the weight
            return self._call_base(x, self._adapted_weight(adapters))
        if len(span) < len(adapters):  # own_spectrum: the base (and span) output plus a low-rank update
            result = self._adapted_forward(x, span) if span else self.base_layer(x)
            for adapter in adapters:
                if adapter not in span:
                    result = result + spectral_update(self, x, adapter).to(result.dtype)
            return result
        weight = base_layer.weight
        x = self._cast_input_dtype(x, weight.dtype)
        mixes, bases, blocks, subtract = self._terms(adapters, weight.device)
        layout = tuple((len(basis), cut is not None) for basis, cut in zip(bases, subtract))
        flat = [t for basis, cut in zip(bases, subtract) for t in (*basis, *([cut] if cut is not None else []))]
        dtype = self._compute_dtype(weight.dtype, weight.device)
        return AdaptedCall.apply(x, weight, base_layer.bias, operation, layout, dtype, *mixes, *blocks, *flat)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        previous_dtype = x.dtype
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            result = self.base_layer(x, *args, **kwargs)
        elif adapter_names is not None:
            result = self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        elif self.merged:
            result = self.base_layer(x, *args, **kwargs)
        else:
            adapters = [name for name in self.active_adapters if name in self.recast_coefficients]
            if adapters:
                result = self._adapted_forward(x, adapters)
            else:
                result = self.base_layer(x, *args, **kwargs)
        return result.to(previous_dtype)

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
                             ) -> torch.Tensor:
        """Each sample goes through its own adapter (``"__base__"``, or an adapter this layer does not hold: none).

        When the adapters share one group basis and :meth:`_prefers_shared_products` says so, the whole batch takes
        ``m`` shared products (:func:`~peft_recast.combination.shared_products`); else one weight is rebuilt and one
        product taken per distinct adapter.
        """
        distinct = [name for name in dict.fromkeys(adapter_names) if name in self.recast_coefficients]
        weight = self.get_base_layer().weight
        operation = Operation.of(self.get_base_layer(), self.fan_in_fan_out)
        span = self._span_adapters(distinct)
        if distinct and not span and operation is not None and operation.kind == "linear":
            result = self.base_layer(x, *args, **kwargs)
            return result + spectrum_update(self, x, adapter_names, distinct).to(result.dtype)
        # own_spectrum beside group-span adapters, or on a convolution: one weight per adapter
        groups = {id(group): group for group in (self.recast_group[name] for name in span)}
        bases = {tuple(member.data_ptr() for member in group.basis()) for group in groups.values()}
        one_basis = len(span) == len(distinct) and operation is not None and len(bases) == 1
        if one_basis and self._prefers_shared_products(distinct, x, operation):
            x = self._cast_input_dtype(x, weight.dtype)
            index = {name: i for i, name in enumerate(distinct)}
            stacked = self._stacked_mixes(distinct, weight.device)  # (A + 1, m, B), last: no adapter
            basis = next(iter(groups.values())).basis()
            samples = torch.tensor([index.get(name, len(distinct)) for name in adapter_names], device=x.device)
            keep = torch.tensor([0.0 if self.recast_replace.get(name, False) else 1.0 for name in adapter_names],
                                device=x.device)
            return shared_products(x, operation, weight, self.get_base_layer().bias, basis, stacked[samples], keep)
        result = None
        for name in dict.fromkeys(adapter_names):
            rows = [i for i, sample_adapter in enumerate(adapter_names) if sample_adapter == name]
            if name in self.recast_coefficients:
                out = self._call_base(x[rows], self._adapted_weight([name]))
            else:
                out = self.base_layer(x[rows], *args, **kwargs)
            if result is None:
                result = out.new_empty((len(adapter_names), *out.shape[1:]))
            result[rows] = out.to(result.dtype)
        return result

    def _prefers_shared_products(self, adapters: list[str], x: torch.Tensor, operation: Operation) -> bool:
        """Whether ``m`` shared products cost less than rebuilding one weight and taking one product per adapter
        (half-precision weights on the CPU always rebuild: there the rebuilt weight is summed in float32, which the
        shared products in half precision would not reproduce).

        The cost rule is :func:`~peft_recast.combination.shared_products_pay` (``m`` counts the base weight when it is
        not a basis member).
        """
        if any(adapter in self.recast_channels for adapter in adapters):
            return False  # the shared products cut the rows into contiguous blocks; channels are single rows
        basis = self.recast_group[adapters[0]].basis()
        weight = self.get_base_layer().weight
        if self._compute_dtype(weight.dtype, weight.device) != weight.dtype:
            return False  # half precision on the CPU: the rebuilt weight's float32 sums give each adapter's own outputs
        members = len(basis) + (0 if any(member.data_ptr() == weight.data_ptr() for member in basis) else 1)
        tokens = x.numel() // x.shape[1 if operation.kind == "conv2d" else -1]
        return shared_products_pay(len(adapters), members, tokens)

    def __repr__(self) -> str:
        return "recast." + super().__repr__()


class Conv2d(Linear):
    """RECAST around ``torch.nn.Conv2d`` (weight ``(out, in / groups, kh, kw)``, templates of the same shape).

    Forward, mixed batches, merging and saving are :class:`Linear`'s; only the base computation differs: one
    ``conv2d`` with the adapted weight and the base layer's stride, padding, dilation, groups and bias.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: RecastConfig, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, config, fan_in_fan_out=False, **kwargs)

    def _call_base(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base_layer = self.get_base_layer()
        x = self._cast_input_dtype(x, weight.dtype)
        return base_layer._conv_forward(x, weight, base_layer.bias)
