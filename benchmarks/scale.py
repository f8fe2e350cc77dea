"""RECAST at scale: a ~1B-parameter Llama, 100 task adapters on one model, mimicry time against model size.

Run: `.venv/bin/python benchmarks/scale.py [--quick] [--json results.json]`.

* **inject**: build a Llama from a config (random weights, bfloat16; TinyLlama-1.1B's shape), wrap it with
  ``get_peft_model`` (``target_modules="all-linear"``: every projection of every layer), check that the output is
  unchanged (identity at init) and print the injection time, the mimicry time alone and the peak resident memory.
* **adapters**: save 100 task adapters of that model (default targets, random coefficients), load them all onto one
  copy of it (``PeftModel.from_pretrained`` + ``load_adapter``), and print the time to add one, the time to switch
  (``set_adapter``), resident memory per extra adapter (measured) and the bytes of its tensors (counted), and how far
  reloaded outputs are from the outputs at save time.
* **sizes**: the inject measurement for a few Llama sizes, as a table of mimicry time against parameters.

Each measurement runs in a fresh subprocess so that its peak memory is its own. ``--quick`` uses small models and
10 adapters and runs everything in this process (a CI smoke run of a few seconds; its memory figures include what
earlier steps left allocated). Figures are printed, and written as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# Llama shapes (hidden, intermediate, layers, attention heads, key/value heads, vocabulary).
ONE_BILLION = (2048, 5632, 22, 32, 4, 32000)  # TinyLlama-1.1B
FULL_SIZES = [(512, 1408, 4, 8, 4, 32000), (1024, 2816, 8, 16, 4, 32000), (1536, 4096, 16, 24, 4, 32000)]
QUICK_MODEL = (256, 688, 4, 4, 2, 1000)
QUICK_SIZES = [(64, 172, 2, 4, 2, 1000), (128, 344, 2, 4, 2, 1000)]
FULL_ADAPTERS, QUICK_ADAPTERS = 100, 10


def rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc``; the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``VmHWM``; ``ru_maxrss`` where ``/proc`` is missing)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); ``False`` where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def build_llama(shape: tuple[int, ...], seed: int = 0):
    """A ``LlamaForCausalLM`` of ``shape`` with random bfloat16 weights, in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, layers, heads, kv_heads, vocab = shape
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _groups(model, adapter_name: str = "default") -> list:
    from peft_recast.layer import RecastLayer

    groups = {}
    for module in model.modules():
        if isinstance(module, RecastLayer) and adapter_name in module.recast_group:
            group = module.recast_group[adapter_name]
            groups.setdefault(id(group), group)
    return list(groups.values())


def measure_inject(shape: tuple[int, ...]) -> dict[str, Any]:
    """Build a Llama of ``shape``, inject RECAST on all linear layers, time it and check identity at init."""
    import torch
    from peft import get_peft_model

    import peft_recast
    from peft_recast.mimicry import fit_group

    start = time.perf_counter()
    base = build_llama(shape)
    build_seconds = time.perf_counter() - start
    params = sum(p.numel() for p in base.parameters())
    ids = torch.randint(0, shape[-1], (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = base(input_ids=ids).logits
    gc.collect()
    rss_before = rss_bytes()
    resettable = reset_peak_rss()
    config = peft_recast.RecastConfig(target_modules="all-linear")
    start = time.perf_counter()
    model = get_peft_model(base, config)
    inject_seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    groups = _groups(model)
    start = time.perf_counter()
    for group in groups:
        fit_group(group.basis(), config.num_templates)
    mimicry_seconds = time.perf_counter() - start
    with torch.no_grad():
        identical = bool(torch.equal(model(input_ids=ids).logits, reference))
    targeted = sum(member.get_base_layer().weight.numel() for group in groups for member in group.members)
    return {
        "shape": list(shape),
        "params": params,
        "targeted_params": targeted,
        "groups": len(groups),
        "coefficients": peft_recast.recast_summary(model).coefficients,
        "dtype": "bfloat16",
        "build_seconds": build_seconds,
        "inject_seconds": inject_seconds,
        "mimicry_seconds": mimicry_seconds,
        "rss_before_inject_bytes": rss_before,
        "peak_rss_bytes": peak,
        "peak_is_injection_only": resettable,
        "peak_over_base_bytes": peak - rss_before,
        "identity_at_init": identical,
    }


def measure_adapters(shape: tuple[int, ...], count: int) -> dict[str, Any]:
    """Save ``count`` adapters of a Llama of ``shape``, load them all onto one model, time and weigh them."""
    import torch
    from peft import PeftModel, get_peft_model

    import peft_recast

    base = build_llama(shape)
    ids = torch.randint(0, shape[-1], (2, 8), generator=torch.Generator().manual_seed(0))
    checked = sorted({0, count // 2, count - 1})
    expected = {}
    with tempfile.TemporaryDirectory() as directory:
        model = get_peft_model(base, peft_recast.RecastConfig(init_weights=False))
        coefficients = [p for name, p in model.named_parameters() if "recast_coefficients" in name]
        start = time.perf_counter()
        for k in range(count):
            generator = torch.Generator().manual_seed(k)
            with torch.no_grad():
                for parameter in coefficients:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
                if k in checked:
                    expected[k] = model(input_ids=ids).logits.float()
            model.save_pretrained(os.path.join(directory, f"task{k}"))
        save_seconds = (time.perf_counter() - start) / count
        file_bytes = os.path.getsize(os.path.join(directory, "task0", "adapter_model.safetensors"))
        base = model.unload()
        del model, coefficients
        gc.collect()

        start = time.perf_counter()
        model = PeftModel.from_pretrained(base, os.path.join(directory, "task0"), adapter_name="task0")
        first_seconds = time.perf_counter() - start
        with torch.no_grad():
            model(input_ids=ids)
        gc.collect()
        rss_one = rss_bytes()
        add_times = []
        for k in range(1, count):
            start = time.perf_counter()
            model.load_adapter(os.path.join(directory, f"task{k}"), adapter_name=f"task{k}")
            add_times.append(time.perf_counter() - start)
        gc.collect()
        rss_all = rss_bytes()
    switch_times, max_diff = [], 0.0
    for k in range(count):
        start = time.perf_counter()
        model.set_adapter(f"task{k}")
        switch_times.append(time.perf_counter() - start)
    with torch.no_grad():
        for k in checked:
            model.set_adapter(f"task{k}")
            max_diff = max(max_diff, float((model(input_ids=ids).logits.float() - expected[k]).abs().max()))
        mixed_names = [f"task{checked[0]}", f"task{checked[-1]}"]
        mixed = model(input_ids=ids, adapter_names=mixed_names).logits.float()
        mixed_diff = max(
            float((mixed[0] - expected[checked[0]][0]).abs().max()),
            float((mixed[1] - expected[checked[-1]][1]).abs().max()),
        )
    adapter_tensor_bytes = 0
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith(".task1") and ("recast_coefficients" in name or "recast_mixing" in name):
            adapter_tensor_bytes += tensor.numel() * tensor.element_size()
    model_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    return {
        "shape": list(shape),
        "params": sum(p.numel() for p in base.parameters()),
        "model_bytes": model_bytes,
        "adapters_loaded": len(model.peft_config),
        "adapter_file_bytes": file_bytes,
        "save_seconds_per_adapter": save_seconds,
        "first_load_seconds": first_seconds,
        "add_seconds_median": statistics.median(add_times),
        "add_seconds_max": max(add_times),
        "switch_seconds_median": statistics.median(switch_times),
        "rss_one_adapter_bytes": rss_one,
        "rss_all_adapters_bytes": rss_all,
        "rss_per_extra_adapter_bytes": (rss_all - rss_one) / (count - 1),
        "tensor_bytes_per_adapter": adapter_tensor_bytes,
        "reload_max_abs_diff": max_diff,
        "mixed_batch_max_abs_diff": mixed_diff,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def _run_inline(phase: str, shape: tuple[int, ...], count: int = 0) -> dict[str, Any]:
    """Run one measurement in this process."""
    return measure_inject(shape) if phase == "inject" else measure_adapters(shape, count)


def _run_phase(phase: str, shape: tuple[int, ...], count: int = 0) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter (with this one's torch thread count) and return its result."""
    import torch

    command = [sys.executable, os.path.abspath(__file__), "--phase", phase, "--shape", ",".join(map(str, shape))]
    command += ["--threads", str(torch.get_num_threads())]
    if count:
        command += ["--count", str(count)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark phase {phase} {shape} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _mib(value: float) -> str:
    return f"{value / 2**20:,.1f} MiB"


def report(results: dict[str, Any]) -> str:
    """The printed form of the results."""
    inject, adapters = results["inject"], results["adapters"]
    lines = [
        f"(torch CPU threads: {results['threads']})",
        f"== inject: Llama {inject['params'] / 1e9:.3f}B parameters ({inject['dtype']}, random weights), "
        f"target_modules='all-linear'",
        f"targeted weights {inject['targeted_params'] / 1e6:,.1f}M in {inject['groups']} groups, "
        f"{inject['coefficients']} coefficients",
        f"build {inject['build_seconds']:.1f} s, get_peft_model {inject['inject_seconds']:.2f} s "
        f"(mimicry alone {inject['mimicry_seconds']:.2f} s)",
        f"RSS before injection {_mib(inject['rss_before_inject_bytes'])}, peak during injection "
        f"{_mib(inject['peak_rss_bytes'])} (+{_mib(inject['peak_over_base_bytes'])})",
        f"identity at init (logits bit-identical): {inject['identity_at_init']}",
        "",
        f"== adapters: {adapters['adapters_loaded']} task adapters on one Llama of "
        f"{adapters['params'] / 1e6:,.1f}M parameters ({_mib(adapters['model_bytes'])}), default targets",
        f"adapter file {adapters['adapter_file_bytes']:,} bytes; save {adapters['save_seconds_per_adapter'] * 1e3:.0f} "
        f"ms each",
        f"first load {adapters['first_load_seconds']:.2f} s; add one more: median "
        f"{adapters['add_seconds_median'] * 1e3:.0f} ms (max {adapters['add_seconds_max'] * 1e3:.0f} ms); "
        f"switch (set_adapter): median {adapters['switch_seconds_median'] * 1e3:.2f} ms",
        f"RSS with 1 adapter {_mib(adapters['rss_one_adapter_bytes'])}, with all "
        f"{_mib(adapters['rss_all_adapters_bytes'])}: {adapters['rss_per_extra_adapter_bytes'] / 1024:,.1f} KiB per "
        f"extra adapter (its tensors: {adapters['tensor_bytes_per_adapter']:,} bytes)",
        f"reloaded outputs vs outputs at save time: max |diff| {adapters['reload_max_abs_diff']:.2e}; "
        f"mixed batch: {adapters['mixed_batch_max_abs_diff']:.2e}",
        "",
        "== sizes: mimicry time against model size (all-linear, bfloat16)",
        f"{'params':>10} {'targeted':>10} {'groups':>6} {'inject s':>9} {'mimicry s':>9} {'mimicry ns/elem':>15} "
        f"{'peak RSS':>12}",
    ]
    for row in results["sizes"]:
        per_element = row["mimicry_seconds"] / row["targeted_params"] * 1e9
        lines.append(
            f"{row['params'] / 1e6:>9.1f}M {row['targeted_params'] / 1e6:>9.1f}M {row['groups']:>6} "
            f"{row['inject_seconds']:>9.2f} {row['mimicry_seconds']:>9.3f} {per_element:>15.2f} "
            f"{_mib(row['peak_rss_bytes']):>12}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small models and 20 adapters (CI smoke run)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's); 1 avoids spin-waiting on a busy machine"
    )
    parser.add_argument("--phase", choices=["inject", "adapters"], help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.phase:
        shape = tuple(int(value) for value in args.shape.split(","))
        print(json.dumps(_run_inline(args.phase, shape, args.count)))
        return
    if args.quick:
        big, sizes, count, run = QUICK_MODEL, QUICK_SIZES, QUICK_ADAPTERS, _run_inline
    else:
        big, sizes, count, run = ONE_BILLION, FULL_SIZES, FULL_ADAPTERS, _run_phase
    results: dict[str, Any] = {"mode": "quick" if args.quick else "full", "threads": torch.get_num_threads()}
    results["inject"] = run("inject", big)
    results["adapters"] = run("adapters", big, count)
    results["sizes"] = [run("inject", shape) for shape in sizes] + [results["inject"]]
    print(report(results))
    if args.json:
        from peft_recast.files import atomic_write

        with atomic_write(args.json) as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
