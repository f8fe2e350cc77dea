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

``--serving-scale N`` (:func:`run_serving_scale`) measures RECAST alone at scale: N saved adapters loaded onto one
MiniLM with ``load_adapters`` (seconds, resident memory per adapter), a mixed batch of N rows with one adapter per row
against the same rows through one adapter (throughput), and every row (or a seeded sample) against its adapter alone.
"""

from __future__ import annotations

import gc
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ... import hotswap_adapter, load_adapters
from ...files import atomic_write
from ..encoder import load_encoder, load_tokenizer
from ..runtime import side_by_side, timed
from ..tasks import load_task

SERVING_FILE = "serving.json"
SERVING_TABLE = "serving.md"
SERVING_PLOT = "serving_throughput.png"
SERVING_METHODS = ("recast", "lora-r8")
SCALE_FILE = "serving_scale.json"
SCALE_TABLE = "serving_scale.md"
SCALE_TOLERANCE = 1e-4  # rtol and atol of "equal to the adapter alone": float32 rounding of six layers' sums


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
    """Bytes of the distinct storages of the model's parameters and buffers (plus RECAST's cached weights and mixes)."""
    storages = {}
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        for slot in ("_weight_cache", "_mix_cache"):
            cache = getattr(module, slot, None)
            if cache is not None:
                tensors.append(cache[-1])
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _batch(rows: int, tokens: int, device: torch.device) -> dict[str, torch.Tensor]:
    """``rows`` real SMS texts (cycled), cut or padded to ``tokens`` tokens."""
    texts = load_task("sms")["test"]["text"]
    texts = [texts[i % len(texts)] for i in range(rows)]
    encoded = load_tokenizer()(texts, padding="max_length", truncation=True, max_length=tokens, return_tensors="pt")
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
        for count in tqdm(settings.adapters, desc=f"serving {name}: batches", leave=False):
            names = [f"a{i % count}" for i in range(settings.rows)]
            # the first, untimed calls build and cache RECAST's adapted weights
            batches = side_by_side({"one adapter": lambda: model(**batch),
                                    "mixed": lambda names=names: model(**batch, adapter_names=names)}, settings.repeats)
            ratios[count] = batches["one adapter"] / batches["mixed"]
        bare = load_encoder(device).eval()
        latency = side_by_side({"unmerged": lambda: model(**batch), "bare": lambda: bare(**batch)}, settings.repeats)
    return dict(throughput_ratio=ratios, load_seconds=load_seconds, read_seconds=read_seconds, add_seconds=add_seconds,
                bytes_per_adapter=per_adapter, unmerged_latency_ratio=latency["unmerged"] / latency["bare"],
                single_batch_seconds=batches["one adapter"])


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
    from ..runtime import resolve_device

    device = resolve_device(settings.device)
    batch = _batch(settings.rows, settings.tokens, device)
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


@dataclass
class ScaleSettings:
    """What ``--serving-scale`` measures: ``adapters`` saved RECAST adapters (MiniLM-L6's default config) loaded onto
    one model; a batch of one row of ``tokens`` tokens per adapter, run ``chunk`` rows per call, timed in ``repeats``
    rounds against the same rows through one adapter (0: not timed); ``check`` of its rows compared with their adapter
    alone (``None``: every row; else a sample drawn with ``seed``, which also draws the coefficients); with
    ``read_files``, the seconds to read the adapter files alone."""

    adapters: int = 10_000
    tokens: int = 16
    chunk: int = 1024
    repeats: int = 3
    check: Optional[int] = None
    seed: int = 0
    read_files: bool = True
    device: str = "cpu"
    output_dir: str = os.path.join("runs", "bench-serving")


def rss_bytes() -> Optional[int]:
    """This process's resident set size after a garbage collection and, with glibc, ``malloc_trim`` (freed heap pages
    leave the count, so that what a later allocation reuses counts again); ``None`` where it cannot be read."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        try:
            import psutil
        except ImportError:
            return None
        return psutil.Process().memory_info().rss


def write_adapters(folder: str, count: int, device: torch.device, seed: int = 0) -> list[str]:
    """``count`` saved RECAST adapters of MiniLM-L6's default config with random coefficients (normal, std 0.1,
    drawn with ``seed``), folders ``a0``, ``a1``, ... in ``folder``: ``a0`` written by ``save_pretrained``, each other
    one as ``a0``'s ``adapter_config.json`` beside ``a0``'s ``adapter_model.safetensors`` with new values in place of
    its float32 data (same header: keys, shapes, offsets). That is what ``save_pretrained`` writes for adapters of one
    config, without building each in a model (about 0.1 ms against 11 ms per adapter)."""
    import peft
    from safetensors import safe_open

    from ... import RecastConfig

    first = os.path.join(folder, "a0")
    source = peft.get_peft_model(load_encoder(device), RecastConfig())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in source.parameters():
            if parameter.requires_grad:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    source.save_pretrained(first, save_embedding_layers=False)
    weights = os.path.join(first, "adapter_model.safetensors")
    with safe_open(weights, framework="pt") as handle:
        if any(handle.get_slice(key).get_dtype() != "F32" for key in handle.keys()):
            raise ValueError("write_adapters expects float32 coefficients only")
    with open(weights, "rb") as handle:
        saved = handle.read()
    with open(os.path.join(first, "adapter_config.json"), "rb") as handle:
        config = handle.read()
    header = 8 + int.from_bytes(saved[:8], "little")  # the header's length, then the header (JSON), then the data
    values = 0.1 * torch.randn(count - 1, (len(saved) - header) // 4, generator=generator)
    paths = [first]
    for i in tqdm(range(1, count), desc="serving scale: save adapters", leave=False):
        path = os.path.join(folder, f"a{i}")
        os.makedirs(path)
        with open(os.path.join(path, "adapter_config.json"), "wb") as handle:
            handle.write(config)
        with open(os.path.join(path, "adapter_model.safetensors"), "wb") as handle:
            handle.write(saved[:header] + values[i - 1].numpy().tobytes())
        paths.append(path)
    return paths


def measure_scale(settings: ScaleSettings) -> dict:
    """Load ``settings.adapters`` saved adapters onto one MiniLM (the first with ``PeftModel.from_pretrained``, the
    rest with ``load_adapters``: seconds, resident memory), time a batch with one row per adapter against the same
    rows through one adapter, then run the mixed batch once more and compare rows with their adapter alone: a second
    model holding one adapter, into which each row's adapter is hotswapped from its folder, runs that row as a batch
    of one (and with its adapter disabled, to show how far the adapter moves the row)."""
    import peft

    from ..runtime import resolve_device

    device = resolve_device(settings.device)
    count = settings.adapters
    names = [f"a{i}" for i in range(count)]
    batch = _batch(count, settings.tokens, device)
    spans = [range(start, min(start + settings.chunk, count)) for start in range(0, count, settings.chunk)]

    def rows(span: range) -> dict[str, torch.Tensor]:
        return {key: value[span.start: span.stop] for key, value in batch.items()}

    def mixed(span: range) -> torch.Tensor:
        return model(**rows(span), adapter_names=names[span.start: span.stop]).last_hidden_state

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        paths = write_adapters(folder, count, device, settings.seed)
        write_seconds = time.perf_counter() - started
        model = peft.PeftModel.from_pretrained(load_encoder(device), paths[0], adapter_name=names[0]).eval()
        rss_before, tensors_before = rss_bytes(), _resident_bytes(model)
        started = time.perf_counter()
        load_adapters(model, paths[1:], names[1:])
        load_seconds = time.perf_counter() - started
        rss_after, tensors_after = rss_bytes(), _resident_bytes(model)
        read_seconds = timed(lambda: [(peft.PeftConfig.from_pretrained(path), peft.utils.load_peft_weights(path))
                                       for path in paths[1:]]) if settings.read_files else None
        model.set_adapter(names[0])
        seconds = None
        if settings.repeats:
            with torch.no_grad():  # first, untimed calls: the cached adapted weight, one-time allocations
                seconds = side_by_side({"one adapter": lambda: [model(**rows(span)) for span in spans],
                                        "mixed": lambda: [mixed(span) for span in spans]},
                                       settings.repeats, device, "serving scale: batches")
        rss_served = rss_bytes()

        if settings.check is None or settings.check >= count:
            checked = list(range(count))
        else:
            checked = sorted(random.Random(settings.seed).sample(range(count), settings.check))
        reference = peft.PeftModel.from_pretrained(load_encoder(device), paths[0]).eval()
        equal, difference, moved, position = 0, 0.0, float("inf"), 0
        with torch.no_grad():
            for span in tqdm(spans, desc="serving scale: rows against their adapter alone", leave=False):
                ours = [i for i in checked[position:] if i < span.stop]
                position += len(ours)
                together = mixed(span)  # every chunk: the whole mixed batch runs, checked rows or not
                for i in ours:
                    hotswap_adapter(reference, paths[i])
                    alone = reference(**rows(range(i, i + 1))).last_hidden_state[0]
                    with reference.disable_adapter():
                        bare = reference(**rows(range(i, i + 1))).last_hidden_state[0]
                    row = together[i - span.start]
                    equal += bool(torch.allclose(row, alone, rtol=SCALE_TOLERANCE, atol=SCALE_TOLERANCE))
                    difference = max(difference, (row - alone).abs().max().item())
                    moved = min(moved, (bare - alone).abs().max().item())
    timings = dict(single_rows_per_second=None, mixed_rows_per_second=None, mixed_vs_single=None)
    if seconds is not None:
        single, together = seconds["one adapter"], seconds["mixed"]
        timings = dict(single_rows_per_second=count / single, mixed_rows_per_second=count / together,
                       mixed_vs_single=single / together)
    return dict(
        adapters=count, tokens=settings.tokens, chunk=settings.chunk, threads=torch.get_num_threads(),
        write_seconds=write_seconds, load_seconds=load_seconds, load_ms_per_adapter=1e3 * load_seconds / max(count - 1, 1),
        read_seconds=read_seconds, rss_before=rss_before, rss_after=rss_after, rss_served=rss_served,
        rss_bytes_per_adapter=None if rss_before is None else (rss_after - rss_before) / max(count - 1, 1),
        tensor_bytes_per_adapter=(tensors_after - tensors_before) / max(count - 1, 1),
        **timings,
        rows_checked=len(checked), rows_sampled=len(checked) < count, rows_equal=equal,
        max_abs_difference=difference, min_adapter_effect=moved if checked else None,
    )


def format_scale(result: dict) -> str:
    """Markdown: the scale measurement's figures, one per line (``n/a``: not measured)."""
    mib = 2 ** 20

    def given(value: Optional[float], text: Callable[[float], str]) -> str:
        return "n/a" if value is None else text(value)

    rss = given(result["rss_before"], lambda before: (
        f"{before / mib:,.0f} MiB before, {result['rss_after'] / mib:,.0f} MiB after loading, "
        f"{result['rss_served'] / mib:,.0f} MiB after the batches"))
    sample = "a seeded random sample" if result["rows_sampled"] else "every row"
    figures = [
        ("adapters on one model", f"{result['adapters']:,}"),
        ("load (`load_adapters`, all but the first)",
         f"{result['load_seconds']:.1f} s, {result['load_ms_per_adapter']:.2f} ms per adapter"),
        ("reading their files alone", given(result["read_seconds"], lambda seconds: f"{seconds:.1f} s")),
        ("resident memory (RSS)", rss),
        ("RSS per extra adapter", given(result["rss_bytes_per_adapter"], lambda size: f"{size:,.0f} B")),
        ("tensor bytes per extra adapter", f"{result['tensor_bytes_per_adapter']:,.0f} B"),
        (f"mixed batch, one row of {result['tokens']} tokens per adapter, {result['chunk']:,} rows per call",
         given(result["mixed_rows_per_second"], lambda rate: f"{rate:,.0f} rows/s")),
        ("the same rows through one adapter",
         given(result["single_rows_per_second"], lambda rate: f"{rate:,.0f} rows/s")),
        ("mixed vs one adapter", given(result["mixed_vs_single"], lambda ratio: f"{ratio:.2f}x")),
        ("rows checked against their adapter alone", f"{result['rows_checked']:,} ({sample})"),
        (f"rows equal to it (rtol = atol = {SCALE_TOLERANCE:g})",
         f"{result['rows_equal']:,} of {result['rows_checked']:,}"),
        ("max abs difference to the adapter alone", f"{result['max_abs_difference']:.1e}"),
        ("smallest max abs change of a checked row by its adapter",
         given(result["min_adapter_effect"], lambda change: f"{change:.1e}")),
    ]
    lines = [f"RECAST default on MiniLM-L6, {result['threads']} torch thread(s).", "", "| figure | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in figures]
    return "\n".join(lines)


def run_serving_scale(settings: ScaleSettings) -> dict:
    """:func:`measure_scale`; write ``serving_scale.json`` and ``serving_scale.md`` to the output dir, print the table."""
    result = measure_scale(settings)
    os.makedirs(settings.output_dir, exist_ok=True)
    table = format_scale(result)
    with atomic_write(os.path.join(settings.output_dir, SCALE_FILE)) as handle:
        json.dump(dict(settings=settings.__dict__, result=result), handle, indent=1)
    with atomic_write(os.path.join(settings.output_dir, SCALE_TABLE)) as handle:
        handle.write(table + "\n")
    print(table)
    print(f"Results in {settings.output_dir}/ ({SCALE_FILE}, {SCALE_TABLE})")
    return result
