"""What a benchmark run covers (:class:`BenchSettings`), each run's key, the resumable ``results.json`` store, and the
learning rate each method gets per task."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from ...files import atomic_write
from ..tasks import HELD_OUT_TASKS
from .methods import ALL_TASKS, METHODS, Method

RESULTS_FILE = "results.json"


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
    one_rate: bool = False

    def tuning_tasks(self) -> list[str]:
        """The tasks a learning rate may be chosen on: those of :attr:`tasks` not in ``HELD_OUT_TASKS``."""
        return [task for task in self.tasks if task not in HELD_OUT_TASKS]

    def chain_tasks(self) -> list[str]:
        """The order tasks are trained in: :attr:`tasks`; with ``one_rate``, the tuning tasks first (their sweeps
        choose the rate the held-out tasks then run at)."""
        if not self.one_rate:
            return list(self.tasks)
        return self.tuning_tasks() + [task for task in self.tasks if task in HELD_OUT_TASKS]

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
    if METHODS[method].head_first:
        described.append({"head_first": True})
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


def lrs_to_run(method: Method, task: str, seed: int, settings: BenchSettings, results: Results,
                protocol: dict) -> list[float]:
    """Seed 0 sweeps the grid (when ``settings.sweep``); later seeds run the chosen rate (:func:`best_lr`). With
    ``settings.one_rate`` seed 0 sweeps the tuning tasks only, and every held-out task runs at the one rate."""
    if method.kind == "probe":
        return [0.0]
    if not settings.sweep:
        return [method.default_lr]
    if seed == settings.seeds[0] and not (settings.one_rate and task in HELD_OUT_TASKS):
        return list(method.lrs)
    return [best_lr(method, task, settings, results, protocol)]


def _validation_accuracy(method: Method, task: str, lr: float, settings: BenchSettings, results: Results,
                         protocol: dict) -> Optional[float]:
    record = results.runs.get(run_key(method.name, task, lr, settings.seeds[0], protocol))
    return None if record is None else record["validation_accuracy"]


def best_lr(method: Method, task: str, settings: BenchSettings, results: Results, protocol: dict) -> float:
    """The rate ``task`` is reported at: the best validation accuracy on ``task`` at the first seed, or with
    ``settings.one_rate`` the method's one rate, :func:`one_rate` (ties: the smaller rate)."""
    if method.kind == "probe":
        return 0.0
    if not settings.sweep:
        return method.default_lr
    if settings.one_rate:
        return one_rate(method, settings, results, protocol)
    scored = [(-value, lr) for lr in method.lrs
              if (value := _validation_accuracy(method, task, lr, settings, results, protocol)) is not None]
    if not scored:
        raise RuntimeError(f"No finished seed-{settings.seeds[0]} run of {method.name} on {task} to choose from.")
    return min(scored)[1]


def one_rate(method: Method, settings: BenchSettings, results: Results, protocol: dict) -> float:
    """The method's one learning rate for every task: the rate of its grid with the best mean validation accuracy
    over the tuning tasks (:meth:`BenchSettings.tuning_tasks`) at the first seed; only rates that finished on every
    tuning task compete (ties: the smaller rate)."""
    tasks = settings.tuning_tasks()
    if not tasks:
        raise ValueError(f"One rate per method is chosen on tuning tasks, but every task of this run is held out "
                         f"({', '.join(settings.tasks)}); add a task that is not in HELD_OUT_TASKS.")
    scored = []
    for lr in method.lrs:
        values = [_validation_accuracy(method, task, lr, settings, results, protocol) for task in tasks]
        if all(value is not None for value in values):
            scored.append((-sum(values) / len(values), lr))
    if not scored:
        raise RuntimeError(f"No rate of {method.name} has finished seed-{settings.seeds[0]} runs on every tuning task "
                           f"({', '.join(tasks)}) to choose one rate from.")
    return min(scored)[1]
