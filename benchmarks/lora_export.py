"""How well a LoRA of rank r reproduces a RECAST adapter on the real MiniLM-L6 (``peft.convert_to_lora``).

Run: `.venv/bin/python benchmarks/lora_export.py [ADAPTER_DIR]` with an adapter written by `peft-recast train` or
`peft-recast demo` (default: a fresh RECAST adapter with random coefficients). For each rank it prints the relative
Frobenius error of the weight updates (mean and max over the adapted layers), the LoRA file size, and, for a trained
classifier, the agreement of its predictions with the RECAST adapter's on the task's test split.
"""

from __future__ import annotations

import argparse
import os

import safetensors.torch
import torch
from peft import convert_to_lora, get_peft_model, set_peft_model_state_dict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft_recast import RecastConfig
from peft_recast.apps.encoder import SentenceClassifier, load_classifier, load_encoder, load_tokenizer
from peft_recast.apps.loop import predict_logits
from peft_recast.apps.tasks import Batches
from peft_recast.layer import RecastLayer

RANKS = (1, 4, 16, 64, 192, 384)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter", nargs="?", default=None, help="adapter directory with a task.json (optional)")
    parser.add_argument("--max-eval", type=int, default=1000, help="test examples for the prediction agreement")
    args = parser.parse_args()
    texts = info = classifier = None
    if args.adapter is None:
        torch.manual_seed(0)
        model = get_peft_model(load_encoder(torch.device("cpu")), RecastConfig(init_weights=False)).eval()
    else:
        from peft_recast.apps.tasks import load_task

        classifier, info = load_classifier(args.adapter, torch.device("cpu"))
        model = classifier.encoder
        texts = load_task(info["task"])["test"]["text"][: args.max_eval]
    deltas = {n: m.get_delta_weight("default").float() for n, m in model.named_modules() if isinstance(m, RecastLayer)}
    reference = None
    if texts is not None:
        batches = Batches(load_tokenizer(), texts, info["max_length"], torch.device("cpu"))
        reference = predict_logits(classifier, batches, 64, "RECAST").argmax(-1)
    print(f"{len(deltas)} adapted layers; relative error ||dW - BA||_F / ||dW||_F")
    header = f"{'rank':>5} {'mean error':>10} {'max error':>10} {'LoRA file':>12}"
    print(header + ("  same prediction" if texts else ""))
    for rank in RANKS:
        config, state = convert_to_lora(model, rank=rank)
        errors = [
            ((delta - state[f"{name}.lora_B.weight"] @ state[f"{name}.lora_A.weight"]).norm() / delta.norm()).item()
            for name, delta in deltas.items()
        ]
        size = len(safetensors.torch.save({k: v.contiguous() for k, v in state.items()}))
        line = f"{rank:>5} {sum(errors) / len(errors):>10.3f} {max(errors):>10.3f} {size:>10,} B"
        if texts is not None:
            lora = SentenceClassifier(get_peft_model(load_encoder(torch.device("cpu")), config), len(info["classes"]))
            set_peft_model_state_dict(lora.encoder, state)
            lora.classifier.load_state_dict(classifier.classifier.state_dict())
            agree = (predict_logits(lora, batches, 64, f"LoRA r={rank}").argmax(-1) == reference).float().mean()
            line += f"  {100 * agree.item():>14.1f}%"
        print(line, flush=True)


if __name__ == "__main__":
    main()
