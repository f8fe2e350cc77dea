"""Trainable numbers against adapter file bytes: per-module coefficients, ``coefficient_sharing="position"``, and
PEFT's tiny-budget tuners at 48 numbers (UniLoRA, TinyLoRA tied), side by side on the same models.

Run: `.venv/bin/python benchmarks/adapter_bytes.py`. Tiny Llamas of 6 and 30 layers built from a config (q/v, the
default groups); for each config it saves the adapter and prints a markdown table: trainable numbers, tensors in
``adapter_model.safetensors``, the file's bytes and the bytes of the tensors' data (the rest is the safetensors
header). A shared coefficient tensor is written once, under its owner's key.
"""

from __future__ import annotations

import os
import tempfile

import torch
from peft import TinyLoraConfig, UniLoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from peft_recast import RecastConfig

CONFIGS = {
    "default (per module)": {},
    '`coefficient_sharing="position"`': {"coefficient_sharing": "position"},
    '`coefficient_sharing="position", coefficient_blocks=6`': {
        "coefficient_sharing": "position", "coefficient_blocks": 6,
    },
    "UniLoRA (`theta_d_length=48, r=4`)": UniLoraConfig(r=4, theta_d_length=48, target_modules=["q_proj", "v_proj"]),
    "TinyLoRA tied (`u=48, r=2, weight_tying=1.0`)": TinyLoraConfig(
        r=2, u=48, weight_tying=1.0, target_modules=["q_proj", "v_proj"]
    ),
}


def measure(layers: int, settings) -> tuple[int, int, int, int]:
    """(trainable numbers, tensors in the file, file bytes, data bytes) of a fresh adapter, ``layers`` deep;
    ``settings``: ``RecastConfig`` keywords, or a peer's PEFT config."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2))
    model = get_peft_model(base, RecastConfig(**settings) if isinstance(settings, dict) else settings)
    numbers = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        path = os.path.join(folder, "adapter_model.safetensors")
        tensors = load_file(path)
        return numbers, len(tensors), os.path.getsize(path), sum(t.numel() * t.element_size() for t in tensors.values())


def main() -> None:
    print("| layers | config | trainable numbers | tensors in the file | file bytes | of which data |")
    print("|---|---|---|---|---|---|")
    for layers in (6, 30):
        for label, settings in CONFIGS.items():
            numbers, count, size, data = measure(layers, settings)
            print(f"| {layers} | {label} | {numbers} | {count} | {size:,} | {data:,} |")


if __name__ == "__main__":
    main()
