"""``peft-recast bench``: RECAST against PEFT's tuners on real text tasks, task after task on one model.

Protocol (the paper's task-incremental setting, on all-MiniLM-L6-v2 with mean pooling):

* Tasks come one after another. Each task gets its own adapter (added with ``add_adapter`` to the one model that
  holds every earlier task's adapter) and its own linear head (trained in every method, counted separately).
* Per method and task, the adapter learning rate is chosen on the validation split at seed 0 from the method's small
  grid; more seeds then run at that rate. The test split is never used for a choice.
* After the last task, every task is evaluated again with all adapters loaded: its test predictions must equal those
  taken right after it was trained (forgetting is 0 to the last digit, or the run reports it).
* Costs, measured side by side in one process on one batch of real texts: trainable numbers, adapter file bytes,
  training step time and training memory as ratios to LoRA r=8, inference latency unmerged and merged as ratios to the
  bare base model, and the throughput of a batch that mixes all tasks against a single-task batch.

Every finished run is appended to ``results.json`` in the output directory (written atomically), and its adapter and
head are saved next to it; a rerun skips every recorded run and reloads saved adapters, so long benchmarks resume. Each
method x seed chain's forgetting check is saved as soon as it is done. Records merged from another machine (without
their adapter files) are not trained again; the forgetting check covers the runs whose files are here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import RECAST_LADDER
from .files import atomic_write
from .sentence_classifier import TaskData, load_task_data, mean_pool

RESULTS_FILE = "results.json"
TABLE_FILE = "table.md"
PLOT_FILE = "accuracy_vs_parameters.png"
LR_PLOT_FILE = "accuracy_vs_learning_rate.png"
# The reference every cost ratio is taken against.
REFERENCE_METHOD = "lora-r8"


# ----------------------------------------------------------------------------------------------------------------------
# methods


@dataclass(frozen=True)
class Method:
    """A way to adapt the encoder: ``config()`` builds a fresh PEFT config (``None``: head only or full fine-tuning).

    ``lrs`` is the peak AdamW learning-rate grid of the adapter's parameters (swept on validation); ``default_lr``
    is used where no sweep runs (``--quick``). ``align_epochs``: a LayerNorm alignment stage (the two-stage PETL
    recipe, scale and shift first): for this many epochs only the adapter's LayerNorm copies (``modules_to_save``)
    and the head train, then every adapter parameter does.
    """

    name: str
    label: str
    kind: str  # "probe", "peft" or "full"
    lrs: tuple[float, ...]
    default_lr: float
    config: Callable[[], object] = lambda: None
    align_epochs: int = 0


def _recast(**kwargs) -> Callable[[], object]:
    def build():
        from .config import RecastConfig

        return RecastConfig(**kwargs)

    return build


def _peft(class_name: str, **kwargs) -> Callable[[], object]:
    def build():
        import peft

        return getattr(peft, class_name)(**kwargs)

    return build


QV = ["query", "value"]
QKVO = ["query", "key", "value", "attention.output.dense"]
# LayerNorms an adapter trains and saves whole (``modules_to_save``): all 13 of MiniLM-L6 (9,984 numbers), or the
# embeddings' one (768), which scales and shifts what every layer reads.
ALL_LAYERNORMS, EMBEDDING_LAYERNORM = ["LayerNorm"], ["embeddings.LayerNorm"]
# Trainable numbers of the RECAST rungs on MiniLM-L6; FourierFT gets the same count (n_frequency per q/v module).
LADDER_SIZES = (24, 48, 72, 144, 216, 288, 432, 648, 864)
# The default RECAST and LoRA r=8 sweep the whole range PEFT users try, for the learning-rate plot.
WIDE_RECAST_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
WIDE_LORA_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
METHODS: dict[str, Method] = {
    method.name: method
    for method in [
        Method("probe", "linear probe (head only)", "probe", (), 0.0),
        Method("recast", "RECAST default = ladder-48 (q,v; 2 layers/group, 2 templates, 2 row blocks)", "peft",
               WIDE_RECAST_LRS, 1e-2, _recast(**RECAST_LADDER["ladder-48"])),
        Method("recast-24", "RECAST ladder-24 (q,v; 2 layers/group, 2 templates)", "peft", WIDE_RECAST_LRS, 1e-2,
               _recast(**RECAST_LADDER["ladder-24"])),
        Method("recast-72", "RECAST all linear; 6 layers/group, 2 templates", "peft", (3e-3, 1e-2, 3e-2), 1e-2,
               _recast(target_modules="all-linear", layers_per_group=6, num_templates=2, coefficient_blocks=1)),
        Method("recast-216", "RECAST ladder-216 (all linear; 6 layers/group, 6 templates)", "peft",
               (3e-3, 1e-2, 3e-2), 1e-2, _recast(**RECAST_LADDER["ladder-216"])),
        Method("recast-144", "RECAST ladder-144 (q,v; 2 layers/group, 2 templates, 6 row blocks)", "peft",
               (3e-3, 1e-2, 3e-2), 1e-2, _recast(**RECAST_LADDER["ladder-144"])),
        Method("recast-432", "RECAST all linear; 2 layers/group, 2 templates, 6 blocks", "peft", (3e-3, 1e-2, 3e-2),
               1e-2, _recast(target_modules="all-linear", coefficient_blocks=6)),
        Method("recast-648", "RECAST ladder-648 (all linear; 6 layers/group, one bank per shape, 24 templates)",
               "peft", (3e-3, 1e-2, 3e-2), 1e-2, _recast(**RECAST_LADDER["ladder-648"])),
        # candidates for the ladder (issue 9): attention heads as row blocks, larger banks, q,k,v,o
        Method("recast-24-blocks", "RECAST q,v; 2 layers/group, 1 template, 2 row blocks", "peft", (1e-2, 3e-2),
               1e-2, _recast(num_templates=1, coefficient_blocks=2)),
        Method("recast-48-qkvo", "RECAST q,k,v,o; 2 layers/group, 2 templates", "peft", (1e-2, 3e-2), 1e-2,
               _recast(target_modules=QKVO, coefficient_blocks=1)),
        Method("recast-288", "RECAST q,k,v,o; 2 layers/group, 2 templates, 6 row blocks", "peft", (1e-2, 3e-2), 1e-2,
               _recast(target_modules=QKVO, coefficient_blocks=6)),
        Method("recast-432-qv", "RECAST q,v; 6 layers/group, 6 templates, 6 row blocks", "peft", (1e-2, 3e-2), 1e-2,
               _recast(layers_per_group=6, num_templates=6, coefficient_blocks=6)),
        Method("recast-864", "RECAST q,k,v,o; 6 layers/group, 6 templates, 6 row blocks", "peft", (1e-2, 3e-2), 1e-2,
               _recast(target_modules=QKVO, layers_per_group=6, num_templates=6, coefficient_blocks=6)),
        # the LayerNorm alignment stage (issue 9): RECAST with LayerNorm scale and shift, jointly or LayerNorms first
        Method("recast-ln", "RECAST default + all LayerNorms", "peft", (1e-2, 3e-2), 1e-2,
               _recast(modules_to_save=ALL_LAYERNORMS)),
        Method("recast-ln-2stage", "RECAST default + all LayerNorms, LayerNorms alone for epoch 1", "peft",
               (1e-2, 3e-2), 1e-2, _recast(modules_to_save=ALL_LAYERNORMS), align_epochs=1),
        Method("recast-984", "RECAST ladder-216 + embedding LayerNorm", "peft", (1e-2, 3e-2), 1e-2,
               _recast(**RECAST_LADDER["ladder-216"], modules_to_save=EMBEDDING_LAYERNORM)),
        Method("recast-984-2stage", "RECAST ladder-216 + embedding LayerNorm, LayerNorm alone for epoch 1", "peft",
               (1e-2, 3e-2), 1e-2, _recast(**RECAST_LADDER["ladder-216"], modules_to_save=EMBEDDING_LAYERNORM),
               align_epochs=1),
        *[
            Method(f"fourierft-{size}", f"FourierFT, {size // 12} frequencies, q,v", "peft", (1e-2, 3e-2, 1e-1), 3e-2,
                   _peft("FourierFTConfig", n_frequency=size // 12, target_modules=QV))
            for size in LADDER_SIZES
        ],
        Method("ln-tuning", "LN tuning (all LayerNorms)", "peft", (1e-3, 3e-3, 1e-2), 3e-3,
               _peft("LNTuningConfig", target_modules=["LayerNorm"])),
        Method("ia3", "IA3 (key, value, output.dense)", "peft", (1e-3, 3e-3, 1e-2), 3e-3, _peft("IA3Config")),
        Method("vera", "VeRA r=256, q,v", "peft", (1e-3, 3e-3, 1e-2), 3e-3,
               _peft("VeraConfig", r=256, target_modules=QV)),
        Method("vblora", "VB-LoRA r=4, 90 vectors of 64, q,v", "peft", (1e-3, 3e-3, 1e-2), 3e-3,
               _peft("VBLoRAConfig", r=4, num_vectors=90, vector_length=64, target_modules=QV)),
        Method("lora-r1", "LoRA r=1, q,v", "peft", (3e-4, 1e-3, 3e-3), 1e-3,
               _peft("LoraConfig", r=1, lora_alpha=2, target_modules=QV)),
        Method("lora-r8", "LoRA r=8, q,v", "peft", WIDE_LORA_LRS, 1e-3,
               _peft("LoraConfig", r=8, lora_alpha=16, target_modules=QV)),
        Method("full", "full fine-tuning", "full", (1e-5, 3e-5, 1e-4), 3e-5),
    ]
}
QUICK_METHODS = ("probe", "recast", "fourierft-48", "lora-r8")
LADDER_METHODS = ("probe", *[f"recast-{size}" if size != 48 else "recast" for size in LADDER_SIZES],
                  *[f"fourierft-{size}" for size in LADDER_SIZES], "lora-r8")
ALL_TASKS = ("trec6", "sms", "bbc", "tweets", "amazon")
QUICK_TASKS = ("trec6", "sms")


# ----------------------------------------------------------------------------------------------------------------------
# settings and results


@dataclass
class BenchSettings:
    """What one benchmark run covers; everything that changes a result is part of a run's key."""

    tasks: list[str] = field(default_factory=lambda: list(ALL_TASKS))
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    sweep: bool = True
    epochs: int = 4
    batch_size: int = 32
    head_lr: float = 3e-3
    max_train: Optional[int] = None
    max_eval: Optional[int] = None
    device: str = "auto"
    output_dir: str = os.path.join("runs", "bench")
    cost_repeats: int = 5
    cost_length: int = 128

    def protocol(self) -> dict:
        """The settings a run's result depends on (besides method, task, lr, seed)."""
        return dict(epochs=self.epochs, batch_size=self.batch_size, head_lr=self.head_lr, max_train=self.max_train,
                    max_eval=self.max_eval)


def _canonical(value: object) -> object:
    """JSON form of what ``json`` cannot write: sets sorted (their order changes with ``PYTHONHASHSEED``), else str."""
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return str(value)


def run_key(method: str, task: str, lr: float, seed: int, protocol: dict) -> str:
    """A run's identity, also its adapter name and folder: ``recast_trec6_lr0_01_seed0_<digest>``.

    The digest covers the protocol, the method's full PEFT config and its alignment stage, so changing any of them
    never reuses old results.
    """
    config = METHODS[method].config()
    described = [protocol, config.to_dict() if config is not None else None]
    if METHODS[method].align_epochs:
        described.append({"align_epochs": METHODS[method].align_epochs})
    digest = hashlib.sha1(json.dumps(described, sort_keys=True, default=_canonical).encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9_]", "_", f"{method}_{task}_lr{lr:g}_seed{seed}_{digest}")


class Results:
    """``results.json``: finished runs by key, the cost measurements and the forgetting check; rewritten atomically
    after each run."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.runs: dict[str, dict] = {}
        self.costs: dict = {}
        self.forgetting: dict = {}
        if os.path.exists(path):
            with open(path) as handle:
                data = json.load(handle)
            self.runs, self.costs, self.forgetting = data.get("runs", {}), data.get("costs", {}), data.get("forgetting", {})

    def merge(self, path: str) -> int:
        """Add the runs, costs and forgetting checks of another ``results.json`` (e.g. a shard run on another machine
        or process); its entries replace same-named ones here (forgetting checks task by task, so shards that ran
        different tasks of one method x seed keep each other's). Returns the number of runs read."""
        with open(path) as handle:
            data = json.load(handle)
        if not isinstance(data, dict) or not isinstance(data.get("runs"), dict):
            raise ValueError(f"{path} is not a benchmark results file (no 'runs' object); pass a results.json written "
                             "by `peft-recast bench`.")
        self.runs.update(data["runs"])
        self.costs.update(data.get("costs", {}))
        for chain, report in data.get("forgetting", {}).items():
            self.forgetting.setdefault(chain, {}).update(report)
        self.save()
        return len(data["runs"])

    def add(self, record: dict) -> None:
        self.runs[record["key"]] = record
        self.save()

    def save(self) -> None:
        with atomic_write(self.path) as handle:
            json.dump(dict(runs=self.runs, costs=self.costs, forgetting=self.forgetting), handle, indent=1)


# ----------------------------------------------------------------------------------------------------------------------
# model pieces


def sentence_logits(encoder: nn.Module, head: nn.Module, batch: dict, **kwargs) -> torch.Tensor:
    hidden = encoder(**batch, **kwargs).last_hidden_state
    return head(mean_pool(hidden, batch["attention_mask"]))


def new_head(hidden: int, num_classes: int, seed: int, device: torch.device) -> nn.Linear:
    """The task head, initialised from ``seed`` alone: every method starts from the same head."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    head = nn.Linear(hidden, num_classes)
    torch.random.set_rng_state(generator_state)
    return head.to(device)


def trainable_numbers(encoder: nn.Module) -> int:
    return sum(p.numel() for p in encoder.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------------------------
# training one run


def train_run(encoder: nn.Module, head: nn.Module, data: TaskData, lr: float, seed: int, settings: BenchSettings,
              desc: str, align_epochs: int = 0) -> float:
    """Train the encoder's trainable parameters (peak lr ``lr``) and ``head`` (``settings.head_lr``) on ``data``.

    AdamW without weight decay, one-cycle schedule, gradients clipped to norm 1 per group; the encoder stays in eval
    mode (no dropout) so that every method sees the features the linear probe sees. The first ``align_epochs``
    epochs train only the ``modules_to_save`` copies (LayerNorms) besides the head. Returns the seconds per step.
    """
    from .sentence_classifier import Settings, batch_order, make_optimizer, optimizer_step, tick

    adapter = [p for p in encoder.parameters() if p.requires_grad]
    head_params = list(head.parameters())
    run_settings = Settings(epochs=settings.epochs, batch_size=settings.batch_size, seed=seed)
    order = batch_order(data.train.lengths, run_settings)
    groups = [(head_params, settings.head_lr)] + ([(adapter, lr)] if adapter else [])
    optimizer, scheduler = make_optimizer(groups, len(order))
    if align_epochs >= settings.epochs:
        raise ValueError(f"An alignment stage of {align_epochs} epoch(s) leaves no epoch for the other adapter "
                         f"parameters in a {settings.epochs}-epoch run; train for more than {align_epochs} epochs.")
    held = [p for name, p in encoder.named_parameters()
            if p.requires_grad and "modules_to_save" not in name] if align_epochs else []
    release_at = len(order) * align_epochs // settings.epochs
    for parameter in held:
        parameter.requires_grad_(False)  # no gradient: AdamW leaves it (and its state) untouched
    encoder.eval()
    head.train()
    started = time.perf_counter()
    progress = tqdm(order, desc=desc, unit="step", leave=False)
    try:
        for step, indices in enumerate(progress):
            if step == release_at:
                for parameter in held:
                    parameter.requires_grad_(True)
            tick()
            logits = sentence_logits(encoder, head, data.train(indices))
            loss = nn.functional.cross_entropy(logits, data.train_labels[torch.tensor(indices, device=logits.device)])
            optimizer_step(loss, optimizer, scheduler, [params for params, _ in groups], run_settings.clip)
            progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    finally:
        for parameter in held:
            parameter.requires_grad_(True)
    return (time.perf_counter() - started) / max(len(order), 1)


@torch.no_grad()
def predictions(encoder: nn.Module, head: nn.Module, batches, batch_size: int, desc: str) -> torch.Tensor:
    """Arg-max class of every text, in the original order (CPU tensor)."""
    from .sentence_classifier import by_batch

    encoder.eval()
    head.eval()
    return by_batch(lambda batch: sentence_logits(encoder, head, batch), batches, batch_size, desc).argmax(-1).cpu()


def _accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return (predicted == labels).float().mean().item()


def _probe_run(encoder: nn.Module, head: nn.Module, data: TaskData, seed: int, settings: BenchSettings,
               cache: dict) -> float:
    """The head alone on cached embeddings (same batches, optimiser and schedule as every other method)."""
    from .sentence_classifier import Settings, embed_texts, train_probe

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


# ----------------------------------------------------------------------------------------------------------------------
# the benchmark


class MethodModel:
    """One method's model: a single encoder holding every task's adapter (``full``: a fresh copy per run)."""

    def __init__(self, method: Method, device: torch.device) -> None:
        self.method, self.device = method, device
        self.encoder: Optional[nn.Module] = None
        self.heads: dict[str, nn.Module] = {}

    def _base(self) -> nn.Module:
        from .sentence_classifier import load_encoder

        return load_encoder(self.device)

    def new_adapter(self, name: str) -> nn.Module:
        """The encoder with a fresh adapter ``name`` added and made the only active (and trainable) one."""
        if self.method.kind == "full":
            encoder = self._base()
            encoder.requires_grad_(True)
            return encoder
        if self.method.kind == "probe":
            self.encoder = self.encoder or self._base()
            return self.encoder
        if self.encoder is None:
            import peft

            self.encoder = peft.get_peft_model(self._base(), self.method.config(), adapter_name=name)
        else:
            self.encoder.add_adapter(name, self.method.config())
            self.encoder.set_adapter(name)
        return self.encoder

    def load_adapter(self, name: str, path: str) -> nn.Module:
        """Reload a saved adapter (a resumed benchmark) into the shared encoder; ``full``: a model from ``path``."""
        if self.method.kind == "full":
            from transformers import AutoModel

            return AutoModel.from_pretrained(path).to(self.device)
        if self.method.kind == "probe":
            self.encoder = self.encoder or self._base()
            return self.encoder
        if self.encoder is None:
            from peft import PeftModel

            self.encoder = PeftModel.from_pretrained(self._base(), path, adapter_name=name)
        else:
            self.encoder.load_adapter(path, adapter_name=name)
        return self.encoder

    def activate(self, name: str) -> nn.Module:
        if self.method.kind == "peft":
            self.encoder.set_adapter(name)
        return self.encoder


def _adapter_bytes(path: str) -> int:
    files = [f for f in os.listdir(path) if f.endswith(".safetensors") and f != "head.safetensors"]
    return sum(os.path.getsize(os.path.join(path, f)) for f in files)


def _save_run(encoder: nn.Module, head: nn.Module, method: Method, path: str) -> int:
    from safetensors.torch import save

    os.makedirs(path, exist_ok=True)
    if method.kind == "peft":
        encoder.save_pretrained(path, selected_adapters=[encoder.active_adapter])
        # PEFT saves non-default adapters in a sub-folder named after the adapter; keep one flat folder per run
        nested = os.path.join(path, encoder.active_adapter)
        if os.path.isdir(nested):
            for name in os.listdir(nested):
                os.replace(os.path.join(nested, name), os.path.join(path, name))
            os.rmdir(nested)
    elif method.kind == "full":
        encoder.save_pretrained(path)
    with atomic_write(os.path.join(path, "head.safetensors"), "wb") as handle:
        handle.write(save({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}))
    return _adapter_bytes(path) if method.kind != "probe" else 0


def _load_head(path: str, device: torch.device) -> nn.Linear:
    """The head saved by :func:`_save_run`, its size read from the file."""
    from safetensors.torch import load_file

    state = load_file(os.path.join(path, "head.safetensors"), device=str(device))
    num_classes, hidden = state["weight"].shape
    head = nn.Linear(hidden, num_classes).to(device)
    head.load_state_dict(state)
    return head


def _prediction_digest(predicted: torch.Tensor) -> str:
    return hashlib.sha1(predicted.to(torch.int64).numpy().tobytes()).hexdigest()


def run_tasks(settings: BenchSettings, results: Results, device: torch.device) -> dict:
    """The accuracy part: every method, task after task; returns the forgetting check per (method, seed)."""
    from .sentence_classifier import load_tokenizer

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
        chosen = {}
        for task in settings.tasks:
            data = datasets[task]
            lrs = _lrs_to_run(method, task, seed, settings, results, protocol)
            for lr in lrs:
                key = run_key(method.name, task, lr, seed, protocol)
                if key in results.runs:  # finished here, or merged from another machine's results.json
                    continue
                run_dir = os.path.join(settings.output_dir, "runs", key)
                encoder = model.new_adapter(key)
                head = new_head(encoder.config.hidden_size, len(data.classes), seed, device)
                if method.kind == "probe":
                    seconds = _probe_run(encoder, head, data, seed, settings, embeddings)
                    step_seconds = None
                else:
                    step_seconds = train_run(encoder, head, data, lr, seed, settings,
                                             f"{method.name} {task} lr {lr:g} seed {seed}", method.align_epochs)
                    seconds = None
                val = predictions(encoder, head, data.validation, settings.batch_size, "validation")
                test = predictions(encoder, head, data.test, settings.batch_size, "test")
                numbers = trainable_numbers(encoder) if method.kind != "probe" else 0
                adapter_bytes = _save_run(encoder, head, method, run_dir)
                results.add(dict(
                    key=key, method=method.name, task=task, lr=lr, seed=seed, protocol=protocol,
                    validation_accuracy=_accuracy(val, data.validation_labels),
                    test_accuracy=_accuracy(test, data.test_labels), test_digest=_prediction_digest(test),
                    trainable=numbers, head_params=sum(p.numel() for p in head.parameters()),
                    adapter_bytes=adapter_bytes, step_seconds=step_seconds, probe_seconds=seconds,
                    device=str(device),
                ))
                if method.kind == "full":
                    del encoder
            chosen[task] = _best_lr(method, task, settings, results, protocol)
        report = _check_forgetting(model, method, seed, chosen, datasets, settings, results, protocol, device)
        if report:  # saved at once: a benchmark stopped later keeps the chains it finished
            forgetting[f"{method.name}/seed{seed}"] = results.forgetting[f"{method.name}/seed{seed}"] = report
            results.save()
    return forgetting


def _lrs_to_run(method: Method, task: str, seed: int, settings: BenchSettings, results: Results,
                protocol: dict) -> list[float]:
    """Seed 0 sweeps the grid (when ``settings.sweep``); later seeds run the rate chosen on validation."""
    if method.kind == "probe":
        return [0.0]
    if not settings.sweep:
        return [method.default_lr]
    if seed == settings.seeds[0]:
        return list(method.lrs)
    return [_best_lr(method, task, settings, results, protocol)]


def _best_lr(method: Method, task: str, settings: BenchSettings, results: Results, protocol: dict) -> float:
    """The rate with the best validation accuracy at the first seed (ties: the smaller rate)."""
    candidates = _lrs_to_run(method, task, settings.seeds[0], settings, results, protocol)
    scored = []
    for lr in candidates:
        record = results.runs.get(run_key(method.name, task, lr, settings.seeds[0], protocol))
        if record is not None:
            scored.append((-record["validation_accuracy"], lr))
    if not scored:
        raise RuntimeError(f"No finished seed-{settings.seeds[0]} run of {method.name} on {task} to choose from.")
    return min(scored)[1]


def _check_forgetting(model: MethodModel, method: Method, seed: int, chosen: dict, datasets: dict,
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
        head = _load_head(run_dir, device)
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
            accuracy_after_last_task=_accuracy(after_last, data.test_labels),
            predictions_unchanged=_prediction_digest(after_last) == record["test_digest"],
            reloaded_predictions_unchanged=_prediction_digest(from_disk) == record["test_digest"],
        )
    return report


# ----------------------------------------------------------------------------------------------------------------------
# costs


def cost_batch(tokenizer, settings: BenchSettings, device: torch.device) -> dict:
    """``batch_size`` real BBC articles, each exactly ``cost_length`` tokens (truncated and padded)."""
    from .data import load_task

    texts = load_task("bbc")["test"]["text"][: settings.batch_size]
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=settings.cost_length,
                        return_tensors="pt")
    return {key: value.to(device) for key, value in encoded.items()}


def training_memory(encoder: nn.Module, head: nn.Module, batch: dict, optimizer) -> int:
    """Bytes a training step adds on top of the frozen model: activations kept for backward, gradients, optimizer.

    CUDA: the peak allocated during the step minus what was allocated before it. CPU (no allocator statistics): the
    tensors autograd saves for backward (distinct storages that are not parameters or buffers), plus every
    gradient and optimizer state after the step, counted exactly.
    """
    device = batch["input_ids"].device
    labels = torch.zeros(len(batch["input_ids"]), dtype=torch.long, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        _train_step(encoder, head, batch, labels, optimizer)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    owned = {t.untyped_storage().data_ptr() for module in (encoder, head) for t in
             [*module.parameters(), *module.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _train_step(encoder, head, batch, labels, optimizer)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    grads = sum(p.numel() * p.element_size() for group in optimizer.param_groups for p in group["params"])
    return sum(saved.values()) + state + grads


def _train_step(encoder: nn.Module, head: nn.Module, batch: dict, labels: torch.Tensor, optimizer) -> None:
    loss = nn.functional.cross_entropy(sentence_logits(encoder, head, batch), labels)
    optimizer.zero_grad(set_to_none=False)
    loss.backward()
    optimizer.step()


def _timed(function: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def measure_costs(settings: BenchSettings, device: torch.device) -> dict:
    """Per method: numbers, step time and training memory relative to LoRA r=8, inference latency unmerged and
    merged relative to the bare base model, and mixed-task batch throughput relative to a single-task batch.

    All methods are built first and timed in rotating order, ``cost_repeats`` rounds, so that every ratio compares
    steps taken under the same machine load; each figure is the median over rounds.
    """
    from .sentence_classifier import load_encoder, load_tokenizer

    batch = cost_batch(load_tokenizer(), settings, device)
    labels = torch.zeros(len(batch["input_ids"]), dtype=torch.long, device=device)
    names = [name for name in settings.methods if METHODS[name].kind != "probe"]
    if REFERENCE_METHOD not in names:
        names.append(REFERENCE_METHOD)
    models, heads, optimizers = {}, {}, {}
    for name in tqdm(names, desc="costs: build", leave=False):
        model = MethodModel(METHODS[name], device)
        models[name] = model.new_adapter("cost")
        heads[name] = new_head(models[name].config.hidden_size, 2, 0, device)
        params = [p for p in models[name].parameters() if p.requires_grad] + list(heads[name].parameters())
        optimizers[name] = torch.optim.AdamW(params, lr=1e-9)
    base = load_encoder(device)
    base_head = new_head(base.config.hidden_size, 2, 0, device)

    for name in names:  # one step each first: one-time allocations (e.g. cuBLAS workspaces) land on no method
        _train_step(models[name], heads[name], batch, labels, optimizers[name])
    memory = {name: training_memory(models[name], heads[name], batch, optimizers[name]) for name in names}
    steps: dict[str, list[float]] = {name: [] for name in names}
    unmerged: dict[str, list[float]] = {name: [] for name in names}
    merged: dict[str, list[float]] = {name: [] for name in names}
    bare: list[float] = []
    for round_ in tqdm(range(settings.cost_repeats), desc="costs: timing", unit="round", leave=False):
        order = names[round_ % len(names):] + names[: round_ % len(names)]
        with torch.no_grad():
            bare.append(_timed(lambda: sentence_logits(base, base_head, batch), device))
        for name in order:
            encoder, head = models[name], heads[name]
            steps[name].append(_timed(lambda: _train_step(encoder, head, batch, labels, optimizers[name]), device))
            with torch.no_grad():
                unmerged[name].append(_timed(lambda: sentence_logits(encoder, head, batch), device))
                if METHODS[name].kind == "peft":
                    encoder.merge_adapter()
                    merged[name].append(_timed(lambda: sentence_logits(encoder, head, batch), device))
                    encoder.unmerge_adapter()
    median = statistics.median
    reference_step, reference_memory, bare_time = median(steps[REFERENCE_METHOD]), memory[REFERENCE_METHOD], median(bare)
    costs = {}
    for name in names:
        costs[name] = dict(
            trainable=trainable_numbers(models[name]),
            step_seconds=median(steps[name]), step_ratio=median(steps[name]) / reference_step,
            training_memory_bytes=memory[name], memory_ratio=memory[name] / reference_memory,
            unmerged_latency_ratio=median(unmerged[name]) / bare_time,
            merged_latency_ratio=median(merged[name]) / bare_time if merged[name] else None,
        )
    costs["_bare_forward_seconds"] = bare_time
    for built in (models, heads, optimizers):  # free the models before building the mixed-batch ones
        built.clear()
    mixed = measure_mixed_batches(settings, device, batch, [n for n in names if METHODS[n].kind == "peft"])
    for name, ratio in mixed.items():
        costs[name]["mixed_batch_throughput_ratio"] = ratio
    costs["_settings"] = dict(batch=list(batch["input_ids"].shape), repeats=settings.cost_repeats,
                              device=str(device), threads=torch.get_num_threads())
    return costs


def measure_mixed_batches(settings: BenchSettings, device: torch.device, batch: dict,
                          names: Sequence[str]) -> dict[str, Optional[float]]:
    """Throughput of one batch whose rows go to ``len(tasks)`` different adapters (``adapter_names``) relative to the
    same batch through one adapter; ``None`` where the method does not support mixed batches."""
    ratios = {}
    count = max(len(settings.tasks), 2)
    for name in tqdm(names, desc="costs: mixed batches", leave=False):
        model = MethodModel(METHODS[name], device)
        for i in range(count):
            encoder = model.new_adapter(f"task{i}")
        encoder.eval()  # PEFT refuses adapter_names in training mode
        adapter_names = [f"task{i % count}" for i in range(len(batch["input_ids"]))]
        head = new_head(encoder.config.hidden_size, 2, 0, device)
        try:
            with torch.no_grad():
                sentence_logits(encoder, head, batch, adapter_names=adapter_names)
                single, mixed = [], []
                for _ in range(settings.cost_repeats):
                    single.append(_timed(lambda: sentence_logits(encoder, head, batch), device))
                    mixed.append(_timed(lambda: sentence_logits(encoder, head, batch, adapter_names=adapter_names),
                                        device))
            ratios[name] = statistics.median(single) / statistics.median(mixed)
        except (ValueError, TypeError, NotImplementedError):
            ratios[name] = None
    return ratios


# ----------------------------------------------------------------------------------------------------------------------
# report


def summarise(settings: BenchSettings, results: Results) -> list[dict]:
    """Per method: numbers, bytes, and test accuracy per task at the chosen rate (mean and spread over seeds)."""
    protocol = settings.protocol()
    rows = []
    for name in settings.methods:
        method = METHODS[name]
        row = dict(method=name, label=method.label, tasks={}, lrs={})
        for task in settings.tasks:
            try:
                lr = _best_lr(method, task, settings, results, protocol)
            except RuntimeError:
                continue
            records = [results.runs.get(run_key(name, task, lr, seed, protocol)) for seed in settings.seeds]
            records = [r for r in records if r is not None]
            accuracies = [100 * r["test_accuracy"] for r in records]
            row["tasks"][task] = dict(mean=statistics.mean(accuracies),
                                      spread=statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                                      seeds=len(accuracies))
            row["lrs"][task] = lr
            row.update(trainable=records[0]["trainable"], adapter_bytes=records[0]["adapter_bytes"],
                       head_params=records[0]["head_params"])
        if len(row["tasks"]) == len(settings.tasks):
            row["mean"] = statistics.mean(v["mean"] for v in row["tasks"].values())
            rows.append(row)
    return rows


def _ratio(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def format_table(rows: list[dict], costs: dict, tasks: Sequence[str]) -> str:
    """Markdown: accuracy per task (mean +- spread over seeds) and mean, numbers, bytes, and the cost ratios."""
    header = ["method", "trainable numbers", "adapter bytes", *tasks, "mean", "seeds", "step time vs LoRA r=8",
              "train memory vs LoRA r=8", "latency unmerged / merged vs base", "mixed-batch throughput"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cost = costs.get(row["method"], {})
        accuracies = [f"{row['tasks'][t]['mean']:.1f}" + (f" ± {row['tasks'][t]['spread']:.1f}"
                                                          if row["tasks"][t]["seeds"] > 1 else "") for t in tasks]
        latency = (f"{_ratio(cost.get('unmerged_latency_ratio'))} / {_ratio(cost.get('merged_latency_ratio'))}"
                   if cost else "")
        lines.append("| " + " | ".join([
            row["label"], f"{row['trainable']:,}", f"{row['adapter_bytes']:,}", *accuracies, f"{row['mean']:.1f}",
            str(min(v["seeds"] for v in row["tasks"].values())),
            _ratio(cost.get("step_ratio")) if cost else "", _ratio(cost.get("memory_ratio")) if cost else "",
            latency, _ratio(cost.get("mixed_batch_throughput_ratio")) if cost else "",
        ]) + " |")
    return "\n".join(lines)


def _new_figure():
    """A figure and its axes for a PNG written by :func:`_save_figure` (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.5))


def _save_figure(figure, path: str) -> None:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=120)
    plt.close(figure)


def plot_accuracy(rows: list[dict], path: str) -> None:
    """Mean test accuracy against trainable numbers (log scale), one point per method (head not counted)."""
    figure, axis = _new_figure()
    for row in rows:
        x = max(row["trainable"], 1)
        spread = statistics.mean(v["spread"] for v in row["tasks"].values())
        is_recast = row["method"].startswith("recast")
        axis.errorbar(x, row["mean"], yerr=spread, fmt="o" if is_recast else "s", color="C3" if is_recast else "C0",
                      capsize=3)
        axis.annotate(row["method"], (x, row["mean"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    axis.set_xscale("log")
    axis.set_xlabel("trainable numbers per task (head excluded; probe plotted at 1)")
    axis.set_ylabel("mean test accuracy over tasks (%)")
    axis.set_title("Accuracy against trainable numbers, all-MiniLM-L6-v2")
    axis.grid(True, which="both", alpha=0.3)
    _save_figure(figure, path)


def learning_rate_curves(settings: BenchSettings, results: Results) -> dict[str, dict[float, float]]:
    """Per method: mean validation accuracy (%) over the tasks at each swept rate (first seed)."""
    protocol = settings.protocol()
    curves = {}
    for name in settings.methods:
        method = METHODS[name]
        points = {}
        for lr in method.lrs:
            records = [results.runs.get(run_key(name, task, lr, settings.seeds[0], protocol)) for task in settings.tasks]
            if all(records):
                points[lr] = statistics.mean(100 * r["validation_accuracy"] for r in records)
        if len(points) > 1:
            curves[name] = points
    return curves


def plot_learning_rates(curves: dict[str, dict[float, float]], path: str) -> None:
    """Validation accuracy against the adapter's peak AdamW learning rate (log scale), one line per method."""
    import matplotlib.pyplot as plt

    figure, axis = _new_figure()
    for index, (name, points) in enumerate(curves.items()):
        rates = sorted(points)
        axis.plot(rates, [points[lr] for lr in rates], marker="o", label=name, color=plt.cm.tab20(index % 20),
                  linestyle="-" if name.startswith("recast") else "--")
    axis.set_xscale("log")
    axis.set_xlabel("peak AdamW learning rate of the adapter (head: fixed)")
    axis.set_ylabel("mean validation accuracy over tasks (%)")
    axis.set_title("Learning-rate sensitivity, all-MiniLM-L6-v2 (seed 0)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    _save_figure(figure, path)


def _changed_predictions(chains: dict) -> list[str]:
    """``"<method>/seed<s>:<task>"`` for every task whose predictions changed after later tasks or a reload."""
    return [f"{key}:{task}" for key, report in chains.items() for task, r in report.items()
            if not (r["predictions_unchanged"] and r["reloaded_predictions_unchanged"])]


def run_bench(settings: BenchSettings, costs: bool = True, train: bool = True, merge: Sequence[str] = ()) -> dict:
    """Run (or resume) the benchmark; writes ``results.json``, ``table.md`` and the plot into ``output_dir``.

    ``train=False`` trains nothing: the table and plots come from the runs already in ``results.json`` (for instance
    runs merged from several machines), skipping methods that lack a task. ``costs`` measures the costs (also without
    training: ``--costs-only``). ``merge``: ``results.json`` files added to the output dir's results first."""
    from .sentence_classifier import resolve_device

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
    rows = summarise(settings, results)
    table = format_table(rows, results.costs, settings.tasks)
    with atomic_write(os.path.join(settings.output_dir, TABLE_FILE)) as handle:
        handle.write(table + "\n")
    plot_accuracy(rows, os.path.join(settings.output_dir, PLOT_FILE))
    curves = learning_rate_curves(settings, results)
    if curves:
        plot_learning_rates(curves, os.path.join(settings.output_dir, LR_PLOT_FILE))
        rates = sorted({lr for points in curves.values() for lr in points})
        print("\nMean validation accuracy (%) per learning rate (seed " + str(settings.seeds[0]) + "):")
        print(f"{'method':<16}" + "".join(f"{lr:>9g}" for lr in rates))
        for name, points in curves.items():
            print(f"{name:<16}" + "".join(f"{points[lr]:>9.1f}" if lr in points else f"{'':>9}" for lr in rates))
    changed, changed_ever = _changed_predictions(forgetting), _changed_predictions(results.forgetting)
    print(f"\nTest accuracy (%), mean ± spread over the seeds run; learning rates chosen on validation"
          f"{'' if settings.sweep else ' (no sweep: each method at its default rate)'}:\n{table}")
    print(f"\nForgetting: {len(results.forgetting)} method x seed chains, every earlier task re-tested after the last "
          f"one and after reloading from disk: "
          f"{'no prediction changed' if not changed_ever else 'CHANGED: ' + ', '.join(changed_ever)}")
    print(f"Results in {settings.output_dir}/ ({RESULTS_FILE}, {TABLE_FILE}, {PLOT_FILE}); "
          f"{time.perf_counter() - started:.0f} s")
    return dict(rows=rows, costs=results.costs, forgetting=forgetting, changed=changed)


# ----------------------------------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``peft-recast bench``."""
    parser.add_argument("--quick", action="store_true",
                        help=f"a few minutes: tasks {' '.join(QUICK_TASKS)}, methods {' '.join(QUICK_METHODS)}, one "
                        "seed, each method at its default learning rate, 500 training examples")
    parser.add_argument("--ladder", action="store_true",
                        help="the budget ladder: probe, every RECAST rung, FourierFT at each rung's count, LoRA r=8")
    parser.add_argument("--task", nargs="+", default=None, metavar="TASK",
                        help=f"tasks, in the order they arrive (default: {' '.join(ALL_TASKS)})")
    parser.add_argument("--method", nargs="+", default=None, choices=list(METHODS), metavar="METHOD",
                        help=f"methods, from {', '.join(METHODS)} (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: 0 1 2)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the learning-rate sweep (default rates)")
    parser.add_argument("--no-costs", action="store_true", help="skip the step time / memory / latency measurements")
    parser.add_argument("--max-train", type=int, default=None, help="training examples per task (default: all, <= 2,000)")
    parser.add_argument("--max-eval", type=int, default=None, help="validation and test examples per task (default: all)")
    parser.add_argument("--epochs", type=int, default=4, help="(default: 4)")
    parser.add_argument("--cost-repeats", type=int, default=5, help="timing rounds of the cost measurements (default: 5)")
    parser.add_argument("--costs-only", action="store_true",
                        help="train nothing: measure the costs alone (on a GPU, after parallel runs, so that no other "
                        "process shares the timings), then write the table and plots")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: write the table and plots from the runs already in the output dir")
    parser.add_argument("--merge", nargs="+", default=None, metavar="RESULTS_JSON",
                        help="first add these results.json files (runs of --method subsets in parallel processes or on "
                        "other machines) to the output dir's results; with --report, nothing is trained")
    parser.add_argument("--output-dir", default=None, help="results, adapters, table and plot (default: runs/bench, "
                        "runs/bench-quick with --quick); a rerun resumes from what is there")


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    from .data import TASKS

    settings = BenchSettings(epochs=args.epochs, device=args.device, cost_repeats=args.cost_repeats)
    if args.quick:
        settings.tasks, settings.methods, settings.seeds = list(QUICK_TASKS), list(QUICK_METHODS), [0]
        settings.sweep, settings.max_train = False, 500
        settings.output_dir = os.path.join("runs", "bench-quick")
    if args.ladder:
        settings.methods = list(LADDER_METHODS)
    for name, value in (("tasks", args.task), ("methods", args.method), ("seeds", args.seeds),
                        ("max_train", args.max_train), ("max_eval", args.max_eval), ("output_dir", args.output_dir)):
        if value is not None:
            setattr(settings, name, value)
    if args.no_sweep:
        settings.sweep = False
    unknown = [task for task in settings.tasks if task not in TASKS]
    if unknown:
        raise SystemExit(f"Unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}.")
    return settings


def main(args: argparse.Namespace) -> int:
    """``peft-recast bench``; exit status 1 if any task's predictions changed after later tasks or a reload."""
    train = not (args.report or args.costs_only)
    report = run_bench(settings_from_args(args), costs=args.costs_only or (train and not args.no_costs), train=train,
                       merge=args.merge or ())
    return 1 if report["changed"] else 0
