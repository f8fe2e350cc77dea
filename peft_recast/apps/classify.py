"""``peft-recast train``, ``evaluate`` and ``predict`` on a built-in task or the user's own data: the options turned
into data, a model and a config, with every bad input refused (:class:`~.textdata.UsageError`) before anything is
written; the metrics of ``evaluate`` (accuracy, macro-F1, confusion matrix as text and PNG)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import TYPE_CHECKING, Any, Optional

from .textdata import (
    STDIN,
    STDIN_TEXT_COLUMN,
    TextExamples,
    UsageError,
    check_known_labels,
    class_names,
    read_examples,
    split_validation,
)

if TYPE_CHECKING:
    import torch

    from .. import RecastConfig

DEFAULT_TASK = "trec6"
DEFAULT_MAX_LENGTH = 128


def _task_examples(task: str, max_train: Optional[int], max_eval: Optional[int]) -> tuple[list[str], dict]:
    from .tasks import first_examples, load_task

    splits = load_task(task, max_train=max_train)
    classes = list(splits["train"].features["label"].names)

    def examples(split: str) -> TextExamples:
        dataset = splits[split] if split == "train" else first_examples(splits[split], max_eval)
        return TextExamples(list(dataset["text"]), None, [classes[i] for i in dataset["label"]])

    return classes, {split: examples(split) for split in ("train", "validation", "test")}


def _own_examples(args: argparse.Namespace) -> tuple[list[str], dict]:
    columns = (args.text_column, args.text_pair_column, args.label_column)
    train = read_examples(args.data, *columns)
    if args.max_train is not None:
        train = train.subset(range(min(args.max_train, len(train))))
    classes = class_names(train.labels, args.data)
    if args.validation_data:
        validation = read_examples(args.validation_data, *columns)
        check_known_labels(validation.labels, classes, args.validation_data)
    else:
        train, validation = split_validation(train, args.seed)
        class_names(train.labels, f"{args.data} (after holding back {len(validation)} examples for validation)")
    return classes, {"train": train, "validation": validation}


def build_config(model: Optional[str], preset: Optional[str], target_modules: Optional[list[str]]) -> RecastConfig:
    """The adapter's config for ``model``: ``preset`` (default: ``RecastConfig()``), ``target_modules`` instead of the
    defaults; a model type without default target modules is refused with the names to pass."""
    from .. import RecastConfig
    from ..planning import TRANSFORMERS_MODELS_TO_RECAST_TARGET_MODULES_MAPPING

    try:
        config = RecastConfig.from_preset(preset) if preset else RecastConfig()
    except (KeyError, ValueError) as error:
        raise UsageError(f"--preset {preset}: {error}") from error
    if target_modules:
        return dataclasses.replace(config, target_modules=target_modules)
    if config.target_modules is None and model is not None:
        from transformers import AutoConfig

        try:
            model_type = AutoConfig.from_pretrained(model).model_type
        except (OSError, ValueError) as error:
            raise UsageError(f"--model {model}: cannot read its config ({str(error).splitlines()[0]}).") from error
        if model_type not in TRANSFORMERS_MODELS_TO_RECAST_TARGET_MODULES_MAPPING:
            raise UsageError(f"--model {model}: model type {model_type!r} has no default target modules; pass "
                             "--target-modules with the names of the linear layers to adapt (for example the "
                             "attention's query and value projections), or --preset ladder-216 for every linear layer.")
    return config


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    """``peft-recast train``: data, config and rate from the options, then
    :func:`~.trainer.train_classifier`; prints the result."""
    from ..presets import recommended_lr
    from .encoder import task_record
    from .tasks import TASKS
    from .trainer import TrainSettings, checkpoint_path, train_classifier

    if args.task and args.data:
        raise UsageError("give either --task (a built-in task) or --data (your own file), not both.")
    if args.channels < 0:
        raise UsageError(f"--channels must be 0 (none) or a positive number of output rows, got {args.channels}.")
    if args.data is None and (args.validation_data or args.text_pair_column):
        raise UsageError("--validation-data and --text-pair-column go with --data.")
    config = build_config(args.model, args.preset, args.target_modules)
    if args.data:
        classes, splits = _own_examples(args)
        name = os.path.splitext(os.path.basename(args.data.rstrip("/")))[0]
        max_length = args.max_length or DEFAULT_MAX_LENGTH
        record = task_record(name, classes, max_length, args.model, text_column=args.text_column,
                             text_pair_column=args.text_pair_column, label_column=args.label_column)
    else:
        task = args.task or DEFAULT_TASK
        classes, splits = _task_examples(task, args.max_train, args.max_eval)
        max_length = args.max_length or TASKS[task].max_length
        record = task_record(task, classes, max_length, args.model)
    lr = args.lr if args.lr is not None else recommended_lr(config)
    resume = True if args.resume_from_checkpoint == "last" else args.resume_from_checkpoint
    settings = TrainSettings(
        output_dir=args.output_dir, model=args.model, config=config, epochs=args.epochs, batch_size=args.batch_size,
        lr=lr, head_lr=args.head_lr, seed=args.seed, max_length=max_length, head_first=not args.no_head_first,
        channels=args.channels, resume_from_checkpoint=resume, record=record,
    )
    if resume:
        checkpoint_path(settings)
    result = train_classifier(splits["train"], splits["validation"], classes, settings, splits.get("test"))
    tested = (f", test accuracy {100 * result['test_accuracy']:.1f}%" if "test_accuracy" in result else "")
    print(f"{record['task']}: {result['train_examples']} training examples, {result['coefficients']} coefficients + "
          f"{result['head_parameters']} head parameters at lr {lr:g}; validation accuracy "
          f"{100 * result['validation_accuracy']:.1f}%{tested} (kept: {result['kept']}); run saved to "
          f"{args.output_dir} (adapter in {result['adapter_dir']})", flush=True)
    return result


def _run_folder(path: str) -> str:
    """The adapter folder of a run: ``path`` itself when it holds ``task.json``, else ``path/adapter``."""
    from .encoder import TASK_FILE

    for folder in (path, os.path.join(path, "adapter")):
        if os.path.isfile(os.path.join(folder, TASK_FILE)):
            return folder
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such run folder.")
    raise UsageError(f"{path} is not a run folder of `peft-recast train` or `demo` (no {TASK_FILE} in it or in "
                     f"{os.path.join(path, 'adapter')}).")


def _examples_for_run(args: argparse.Namespace, record: dict, labelled: bool) -> TextExamples:
    text = args.text_column or record.get("text_column") or ("text" if args.data != STDIN else STDIN_TEXT_COLUMN)
    pair = args.text_pair_column or record.get("text_pair_column")
    label = (args.label_column or record.get("label_column") or "label") if labelled else None
    if args.data == STDIN and pair is None and text != STDIN_TEXT_COLUMN and not args.text_column:
        text = STDIN_TEXT_COLUMN
    return read_examples(args.data, text, pair, label)


def _logits(classifier, record: dict, examples: TextExamples, batch_size: int, desc: str) -> torch.Tensor:
    import torch

    from .encoder import load_tokenizer, record_model
    from .loop import predict_logits
    from .tasks import Batches

    tokenizer = load_tokenizer(record_model(record))
    batches = Batches(tokenizer, examples.texts, record["max_length"], torch.device("cpu"), examples.pairs)
    return predict_logits(classifier, batches, batch_size, desc)


def classification_metrics(predicted: list[int], labels: list[int], classes: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 (the mean over the classes present in ``labels`` or ``predicted`` of each class's F1) and
    the confusion matrix (``matrix[i][j]``: examples of class ``i`` predicted as ``j``)."""
    count = len(classes)
    matrix = [[0] * count for _ in range(count)]
    for truth, guess in zip(labels, predicted):
        matrix[truth][guess] += 1
    scores = []
    for k in range(count):
        true_positive = matrix[k][k]
        predicted_k = sum(matrix[i][k] for i in range(count))
        actual_k = sum(matrix[k])
        if predicted_k + actual_k:
            scores.append(2 * true_positive / (predicted_k + actual_k))
    correct = sum(matrix[k][k] for k in range(count))
    return dict(examples=len(labels), accuracy=correct / max(len(labels), 1),
                macro_f1=sum(scores) / max(len(scores), 1), classes=classes, confusion_matrix=matrix)


def format_confusion(metrics: dict[str, Any]) -> str:
    """The confusion matrix as text: one row per true class, one column per predicted class."""
    names = [name[:12] for name in metrics["classes"]]
    width = max(6, *(len(name) for name in names))
    corner = "true \\ predicted"
    lines = [f"{corner:>{width + 4}} " + " ".join(f"{name:>{width}}" for name in names)]
    for name, row in zip(names, metrics["confusion_matrix"]):
        lines.append(f"{name:>{width + 4}} " + " ".join(f"{value:>{width}}" for value in row))
    return "\n".join(lines)


def plot_confusion(metrics: dict[str, Any], path: str) -> None:
    """The confusion matrix as a PNG heat map with counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix, names = metrics["confusion_matrix"], metrics["classes"]
    size = max(4.0, 0.6 * len(names) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axes.set_yticks(range(len(names)), names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    peak = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            axes.text(j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    axes.set_title(f"accuracy {100 * metrics['accuracy']:.1f}%, macro-F1 {100 * metrics['macro_f1']:.1f}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """``peft-recast evaluate RUN``: metrics of a saved run on a built-in task's split or on ``--data``."""
    import torch

    from .encoder import load_classifier, read_task_record

    folder = _run_folder(args.run)
    record = read_task_record(folder)
    classes = record["classes"]
    if args.data:
        examples = _examples_for_run(args, record, labelled=True)
        check_known_labels(examples.labels, classes, "standard input" if args.data == STDIN else args.data)
        name = args.data
    else:
        from .tasks import TASKS

        task = args.task or record["task"]
        if task not in TASKS:
            raise UsageError(f"run {args.run} was trained on {task!r}, not a built-in task; pass --data.")
        task_classes, splits = _task_examples(task, None, args.max_eval)
        if task_classes != classes:
            raise UsageError(f"the run in {folder} classifies into {len(classes)} classes ({record['task']}); task "
                             f"{task!r} has {len(task_classes)}.")
        examples, name = splits[args.split], f"{task} {args.split}"
    if args.max_eval is not None:
        examples = examples.subset(range(min(args.max_eval, len(examples))))
    classifier, _ = load_classifier(folder, torch.device("cpu"))
    logits = _logits(classifier, record, examples, args.batch_size, f"evaluate {name}")
    metrics = classification_metrics(logits.argmax(-1).tolist(), [classes.index(x) for x in examples.labels], classes)
    print(f"{name}: accuracy {100 * metrics['accuracy']:.1f}%, macro-F1 {100 * metrics['macro_f1']:.1f} on "
          f"{metrics['examples']} examples ({args.run})\n{format_confusion(metrics)}", flush=True)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        plot_confusion(metrics, os.path.join(args.output_dir, "confusion_matrix.png"))
        with open(os.path.join(args.output_dir, "evaluation.json"), "w") as handle:
            json.dump(dict(data=name, run=args.run, **metrics), handle, indent=2)
        print(f"wrote {os.path.join(args.output_dir, 'confusion_matrix.png')} and evaluation.json", flush=True)
    return metrics


def run_predict(args: argparse.Namespace) -> int:
    """``peft-recast predict RUN --data F``: the label and its probability per example, as JSON lines."""
    import torch

    from .encoder import load_classifier, read_task_record

    folder = _run_folder(args.run)
    record = read_task_record(folder)
    examples = _examples_for_run(args, record, labelled=False)
    classifier, _ = load_classifier(folder, torch.device("cpu"))
    probabilities = _logits(classifier, record, examples, args.batch_size, "predict").softmax(-1)
    best, index = probabilities.max(-1)
    lines = [json.dumps(dict(label=record["classes"][i], probability=round(p, 6)))
             for i, p in zip(index.tolist(), best.tolist())]
    text = "\n".join(lines) + "\n"
    if args.output in (None, STDIN):
        sys.stdout.write(text)
    else:
        from ..files import atomic_write

        with atomic_write(args.output) as handle:
            handle.write(text)
        print(f"wrote {len(lines)} predictions to {args.output}", file=sys.stderr, flush=True)
    return 0
