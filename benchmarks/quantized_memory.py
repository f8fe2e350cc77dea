"""Memory of RECAST training on a bitsandbytes-quantized Llama: bfloat16 base against 4-bit nf4 and 8-bit.

Run: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quantized_memory.py [--steps 3] [--batch 4] [--length 128]`.

A Llama of ~125M parameters (hidden 768, intermediate 2048, 12 layers, 12 heads, 4 key/value heads, vocabulary 32,000,
random weights) is saved once in bfloat16, then loaded in a fresh process per variant (read into memory, not
memory-mapped: a mapped checkpoint would stay resident as file pages, quantized or not): bfloat16, 4-bit nf4
(``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)``) and
8-bit (``load_in_8bit=True``); transformers quantizes every decoder projection (embeddings, norms and the LM head stay
bfloat16). Each process wraps the model with the default ``RecastConfig()`` (``q_proj``/``v_proj``) and takes
``--steps`` AdamW steps of causal-LM loss on ``batch x length`` random tokens. Printed, as a markdown table:

* base bytes: parameters and buffers of the loaded model (counted);
* RSS (resident memory, measured): after the imports (the runtime), before the measured steps (after a first step
  that pages the weights in; memory freed by loading is returned with ``malloc_trim``), and the peak during them
  (``VmHWM``, reset before them); "peak - before" is what the steps add: activations kept for backward, gradients,
  optimizer state and transients (bitsandbytes' dequantized weights in its matmuls, RECAST's dequantized basis, one
  layer at a time);
* saved for backward: the storages autograd keeps for backward in one step (counted), parameters and buffers excepted;
* seconds per step (median of the measured steps; 1 thread, the machine may be shared: compare within one run).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time

from scale import peak_rss_bytes, reset_peak_rss, rss_bytes  # benchmarks/scale.py, next to this file

SHAPE = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
         "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 512}
VARIANTS = ["bf16", "nf4", "8bit"]


def _save_base(path: str) -> int:
    """Save the bfloat16 Llama of ``SHAPE`` to ``path``; returns its number of parameters."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).to(torch.bfloat16)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def _measure(variant: str, path: str, steps: int, batch: int, length: int) -> dict:
    """Load ``variant`` of the saved model, wrap it with RECAST and train it (in this process: run it fresh)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import peft_recast

    runtime = rss_bytes()  # the interpreter and the libraries, before any model
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # 8-bit on the CPU logs a dtype cast at every call
    quantization = {
        "bf16": None,
        "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
        "8bit": BitsAndBytesConfig(load_in_8bit=True),
    }[variant]
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=quantization,
                                                device_map="cpu", disable_mmap=True)
    base_bytes = sum(t.numel() * t.element_size() for t in [*base.parameters(), *base.buffers()])
    model = get_peft_model(base, peft_recast.RecastConfig())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=peft_recast.RECOMMENDED_LR)
    ids = torch.randint(0, SHAPE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(0))
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:  # what autograd keeps for backward, by storage
        if tensor.untyped_storage().data_ptr() not in owned:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    model.train()
    losses, seconds = [], []
    for step in range(steps):
        if step == 1:  # after a first step (weights paged in from the file, one-time allocations)
            gc.collect()
            _return_freed_memory()
            before = rss_bytes()
            resettable = reset_peak_rss()
        saved.clear()
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    peak = peak_rss_bytes()
    return {"variant": variant, "base_bytes": base_bytes, "runtime_rss": runtime, "rss_before": before,
            "peak_rss": peak,
            "peak_is_training_only": resettable, "overhead": peak - before, "saved_bytes": sum(saved.values()),
            "step_seconds": statistics.median(seconds[1:]), "losses": losses}


def _return_freed_memory() -> None:
    """Give memory freed by loading (quantization transients) back to the system (glibc), so that the resident
    memory before training is the model's and the runtime's."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _mib(value: float) -> str:
    return f"{value / 2**20:,.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="at least 2: the first one is not measured")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(args.child[0], args.child[1], args.steps, args.batch, args.length)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as path:
        parameters = _save_base(path)
        for variant in args.variants:
            command = [sys.executable, os.path.abspath(__file__), "--child", variant, path, "--steps", str(args.steps),
                       "--batch", str(args.batch), "--length", str(args.length)]
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
            if result.returncode != 0:
                raise SystemExit(f"{variant} failed:\n{result.stderr[-3000:]}")
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    reference = rows[0]
    print(f"Llama {parameters / 1e6:.1f}M parameters, RECAST default (q_proj, v_proj), {args.steps} AdamW steps of "
          f"{args.batch} x {args.length} tokens, 1 process per row, torch threads {os.environ.get('OMP_NUM_THREADS')}")
    print()
    print("| base | base bytes | vs bf16 | RSS: runtime | before steps | peak in training | vs bf16 | peak - before "
          "| saved for backward | s/step | loss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['variant']} | {_mib(row['base_bytes'])} | {row['base_bytes'] / reference['base_bytes']:.2f} "
            f"| {_mib(row['runtime_rss'])} | {_mib(row['rss_before'])} | {_mib(row['peak_rss'])} "
            f"| {row['peak_rss'] / reference['peak_rss']:.2f} "
            f"| {_mib(row['overhead'])} | {_mib(row['saved_bytes'])} "
            f"| {row['step_seconds']:.1f} | {row['losses'][0]:.3f} -> {row['losses'][-1]:.3f} |"
        )
    if not all(row["peak_is_training_only"] for row in rows):
        print("\n(peak RSS could not be reset: the peaks include loading)")


if __name__ == "__main__":
    main()
