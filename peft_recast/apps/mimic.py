"""``peft-recast mimic`` and ``peft-recast fidelity``: gradient Neural Mimicry of a model, and how faithful it is."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from torch import nn

from .. import RecastConfig
from ..bank import MimicrySettings, save_template_bank
from ..fidelity import compare_mimicry, format_comparison
from ..files import atomic_write
from ..gradient_mimicry import mimic_template_bank
from .runtime import torch_threads


def _config_from_args(args: argparse.Namespace) -> RecastConfig:
    overrides: dict[str, Any] = {}
    if args.layers_per_group:
        overrides["layers_per_group"] = args.layers_per_group
    for name in ("num_templates", "num_coefficient_sets", "target_modules", "fused_modules"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return RecastConfig.from_preset(args.preset, **overrides)


def _settings_from_args(args: argparse.Namespace) -> MimicrySettings:
    return MimicrySettings(
        steps=args.steps, lr=args.lr, lr_step=args.lr_step or max(1, args.steps // 5), lr_gamma=args.lr_gamma,
        noise_std=args.noise_std, clip_norm=args.clip_norm, loss_weight=args.loss_weight, seed=args.seed,
    )


def _load_model(args: argparse.Namespace) -> tuple[nn.Module, str]:
    from transformers import AutoModel

    from .encoder import minilm_path

    path = args.model or minilm_path()
    return AutoModel.from_pretrained(path).eval(), path


def run_mimicry_command(args: argparse.Namespace) -> int:
    """Run ``peft-recast mimic`` or ``peft-recast fidelity``."""
    with torch_threads(args.threads):
        return _run_mimicry_command(args)


def _run_mimicry_command(args: argparse.Namespace) -> int:
    model, path = _load_model(args)
    config, settings = _config_from_args(args), _settings_from_args(args)
    if args.command == "mimic":
        bank = mimic_template_bank(model, config, settings)
        written = save_template_bank(bank, args.output)
        print(f"template bank of {len(bank.groups)} groups for {path}: {written} (best loss {bank.best_loss:.3e}, "
              f"{bank.seconds:.1f} s)")
        print(f"use it with RecastConfig.from_preset({args.preset!r}, ..., template_bank={written!r})")
        return 0
    from transformers import AutoTokenizer

    from .tasks import read_trec6

    texts = read_trec6()[0][: args.samples]
    inputs = dict(AutoTokenizer.from_pretrained(path)(texts, return_tensors="pt", padding=True, truncation=True,
                                                      max_length=64))
    closed, gradient = compare_mimicry(model, config, inputs, args.bank_dir, settings)
    print(closed)
    print(gradient)
    print(format_comparison(closed, gradient))
    if args.json:
        with atomic_write(args.json) as handle:
            json.dump({"model": path, "config": config.to_dict(), "reports": [asdict(closed), asdict(gradient)]},
                      handle, indent=1, default=str)
    return 0
