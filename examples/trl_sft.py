"""Supervised fine-tuning with 🤗 TRL's ``SFTTrainer(peft_config=RecastConfig(...))``, offline, on a tiny Llama.

The base model is a random tiny Llama with a character-level tokenizer built on the spot (``tiny_llama.py``; use
``from_pretrained`` of a real model for real work). The chat template comes through TRL's
``SFTConfig(chat_template_path=...)`` from a tokenizer that has two tokens the model's lacks (``<|im_start|>``,
``<|im_end|>``): TRL adds them, grows the embeddings (to a multiple of 64) and puts the new ids into the config's
``trainable_token_indices`` and ``lm_head`` into its ``modules_to_save``, so besides RECAST's coefficients the new
tokens' embedding rows and the output head train and are saved with the adapter. The script prints the loss at the
start and the end of training, saves the adapter, reloads it with ``peft.AutoPeftModelForCausalLM`` and checks that
the reloaded model gives the trained model's logits and embedding rows::

    python examples/trl_sft.py                                  # 64 wide, 4 layers, 60 steps: about 15 s on 2 CPU cores
    python examples/trl_sft.py --hidden 32 --layers 2 --steps 12   # a seconds-long smoke run (CI)
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never ask the Hub

import torch
from datasets import Dataset
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

import peft_recast
from peft_recast import RecastConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_llama import make_chat_template_source, make_tiny_llama

WORDS = ["cat", "dog", "bird", "fish", "frog", "lion", "bear", "wolf", "duck", "goat", "mole", "crab"]


def conversations(count: int, seed: int = 0) -> Dataset:
    """``count`` chats in TRL's conversational format: the user asks to spell a word, the assistant spells it."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        word = rng.choice(WORDS)
        rows.append({"messages": [
            {"role": "user", "content": f"spell {word}"},
            {"role": "assistant", "content": " ".join(word)},
        ]})  # fmt: skip
    return Dataset.from_list(rows)


def embedding_rows(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """The rows the model's input embedding gives ``ids`` (through PEFT's trainable-token wrapper, if any)."""
    with torch.no_grad():
        return model.get_input_embeddings()(torch.tensor(ids)).detach().clone()


def run(
    output_dir: str, hidden: int = 64, layers: int = 4, steps: int = 60, batch_size: int = 8, seed: int = 0
) -> dict[str, Any]:
    """Train, save and reload; return what the script prints (losses, token ids, rows, reload differences)."""
    output_dir = os.path.abspath(output_dir)  # the adapter config names the base model's folder
    base_dir = make_tiny_llama(os.path.join(output_dir, "base"), hidden=hidden, layers=layers, seed=seed)
    template_dir = make_chat_template_source(os.path.join(output_dir, "chat-template"))
    args = SFTConfig(
        output_dir=os.path.join(output_dir, "trainer"),
        chat_template_path=template_dir,  # a tokenizer folder: TRL clones its template and adds its tokens
        learning_rate=peft_recast.RECOMMENDED_LR,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        logging_steps=1,
        max_length=64,
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        report_to="none",
        seed=seed,
    )
    # q/v, 2 layers per template group; the head trains in full so that the model can learn to emit the new tokens
    # (TRL adds it when the template adds tokens); TRL fills `trainable_token_indices` with the added tokens' ids
    peft_config = RecastConfig(task_type="CAUSAL_LM", layers_per_group=2, modules_to_save=["lm_head"])
    trainer = SFTTrainer(
        model=base_dir,
        args=args,
        train_dataset=conversations(steps * batch_size, seed),
        processing_class=AutoTokenizer.from_pretrained(base_dir),
        peft_config=peft_config,
    )
    model = trainer.model
    new_ids = sorted(model.peft_config["default"].trainable_token_indices["embed_tokens"])
    chat_ids = trainer.processing_class.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    initial_rows = embedding_rows(model, new_ids)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    adapter_dir = os.path.join(output_dir, "adapter")
    trainer.save_model(adapter_dir)  # the adapter, its config and the grown tokenizer
    model.eval()
    reloaded = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()
    chats = [row["messages"] for row in conversations(4, seed + 1)]
    batch = trainer.processing_class.apply_chat_template(chats, return_tensors="pt", padding=True, return_dict=True)
    with torch.no_grad():
        logits = model(**batch).logits
        reloaded_logits = reloaded(**batch).logits
    trained_rows = embedding_rows(model, new_ids)
    return {
        "trainable_parameters": model.get_nb_trainable_parameters()[0],
        "coefficients": {n: p.detach().clone() for n, p in model.named_parameters() if "recast_coefficients" in n},
        "losses": losses,
        "new_token_ids": new_ids,
        "chat_token_ids": chat_ids,
        "initial_rows": initial_rows,
        "trained_rows": trained_rows,
        "reloaded_rows": embedding_rows(reloaded, new_ids),
        "logits_difference": (logits - reloaded_logits).abs().max().item(),
        "adapter_dir": adapter_dir,
    }


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="runs/trl-sft")
    parser.add_argument("--hidden", type=int, default=64, help="width of the tiny Llama")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the tiny Llama")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)
    result = run(options.output_dir, options.hidden, options.layers, options.steps, options.batch_size, options.seed)
    losses, k = result["losses"], max(1, len(result["losses"]) // 5)
    coefficients = torch.cat([c.flatten() for c in result["coefficients"].values()])
    print(f"trainable: {result['trainable_parameters']} ({coefficients.numel()} RECAST coefficients, the rest the "
          f"{len(result['new_token_ids'])} new tokens' embedding rows and lm_head)")
    print(f"loss: {sum(losses[:k]) / k:.3f} (first {k} steps) -> {sum(losses[-k:]) / k:.3f} (last {k} steps)")
    print(f"RECAST coefficients: |theta| = {coefficients.norm():.3f} (0 at the start)")
    moved = (result["trained_rows"] - result["initial_rows"]).norm(dim=1)
    print(f"chat tokens {result['chat_token_ids']}: embedding rows moved by {moved[:2].tolist()}")
    print(f"reloaded with AutoPeftModelForCausalLM from {result['adapter_dir']}: max |logits difference| "
          f"{result['logits_difference']:.2e}, new-token rows equal: "
          f"{torch.equal(result['reloaded_rows'], result['trained_rows'])}")
    return result


if __name__ == "__main__":
    main()
