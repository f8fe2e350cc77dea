"""Reinforcement learning with 🤗 TRL's ``GRPOTrainer(peft_config=RecastConfig(...))``, offline, on a tiny Llama.

The policy is a random tiny Llama with a character-level tokenizer built on the spot (``tiny_llama.py``; use
``from_pretrained`` of a real model for real work) and the reward is the share of vowels in each completion, a
stand-in for a real reward function. GRPO samples ``--generations`` completions per prompt with ``generate``, scores
them, and trains RECAST's coefficients only (the base weights stay frozen); with ``--beta > 0`` the KL term's
reference is the base model, which TRL gets by disabling the adapter. The script prints the mean reward per step,
saves the adapter and reloads it with ``peft.AutoPeftModelForCausalLM``::

    python examples/trl_grpo.py                                 # 64 wide, 4 layers, 20 steps: about 15 s on 2 CPU cores
    python examples/trl_grpo.py --hidden 32 --layers 2 --steps 3   # a seconds-long smoke run (CI)
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never ask the Hub

import torch
from datasets import Dataset
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

import peft_recast
from peft_recast import RecastConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_llama import make_tiny_llama

PROMPTS = ["Say something:", "Tell me a word:", "Write a line:", "Answer:"]


def vowel_share(completions: list[str], **kwargs: Any) -> list[float]:
    """The reward: the share of vowels among the characters of each completion (0 for an empty one)."""
    return [sum(c in "aeiouAEIOU" for c in text) / max(len(text), 1) for text in completions]


def run(
    output_dir: str,
    hidden: int = 64,
    layers: int = 4,
    steps: int = 20,
    generations: int = 4,
    completion_length: int = 16,
    beta: float = 0.04,
    seed: int = 0,
) -> dict[str, Any]:
    """Train, save and reload; return what the script prints (rewards, coefficients, reload difference)."""
    output_dir = os.path.abspath(output_dir)  # the adapter config names the base model's folder
    base_dir = make_tiny_llama(os.path.join(output_dir, "base"), hidden=hidden, layers=layers, seed=seed)
    args = GRPOConfig(
        output_dir=os.path.join(output_dir, "trainer"),
        # GRPO at 3e-3, 0.3 x the supervised rate: on SmolLM2 it learned there and collapsed at 1e-2 (docs/llm.md)
        learning_rate=0.3 * peft_recast.RECOMMENDED_LR,
        max_steps=steps,
        per_device_train_batch_size=generations,  # one prompt's group of completions per step
        num_generations=generations,
        max_completion_length=completion_length,
        beta=beta,
        logging_steps=1,
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        report_to="none",
        seed=seed,
    )
    trainer = GRPOTrainer(
        model=base_dir,
        reward_funcs=vowel_share,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": PROMPTS[i % len(PROMPTS)]} for i in range(steps)]),
        processing_class=AutoTokenizer.from_pretrained(base_dir, padding_side="left"),
        peft_config=RecastConfig(task_type="CAUSAL_LM", layers_per_group=2),  # q/v, 2 layers per template group
    )
    model = trainer.model
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    trainer.train()
    history = trainer.state.log_history
    rewards = [entry["reward"] for entry in history if "reward" in entry]

    adapter_dir = os.path.join(output_dir, "adapter")
    trainer.save_model(adapter_dir)
    model.eval()
    reloaded = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()
    batch = trainer.processing_class(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        difference = (model(**batch).logits - reloaded(**batch).logits).abs().max().item()
    return {
        "trainable": sorted(trainable),
        "coefficients": {n: p.detach().clone() for n, p in model.named_parameters() if "recast_coefficients" in n},
        "frozen_unchanged": all(torch.equal(p, model.get_parameter(n)) for n, p in frozen.items()),
        "rewards": rewards,
        "kl": [entry["kl"] for entry in history if "kl" in entry],
        "logits_difference": difference,
        "adapter_dir": adapter_dir,
    }


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="runs/trl-grpo")
    parser.add_argument("--hidden", type=int, default=64, help="width of the tiny Llama")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the tiny Llama")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (one prompt each)")
    parser.add_argument("--generations", type=int, default=4, help="completions sampled per prompt")
    parser.add_argument("--completion-length", type=int, default=16, help="tokens per completion at most")
    parser.add_argument("--beta", type=float, default=0.04, help="KL coefficient (reference: adapter disabled)")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)
    result = run(options.output_dir, options.hidden, options.layers, options.steps, options.generations,
                 options.completion_length, options.beta, options.seed)
    coefficients = torch.cat([c.flatten() for c in result["coefficients"].values()])
    print(f"trained {coefficients.numel()} RECAST coefficients (nothing else: {len(result['trainable'])} tensors), "
          f"|theta| = {coefficients.norm():.3f} (0 at the start); base weights unchanged: {result['frozen_unchanged']}")
    print("mean reward per step: " + " ".join(f"{r:.3f}" for r in result["rewards"]))
    if result["kl"]:
        print(f"KL to the base model (adapter disabled) at the last step: {result['kl'][-1]:.2e}")
    print(f"reloaded with AutoPeftModelForCausalLM from {result['adapter_dir']}: max |logits difference| "
          f"{result['logits_difference']:.2e}")
    return result


if __name__ == "__main__":
    main()
