"""The one training loop of the applications (demo, sweep, benchmark), its optimiser and schedule, and evaluation.

Every method trains the same way: AdamW without weight decay, a one-cycle schedule, gradients clipped to norm
``clip`` per parameter group, the batches of :func:`batch_order` (the same for every method at one seed), and the
encoder in eval mode (no dropout), so that every method sees the features a linear probe sees.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..presets import HEAD_LR, RECOMMENDED_LR
from .runtime import tick
from .tasks import Batches

if TYPE_CHECKING:
    from .encoder import SentenceClassifier


# Training batches that output rows are ranked on (`rank_channels`) before they get coefficients of their own.
RANKING_BATCHES = 4


@dataclass
class Settings:
    """One training run: epochs, batch size, peak learning rates (adapter, head), token length, seed, clipping."""

    epochs: int = 4
    batch_size: int = 32
    lr: float = RECOMMENDED_LR
    head_lr: float = HEAD_LR
    max_length: int = 64
    seed: int = 0
    clip: float = 1.0


# Training batches are drawn from pools of this many batches' worth of shuffled examples sorted by length.
LENGTH_POOL_BATCHES = 8


def batch_order(lengths: Sequence[int], settings: Settings) -> list[list[int]]:
    """Every epoch's mini-batches, from ``settings.seed`` (the same order for every method).

    Each epoch shuffles the examples, sorts pools of ``LENGTH_POOL_BATCHES`` batches by length (so a batch holds
    texts of similar lengths and little padding), cuts them into batches and shuffles the batches.
    """
    generator = torch.Generator().manual_seed(settings.seed)
    size, pool = settings.batch_size, settings.batch_size * LENGTH_POOL_BATCHES
    batches = []
    for _ in range(settings.epochs):
        order = torch.randperm(len(lengths), generator=generator).tolist()
        epoch = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
            epoch.extend(chunk[i : i + size] for i in range(0, len(chunk), size))
        batches.extend(epoch[i] for i in torch.randperm(len(epoch), generator=generator).tolist())
    return batches


def make_optimizer(
    groups: list[tuple[list[nn.Parameter], float]], total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.OneCycleLR]:
    """AdamW (no weight decay) with a one-cycle schedule; ``groups`` are ``(parameters, peak lr)`` pairs."""
    optimizer = torch.optim.AdamW([{"params": params, "lr": lr} for params, lr in groups], weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[lr for _, lr in groups], total_steps=max(total_steps, 1)
    )
    return optimizer, scheduler


def optimizer_step(loss: torch.Tensor, optimizer, scheduler, groups: list[list[nn.Parameter]], clip: float) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for params in groups:  # clipped separately: the head trains exactly as in the probe
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    scheduler.step()


def train(
    logits: Callable[[list[int]], torch.Tensor],
    labels: torch.Tensor,
    lengths: Sequence[int],
    groups: list[tuple[list[nn.Parameter], float]],
    settings: Settings,
    desc: str,
    held: Sequence[nn.Parameter] = (),
    align_epochs: int = 0,
) -> float:
    """Train ``groups`` (``(parameters, peak lr)`` pairs) on the batches of :func:`batch_order`; returns seconds/step.

    Args:
        logits: the logits ``(batch, classes)`` of the examples at the given indices.
        labels: every example's class, ``(examples,)``.
        lengths: every example's length in tokens (they fix the batch order only).
        held: parameters (in ``groups``) kept frozen for the first ``align_epochs`` epochs: an alignment stage in
            which only the other parameters train (the two-stage recipe: LayerNorm scale and shift first).
    """
    order = batch_order(lengths, settings)
    optimizer, scheduler = make_optimizer(groups, len(order))
    if held and align_epochs >= settings.epochs:
        raise ValueError(f"An alignment stage of {align_epochs} epoch(s) leaves no epoch for the other adapter "
                         f"parameters in a {settings.epochs}-epoch run; train for more than {align_epochs} epochs.")
    release_at = len(order) * align_epochs // settings.epochs
    for parameter in held:
        parameter.requires_grad_(False)  # no gradient: AdamW leaves it (and its state) untouched
    started = time.perf_counter()
    progress = tqdm(order, desc=desc, unit="step", leave=False)
    try:
        for step, indices in enumerate(progress):
            if step == release_at:
                for parameter in held:
                    parameter.requires_grad_(True)
            tick()
            batch_logits = logits(indices)
            loss = nn.functional.cross_entropy(batch_logits, labels[torch.tensor(indices, device=labels.device)])
            optimizer_step(loss, optimizer, scheduler, [params for params, _ in groups], settings.clip)
            progress.set_postfix(loss=f"{loss.item():.3f}", threads=torch.get_num_threads(), refresh=False)
    finally:
        for parameter in held:
            parameter.requires_grad_(True)
    return (time.perf_counter() - started) / max(len(order), 1)


def train_probe(
    head: nn.Linear, features: torch.Tensor, labels: torch.Tensor, lengths: Sequence[int], settings: Settings, desc: str
) -> float:
    """Train ``head`` alone (peak lr ``settings.head_lr``) on cached sentence embeddings ``(examples, hidden)``: a
    linear probe of the frozen encoder, on the batches every other method sees. Returns seconds per step."""
    head.train()
    return train(lambda indices: head(features[torch.tensor(indices, device=features.device)]), labels, lengths,
                 [(list(head.parameters()), settings.head_lr)], settings, desc)


def coefficient_groups(model: nn.Module, lr: float, head_lr: float) -> list[tuple[list[nn.Parameter], float]]:
    """``(parameters, peak lr)`` groups of a RECAST-wrapped classifier: its coefficients (and gate scores) at ``lr``,
    every other trainable parameter (the head) at ``head_lr``; a group without parameters is left out."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    coefficients = [p for name, p in trainable if ".recast_" in name]
    others = [p for name, p in trainable if ".recast_" not in name]
    return [(params, rate) for params, rate in ((coefficients, lr), (others, head_lr)) if params]


def train_recast(model: nn.Module, batches: Batches, labels: torch.Tensor, settings: Settings, desc: str) -> float:
    """Train a RECAST-wrapped classifier (:func:`coefficient_groups` at ``settings.lr`` and ``settings.head_lr``); the
    model stays in eval mode. Returns seconds per step."""
    model.eval()
    return train(lambda indices: model(**batches(indices)), labels, batches.lengths,
                 coefficient_groups(model, settings.lr, settings.head_lr), settings, desc)


@torch.no_grad()
def by_batch(function, batches: Batches, batch_size: int, desc: str) -> torch.Tensor:
    """``function(batch)`` over all texts, in batches of similar lengths, returned in the original order."""
    outputs, positions = [], []
    for indices in tqdm(batches.in_length_order(batch_size), desc=desc, unit="batch", leave=False):
        tick()
        outputs.append(function(batches(indices)).float())
        positions.extend(indices)
    result = torch.cat(outputs)
    restored = torch.empty_like(result)
    restored[torch.tensor(positions, device=result.device)] = result
    return restored


def embed_texts(model: SentenceClassifier, batches: Batches, batch_size: int, desc: str) -> torch.Tensor:
    """Mean-pooled sentence embeddings of every text (encoder in eval mode)."""
    model.eval()
    return by_batch(lambda batch: model.embed(**batch), batches, batch_size, desc)


def predict_logits(model: nn.Module, batches: Batches, batch_size: int, desc: str) -> torch.Tensor:
    """Logits of every text, ``(texts, classes)`` on the CPU, from a classifier called on a batch."""
    model.eval()
    return by_batch(lambda batch: model(**batch), batches, batch_size, desc).cpu()


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of ``predicted`` class ids ``(examples,)`` equal to ``labels`` (any devices)."""
    return (predicted.cpu() == labels.cpu()).float().mean().item()


def trainable_numbers(model: nn.Module) -> int:
    """How many numbers ``model`` trains: the elements of its parameters that require gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
