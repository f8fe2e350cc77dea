"""Does the default train a decoder LM at the recommended rate and around it? Loss on held-back text, 50 steps.

Run: `.venv/bin/python benchmarks/decoder_lr.py [--layers 30]`. A Llama with grouped-query attention (4 query, 2
key/value heads) built from a config is first trained in full for ``--pretrain-steps`` on synthetic sequences (token
``t_i = t_0 + i * stride mod V``, strides 1-5), so that its weights carry structure as a pretrained model's do; then
``RecastConfig()`` adapts it to strides 6-8 (a task it has not seen) with AdamW at ``RECOMMENDED_LR / 3``,
``RECOMMENDED_LR`` and ``3 x RECOMMENDED_LR``, a linear decay to 0 without warm-up (transformers' ``Trainer`` default),
batches of 8 x 32 tokens. Every 5 steps it takes the loss on 16 held-back sequences; the table gives the start, the
end, and the worst loss as a change from the start. ``--text DIR``: the same on real text, with the Llama that
``decoder_task.py`` pretrains on the tasks' texts (cached in ``DIR``) adapted to TREC-6 and SMS texts it never saw.
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch
from peft import get_peft_model
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from peft_recast import RECOMMENDED_LR, RecastConfig

VOCAB, LENGTH = 512, 32


def sequences(count: int, strides: range, generator: torch.Generator) -> torch.Tensor:
    """``(count, LENGTH)`` token ids ``t_0 + i * stride mod VOCAB``, start and stride drawn from ``generator``."""
    start = torch.randint(0, VOCAB, (count, 1), generator=generator)
    stride = torch.tensor(list(strides))[torch.randint(0, len(strides), (count, 1), generator=generator)]
    return (start + torch.arange(LENGTH) * stride) % VOCAB


def pretrained(layers: int, steps: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=LENGTH))
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in tqdm(range(steps), desc="pretraining", unit="step"):
        batch = sequences(16, range(1, 6), generator)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def adapt(base: LlamaForCausalLM, lr: float, steps: int, windows: Optional[torch.Tensor] = None) -> list[float]:
    """Held-back losses (start, then every 5 steps) while ``RecastConfig()`` trains at peak rate ``lr``; on
    ``windows`` ``(80, length)`` of token ids if given (the first 64 train, the last 16 are held back), else on
    synthetic sequences of strides 6-8."""
    model = get_peft_model(base, RecastConfig())
    generator = torch.Generator().manual_seed(2)
    if windows is None:
        windows = torch.cat([sequences(64, range(6, 9), generator), sequences(16, range(6, 9), generator)])
    train, held = windows[:64], windows[64:80]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)

    def held_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(input_ids=held, labels=held).loss.item()

    losses = [held_loss()]
    for step in tqdm(range(steps), desc=f"RECAST lr {lr:g}", unit="step", leave=False):
        model.train()
        batch = train[torch.randint(0, len(train), (8,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 5 == 4:
            losses.append(held_loss())
    model.unload()  # the base model as it was, for the next rate
    return losses


def text_base_and_windows(out: str) -> tuple[LlamaForCausalLM, torch.Tensor]:
    """The Llama that ``decoder_task.py`` pretrains on real text (its defaults, cached in ``out``) and 80 windows of
    ``LENGTH`` tokens of the texts it never saw (TREC-6 questions and SMS messages, shuffled with a fixed seed)."""
    import decoder_task

    tokenizer, base = decoder_task.tokenizer_and_base(decoder_task.arguments(["--out", out]))
    unseen = [text for name in (*decoder_task.TUNING_TASKS, *decoder_task.HELD_OUT_TASKS)
              for text in decoder_task.TASKS[name].reader()[0]]
    order = torch.randperm(len(unseen), generator=torch.Generator().manual_seed(3)).tolist()
    stream = [t for i in order[:2000] for t in tokenizer(unseen[i])["input_ids"] + [tokenizer.eos_token_id]]
    return base, torch.tensor(stream[: 80 * LENGTH]).view(80, LENGTH)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--text", metavar="DIR", help="adapt decoder_task.py's text-pretrained Llama (cached in DIR) "
                                                      "to unseen real text instead")
    args = parser.parse_args()
    if args.text:
        base, windows = text_base_and_windows(args.text)
    else:
        base, windows = pretrained(args.layers, args.pretrain_steps), None
    print(f"| peak lr | held-back loss at start | after {args.steps} steps | worst (vs start) |")
    print("|---|---|---|---|")
    for lr in (RECOMMENDED_LR / 3, RECOMMENDED_LR, 3 * RECOMMENDED_LR):
        losses = adapt(base, lr, args.steps, windows)
        worst = max(losses)
        change = 100 * (worst / losses[0] - 1)
        print(f"| {lr:.2g} | {losses[0]:.3f} | {losses[-1]:.3f} | {worst:.3f} ({change:+.1f} %) |")


if __name__ == "__main__":
    main()
