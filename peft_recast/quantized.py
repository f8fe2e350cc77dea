"""RECAST on a bitsandbytes-quantized base: ``bnb.nn.Linear4bit`` (nf4, fp4) and ``bnb.nn.Linear8bitLt``.

The base weights stay quantized. A group's basis ``W_1..W_m`` (its members' pretrained weights) is dequantized when
it is needed, one layer (forward, backward, merge) or one group (mimicry, fingerprint) at a time, and never kept. For
a layer with quantized weight ``Q`` and the mix ``mix`` of each active adapter (``m x B``, see
:mod:`peft_recast.combination`):

    y = base(x) + x @ delta_W^T,     delta_W[r] = sum_j mix[j, block(r)] dequantize(Q_j)[r]     (delta_W: out x in)

where ``base(x)`` is the quantized layer's own output (its kernel and bias). ``theta = 0`` gives ``delta_W = 0``
exactly, so a new adapter starts as the quantized model itself. Training keeps only ``x`` and the mixes for backward
(:class:`QuantizedUpdate`) and dequantizes the basis again there, so a step holds no dequantized weight beyond the
layer being computed; without gradients nothing is cached either (each call dequantizes its ``m`` basis weights).

Merging dequantizes the layer's weight, adds ``delta_W`` and quantizes the sum again with the layer's own settings
(4-bit: block size, quant type, double quantization, storage; 8-bit: absmax per output row), as PEFT's LoRA does on
these layers: the merged layer differs from the unmerged one by one re-quantization of its weight. The pre-merge
quantized weight is kept (not copied), so siblings keep their templates and ``unmerge`` restores it bit for bit.
"""

from __future__ import annotations

import copy
import sys
import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from .combination import Operation, basis_grads, combine
from .config import RecastConfig
from .layer import Linear
from .spectrum import spectral_update

# The stored weight of a quantized layer: the parameter and, for 8-bit, its row scales (bitsandbytes moves them from
# the parameter into the layer's state at the first forward).
Stored = tuple[nn.Parameter, Optional[torch.Tensor]]
_LINEAR = Operation("linear")


def is_bnb_linear(layer: nn.Module) -> bool:
    """Whether ``layer`` is a bitsandbytes ``Linear4bit`` or ``Linear8bitLt`` (never imports bitsandbytes: a model
    cannot hold its layers unless it was imported)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def dequantize(param: nn.Parameter, scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The float weight (``out x in``) of a bitsandbytes parameter, as a new tensor.

    4-bit (``Params4bit``): ``code[q] * absmax`` per block of ``blocksize`` elements, in the dtype the weight was
    quantized from, whichever layout it is in (:func:`canonical_4bit`). 8-bit (``Int8Params``): ``q * scales[r] / 127``
    on output row ``r``, float32. A weight that bitsandbytes keeps in float (8-bit with ``has_fp16_weights``) is
    returned as it is (detached).
    """
    import bitsandbytes as bnb

    if isinstance(param, bnb.nn.Params4bit):
        return bnb.functional.dequantize_4bit(*canonical_4bit(param.data, param.quant_state))
    if param.dtype != torch.int8:
        return param.detach()
    return bnb.functional.int8_vectorwise_dequant(param.data, scales.to(param.device))


def dequantized_dtype(param: nn.Parameter) -> torch.dtype:
    """The dtype :func:`dequantize` returns for ``param``, without dequantizing it."""
    import bitsandbytes as bnb

    if isinstance(param, bnb.nn.Params4bit):
        return param.quant_state.dtype
    return torch.float32 if param.dtype == torch.int8 else param.dtype


def quantize_like(param: nn.Parameter, values: torch.Tensor) -> nn.Parameter:
    """``values`` (``out x in``, float) quantized with the settings of ``param``, as a new frozen parameter on
    ``param``'s device (bitsandbytes quantizes when a parameter leaves the CPU for a device, or stays on the CPU)."""
    import bitsandbytes as bnb

    values = values.detach().to("cpu")
    if isinstance(param, bnb.nn.Params4bit):
        new = bnb.nn.Params4bit(
            values, requires_grad=False, blocksize=param.blocksize, compress_statistics=param.compress_statistics,
            quant_type=param.quant_type, quant_storage=param.quant_storage, module=param.module,
        )  # fmt: skip
    else:
        new = bnb.nn.Int8Params(values, requires_grad=False, has_fp16_weights=param.has_fp16_weights)
    return new.to(param.device)


def install(layer: nn.Module, stored: Stored) -> None:
    """Make ``stored`` the weight of the bitsandbytes ``layer``; an 8-bit layer's state takes its row scales at the
    next forward."""
    param, scales = stored
    layer.weight = param
    state = getattr(layer, "state", None)
    if state is not None and param.dtype == torch.int8:
        state.reset_grads()
        param.CB = param.data
        if scales is not None:
            param.SCB = scales


def canonical_4bit(data: torch.Tensor, quant_state: Any) -> tuple[torch.Tensor, Any]:
    """A 4-bit weight (``data``, ``quant_state``) in the canonical layout that ``dequantize_4bit`` reads, with the
    block scales the weight computes with; the arguments are returned as they are unless bitsandbytes' CPU kernel
    repacked them, and never modified.

    The repacking (bitsandbytes 0.50, a CPU with AVX512-BF16, first eval call without gradients) moves the 4-bit codes
    into 32-row tiles and stores the block scales as a transposed bfloat16 matrix (double quantization expanded). Its
    own inverse puts the codes back but not the scales: without double quantization it leaves them transposed, so
    block ``b`` reads another block's scale (outputs off by 2.4e-2 on a tiny Llama); with it, it quantizes them again
    (about 3e-3, and another fingerprint). Here the codes come back bit for bit and the scales are the repacked ones in
    block order, in float32, unquantized (bfloat16 is exact in float32): the dequantized weight is the one the repacked
    kernel used, which differs from the weight before repacking by the bfloat16 rounding of its scales (relative
    ``2^-8`` at most), as bitsandbytes' two CPU paths do.
    """
    if not getattr(quant_state, "packing_format_for_cpu", False):
        return data, quant_state
    rows, cols = quant_state.shape
    tile = 32  # rows per tile, bitsandbytes' default `block_n`
    # 64 codes of a tile's 32 rows x columns (c, c+1), row-major: the first 32 in the low nibbles, the others high
    packed = data.view(torch.uint8).reshape(-1, tile)
    codes = torch.cat([packed & 0xF, packed >> 4], dim=1)
    codes = codes.reshape(rows // tile, cols // 2, tile, 2).transpose(1, 2).reshape(-1)  # row-major (rows x cols)
    canonical = ((codes[0::2] << 4) | codes[1::2]).reshape(quant_state.original_qshape)  # two codes a byte, high first
    storage = getattr(quant_state, "original_storage_type", None)
    state = copy.copy(quant_state)
    state.absmax = quant_state.absmax.T.reshape(-1).float()  # (cols / blocksize, rows) -> block order
    state.dtype, state.nested, state.state2, state.offset = quant_state.original_dtype, False, None, None
    state.packing_format_for_cpu = False
    return (canonical if storage is None else canonical.view(storage)), state


def keep_canonical_layout(layer: nn.Module) -> None:
    """Keep a 4-bit weight in the layout that :func:`dequantize` reads.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a ``Linear4bit`` weight for its CPU kernel at the first call
    in eval mode with an input that needs no gradient (:func:`canonical_4bit`). A repacked layer passes no input
    gradient, and the repacking would change the dequantized basis (and the fingerprint) between calls: put back a
    layer repacked before it was wrapped (the weight it was evaluated with, unpacked by :func:`canonical_4bit`) and
    switch the repacking off for this layer. The base output then takes bitsandbytes' generic CPU path, the one
    training takes.
    """
    weight = getattr(layer, "weight", None)
    quant_state = getattr(weight, "quant_state", None)
    if getattr(quant_state, "packing_format_for_cpu", False):
        weight.data, weight.quant_state = canonical_4bit(weight.data, quant_state)
        if getattr(layer, "quant_state", None) is quant_state:
            layer.quant_state = weight.quant_state
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False


class QuantizedBase:
    """``RecastModel``'s hook for bitsandbytes bases (a mixin before ``BaseTuner``).

    Before an adapter is injected, every ``Linear4bit`` of the model, targeted or not, gets
    :func:`keep_canonical_layout`: on a CPU with AVX512-BF16, bitsandbytes 0.50.2 computes no input gradient through
    a repacked layer (``gemv_4bit`` has no autograd kernel), so one evaluation under ``torch.no_grad`` would silently
    stop the coefficients below it from training.
    """

    def _prepare_model(self, peft_config: RecastConfig, model: nn.Module) -> None:
        for module in model.modules():
            if is_bnb_linear(module):
                keep_canonical_layout(module)
        super()._prepare_model(peft_config, model)


class QuantizedUpdate(torch.autograd.Function):
    """``x @ delta_W^T`` of one quantized layer's adapters, keeping for backward only ``x`` and the mixes.

    Call as ``QuantizedUpdate.apply(x, layer, adapters, terms, *mixes)`` with ``terms`` = ``(bases, blocks,
    subtract)`` of :meth:`~peft_recast.layer.RecastLayer._terms` (used in forward, not kept) and ``mixes[a]`` =
    ``mean_K(theta_a) @ R_a`` (``m_a x B_a``). Shapes: ``x`` ``(..., in)``, result ``(..., out)`` in ``x``'s dtype,
    computed in ``layer._compute_dtype`` (float32 for half precision on the CPU). Backward dequantizes the basis again
    and builds ``delta_W`` once: ``dx = dy @ delta_W``; ``d mix_a[j, b] = <dy^T x, W_aj>`` over the rows of block ``b``
    (:func:`~peft_recast.combination.basis_grads`).
    """

    @staticmethod
    def forward(ctx, x, layer, adapters, terms, *mixes):
        dtype = layer._compute_dtype(x.dtype, x.device)
        ctx.layer, ctx.adapters, ctx.dtype = layer, adapters, dtype
        ctx.save_for_backward(x, *mixes)
        delta = combine(None, mixes, *terms[:2], 0, dtype, terms[2])
        return _LINEAR(x.to(dtype), delta).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, *mixes = ctx.saved_tensors
        _, bases, blocks, subtract = ctx.layer._terms(ctx.adapters, x.device)
        grad, grad_x = grad.to(ctx.dtype), None
        if ctx.needs_input_grad[0]:
            delta = combine(None, mixes, bases, blocks, 0, ctx.dtype, subtract)
            grad_x = _LINEAR.input_grad(grad, x, delta).to(x.dtype)
        mix_grads = [None] * len(mixes)
        if any(ctx.needs_input_grad[4:]):
            grad_weight = _LINEAR.weight_grad(grad, x.to(ctx.dtype), None)  # (out, in)
            for a, mix in enumerate(mixes):
                if ctx.needs_input_grad[4 + a]:
                    mix_grads[a] = basis_grads(grad_weight, bases[a], blocks[a], mix.shape[1], 0).to(mix.dtype)
        return (grad_x, None, None, None, *mix_grads)


class QuantizedLinear(Linear):
    """RECAST around a bitsandbytes ``Linear4bit`` (nf4 or fp4, any compute dtype) or ``Linear8bitLt`` layer.

    Forward is the quantized layer's own output plus ``x @ delta_W^T`` (module docstring); ``pristine_weight`` is the
    dequantized pre-merge weight, so mimicry, fingerprints, ``get_delta_weight``, fidelity reports and template banks
    work as on a float base, from the weights the quantized model actually uses.

    Args:
        base_layer (`torch.nn.Module`): The bitsandbytes layer (or a tuner layer around it).
        adapter_name (`str`): The first adapter's name.
        config (`RecastConfig`): Its configuration.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: RecastConfig, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, config, fan_in_fan_out=False, **kwargs)
        self._pristine_quantized: Optional[Stored] = None  # the quantized weight before the first merge
        keep_canonical_layout(self.get_base_layer())

    def _current(self) -> Stored:
        layer = self.get_base_layer()
        scales = getattr(layer.weight, "SCB", None)
        if scales is None:
            scales = getattr(getattr(layer, "state", None), "SCB", None)
        return layer.weight, scales

    def _stored(self) -> Stored:
        """The quantized weight before any merge, with its 8-bit row scales."""
        return self._pristine_quantized if self._pristine_quantized is not None else self._current()

    def pristine_weight(self) -> torch.Tensor:
        """The base weight without any merged adapter, dequantized (``out x in``, a new tensor at every call)."""
        return dequantize(*self._stored())

    def weight_placement(self) -> tuple[torch.device, torch.dtype]:
        param = self._stored()[0]
        return param.device, dequantized_dtype(param)

    def weight_state(self) -> tuple[int, int]:
        param = self._stored()[0]
        return param.data_ptr(), param._version

    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    def _update(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        """``x @ sum_a delta_W_a^T`` (``(..., out)``, ``x``'s dtype); gradients reach the coefficients."""
        span = self._span_adapters(adapters)
        total = None
        if span:
            mixes, *terms = self._terms(span, x.device)
            total = QuantizedUpdate.apply(x, self, span, terms, *mixes)
        for adapter in adapters:
            if adapter not in span:
                update = spectral_update(self, x, adapter)
                total = update if total is None else total + update
        return total

    def _adapted_forward(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        result = self.base_layer(x)
        return result + self._update(x, adapters).to(result.dtype)

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        """The quantized layer's output for the whole batch, plus each sample's own adapter's update (none for
        ``"__base__"`` or an adapter this layer does not hold): one update per distinct adapter, on its samples."""
        result = self.base_layer(x, *args, **kwargs)
        for name in dict.fromkeys(adapter_names):
            if name in self.recast_coefficients:
                rows = torch.tensor([i for i, a in enumerate(adapter_names) if a == name], device=x.device)
                result = result.index_add(0, rows, self._update(x[rows], [name]).to(result.dtype))
        return result

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Dequantize the weight, add the adapters' ``delta_W`` (float32 for half precision on the CPU) and quantize the
        sum again with the layer's settings. The merged layer's outputs differ from the unmerged ones by that
        re-quantization (about one quantization step of the weight: large for 4-bit, see the tests)."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.recast_coefficients:
                continue
            current = self._current()
            weight = dequantize(*current)
            dtype = self._compute_dtype(weight.dtype, weight.device)
            merged = weight.to(dtype) + self.get_delta_weight(adapter).to(device=weight.device, dtype=dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            if self._pristine_quantized is None:
                self._pristine_quantized = current
            install(self.get_base_layer(), (quantize_like(current[0], merged.to(weight.dtype)), None))
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Put back the quantized weight from before the first merge (bit for bit)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        install(self.get_base_layer(), self._pristine_quantized)
        self._pristine_quantized = None
        self.merged_adapters.clear()
