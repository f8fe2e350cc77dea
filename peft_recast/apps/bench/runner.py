"""The accuracy part of the benchmark: every method learns the tasks one after another on one model, then every
earlier task is re-tested (on that model and reloaded from disk); :func:`run_bench` ties it to costs and report."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ...channels import add_channels, rank_channels
from ...files import atomic_write
from ...pruning import gate_states, prune_gates
from ..encoder import load_tokenizer, mean_pool, new_head, sentence_logits
from ..loop import (
    RANKING_BATCHES,
    Settings,
    accuracy,
    batch_order,
    by_batch,
    embed_texts,
    train,
    train_probe,
    trainable_numbers,
)
from ..runtime import resolve_device
from ..tasks import TaskData, load_task_data
from .costs import measure_costs
from .methods import METHODS, Method
from .models import MethodModel, load_head, save_run
from .report import (
    BAND_PLOT_FILE,
    GAINS_FILE,
    LR_PLOT_FILE,
    PLOT_FILE,
    TABLE_FILE,
    changed_predictions,
    describe_protocol,
    format_gains_by_rate,
    format_table,
    gain_over_probe,
    learning_rate_curves,
    plot_accuracy,
    plot_gain_bands,
    plot_learning_rates,
    rates_at_the_edge,
    summarise,
)
from .results import RESULTS_FILE, BenchSettings, Results, best_lr, lrs_to_run, probe_candidates, run_key


def _held_during_alignment(encoder: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters a LayerNorm alignment stage holds still: all but the ``modules_to_save``
    copies (the LayerNorms)."""
    return [p for name, p in encoder.named_parameters() if p.requires_grad and "modules_to_save" not in name]


def train_run(encoder: nn.Module, head: nn.Module, data: TaskData, lr: float, seed: int, settings: BenchSettings,
              desc: str, align_epochs: int = 0) -> float:
    """Train the encoder's trainable parameters (peak lr ``lr``) and ``head`` (``settings.head_lr``) on ``data`` with
    the one training loop (:func:`~peft_recast.apps.loop.train`). The first ``align_epochs`` epochs train only the
    ``modules_to_save`` copies (LayerNorms) besides the head. Returns the seconds per step."""
    adapter = [p for p in encoder.parameters() if p.requires_grad]
    groups = [(list(head.parameters()), settings.head_lr)] + ([(adapter, lr)] if adapter else [])
    held = _held_during_alignment(encoder) if align_epochs else []
    run_settings = Settings(epochs=settings.epochs, batch_size=settings.batch_size, seed=seed)
    encoder.eval()
    head.train()
    return train(lambda indices: sentence_logits(encoder, head, data.train(indices)), data.train_labels,
                 data.train.lengths, groups, run_settings, desc, held=held, align_epochs=align_epochs)


@torch.no_grad()
def predictions(encoder: nn.Module, head: nn.Module, batches, batch_size: int, desc: str) -> torch.Tensor:
    """Arg-max class of every text, in the original order (CPU tensor)."""
    encoder.eval()
    head.eval()
    return by_batch(lambda batch: sentence_logits(encoder, head, batch), batches, batch_size, desc).argmax(-1).cpu()


def _probe_run(encoder: nn.Module, head: nn.Module, data: TaskData, seed: int, settings: BenchSettings,
               cache: dict) -> float:
    """The head alone on cached embeddings (same batches, optimiser and schedule as every other method)."""
    class Embedder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def embed(self, **batch) -> torch.Tensor:
            return mean_pool(self.encoder(**batch).last_hidden_state, batch["attention_mask"])

    if data.name not in cache:
        cache[data.name] = embed_texts(Embedder(), data.train, settings.batch_size, f"{data.name}: embed train")
    run_settings = Settings(epochs=settings.epochs, batch_size=settings.batch_size, head_lr=settings.head_lr, seed=seed)
    started = time.perf_counter()
    train_probe(head, cache[data.name], data.train_labels, data.train.lengths, run_settings, f"{data.name} probe")
    return time.perf_counter() - started


def _add_ranked_channels(encoder: nn.Module, head: nn.Module, method: Method, key: str, data: TaskData, seed: int,
                     settings: BenchSettings) -> None:
    """A `channels` method, after the head's probe run: :func:`rank_channels` with that head's loss on the run's first
    training batches, and the chosen channels added to the adapter ``key``."""
    order = batch_order(data.train.lengths, Settings(epochs=1, batch_size=settings.batch_size, seed=seed))
    channels = rank_channels(
        encoder, order[:RANKING_BATCHES], method.channels,
        loss_fn=lambda encoder, indices: nn.functional.cross_entropy(
            sentence_logits(encoder, head, data.train(indices)), data.train_labels[indices]),
    )
    add_channels(encoder, channels, key)


def _align_layernorms(encoder: nn.Module, head: nn.Module, data: TaskData, lr: float, seed: int,
                      settings: BenchSettings, epochs: int, desc: str) -> None:
    """The two-stage recipe's first stage as a run of its own (``epochs`` epochs, its own schedule): only the adapter's
    LayerNorm copies (``modules_to_save``) and the head train; the other adapter parameters are frozen meanwhile and
    trainable again afterwards, so that :func:`rank_channels` ranks the channels of the aligned model."""
    if epochs >= settings.epochs:
        raise ValueError(f"An alignment stage of {epochs} epoch(s) leaves no epoch for ranking and training the "
                         f"channels in a {settings.epochs}-epoch run; train for more than {epochs} epochs.")
    frozen = _held_during_alignment(encoder)
    for parameter in frozen:
        parameter.requires_grad_(False)
    try:
        train_run(encoder, head, data, lr, seed, dataclasses.replace(settings, epochs=epochs), desc)
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)


def _prune(encoder: nn.Module, key: str) -> bool:
    """Drop the modules whose TAPS gate closed (:func:`prune_gates`), so that the run saves and counts the open ones.
    Returns whether every gate closed (:func:`gate_states`): such a run keeps its gated adapter (``prune_gates``
    refuses to remove every module) but computes the pretrained encoder, so the caller counts 0 numbers for it."""
    if not any(gate_states(encoder, key).values()):
        print(f"{key}: every gate closed; the adapter is kept as trained and counted as 0 numbers")
        return True
    closed = prune_gates(encoder, key)
    print(f"{key}: {len(closed)} module(s) closed by their gates")
    return False


def _prediction_digest(predicted: torch.Tensor) -> str:
    return hashlib.sha1(predicted.to(torch.int64).numpy().tobytes()).hexdigest()


def run_tasks(settings: BenchSettings, results: Results, device: torch.device) -> dict:
    """The accuracy part: every method, task after task; returns the forgetting check per (method, seed)."""
    tokenizer = load_tokenizer()
    datasets = {task: load_task_data(task, tokenizer, device, settings.max_train, settings.max_eval)
                for task in settings.tasks}
    protocol = settings.protocol()
    forgetting = {}
    plan = []
    for name in settings.methods:
        method = METHODS[name]
        for seed in settings.seeds:
            plan.append((method, seed))
    outer = tqdm(plan, desc="bench", unit="method x seed")
    for method, seed in outer:
        outer.set_postfix(method=method.name, seed=seed)
        model = MethodModel(method, device)
        embeddings: dict = {}
        for task in settings.chain_tasks():
            data = datasets[task]
            lrs = lrs_to_run(method, task, seed, settings, results, protocol)
            for lr in lrs:
                key = run_key(method.name, task, lr, seed, protocol)
                if key in results.runs:  # finished here, or merged from another machine's results.json
                    continue
                run_dir = os.path.join(settings.output_dir, "runs", key)
                # methods that start from random values (LoRA's A, FourierFT's spectrum) draw them from the run's seed,
                # not from whatever the process did before (other methods, tasks, imports)
                torch.manual_seed(seed)
                encoder = model.new_adapter(key)
                head = new_head(encoder.config.hidden_size, len(data.classes), seed, device)
                gates_all_closed = False
                if method.kind == "probe":
                    seconds = _probe_run(encoder, head, data, seed, settings, embeddings)
                    step_seconds = None
                else:
                    if method.head_first:  # the probe's run on the frozen encoder, then both from there
                        _probe_run(encoder, head, data, seed, settings, embeddings)
                    desc = f"{method.name} {task} lr {lr:g} seed {seed}"
                    stage_settings, align_epochs = settings, method.align_epochs
                    if method.channels:  # ranked with the head's loss, after the LayerNorm stage where there is one
                        if align_epochs:
                            _align_layernorms(encoder, head, data, lr, seed, settings, align_epochs, f"{desc} align")
                            stage_settings = dataclasses.replace(settings, epochs=settings.epochs - align_epochs)
                            align_epochs = 0
                        _add_ranked_channels(encoder, head, method, key, data, seed, settings)
                    step_seconds = train_run(encoder, head, data, lr, seed, stage_settings, desc, align_epochs)
                    seconds = None
                    if getattr(encoder.peft_config[key], "module_gates", False):
                        gates_all_closed = _prune(encoder, key)
                val = predictions(encoder, head, data.validation, settings.batch_size, "validation")
                test = predictions(encoder, head, data.test, settings.batch_size, "test")
                numbers = 0 if method.kind == "probe" or gates_all_closed else trainable_numbers(encoder)
                adapter_bytes = save_run(encoder, head, method, run_dir)
                results.add(dict(
                    key=key, method=method.name, task=task, lr=lr, seed=seed, protocol=protocol,
                    validation_accuracy=accuracy(val, data.validation_labels),
                    test_accuracy=accuracy(test, data.test_labels), test_digest=_prediction_digest(test),
                    trainable=numbers, head_params=trainable_numbers(head),
                    adapter_bytes=adapter_bytes, step_seconds=step_seconds, probe_seconds=seconds,
                    device=str(device),
                ))
                if method.kind == "full":
                    del encoder
        chosen = {task: best_lr(method, task, settings, results, protocol) for task in settings.chain_tasks()}
        report = check_forgetting(model, method, seed, chosen, datasets, settings, results, protocol, device)
        if report:  # saved at once: a benchmark stopped later keeps the chains it finished
            forgetting[f"{method.name}/seed{seed}"] = results.forgetting[f"{method.name}/seed{seed}"] = report
            results.save()
    return forgetting


def check_forgetting(model: MethodModel, method: Method, seed: int, chosen: dict, datasets: dict,
                      settings: BenchSettings, results: Results, protocol: dict, device: torch.device) -> dict:
    """After the last task: every task's adapter (at its chosen rate) on the one model that learned them all, and
    again loaded from its saved files onto a fresh base model; both must give the predictions taken right after the
    task was trained. Runs whose files are not here (merged from another machine's ``results.json``) are left out."""
    fresh = MethodModel(method, device)
    report = {}
    for task, lr in chosen.items():
        key = run_key(method.name, task, lr, seed, protocol)
        record, data = results.runs[key], datasets[task]
        run_dir = os.path.join(settings.output_dir, "runs", key)
        if not os.path.isdir(run_dir):
            continue
        head = load_head(run_dir, device)
        if method.kind == "peft" and model.encoder is not None and key in model.encoder.peft_config:
            shared = model.activate(key)
        else:  # trained in an earlier (resumed) process, or full fine-tuning: load it next to the others
            shared = model.load_adapter(key, run_dir)
            if method.kind == "peft":
                shared = model.activate(key)
        after_last = predictions(shared, head, data.test, settings.batch_size, f"{task}: re-test")
        reloaded = fresh.load_adapter(key, run_dir)
        if method.kind == "peft":
            fresh.activate(key)
        from_disk = predictions(reloaded, head, data.test, settings.batch_size, f"{task}: reloaded test")
        report[task] = dict(
            lr=lr, accuracy_after_training=record["test_accuracy"],
            accuracy_after_last_task=accuracy(after_last, data.test_labels),
            predictions_unchanged=_prediction_digest(after_last) == record["test_digest"],
            reloaded_predictions_unchanged=_prediction_digest(from_disk) == record["test_digest"],
        )
    return report


def run_bench(settings: BenchSettings, costs: bool = True, train: bool = True, merge: Sequence[str] = ()) -> dict:
    """Run (or resume) the benchmark; writes ``results.json``, ``table.md`` and the plot into ``output_dir``.

    ``train=False`` trains nothing: the table and plots come from the runs already in ``results.json`` (for instance
    runs merged from several machines); a method that lacks a task gets no row and a printed line naming the task.
    ``costs`` measures the costs (also without training: ``--costs-only``). ``merge``: ``results.json`` files added to
    the output dir's results first."""
    unknown = [m for m in settings.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}.")
    device = resolve_device(settings.device)
    os.makedirs(settings.output_dir, exist_ok=True)
    results = Results(os.path.join(settings.output_dir, RESULTS_FILE))
    for path in merge:
        print(f"merged {results.merge(path)} runs from {path}")
    started = time.perf_counter()
    forgetting = run_tasks(settings, results, device) if train else {}  # saved chain by chain; other entries stay
    if costs:
        results.costs.update(measure_costs(settings, device))
        results.save()
    if settings.probe_candidate:
        results = probe_candidates(results, settings.protocol())
        chosen = [r for r in results.runs.values() if r.get("probe_chosen") and r["method"] in settings.methods]
        print(f"Validation chose the probe over {len(chosen)} run(s) of these methods (every rate, task and seed).")
    rows = summarise(settings, results)
    if not rows and not train and results.runs:
        protocol = settings.protocol()
        recorded = sorted({record["task"] for record in results.runs.values() if record.get("protocol") == protocol})
        print(f"No method has records for every task of this report ({', '.join(settings.tasks)}) under its protocol "
              f"{protocol}; the records under it hold {', '.join(recorded) or 'no task'}: name those with --task.")
    table = format_table(rows, results.costs, settings.tasks)
    with atomic_write(os.path.join(settings.output_dir, TABLE_FILE)) as handle:
        handle.write(f"{describe_protocol(settings)}:\n\n{table}\n")
    plot_accuracy(rows, os.path.join(settings.output_dir, PLOT_FILE))
    curves = learning_rate_curves(settings, results)
    if curves:
        plot_learning_rates(curves, os.path.join(settings.output_dir, LR_PLOT_FILE))
        rates = sorted({lr for points in curves.values() for lr in points})
        print("\nMean validation accuracy (%) per learning rate (seed " + str(settings.seeds[0]) + "):")
        print(f"{'method':<16}" + "".join(f"{lr:>9g}" for lr in rates))
        for name, points in curves.items():
            print(f"{name:<16}" + "".join(f"{points[lr]:>9.1f}" if lr in points else f"{'':>9}" for lr in rates))
    bands = {name: gain_over_probe(settings, results, name) for name in settings.methods
             if METHODS[name].kind != "probe" and "probe" in settings.methods}
    bands = {name: gains for name, gains in bands.items() if len({lr for p in gains.values() for lr in p}) > 1}
    if bands:
        plot_gain_bands(bands, os.path.join(settings.output_dir, BAND_PLOT_FILE))
        with atomic_write(os.path.join(settings.output_dir, GAINS_FILE)) as handle:
            handle.write(f"Test accuracy minus the probe's per learning rate, points, mean over the seeds each rate "
                         f"ran at. {describe_protocol(settings)}:\n\n{format_gains_by_rate(bands)}\n")
    changed, changed_ever = changed_predictions(forgetting), changed_predictions(results.forgetting)
    print(f"\n{describe_protocol(settings)}:\n{table}")
    edges = rates_at_the_edge(settings, results)
    if edges:
        print("\nRates chosen on validation at the edge of the rates that ran (the best rate may lie beyond them):")
        for name, notes in edges.items():
            print(f"  {name}: {'; '.join(notes)}")
    print(f"\nForgetting: {len(results.forgetting)} method x seed chains, every earlier task re-tested after the last "
          f"one and after reloading from disk: "
          f"{'no prediction changed' if not changed_ever else 'CHANGED: ' + ', '.join(changed_ever)}")
    print(f"Results in {settings.output_dir}/ ({RESULTS_FILE}, {TABLE_FILE}, {PLOT_FILE}); "
          f"{time.perf_counter() - started:.0f} s")
    return dict(rows=rows, costs=results.costs, forgetting=forgetting, changed=changed, rates_at_the_edge=edges)
