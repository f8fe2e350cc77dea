"""The maths of a RECAST layer: its weight as a combination of its group's basis, and the products that use it.

For one adapter, a layer with base weight ``W`` (stored layout, output rows on dimension ``axis``) and a group basis
``W_1..W_m`` (the group's pretrained weights, or a bank's templates) has the mix ``mix`` (``m x B``, one column per
block of output rows) and

    W_adapted = W + sum_j mix[j, block(r)] W_j[r]         on every output row r   (- W_pre in the replacement form)

Three ways to use it, all exact:

* :func:`combine`: build ``W_adapted`` (merging, caching, ``get_delta_weight``), ``m`` multiply-adds over the weight;
* :class:`AdaptedCall`: ``y = f(x, W_adapted)`` for training, keeping only ``x`` and the mixes for backward (the
  adapted weight is rebuilt there, so training holds no extra weight per layer);
* :func:`shared_products`: a batch whose rows use different adapters, ``y_n = f(x_n, W) + sum_j mix_n[j] * f(x_n,
  W_j)``: ``m`` products shared by every adapter in the batch, whatever their number.

``f`` is the base layer's computation without bias: ``F.linear`` (``Linear``, and transformers' ``Conv1D`` with its
``(in, out)`` weight) or ``conv2d`` (``Conv2d``), described by an :class:`Operation`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def block_runs(rows: int, num_blocks: int) -> list[tuple[int, int]]:
    """How ``rows`` output rows are cut into ``num_blocks`` contiguous blocks, as ``torch.tensor_split`` cuts them:
    ``(blocks, rows per block)`` runs, first ``rows % B`` blocks of ``ceil(rows / B)`` rows, then the rest of
    ``floor(rows / B)``. Blocks beyond ``rows`` get no rows: that happens only to a fused member (e.g. a GQA
    ``k_proj``) with fewer rows than the module whose coefficient tensor it shares."""
    size, larger = divmod(rows, num_blocks)
    return [(count, rows_each) for count, rows_each in ((larger, size + 1), (num_blocks - larger, size)) if count]


def row_blocks(rows: int, num_blocks: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """The block of every output row, ``(rows,)`` int64, as :func:`block_runs` cuts them."""
    sizes = [rows_each for count, rows_each in block_runs(rows, num_blocks) for _ in range(count)]
    return torch.tensor([block for block, size in enumerate(sizes) for _ in range(size)], device=device)


@dataclass(frozen=True)
class Operation:
    """The base layer's computation ``f(x, weight)`` without bias, and the layout of its weight.

    ``kind`` is ``"linear"`` (weight ``(out, in)``, or ``(in, out)`` when ``fan_in_fan_out``) or ``"conv2d"``
    (weight ``(out, in / groups, kh, kw)``, zero padding); ``axis`` is the output rows' dimension of the stored weight.
    """

    kind: str
    fan_in_fan_out: bool = False
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1

    @staticmethod
    def of(layer: nn.Module, fan_in_fan_out: bool = False) -> Optional["Operation"]:
        """The operation of ``layer`` (a ``Linear``, ``Conv1D`` or ``Conv2d``); ``None`` for a convolution whose
        padding mode is not zeros (it keeps the plain autograd path)."""
        if isinstance(layer, nn.Conv2d):
            if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                return None
            return Operation("conv2d", False, tuple(layer.stride), tuple(layer.padding), tuple(layer.dilation),
                             layer.groups)
        return Operation("linear", fan_in_fan_out)

    @property
    def axis(self) -> int:
        return 1 if self.fan_in_fan_out else 0

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.kind == "conv2d":
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return F.linear(x, weight.T if self.fan_in_fan_out else weight, bias)

    def output_view(self, values: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """``values`` ``(batch, out)`` (either may be 1) shaped to scale ``output`` per sample and output channel."""
        if self.kind == "conv2d":
            return values.view(*values.shape, *[1] * (output.dim() - 2))
        return values.view(values.shape[0], *[1] * (output.dim() - 2), values.shape[1])

    def input_grad(self, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv2d":
            return torch.nn.grad.conv2d_input(x.shape, weight, grad, self.stride, self.padding, self.dilation,
                                              self.groups)
        return grad @ (weight.T if self.fan_in_fan_out else weight)

    def weight_grad(self, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The gradient of the stored weight: ``grad^T x`` summed over every sample and position."""
        if self.kind == "conv2d":
            return torch.nn.grad.conv2d_weight(x, weight.shape, grad, self.stride, self.padding, self.dilation,
                                               self.groups)
        rows = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1])  # (out, in)
        return rows.T if self.fan_in_fan_out else rows


def _scales(mix: torch.Tensor, blocks: torch.Tensor, weight: torch.Tensor, axis: int) -> torch.Tensor:
    """``mix`` ``(B,)`` as a factor per output row of ``weight``, shaped to broadcast along ``axis``."""
    shape = [1] * weight.dim()
    shape[axis] = weight.shape[axis]
    return mix[blocks].view(shape)


def combine(
    weight: Optional[torch.Tensor],
    mixes: Sequence[torch.Tensor],
    bases: Sequence[Sequence[torch.Tensor]],
    blocks: Sequence[torch.Tensor],
    axis: int,
    dtype: torch.dtype,
    subtract: Sequence[Optional[torch.Tensor]] = (),
) -> torch.Tensor:
    """``weight + sum_a (sum_j mix_a[j, block(r)] W_aj[r] - subtract_a)`` in ``dtype`` (``weight`` ``None``: the sum).

    Shapes: ``mix_a`` ``(m_a, B_a)``; each ``W_aj`` and ``subtract_a`` have the weight's shape; ``blocks[a]`` is
    :func:`row_blocks` of the weight's rows for ``B_a`` blocks. No basis is copied or stacked.
    """
    total = None if weight is None else weight.to(dtype)
    for a, (mix, basis) in enumerate(zip(mixes, bases)):
        mix = mix.to(dtype)
        for j, member in enumerate(basis):
            term = member.to(dtype) * _scales(mix[j], blocks[a], member, axis)
            total = term if total is None else total + term
        if a < len(subtract) and subtract[a] is not None:
            total = total - subtract[a].to(dtype)
    return total


def basis_grads(grad: torch.Tensor, basis: Sequence[torch.Tensor], blocks: torch.Tensor, num_blocks: int,
                axis: int) -> torch.Tensor:
    """``d mix[j, b] = <grad restricted to block b, W_j restricted to block b>``, ``(m, B)`` float32."""
    other = [d for d in range(grad.dim()) if d != axis]
    result = torch.zeros(len(basis), num_blocks, dtype=torch.float32, device=grad.device)
    for j, member in enumerate(basis):
        per_row = (grad * member.to(grad.dtype)).sum(dim=other).float()  # (rows,)
        result[j].index_add_(0, blocks, per_row)
    return result


class AdaptedCall(torch.autograd.Function):
    """``y = f(x, combine(weight, mixes, bases) , bias)``, keeping for backward only ``x``, the mixes and references
    to the frozen tensors; the adapted weight is rebuilt in backward (``m`` multiply-adds), so a training step holds
    no extra weight per layer.

    Call as ``AdaptedCall.apply(x, weight, bias, operation, layout, dtype, *mixes, *blocks, *flat)`` where ``layout``
    is ``((m_1, subtracts_1), ..., (m_A, subtracts_A))``, ``flat`` holds each adapter's ``m_a`` basis tensors followed
    by its tensor to subtract when ``subtracts_a``, and ``dtype`` is the one the weight is combined in (then cast to
    ``x``'s). Backward: ``dx = f^T(dy, W_adapted)``, ``dW = dy^T x`` and
    ``d mix_a`` from :func:`basis_grads`; ``d bias = sum(dy)``.
    """

    @staticmethod
    def _unpack(layout, tensors):
        count = len(layout)
        mixes, blocks, rest = tensors[:count], tensors[count: 2 * count], list(tensors[2 * count:])
        bases, subtract = [], []
        for m, subtracts in layout:
            bases.append(rest[:m])
            subtract.append(rest[m] if subtracts else None)
            rest = rest[m + int(subtracts):]
        return mixes, blocks, bases, subtract

    @staticmethod
    def forward(ctx, x, weight, bias, operation, layout, dtype, *tensors):
        mixes, blocks, bases, subtract = AdaptedCall._unpack(layout, tensors)
        adapted = combine(weight, mixes, bases, blocks, operation.axis, dtype, subtract).to(x.dtype)
        ctx.operation, ctx.layout, ctx.dtype, ctx.has_bias = operation, layout, dtype, bias is not None
        ctx.save_for_backward(x, weight, *tensors)
        return operation(x, adapted, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        x, weight, *tensors = ctx.saved_tensors
        operation, layout = ctx.operation, ctx.layout
        mixes, blocks, bases, subtract = AdaptedCall._unpack(layout, tensors)
        grad_x = grad_bias = None
        mix_grads = [None] * len(mixes)
        if ctx.needs_input_grad[0]:
            adapted = combine(weight, mixes, bases, blocks, operation.axis, ctx.dtype, subtract).to(grad.dtype)
            grad_x = operation.input_grad(grad, x, adapted)
        wanted = [ctx.needs_input_grad[6 + a] for a in range(len(mixes))]
        if any(wanted):
            grad_weight = operation.weight_grad(grad, x, weight)
            for a, needed in enumerate(wanted):
                if needed:
                    mix_grads[a] = basis_grads(grad_weight, bases[a], blocks[a], mixes[a].shape[1],
                                               operation.axis).to(mixes[a].dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            channel = 1 if operation.kind == "conv2d" else grad.dim() - 1
            grad_bias = grad.sum(dim=[d for d in range(grad.dim()) if d != channel])
        return (grad_x, None, grad_bias, None, None, None, *mix_grads, *[None] * (len(tensors) - len(mixes)))


def block_slices(rows: int, num_blocks: int) -> list[slice]:
    """The output rows of each block, as contiguous slices (:func:`block_runs`; empty blocks left out)."""
    slices, start = [], 0
    for count, rows_each in block_runs(rows, num_blocks):
        for _ in range(count if rows_each else 0):
            slices.append(slice(start, start + rows_each))
            start += rows_each
    return slices


# A mixed batch rebuilds one weight per adapter (about this many tokens' worth of product per basis member, measured
# on MiniLM-L6's 384 x 384 query/value on a 2-core CPU: the crossover falls at 2, ~40 and ~650 adapters for batches
# of 64, 2,048 and 32,768 tokens) or takes the group's shared products.
REBUILD_TOKENS_PER_MEMBER = 25


def shared_products_pay(adapters: int, members: int, tokens: int) -> bool:
    """Whether :func:`shared_products` over a batch of ``tokens`` tokens (``members - 1`` products more than one
    plain product) cost less than rebuilding one weight per adapter (``REBUILD_TOKENS_PER_MEMBER * members`` tokens'
    worth of product each, measured with ``benchmarks/mixed_batch_rule.py``)."""
    return adapters * REBUILD_TOKENS_PER_MEMBER * members >= (members - 1) * tokens


def shared_products(
    x: torch.Tensor,
    operation: Operation,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    basis: Sequence[torch.Tensor],
    sample_mix: torch.Tensor,
    keep_base: torch.Tensor,
) -> torch.Tensor:
    """``keep_base[n] f(x_n, W) + bias + sum_j sample_mix[n, j, b] f(x_n, W_j)`` (on the rows of block ``b``) for a batch
    whose samples use different adapters over one group basis: ``m`` products shared by the whole batch, whatever
    the number of adapters (``m + 1`` when ``W`` itself is not a basis member, as with a template bank).

    Each sample's factor scales its input (``f`` is linear in ``x``), so that for every block the ``m`` products
    accumulate into one output: ``y_b = sum_j f(c_jb * x, W_j[rows of b])``, no pass over the output per member.

    Shapes: ``x`` ``(N, ...)``; ``sample_mix`` ``(N, m, B)``, zero for samples without an adapter; ``keep_base``
    ``(N,)``: 0 for samples whose adapter replaces the weight (the replacement form), else 1.
    """
    dtype = x.dtype
    factors = sample_mix.to(dtype)
    members = list(basis)
    own = next((j for j, member in enumerate(members) if member.data_ptr() == weight.data_ptr()), None)
    if own is None:  # the base product is one more member, with the factor keep_base in every block
        members.append(weight)
        factors = torch.cat([factors, keep_base.to(dtype)[:, None, None].expand(-1, 1, factors.shape[2])], dim=1)
    else:  # f(x, W) is one of the shared products: fold the base output into its factor
        factors = factors.clone()
        factors[:, own] += keep_base.to(dtype)[:, None]
    rows = weight.shape[operation.axis]
    scale_shape = (len(x), *[1] * (x.dim() - 1))
    parts = []
    for b, block in enumerate(block_slices(rows, factors.shape[2])):
        total = None
        for j, member in enumerate(members):
            part = member.narrow(operation.axis, block.start, block.stop - block.start).to(dtype)
            scaled = x * factors[:, j, b].view(scale_shape)
            if total is None:
                total = operation(scaled, part)
            elif operation.kind == "linear":  # accumulate in place: one GEMM that adds to the block's output
                flat = total.view(-1, total.shape[-1])
                flat.addmm_(scaled.reshape(-1, scaled.shape[-1]), part if operation.fan_in_fan_out else part.T)
            else:
                total += operation(scaled, part)
        parts.append(total)
    result = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1 if operation.kind == "conv2d" else -1)
    if bias is not None:
        result = result + operation.output_view(bias.to(dtype)[None], result)
    return result
