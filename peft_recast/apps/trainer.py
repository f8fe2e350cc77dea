"""``peft-recast train``: a sentence classifier's RECAST adapter trained with ``transformers.Trainer``.

The logic behind ``peft-recast train`` and ``examples/train_with_trainer.py``:

1. an encoder (``--model``: any model ``AutoModel`` loads; default the pip all-MiniLM-L6-v2) whose target modules PEFT
   wraps with ``RecastConfig`` (48 coefficients on MiniLM), mean pooling and a linear head
   (:class:`~peft_recast.apps.encoder.SentenceClassifier`);
2. the head alone first on the frozen encoder (the linear probe's run, LP-FT), then ``Trainer`` with AdamW
   (coefficients at ``lr``, the head at ``head_lr``), a checkpoint and a validation pass per epoch, the best checkpoint
   kept (``load_best_model_at_end``) and ``resume_from_checkpoint``; when no epoch beats the head alone on validation,
   the head-alone state (coefficients 0: the pretrained encoder) is kept;
3. the run folder: ``adapter/`` (a plain PEFT adapter of the base encoder, ``head.safetensors``, ``task.json``; see
   :mod:`.encoder`), ``checkpoint-N/`` and ``results.json``.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import nn

from ..files import atomic_write
from ..presets import HEAD_LR
from .encoder import (
    HEAD_FILE,
    SentenceClassifier,
    load_head,
    load_tokenizer,
    mean_pool,
    recast_classifier,
    save_classifier,
    save_head,
)
from .loop import RANKING_BATCHES, Settings, accuracy, embed_texts, predict_logits, train_probe
from .tasks import Batches
from .textdata import TextExamples, UsageError

if TYPE_CHECKING:
    import datasets

    from .. import RecastConfig

RESULTS_FILE = "results.json"


@dataclass
class TrainSettings:
    """One ``peft-recast train`` run.

    Args:
        output_dir: the run folder (checkpoints, ``adapter/``, ``results.json``).
        model: the encoder, a local folder or Hub id (``None``: the pip all-MiniLM-L6-v2).
        config: the adapter's ``RecastConfig`` (``None``: ``RecastConfig()``).
        lr, head_lr: peak learning rates of the coefficients and of the head.
        max_length: tokens per text (longer texts are cut).
        head_first: train the head alone on the frozen encoder first.
        channels: output rows that get coefficients of their own after the head's run (0: none).
        resume_from_checkpoint: a checkpoint folder, or ``True`` for the run folder's last one.
    """

    output_dir: str
    model: Optional[str] = None
    config: Optional[RecastConfig] = None
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-2
    head_lr: float = HEAD_LR
    seed: int = 0
    max_length: int = 128
    head_first: bool = True
    channels: int = 0
    resume_from_checkpoint: Optional[Union[str, bool]] = None
    record: dict[str, Any] = field(default_factory=dict)


def _dataset(examples: TextExamples, classes: list[str], tokenizer: Any, max_length: int) -> datasets.Dataset:
    """Token ids and class ids of ``examples`` (unpadded: the collator pads per batch)."""
    import datasets

    columns = {"text": examples.texts, "label": [classes.index(label) for label in examples.labels]}
    if examples.pairs is not None:
        columns["text_pair"] = examples.pairs
    dataset = datasets.Dataset.from_dict(columns)
    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # tokenizing takes a moment: no bar of its own
    try:
        return dataset.map(
            lambda batch: tokenizer(batch["text"], batch.get("text_pair"), truncation=True, max_length=max_length),
            batched=True, remove_columns=[name for name in columns if name != "label"],
        )
    finally:
        if not quiet:
            datasets.enable_progress_bars()


def _batches(examples: TextExamples, tokenizer: Any, max_length: int) -> Batches:
    return Batches(tokenizer, examples.texts, max_length, torch.device("cpu"), examples.pairs)


def train_head_first(classifier: SentenceClassifier, batches: Batches, labels: torch.Tensor, settings: Settings) -> None:
    """Train the classifier head alone on the frozen encoder (the adapter at its identity), exactly as the linear
    probe does (``settings.epochs`` epochs at ``settings.head_lr`` on cached sentence embeddings), so that the
    coefficients then start from a trained head rather than a random one (LP-FT)."""
    features = embed_texts(classifier, batches, settings.batch_size, "head first: embed")
    train_probe(classifier.classifier, features, labels, batches.lengths, settings, "head first")


def classifier_loss(head: nn.Module, encoder: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``head(mean_pool(encoder(batch)))`` against ``batch["labels"]`` and the logits."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    logits = head(mean_pool(encoder(**inputs).last_hidden_state, inputs["attention_mask"]))
    return nn.functional.cross_entropy(logits, batch["labels"]), logits


def _trainer_classes():
    """``Trainer`` and callbacks for a PEFT-wrapped encoder whose head lives outside it (built on first use: importing
    transformers' Trainer takes seconds)."""
    from tqdm.auto import tqdm
    from transformers import Trainer, TrainerCallback

    class ClassifierTrainer(Trainer):
        """``Trainer`` whose model is the PEFT-wrapped encoder; the loss goes through the ``head`` kept beside it, so
        checkpoints hold the plain adapter (and, by :class:`HeadCheckpoints`, the head)."""

        def __init__(self, *args: Any, head: nn.Module, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.head = head

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, logits = classifier_loss(self.head, model, inputs)
            return (loss, {"logits": logits}) if return_outputs else loss

    class HeadCheckpoints(TrainerCallback):
        """Writes the head into every checkpoint and, at the end, restores the best checkpoint's head."""

        def __init__(self, head: nn.Module) -> None:
            self.head = head

        def on_save(self, args, state, control, **kwargs):
            save_head(self.head, os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

        def on_train_end(self, args, state, control, **kwargs):
            if args.load_best_model_at_end and state.best_model_checkpoint:
                load_head(state.best_model_checkpoint, self.head)

    class ReadableProgress(TrainerCallback):
        """A progress bar with the running loss, and one line per validation pass (instead of raw log dicts)."""

        def __init__(self) -> None:
            self.bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step", leave=False)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and self.bar is not None:
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if metrics and "eval_accuracy" in metrics and state.epoch is not None:
                line = (f"epoch {state.epoch:.0f}/{args.num_train_epochs:.0f}: validation accuracy "
                        f"{100 * metrics['eval_accuracy']:.1f}%, loss {metrics['eval_loss']:.3f}")
                (self.bar.write if self.bar is not None else print)(line)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()

    return ClassifierTrainer, HeadCheckpoints, ReadableProgress


def checkpoint_path(settings: TrainSettings) -> str:
    """The checkpoint ``settings.resume_from_checkpoint`` names (``True``: the run folder's last one)."""
    from transformers.trainer_utils import get_last_checkpoint

    resume = settings.resume_from_checkpoint
    path = get_last_checkpoint(settings.output_dir) if resume is True and os.path.isdir(settings.output_dir) else resume
    if path is None or path is True or not os.path.isfile(os.path.join(path, HEAD_FILE)):
        raise UsageError(f"No valid checkpoint found in {path if isinstance(path, str) else settings.output_dir}: "
                         "--resume-from-checkpoint needs a checkpoint-N folder written by `peft-recast train`.")
    return path


def _accuracy_metric(prediction) -> dict[str, float]:
    predicted = torch.from_numpy(prediction.predictions).argmax(-1)
    return {"accuracy": accuracy(predicted, torch.from_numpy(prediction.label_ids))}


def _ranked_channels(classifier: SentenceClassifier, batches: Batches, labels: torch.Tensor, count: int,
                     settings: TrainSettings) -> dict[str, list[int]]:
    from .. import RecastConfig, rank_channels

    if settings.resume_from_checkpoint:
        return RecastConfig.from_pretrained(checkpoint_path(settings)).channels
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(settings.seed)).tolist()
    size = settings.batch_size
    chosen = [order[start:start + size] for start in range(0, min(len(order), RANKING_BATCHES * size), size)]
    ranking = [dict(batches(indices), labels=labels[indices]) for indices in chosen]
    return rank_channels(classifier.encoder, ranking, count,
                         loss_fn=lambda model, batch: classifier_loss(classifier.classifier, model, batch)[0])


def train_classifier(
    train: TextExamples,
    validation: TextExamples,
    classes: list[str],
    settings: TrainSettings,
    test: Optional[TextExamples] = None,
) -> dict[str, Any]:
    """Train RECAST (+ head) on ``train``, keep the best state on ``validation``, save the run folder.

    Returns what ``results.json`` holds: examples, numbers trained, validation accuracy per epoch (epoch 0: the head
    alone), which state was kept, and the test accuracy when ``test`` is given.
    """
    from transformers import DataCollatorWithPadding, TrainingArguments
    from transformers.utils import logging as hf_logging

    from .. import add_channels

    tokenizer = load_tokenizer(settings.model)
    try:
        classifier = recast_classifier(len(classes), torch.device("cpu"), settings.seed, settings.model,
                                       settings.config)
    except ValueError as error:  # PEFT's: target modules that match nothing in this model, and the like
        raise UsageError(f"{settings.model or 'all-MiniLM-L6-v2'}: {str(error).splitlines()[0]}") from error
    model = classifier.encoder
    loop_settings = Settings(epochs=settings.epochs, batch_size=settings.batch_size, head_lr=settings.head_lr,
                             seed=settings.seed)
    train_batches = _batches(train, tokenizer, settings.max_length)
    validation_batches = _batches(validation, tokenizer, settings.max_length)
    train_labels = torch.tensor([classes.index(label) for label in train.labels])
    validation_labels = torch.tensor([classes.index(label) for label in validation.labels])

    def validation_accuracy() -> float:
        logits = predict_logits(classifier, validation_batches, 2 * settings.batch_size, "validation")
        return accuracy(logits.argmax(-1), validation_labels)

    head_only = None
    if settings.head_first and not settings.resume_from_checkpoint:
        train_head_first(classifier, train_batches, train_labels, loop_settings)
        head_only = validation_accuracy()
        print(f"epoch 0 (head alone, the linear probe): validation accuracy {100 * head_only:.1f}%", flush=True)
    head_state = {k: v.detach().clone() for k, v in classifier.classifier.state_dict().items()}
    if settings.channels:
        add_channels(model, _ranked_channels(classifier, train_batches, train_labels, settings.channels, settings))
    if settings.resume_from_checkpoint:
        load_head(checkpoint_path(settings), classifier.classifier)
    coefficients = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": coefficients, "lr": settings.lr},
                                   {"params": list(classifier.classifier.parameters()), "lr": settings.head_lr}],
                                  weight_decay=0.0)
    args = TrainingArguments(
        output_dir=settings.output_dir, num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size, per_device_eval_batch_size=2 * settings.batch_size,
        lr_scheduler_type="linear", warmup_steps=0.1, eval_strategy="epoch", save_strategy="epoch",
        save_total_limit=2, load_best_model_at_end=True, metric_for_best_model="accuracy", logging_steps=5,
        seed=settings.seed, report_to="none", use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        label_names=["labels"], disable_tqdm=True,
    )
    trainer_class, head_checkpoints, readable_progress = _trainer_classes()
    trainer = trainer_class(
        model=model, args=args, head=classifier.classifier,
        train_dataset=_dataset(train, classes, tokenizer, settings.max_length),
        eval_dataset=_dataset(validation, classes, tokenizer, settings.max_length),
        processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
        optimizers=(optimizer, None), compute_metrics=_accuracy_metric,
        callbacks=[head_checkpoints(classifier.classifier), readable_progress()],
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    try:
        with warnings.catch_warnings():
            # PEFT looks for the base model's config.json by its Hub id to see whether the vocabulary was resized;
            # it is not, and offline the look-up only warns
            warnings.filterwarnings("ignore", message="Could not find a config file in")
            trainer.train(resume_from_checkpoint=settings.resume_from_checkpoint)
    finally:
        hf_logging.set_verbosity(verbosity)
    per_epoch = [entry["eval_accuracy"] for entry in trainer.state.log_history if "eval_accuracy" in entry]
    best = validation_accuracy()
    kept = f"best epoch ({trainer.state.best_model_checkpoint})"
    if head_only is not None and head_only > best:
        # fine-tuning did not beat the head alone on validation: keep the probe (coefficients 0, the trained head)
        with torch.no_grad():
            for parameter in coefficients:
                parameter.zero_()
        classifier.classifier.load_state_dict(head_state)
        best, kept = head_only, "head alone (coefficients 0: no epoch beat the linear probe on validation)"
    adapter_dir = os.path.join(settings.output_dir, "adapter")
    save_classifier(classifier, adapter_dir, settings.record)
    results = dict(
        adapter_dir=adapter_dir, train_examples=len(train), validation_examples=len(validation), classes=classes,
        coefficients=sum(p.numel() for p in coefficients), head_parameters=sum(
            p.numel() for p in classifier.classifier.parameters()),
        lr=settings.lr, head_lr=settings.head_lr, epochs=settings.epochs, seed=settings.seed,
        validation_accuracy_head_alone=head_only, validation_accuracy_per_epoch=per_epoch,
        validation_accuracy=best, kept=kept,
    )
    if test is not None:
        logits = predict_logits(classifier, _batches(test, tokenizer, settings.max_length), 2 * settings.batch_size,
                                "test")
        labels = torch.tensor([classes.index(label) for label in test.labels])
        results.update(test_examples=len(test), test_accuracy=accuracy(logits.argmax(-1), labels))
    with atomic_write(os.path.join(settings.output_dir, RESULTS_FILE)) as handle:
        json.dump(results, handle, indent=2)
    return results
