"""RECAST layers: a frozen base weight plus a few coefficients over templates shared with sibling layers."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils.other import transpose
from torch import nn

from .config import RecastConfig

# Standard deviation of the coefficients when `init_weights=False`: each weight moves by about 20 % of its norm at the
# default coefficient_scale of 10 (enough to change the greedy generations of PEFT's tiny test models).
RANDOM_INIT_STD = 0.02


class RecastGroup:
    """The modules whose templates are built from one another's pretrained weights (one per adapter and group).

    A plain object, not an ``nn.Module``: it holds references to its member layers without adding entries to the
    model's ``state_dict`` or module tree.
    """

    def __init__(self, name: str, members: list[RecastLayer]) -> None:
        self.name = name
        self.members = members

    def basis(self) -> list[torch.Tensor]:
        """The members' pretrained weights ``W_1..W_m`` (untouched by any merge), which span the templates."""
        return [member.pristine_weight() for member in self.members]

    def __repr__(self) -> str:
        return f"RecastGroup({self.name!r}, {len(self.members)} modules)"


def block_runs(rows: int, num_blocks: int) -> list[tuple[int, int]]:
    """How ``rows`` output rows are cut into ``num_blocks`` contiguous blocks, as ``torch.tensor_split`` cuts them:
    ``(blocks, rows per block)`` runs, first ``rows % B`` blocks of ``ceil(rows / B)`` rows, then the rest of
    ``floor(rows / B)``. Blocks beyond ``rows`` get no rows: that happens only to a fused member (e.g. a GQA
    ``k_proj``) with fewer rows than the module whose coefficient tensor it shares."""
    size, larger = divmod(rows, num_blocks)
    return [(count, rows_each) for count, rows_each in ((larger, size + 1), (num_blocks - larger, size)) if count]


class BasisCombination(torch.autograd.Function):
    """``delta = sum_j mix[j, b] W_j`` on the output rows of block ``b``, one batched product per run of equal-sized
    blocks (one or two runs, :func:`block_runs`), keeping nothing for backward but references to the frozen basis.

    Shapes: ``mix`` ``(m, B)``; each basis weight ``W_j`` has the weight's shape, whose dimension ``axis`` (the output
    rows) is cut into ``B`` blocks; the result has the weight's shape and ``dtype``. Backward:
    ``d mix[j, b] = <grad restricted to block b, W_j restricted to block b>``.
    """

    @staticmethod
    def _runs(rows: torch.Tensor, num_blocks: int) -> list[tuple[int, torch.Tensor]]:
        """``rows`` (``(..., out, R)``, the output rows on dimension -2) -> ``(blocks, (..., blocks, rows x R))`` per
        run of equal blocks."""
        runs, start = [], 0
        for count, rows_each in block_runs(rows.shape[-2], num_blocks):
            part = rows[..., start:start + count * rows_each, :]
            runs.append((count, part.reshape(*part.shape[:-2], count, -1)))
            start += count * rows_each
        return runs

    @staticmethod
    def _stacked_rows(basis: tuple[torch.Tensor, ...], axis: int, dtype: torch.dtype) -> torch.Tensor:
        """``(m, out, R)``: the basis stacked, output rows moved to dimension 1, the other dimensions flattened."""
        stacked = torch.stack(basis).to(dtype).movedim(1 + axis, 1)
        return stacked.reshape(*stacked.shape[:2], -1)

    @staticmethod
    def forward(ctx, mix: torch.Tensor, axis: int, dtype: torch.dtype, *basis: torch.Tensor) -> torch.Tensor:
        ctx.axis, ctx.num_blocks = axis, mix.shape[1]
        ctx.save_for_backward(*basis)
        parts, first = [], 0
        for count, part in BasisCombination._runs(BasisCombination._stacked_rows(basis, axis, dtype), mix.shape[1]):
            parts.append(torch.einsum("mb,mbr->br", mix[:, first:first + count], part).reshape(-1))
            first += count
        moved_shape = list(basis[0].shape)
        moved_shape.insert(0, moved_shape.pop(axis))
        delta = parts[0] if len(parts) == 1 else torch.cat(parts)
        return delta.reshape(moved_shape).movedim(0, axis)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        basis = ctx.saved_tensors
        mix_grad = None
        if ctx.needs_input_grad[0]:
            stacked = BasisCombination._stacked_rows(basis, ctx.axis, grad.dtype)
            grad_rows = grad.movedim(ctx.axis, 0).reshape(stacked.shape[1:])
            grads = [
                torch.einsum("br,mbr->mb", grad_part, part)
                for (_, grad_part), (_, part) in zip(BasisCombination._runs(grad_rows, ctx.num_blocks),
                                                     BasisCombination._runs(stacked, ctx.num_blocks))
            ]
            mix_grad = grads[0] if len(grads) == 1 else torch.cat(grads, dim=1)
        return (mix_grad, None, None, *[None] * len(basis))


class RecastLayer(BaseTunerLayer):
    """Per-module RECAST state.

    For adapter ``a`` with coefficients ``theta`` (``K x n``) and group basis ``W_1..W_m`` (the group's pretrained
    weights), the update is

        delta_W = sum_j (mean_K(theta) @ R)_j W_j,   R = s ||W_self||_F / sqrt(n) * M   (``n x m``, ``recast_mixing``)

    where ``M`` maps the group's weights to its orthonormal templates (see :mod:`peft_recast.mimicry`) and ``s`` is
    ``coefficient_scale``, so that ``delta_W = s ||W_self||_F / sqrt(n) * sum_k mean_K(theta)_k T_k``. Templates are never materialised.
    """

    adapter_layer_names = ("recast_coefficients",)
    other_param_names = ("recast_mixing", "recast_group", "recast_replace", "recast_tie")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.recast_coefficients = nn.ParameterDict({})
        self.recast_mixing = BufferDict({}, persistent=False)
        self.recast_group: dict[str, RecastGroup] = {}
        # adapters in the paper's replacement form (delta_W = sum_k alpha_k T_k - W_pre)
        self.recast_replace: dict[str, bool] = {}
        # fused modules (config.fused_modules): the layer whose coefficient tensor this one shares
        self.recast_tie: dict[str, RecastLayer] = {}
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

    def update_layer(self, adapter_name: str, config: RecastConfig, inference_mode: bool = False) -> None:
        """Create the coefficients of ``adapter_name`` (``K x n``, or ``K x n x B`` with ``B > 1`` coefficient blocks,
        ``B`` at most the module's output rows); the model attaches its template group after injection."""
        blocks = min(config.coefficient_blocks, self.out_features)
        shape = (config.num_coefficient_sets, config.num_templates) + ((blocks,) if blocks > 1 else ())
        if config.init_weights:
            coefficients = torch.zeros(shape)
        else:
            coefficients = torch.randn(shape) * RANDOM_INIT_STD
        self.recast_coefficients[adapter_name] = nn.Parameter(coefficients)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def attach_group(
        self,
        adapter_name: str,
        group: RecastGroup,
        mixing: torch.Tensor,
        initial: Optional[torch.Tensor] = None,
        replace: bool = False,
    ) -> None:
        """Bind ``adapter_name`` to its template group; ``mixing`` is this layer's ``R`` (``n x m``, any float).

        ``initial`` (``K x n``) is added to the coefficients (the mimicked ``alpha_0`` of the replacement form);
        ``replace=True`` makes ``delta_W = sum_j (mean_K(theta) @ R)_j B_j - W_pre`` (``B`` = the group's basis).
        """
        coefficients = self.recast_coefficients[adapter_name]
        num_templates = mixing.shape[0]
        if coefficients.shape[1] != num_templates or initial is not None:
            # fewer templates than requested: the group is smaller than `num_templates` or rank deficient
            values = coefficients.data[:, :num_templates].clone()
            if initial is not None:
                values = values + initial.to(values).view(*initial.shape, *[1] * (values.dim() - initial.dim()))
            self.recast_coefficients[adapter_name] = nn.Parameter(values, requires_grad=coefficients.requires_grad)
        if replace:
            self.recast_replace[adapter_name] = True
        weight = self.pristine_weight()
        self.recast_mixing[adapter_name] = mixing.to(device=weight.device, dtype=torch.float32)
        self.recast_group[adapter_name] = group

    def tie_coefficients(self, adapter_name: str, owner: RecastLayer) -> None:
        """Share ``owner``'s coefficient tensor (one fused weight, e.g. q/k/v as the paper's ``qkv``)."""
        self.recast_tie[adapter_name] = owner
        parameter = owner.recast_coefficients[adapter_name]
        self.recast_coefficients[adapter_name] = parameter

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        super()._move_adapter_to_device_of_base_layer(adapter_name, device=device)
        owner = self.recast_tie.get(adapter_name)
        if owner is not None and adapter_name in owner.recast_coefficients:
            # loading with `assign=True` (low_cpu_mem_usage) gives every member its own tensor: share the owner's again
            self.recast_coefficients[adapter_name] = owner.recast_coefficients[adapter_name]

    def pristine_weight(self) -> torch.Tensor:
        """The base weight without any merged adapter (detached)."""
        if self._pristine_weight is not None:
            return self._pristine_weight
        return self.get_base_weight()

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``delta_W`` of ``adapter`` in the base weight's layout and dtype (float32 maths for half on CPU)."""
        basis = self.recast_group[adapter].basis()
        dtype, device = basis[0].dtype, basis[0].device
        compute_dtype = torch.float32 if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16) else dtype
        owner = self.recast_tie.get(adapter, self)
        theta = owner.recast_coefficients[adapter].float().mean(0)  # (n) or (n, B)
        # (m) or (m, B): the weight of each basis member W_j (per block of output rows)
        mix = torch.einsum("n...,nm->m...", theta, self.recast_mixing[adapter].float()).to(
            device=device, dtype=compute_dtype
        )
        axis = 1 if getattr(self, "fan_in_fan_out", False) else 0  # the output rows' axis of the stored weight
        delta = BasisCombination.apply(mix.reshape(len(basis), -1), axis, compute_dtype, *basis)
        if self.recast_replace.get(adapter, False):
            delta = delta - self.pristine_weight().to(compute_dtype)
        return delta.to(dtype)

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

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: RecastConfig,
        fan_in_fan_out: bool = False,
        **kwargs: Any,
    ) -> None:
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
        weight = self.get_base_layer().weight
        for adapter in adapters:
            weight = weight + self.get_delta_weight(adapter)
        return weight

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
                result = self._call_base(x, self._adapted_weight(adapters))
            else:
                result = self.base_layer(x, *args, **kwargs)
        return result.to(previous_dtype)

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        """Each sample goes through its own adapter (``"__base__"``: none); one matmul per distinct adapter."""
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
