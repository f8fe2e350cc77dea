"""Output rows with coefficients of their own (``RecastConfig.channels``): ranking them on the user's data by
first-order Taylor importance, and attaching them to an adapter's layers.

The importance of output row ``r`` of a module with output ``y`` (the two-stage PETL paper, Zhao et al.,
arXiv 2303.07910) is the first-order change of the loss when the channel is switched off, summed over batches:

    I_r = sum_batches | sum_{tokens t} y[t, r] * dL/dy[t, r] |

"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .planning import attach_channels, peft_model_layers


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    outputs = model(**batch)
    loss = getattr(outputs, "loss", None)
    if loss is None:
        raise ValueError(
            "rank_channels could not find a loss: the model's outputs have no `loss` (pass `labels` in each batch) "
            "and no `loss_fn` was given; pass loss_fn=lambda model, batch: ... returning a scalar loss."
        )
    return loss


def channel_importance(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
    adapter_name: Optional[str] = None,
) -> dict[str, torch.Tensor]:
    """The Taylor importance ``I_r`` (module docstring) of every output row of every RECAST module of ``adapter_name``.

    Args:
        model (`torch.nn.Module`): A PEFT model holding a RECAST adapter; its modules define what is ranked.
        batches (`Iterable`): A few training batches (e.g. 4 of 32 examples).
        loss_fn (`Callable`, *optional*): ``loss_fn(model, batch)`` -> scalar loss; default ``model(**batch).loss``.
        adapter_name (`str`, *optional*): Defaults to the active adapter.

    Returns:
        `dict[str, torch.Tensor]`: per module key (as in the base model's ``named_modules()``), ``(out_features,)``
        float64 scores. The model's parameters, gradients and train/eval mode are left as they were.
    """
    name, layers = peft_model_layers(model, adapter_name)
    if not layers:
        raise ValueError(f"The model has no RECAST modules for adapter {name!r}: add a RECAST adapter "
                         "(get_peft_model(base, RecastConfig(...))) before ranking its channels.")
    scores = {key: torch.zeros(layer.out_features, dtype=torch.float64) for key, layer in layers.items()}
    outputs: dict[str, torch.Tensor] = {}

    def keep(key: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not output.requires_grad:  # no trainable input upstream: make the output a leaf that takes a gradient
                output.requires_grad_(True)
            outputs[key] = output
        return hook

    handles = [layer.register_forward_hook(keep(key)) for key, layer in layers.items()]
    was_training = model.training
    model.eval()
    loss_fn = loss_fn or _default_loss
    try:
        for batch in tqdm(list(batches), desc="channel importance", unit="batch"):
            outputs.clear()
            with torch.enable_grad():
                loss = loss_fn(model, batch)
                keys = [key for key in layers if key in outputs]
                grads = torch.autograd.grad(loss, [outputs[key] for key in keys], allow_unused=True)
            for key, grad in zip(keys, grads):
                if grad is None:
                    continue
                output = outputs[key].detach()
                channel_axis = 1 if output.dim() == 4 else -1  # Conv2d: (N, C, H, W); linear: (..., out)
                product = (output * grad).movedim(channel_axis, -1).reshape(-1, output.shape[channel_axis])
                scores[key] += product.sum(0).abs().double().cpu()
    finally:
        for handle in handles:
            handle.remove()
        outputs.clear()
        model.train(was_training)
    return scores


def rank_channels(
    model: nn.Module,
    batches: Iterable[Any],
    num_channels: int,
    loss_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
    adapter_name: Optional[str] = None,
) -> dict[str, list[int]]:
    """The ``num_channels`` output rows with the highest Taylor importance on ``batches``, for
    ``RecastConfig(channels=...)``: each costs ``K x n`` numbers (2 with the default config).

    Scores are compared across modules after dividing each module's by its sum (a row's share of its module's
    importance), so that modules whose outputs are on larger scales do not take every channel.

    Args:
        model (`torch.nn.Module`): A PEFT model with a RECAST adapter of the grouping to be trained (e.g. the
            default ``RecastConfig()``); its coefficients are usually still 0, the pretrained model.
        batches (`Iterable`): A few training batches.
        num_channels (`int`): How many rows to choose, over all modules.
        loss_fn (`Callable`, *optional*): ``loss_fn(model, batch)`` -> scalar loss; default ``model(**batch).loss``.
        adapter_name (`str`, *optional*): Defaults to the active adapter.

    Returns:
        `dict[str, list[int]]`: sorted rows per module key (modules without a chosen row left out).

    Example:

        ```py
        >>> import torch, peft_recast
        >>> from peft import get_peft_model
        >>> from transformers import BertConfig, BertForSequenceClassification

        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> base = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                                                 intermediate_size=64))
        >>> model = get_peft_model(base, peft_recast.RecastConfig())
        >>> batch = dict(input_ids=torch.tensor([[1, 2, 3], [4, 5, 6]]), labels=torch.tensor([0, 1]))
        >>> channels = peft_recast.rank_channels(model, [batch], num_channels=8)
        >>> sum(len(rows) for rows in channels.values())
        8
        >>> config = peft_recast.RecastConfig(channels=channels)  # 8 rows x 2 templates more to train

        ```
    """
    if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
        raise ValueError(f"`num_channels` must be a positive integer, got {num_channels!r}.")
    scores = channel_importance(model, batches, loss_fn, adapter_name)
    total = sum(len(values) for values in scores.values())
    if num_channels > total:
        raise ValueError(f"`num_channels` is {num_channels}, but the adapter's modules have {total} output rows in all.")
    keys = sorted(scores)
    shares = torch.cat([scores[key] / scores[key].sum().clamp_min(torch.finfo(torch.float64).tiny) for key in keys])
    owners = [(key, row) for key in keys for row in range(len(scores[key]))]
    # ties (e.g. all-zero scores) go to the earlier module and row: a stable, reproducible choice
    order = sorted(range(len(owners)), key=lambda i: (-shares[i].item(), i))[:num_channels]
    chosen: dict[str, list[int]] = {}
    for i in order:
        key, row = owners[i]
        chosen.setdefault(key, []).append(row)
    return {key: sorted(rows) for key, rows in sorted(chosen.items())}


def add_channels(model: nn.Module, channels: dict[str, list[int]], adapter_name: Optional[str] = None) -> None:
    """Give rows of an existing RECAST adapter coefficients of their own, in place (e.g. the rows
    :func:`rank_channels` chose on the same model): each new coefficient starts as a copy of its row's block, so the
    model computes exactly what it did; the adapter's config is replaced by a copy that lists the rows, so that
    ``save_pretrained`` writes them and the adapter loads as it is. Create the optimizer afterwards (the adapter's
    coefficient tensors are new).

    Args:
        model (`torch.nn.Module`): The PEFT model.
        channels (`dict[str, list[int]]`): Rows per module key, as ``RecastConfig.channels``.
        adapter_name (`str`, *optional*): Defaults to the active adapter.

    Raises:
        ValueError: bad rows or module keys, or an adapter that has channels already (nothing is changed then).

    Example:

        ```py
        >>> import torch, peft_recast
        >>> from peft import get_peft_model
        >>> from transformers import BertConfig, BertForSequenceClassification

        >>> base = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                                                 intermediate_size=64))
        >>> model = get_peft_model(base, peft_recast.RecastConfig())  # 16 numbers
        >>> batch = dict(input_ids=torch.tensor([[1, 2, 3], [4, 5, 6]]), labels=torch.tensor([0, 1]))
        >>> peft_recast.add_channels(model, peft_recast.rank_channels(model, [batch], num_channels=8))
        >>> model.get_nb_trainable_parameters()[0]  # + 8 rows x 2 templates
        32

        ```
    """
    name, layers = peft_model_layers(model, adapter_name)
    config = model.peft_config[name]
    if config.channels:
        raise ValueError(f"The RECAST adapter '{name}' has channels already ({sum(map(len, config.channels.values()))} "
                         "rows); add rows to a fresh adapter, or list all of them in RecastConfig(channels=...).")
    new_config = dataclasses.replace(config, channels=channels)  # validates the rows
    attach_channels(layers, name, new_config.channels or {})
    model.peft_config[name] = new_config
