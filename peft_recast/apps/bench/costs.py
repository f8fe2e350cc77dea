"""The costs of each method, measured side by side in one process on one batch of real texts: step time and training
memory against LoRA r=8, inference latency against the bare model, mixed-task batch throughput."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..encoder import load_encoder, load_tokenizer, new_head, sentence_logits
from ..loop import trainable_numbers
from ..runtime import side_by_side
from ..tasks import load_task
from .methods import METHODS, REFERENCE_METHOD
from .models import MethodModel
from .results import BenchSettings

BARE = "_bare base model"  # the key of the base model's own forward among the timed calls


def cost_batch(tokenizer, settings: BenchSettings, device: torch.device) -> dict:
    """``batch_size`` real BBC articles, each exactly ``cost_length`` tokens (truncated and padded)."""
    texts = load_task("bbc")["test"]["text"][: settings.batch_size]
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=settings.cost_length,
                        return_tensors="pt")
    return {key: value.to(device) for key, value in encoded.items()}


def step_memory(step: Callable[[], None], modules: Sequence[nn.Module], optimizer, device: torch.device) -> int:
    """Bytes one training ``step()`` adds on top of the frozen ``modules``: activations kept for backward, gradients,
    optimizer state.

    CUDA: the peak allocated during the step minus what was allocated before it. CPU (no allocator statistics): the
    tensors autograd saves for backward (distinct storages that are not parameters or buffers of ``modules``), plus
    every gradient and optimizer state after the step, counted exactly.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    owned = {t.untyped_storage().data_ptr() for module in modules for t in [*module.parameters(), *module.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    grads = sum(p.numel() * p.element_size() for group in optimizer.param_groups for p in group["params"])
    return sum(saved.values()) + state + grads


def training_memory(encoder: nn.Module, head: nn.Module, batch: dict, optimizer) -> int:
    """:func:`step_memory` of one :func:`train_step` of ``encoder`` and ``head`` on ``batch``."""
    device = batch["input_ids"].device
    labels = torch.zeros(len(batch["input_ids"]), dtype=torch.long, device=device)
    return step_memory(lambda: train_step(encoder, head, batch, labels, optimizer), (encoder, head), optimizer, device)


def train_step(encoder: nn.Module, head: nn.Module, batch: dict, labels: torch.Tensor, optimizer) -> None:
    """One AdamW step of the encoder's trainable parameters and the head on ``batch`` (cross-entropy on ``labels``)."""
    loss = nn.functional.cross_entropy(sentence_logits(encoder, head, batch), labels)
    optimizer.zero_grad(set_to_none=False)
    loss.backward()
    optimizer.step()


def measure_costs(settings: BenchSettings, device: torch.device) -> dict:
    """Per method: numbers, step time and training memory relative to LoRA r=8, inference latency unmerged and
    merged relative to the bare base model, and mixed-task batch throughput relative to a single-task batch.

    All methods are built first and timed side by side (:func:`~peft_recast.apps.runtime.side_by_side`:
    ``cost_repeats`` rounds in rotating order), so that every ratio compares calls made under the same machine load;
    each figure is the median over rounds.
    """
    batch = cost_batch(load_tokenizer(), settings, device)
    labels = torch.zeros(len(batch["input_ids"]), dtype=torch.long, device=device)
    names = [name for name in settings.methods if METHODS[name].kind != "probe"]
    if REFERENCE_METHOD not in names:
        names.append(REFERENCE_METHOD)
    models, heads, optimizers = {}, {}, {}
    for name in tqdm(names, desc="costs: build", leave=False):
        model = MethodModel(METHODS[name], device)
        models[name] = model.new_adapter("cost")
        heads[name] = new_head(models[name].config.hidden_size, 2, 0, device)
        params = [p for p in models[name].parameters() if p.requires_grad] + list(heads[name].parameters())
        optimizers[name] = torch.optim.AdamW(params, lr=1e-9)
    base = load_encoder(device)
    base_head = new_head(base.config.hidden_size, 2, 0, device)

    for name in names:  # one step each first: one-time allocations (e.g. cuBLAS workspaces) land on no method
        train_step(models[name], heads[name], batch, labels, optimizers[name])
    memory = {name: training_memory(models[name], heads[name], batch, optimizers[name]) for name in names}
    repeats = settings.cost_repeats
    steps = side_by_side({name: lambda name=name: train_step(models[name], heads[name], batch, labels,
                                                             optimizers[name]) for name in names},
                         repeats, device, "costs: training steps")
    merging = [name for name in names if METHODS[name].kind == "peft"]
    with torch.no_grad():
        forward = {BARE: lambda: sentence_logits(base, base_head, batch)}
        forward.update({name: lambda name=name: sentence_logits(models[name], heads[name], batch) for name in names})
        unmerged = side_by_side(forward, repeats, device, "costs: unmerged forward")
        for name in merging:
            models[name].merge_adapter()
        merged = side_by_side({key: forward[key] for key in (BARE, *merging)}, repeats, device, "costs: merged forward")
        for name in merging:
            models[name].unmerge_adapter()
    reference_step, reference_memory = steps[REFERENCE_METHOD], memory[REFERENCE_METHOD]
    costs = {}
    for name in names:
        costs[name] = dict(
            trainable=trainable_numbers(models[name]),
            step_seconds=steps[name], step_ratio=steps[name] / reference_step,
            training_memory_bytes=memory[name], memory_ratio=memory[name] / reference_memory,
            unmerged_latency_ratio=unmerged[name] / unmerged[BARE],
            merged_latency_ratio=merged[name] / merged[BARE] if name in merged else None,
        )
    costs["_bare_forward_seconds"] = unmerged[BARE]
    for built in (models, heads, optimizers):  # free the models before building the mixed-batch ones
        built.clear()
    mixed = measure_mixed_batches(settings, device, batch, [n for n in names if METHODS[n].kind == "peft"])
    for name, ratio in mixed.items():
        costs[name]["mixed_batch_throughput_ratio"] = ratio
    costs["_settings"] = dict(batch=list(batch["input_ids"].shape), repeats=settings.cost_repeats,
                              device=str(device), threads=torch.get_num_threads())
    return costs


def measure_mixed_batches(settings: BenchSettings, device: torch.device, batch: dict,
                          names: Sequence[str]) -> dict[str, Optional[float]]:
    """Throughput of one batch whose rows go to ``len(tasks)`` different adapters (``adapter_names``) relative to the
    same batch through one adapter; ``None`` where the method does not support mixed batches."""
    ratios = {}
    count = max(len(settings.tasks), 2)
    for name in tqdm(names, desc="costs: mixed batches", leave=False):
        model = MethodModel(METHODS[name], device)
        for i in range(count):
            encoder = model.new_adapter(f"task{i}")
        encoder.eval()  # PEFT refuses adapter_names in training mode
        adapter_names = [f"task{i % count}" for i in range(len(batch["input_ids"]))]
        head = new_head(encoder.config.hidden_size, 2, 0, device)
        try:
            with torch.no_grad():
                seconds = side_by_side({
                    "one task": lambda: sentence_logits(encoder, head, batch),
                    "mixed": lambda: sentence_logits(encoder, head, batch, adapter_names=adapter_names),
                }, settings.cost_repeats, device)
            ratios[name] = seconds["one task"] / seconds["mixed"]
        except (ValueError, TypeError, NotImplementedError):
            ratios[name] = None
    return ratios
