"""Training memory and step time of RECAST rungs against LoRA r=8 on the same target modules, side by side.

One process builds every model on all-MiniLM-L6-v2, takes a step each (one-time allocations), then measures the
memory a step adds (tensors kept for backward, gradients and optimizer state: ``bench.training_memory``) and the
median step time over rounds taken in rotation, on 32 real BBC articles x 128 tokens.

    python benchmarks/training_costs.py --threads 1
"""

import argparse

import peft
import torch

import peft_recast
from peft_recast.apps.bench.costs import train_step, training_memory
from peft_recast.apps.encoder import load_encoder, load_tokenizer, new_head
from peft_recast.apps.runtime import side_by_side
from peft_recast.apps.tasks import load_task
from peft_recast.presets import preset_fields

QV_MLP = preset_fields("bands-24-qv-mlp", {"model_type": "bert"})["target_modules"]  # the bands presets' modules
CONFIGS = {  # name -> (config builder, the LoRA reference on the same targets)
    "LoRA r=8, all linear": (lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), None),
    "RECAST ladder-216, all linear": (lambda: peft_recast.RecastConfig.from_preset("ladder-216"),
                                      "LoRA r=8, all linear"),
    "RECAST ladder-648, all linear": (lambda: peft_recast.RecastConfig.from_preset("ladder-648"),
                                      "LoRA r=8, all linear"),
    "LoRA r=8, q,v": (lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]), None),
    "RECAST default, q,v": (lambda: peft_recast.RecastConfig(), "LoRA r=8, q,v"),
    "LoRA r=8, q,v,MLP": (lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=QV_MLP), None),
    "RECAST bands-24-qv-mlp": (lambda: peft_recast.RecastConfig.from_preset("bands-24-qv-mlp"), "LoRA r=8, q,v,MLP"),
    "RECAST bands-48-qv-mlp": (lambda: peft_recast.RecastConfig.from_preset("bands-48-qv-mlp"), "LoRA r=8, q,v,MLP"),
    "RECAST bands-144-qv-mlp": (lambda: peft_recast.RecastConfig.from_preset("bands-144-qv-mlp"), "LoRA r=8, q,v,MLP"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    texts = load_task("bbc")["test"]["text"][:32]
    batch = dict(load_tokenizer()(texts, padding="max_length", truncation=True, max_length=128, return_tensors="pt"))
    labels = torch.zeros(32, dtype=torch.long)
    built = {}
    for name, (config, _) in CONFIGS.items():
        encoder = peft.get_peft_model(load_encoder(cpu), config())
        head = new_head(384, 2, 0, cpu)
        optimizer = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad] + list(head.parameters()))
        train_step(encoder, head, batch, labels, optimizer)
        built[name] = (encoder, head, optimizer)
    memory = {name: training_memory(*built[name][:2], batch, built[name][2]) for name in built}
    seconds = side_by_side({name: lambda name=name: train_step(*built[name][:2], batch, labels, built[name][2])
                            for name in built}, args.rounds, description="training steps")
    print(f"{'config':<32} {'memory MiB':>10} {'vs LoRA':>8} {'step s':>7} {'vs LoRA':>8}")
    for name, (_, reference) in CONFIGS.items():
        reference = reference or name
        step, base = seconds[name], seconds[reference]
        print(f"{name:<32} {memory[name] / 2**20:>10.1f} {memory[name] / memory[reference]:>7.2f}x {step:>7.2f} "
              f"{step / base:>7.2f}x")


if __name__ == "__main__":
    main()
