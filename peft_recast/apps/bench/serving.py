"""``peft-recast bench --serving``: one model serving many task adapters at once, RECAST against LoRA r=8.

For N distinct adapters in one batch (rows ``i`` use adapter ``i mod N``), measured side by side in one process on
all-MiniLM-L6-v2 and real SMS texts cut or padded to a fixed token count:

* throughput of the mixed batch as a ratio to the same batch through one adapter (``adapter_names`` against
  ``set_adapter``), alternating the two in every round so that both see the same machine load;
* the seconds to load N saved adapters (one folder each) onto the model, RECAST with ``peft_recast.load_adapters``
  and LoRA with PEFT's ``load_adapter``, beside the seconds to read their files alone (config and safetensors);
* the milliseconds to add one more adapter (``add_adapter``) to the model holding them all;
* the bytes each extra adapter keeps resident (distinct tensor storages of the model, LoRA's and RECAST's alike);
* unmerged single-adapter latency as a ratio to the bare model (RECAST serves a cached adapted weight).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ... import load_adapters
from ...files import atomic_write
from ..encoder import load_encoder, load_tokenizer
from ..runtime import timed
from ..tasks import load_task

SERVING_FILE = "serving.json"
SERVING_TABLE = "serving.md"
SERVING_PLOT = "serving_throughput.png"
SERVING_METHODS = ("recast", "lora-r8")


@dataclass
class ServingSettings:
    """What ``--serving`` measures: the adapter counts, the batch (rows x tokens) and the timing rounds."""

    adapters: list[int] = field(default_factory=lambda: [1, 16, 256, 1024])
    rows: int = 1024
    tokens: int = 32
    repeats: int = 3
    device: str = "cpu"
    output_dir: str = os.path.join("runs", "bench-serving")


def _configs() -> dict[str, Callable[[], object]]:
    """RECAST's default and LoRA r=8 on query/value, each with random (non-identity) starting values."""
    import peft

    from ... import RecastConfig

    return {
        "recast": lambda: RecastConfig(init_weights=False),
        "lora-r8": lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                           init_lora_weights=False),
    }


def _resident_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages of the model's parameters and buffers (plus RECAST's cached weights)."""
    storages = {}
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        cache = getattr(module, "_weight_cache", None)
        if cache is not None:
            tensors.append(cache[-1])
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _batch(settings: ServingSettings, device: torch.device) -> dict[str, torch.Tensor]:
    texts = load_task("sms")["test"]["text"]
    texts = [texts[i % len(texts)] for i in range(settings.rows)]
    encoded = load_tokenizer()(texts, padding="max_length", truncation=True, max_length=settings.tokens,
                               return_tensors="pt")
    return {key: value.to(device) for key, value in encoded.items()}


def measure_method(name: str, settings: ServingSettings, batch: dict, device: torch.device,
                   folder: str) -> dict:
    """Save ``max(adapters)`` adapters of one method, load them onto a fresh model (timed), then time mixed batches
    of each adapter count against the single-adapter batch."""
    import peft

    config = _configs()[name]
    largest = max(settings.adapters)
    source = peft.get_peft_model(load_encoder(device), config())
    trained = [p for p in source.parameters() if p.requires_grad]
    generator = torch.Generator(device=device).manual_seed(0)
    for i in tqdm(range(largest), desc=f"serving {name}: save adapters", leave=False):
        with torch.no_grad():  # adapter i: new random values in the one adapter's tensors (as after training)
            for parameter in trained:
                parameter.normal_(0.0, 0.02, generator=generator)
        source.save_pretrained(os.path.join(folder, name, f"a{i}"), save_embedding_layers=False)
    paths = [os.path.join(folder, name, f"a{i}") for i in range(largest)]
    del source
    model = peft.PeftModel.from_pretrained(load_encoder(device), paths[0], adapter_name="a0")
    one_adapter = _resident_bytes(model)
    load_seconds = {1: 0.0}
    started, loaded = time.perf_counter(), 1
    for count in sorted(n for n in settings.adapters if n > 1):  # RECAST: load_adapters; LoRA: PEFT's load_adapter
        batch_paths = paths[loaded:count]
        if name == "recast":
            load_adapters(model, batch_paths, [f"a{i}" for i in range(loaded, count)])
        else:
            for i, path in enumerate(tqdm(batch_paths, desc=f"serving {name}: load adapters", leave=False)):
                model.load_adapter(path, adapter_name=f"a{loaded + i}")
        loaded = count
        load_seconds[count] = time.perf_counter() - started
    per_adapter = (_resident_bytes(model) - one_adapter) / max(largest - 1, 1)
    adds = 10  # adding a new adapter to the loaded model (the grouping is fitted already), then removing it again
    add_seconds = timed(lambda: [model.add_adapter(f"new{i}", config()) for i in range(adds)]) / adds
    for i in range(adds):
        model.delete_adapter(f"new{i}")
    read_seconds = timed(lambda: [(peft.PeftConfig.from_pretrained(path), peft.utils.load_peft_weights(path))
                                   for path in paths[1:]])
    model.eval()
    model.set_adapter("a0")
    ratios = {}
    with torch.no_grad():
        model(**batch)  # first call: RECAST builds and caches its adapted weights
        for count in tqdm(settings.adapters, desc=f"serving {name}: batches", leave=False):
            names = [f"a{i % count}" for i in range(settings.rows)]
            model(**batch, adapter_names=names)
            single, mixed = [], []
            for _ in range(settings.repeats):
                single.append(timed(lambda: model(**batch)))
                mixed.append(timed(lambda: model(**batch, adapter_names=names)))
            ratios[count] = statistics.median(single) / statistics.median(mixed)
        bare = load_encoder(device).eval()
        bare(**batch)
        unmerged, plain = [], []
        for _ in range(settings.repeats):
            unmerged.append(timed(lambda: model(**batch)))
            plain.append(timed(lambda: bare(**batch)))
    return dict(throughput_ratio=ratios, load_seconds=load_seconds, read_seconds=read_seconds, add_seconds=add_seconds,
                bytes_per_adapter=per_adapter,
                unmerged_latency_ratio=statistics.median(unmerged) / statistics.median(plain),
                single_batch_seconds=statistics.median(single))


def format_serving(results: dict, settings: ServingSettings) -> str:
    """Markdown: per method and adapter count the mixed batch's throughput as a ratio to the same batch through one
    adapter and to the bare model (what a server compares), and the load time; then the file-reading time, the bytes
    per extra adapter and the unmerged single-adapter latency."""
    header = ["method", *[f"N={n}: throughput vs 1 adapter / vs bare model / load s" for n in settings.adapters],
              f"reading the {max(settings.adapters) - 1} files alone, s", "add_adapter ms", "bytes per extra adapter",
              "unmerged latency vs bare model"]
    lines = [f"Batch of {settings.rows} rows x {settings.tokens} tokens, MiniLM-L6, rows cycle through N adapters; "
             "median of " + str(settings.repeats) + " rounds.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in results.items():
        ratios, loads = _by_count(row["throughput_ratio"]), _by_count(row["load_seconds"])
        latency = row["unmerged_latency_ratio"]
        cells = [f"{ratios[n]:.2f}x / {ratios[n] / latency:.2f}x / {loads[n]:.1f}" for n in settings.adapters]
        lines.append("| " + " | ".join([name, *cells, f"{row['read_seconds']:.1f}", f"{1e3 * row['add_seconds']:.1f}",
                                        f"{row['bytes_per_adapter']:,.0f}",
                                        f"{latency:.2f}x"]) + " |")
    return "\n".join(lines)


def _by_count(values: dict) -> dict[int, float]:
    """A per-count dict with int keys (``serving.json`` stores them as strings)."""
    return {int(count): value for count, value in values.items()}


def plot_serving(results: dict, settings: ServingSettings, path: str) -> None:
    """Mixed-batch throughput (as a ratio to one adapter) against the number of distinct adapters, log scale."""
    from .report import new_figure, save_figure

    figure, axis = new_figure()
    for index, (name, row) in enumerate(results.items()):
        counts, color = list(settings.adapters), f"C{index}"
        ratios = _by_count(row["throughput_ratio"])
        axis.plot(counts, [ratios[n] for n in counts], marker="o", color=color,
                  label=f"{name}, vs its own one-adapter batch")
        axis.plot(counts, [ratios[n] / row["unmerged_latency_ratio"] for n in counts], marker="s", linestyle="--",
                  color=color, label=f"{name}, vs the bare model")
    axis.set_xscale("log")
    axis.set_xlabel("distinct adapters in one batch")
    axis.set_ylabel("mixed-batch throughput, as a ratio")
    axis.set_title(f"Mixed-task batches, MiniLM-L6, {settings.rows} rows x {settings.tokens} tokens")
    axis.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    save_figure(figure, path)


def run_serving(settings: ServingSettings, methods: Optional[list[str]] = None) -> dict:
    """Measure every method (default: RECAST and LoRA r=8); write ``serving.json``, the table and the plot."""
    import json

    from ..runtime import resolve_device

    device = resolve_device(settings.device)
    batch = _batch(settings, device)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in methods or list(_configs()):
            results[name] = measure_method(name, settings, batch, device, folder)
    os.makedirs(settings.output_dir, exist_ok=True)
    table = format_serving(results, settings)
    with atomic_write(os.path.join(settings.output_dir, SERVING_FILE)) as handle:
        json.dump(dict(settings=settings.__dict__, results=results, threads=torch.get_num_threads()), handle, indent=1)
    with atomic_write(os.path.join(settings.output_dir, SERVING_TABLE)) as handle:
        handle.write(table + "\n")
    plot_serving(results, settings, os.path.join(settings.output_dir, SERVING_PLOT))
    print(table)
    print(f"Results in {settings.output_dir}/ ({SERVING_FILE}, {SERVING_TABLE}, {SERVING_PLOT})")
    return results
