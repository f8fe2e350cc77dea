"""What a benchmark run covers (:class:`BenchSettings`), each run's key, the resumable ``results.json`` store, and the
learning rate each method gets per task."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Iterator, Optional, Sequence

from ...files import atomic_write
from ..tasks import HELD_OUT_TASKS
from .methods import ALL_TASKS, EXPERIMENTS, METHODS, Method

RESULTS_FILE = "results.json"
ADDED_OPTIONS_FILE = "added_options.json"


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
    lrs: Optional[list[float]] = None  # the rates a sweep runs instead of each method's grid (not part of a run's key)
    probe_candidate: bool = False  # the report lets validation choose the probe over a run (not part of a run's key)

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


def _digest(method: str, protocol: dict, leave_out: frozenset = frozenset()) -> str:
    """The protocol, the method's full PEFT config (less the options ``leave_out``) and its recipe flags, hashed."""
    config = METHODS[method].config()
    described = [protocol, None if config is None else
                 {name: value for name, value in config.to_dict().items() if name not in leave_out}]
    if METHODS[method].align_epochs:
        described.append({"align_epochs": METHODS[method].align_epochs})
    if METHODS[method].head_first:
        described.append({"head_first": True})
    return hashlib.sha1(json.dumps(described, sort_keys=True, default=_canonical).encode()).hexdigest()[:8]


def _key(method: str, task: str, lr: float, seed: int, digest: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", f"{method}_{task}_lr{lr:g}_seed{seed}_{digest}")


def run_key(method: str, task: str, lr: float, seed: int, protocol: dict) -> str:
    """A run's identity, also its adapter name and folder: ``recast_trec6_lr0_01_seed0_<digest>``.

    The digest covers the protocol, the method's full PEFT config and its recipe flags (alignment stage, head
    first), so changing any of them never reuses old results.
    """
    return _key(method, task, lr, seed, _digest(method, protocol))


def _added_options() -> dict[str, list[list[str]]]:
    text = resources.files(__package__).joinpath(EXPERIMENTS, ADDED_OPTIONS_FILE).read_text()
    return {name: groups for name, groups in json.loads(text).items() if name != "about"}


@functools.lru_cache(maxsize=None)
def earlier_digests(method: str, protocol_json: str) -> tuple[str, ...]:
    """The digests the same runs of ``method`` were keyed under before its config class gained the options of
    ``experiments/added_options.json`` (``protocol_json``: the protocol as sorted JSON): its config less the last
    group of them, less the last two groups, and so on, as long as every option left out is at its default (a run
    that sets one is another run)."""
    config = METHODS[method].config()
    if config is None:
        return ()
    defaults = {field.name: field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
                for field in dataclasses.fields(config)}
    values = config.to_dict()
    groups = _added_options().get(type(config).__name__, [])
    digests, leave_out = [], frozenset()
    for group in reversed(groups):
        if any(values.get(option) != defaults.get(option) for option in group):
            break
        leave_out |= frozenset(group)
        digests.append(_digest(method, json.loads(protocol_json), leave_out))
    return tuple(digests)


def _with_todays_keys(runs: dict[str, dict], kept: dict[str, dict]) -> dict[str, dict]:
    """``runs`` with every record saved under an earlier digest of its method (:func:`earlier_digests`) under today's
    key instead, unless ``kept`` or ``runs`` holds a record there already; its ``key`` is then today's and
    ``recorded_key`` the one it was saved under. Records of methods not in :data:`METHODS` stay as they are."""
    moved = {}
    for key, record in runs.items():
        if record.get("method") in METHODS and all(name in record for name in ("task", "lr", "seed", "protocol")):
            method, task, lr, seed, protocol = (record[name] for name in ("method", "task", "lr", "seed", "protocol"))
            today = run_key(method, task, lr, seed, protocol)
            earlier = {_key(method, task, lr, seed, digest)
                       for digest in earlier_digests(method, json.dumps(protocol, sort_keys=True))}
            if key != today and key in earlier and today not in runs and today not in kept and today not in moved:
                moved[today] = {**record, "key": today, "recorded_key": key}
                continue
        moved[key] = record
    return moved


class Results:
    """``results.json``: finished runs by key, the cost measurements and the forgetting check; rewritten atomically
    after each run. Records keyed before the config class gained an option are read under today's key
    (:func:`earlier_digests`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.runs: dict[str, dict] = {}
        self.costs: dict = {}
        self.forgetting: dict = {}
        if os.path.exists(path):
            with open(path) as handle:
                data = json.load(handle)
            self.runs, self.costs, self.forgetting = data.get("runs", {}), data.get("costs", {}), data.get("forgetting", {})
            self.runs = _with_todays_keys(self.runs, {})

    def merge(self, path: str) -> int:
        """Add the runs, costs and forgetting checks of another ``results.json`` (e.g. a shard run on another machine
        or process); its entries replace same-named ones here (forgetting checks task by task, so shards that ran
        different tasks of one method x seed keep each other's). Returns the number of runs read."""
        with open(path) as handle:
            data = json.load(handle)
        if not isinstance(data, dict) or not isinstance(data.get("runs"), dict):
            raise ValueError(f"{path} is not a benchmark results file (no 'runs' object); pass a results.json written "
                             "by `peft-recast bench`.")
        self._take_in(data, replace=True)
        self.save()
        return len(data["runs"])

    def _take_in(self, data: dict, replace: bool) -> None:
        """Add the runs, costs and forgetting checks (task by task) of another file's ``data``; on a shared name its
        entry replaces this object's when ``replace``, else this object's stays."""
        for mine, theirs in ((self.runs, _with_todays_keys(data.get("runs", {}), self.runs)),
                             (self.costs, data.get("costs", {})),
                             *((self.forgetting.setdefault(chain, {}), report)
                               for chain, report in data.get("forgetting", {}).items())):
            mine.update(theirs if replace else {key: value for key, value in theirs.items() if key not in mine})

    def add(self, record: dict) -> None:
        self.runs[record["key"]] = record
        self.save()

    def save(self) -> None:
        """Write the records, first taking in what other processes wrote to the file since this one read it (runs,
        costs and forgetting checks this object lacks), under an exclusive lock on ``<path>.lock``: parallel benches
        writing one ``results.json`` keep each other's records."""
        if self.path is None:
            raise RuntimeError("This is a report's view of the records (probe_candidates), not a results file.")
        with _exclusive(self.path + ".lock"):
            if os.path.exists(self.path):
                with open(self.path) as handle:
                    data = json.load(handle)
                self._take_in(data, replace=False)
            with atomic_write(self.path) as handle:
                json.dump(dict(runs=self.runs, costs=self.costs, forgetting=self.forgetting), handle, indent=1)


@contextlib.contextmanager
def _exclusive(path: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing; where ``fcntl`` is missing, no lock)."""
    try:
        import fcntl
    except ImportError:  # Windows: one writer per file
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def probe_candidates(results: Results, protocol: dict) -> Results:
    """The records as the report reads them when validation may choose the linear probe over a run, the state
    ``peft-recast train`` keeps when no epoch beats the head alone: a copy of ``results`` in which every run whose
    validation accuracy is strictly under the probe's of the same task and seed takes the probe's validation and test
    accuracies and test digest, with ``probe_chosen`` true. Runs without such a probe record stay as they are; the
    copy cannot be saved."""
    view = copy.copy(results)
    view.path, view.runs = None, {}
    for key, record in results.runs.items():
        probe = None
        if record.get("method") != "probe" and record.get("protocol") == protocol:
            probe = results.runs.get(run_key("probe", record["task"], 0.0, record["seed"], protocol))
        if probe is not None and probe["validation_accuracy"] > record["validation_accuracy"]:
            record = {**record, "probe_chosen": True,
                      **{name: probe[name] for name in ("validation_accuracy", "test_accuracy", "test_digest")}}
        view.runs[key] = record
    return view


def lrs_to_run(method: Method, task: str, seed: int, settings: BenchSettings, results: Results,
                protocol: dict) -> list[float]:
    """Seed 0 sweeps the grid (when ``settings.sweep``; ``settings.lrs`` instead of the grid where given); later seeds
    run the chosen rate (:func:`best_lr`). With ``settings.one_rate`` seed 0 sweeps the tuning tasks only, and every
    held-out task runs at the one rate."""
    if method.kind == "probe":
        return [0.0]
    if not settings.sweep:
        return [method.default_lr]
    if seed == settings.seeds[0] and not (settings.one_rate and task in HELD_OUT_TASKS):
        return list(settings.lrs or method.lrs)
    return [best_lr(method, task, settings, results, protocol)]


def _validation_accuracy(method: Method, task: str, lr: float, settings: BenchSettings, results: Results,
                         protocol: dict) -> Optional[float]:
    record = results.runs.get(run_key(method.name, task, lr, settings.seeds[0], protocol))
    return None if record is None else record["validation_accuracy"]


def rates_run(method: Method, results: Results, seed: int) -> list[float]:
    """The rates of ``method`` to choose from: its grid and every other rate it has a record of at ``seed`` (a record
    made under an earlier grid), ascending."""
    recorded = {record["lr"] for record in results.runs.values()
                if record.get("method") == method.name and record.get("seed") == seed}
    return sorted(set(method.lrs) | recorded)


def validation_means(method: Method, tasks: Sequence[str], settings: BenchSettings, results: Results,
                     protocol: dict) -> dict[float, float]:
    """Per rate of :func:`rates_run` that finished on every task of ``tasks`` at the first seed: its mean validation
    accuracy over them (the rates that compete for :func:`best_lr` and :func:`one_rate`)."""
    means = {}
    for lr in rates_run(method, results, settings.seeds[0]):
        values = [_validation_accuracy(method, task, lr, settings, results, protocol) for task in tasks]
        if all(value is not None for value in values):
            means[lr] = sum(values) / len(values)
    return means


def chosen_rate(means: dict[float, float]) -> float:
    """The rate with the best mean validation accuracy (ties: the smaller rate)."""
    return min((-mean, lr) for lr, mean in means.items())[1]


def best_lr(method: Method, task: str, settings: BenchSettings, results: Results, protocol: dict) -> float:
    """The rate ``task`` is reported at: the best validation accuracy on ``task`` at the first seed among the rates
    that ran (:func:`rates_run`), or with ``settings.one_rate`` the method's one rate, :func:`one_rate` (ties: the
    smaller rate)."""
    if method.kind == "probe":
        return 0.0
    if not settings.sweep:
        return method.default_lr
    if settings.one_rate:
        return one_rate(method, settings, results, protocol)
    means = validation_means(method, [task], settings, results, protocol)
    if not means:
        raise RuntimeError(f"No finished seed-{settings.seeds[0]} run of {method.name} on {task} to choose from.")
    return chosen_rate(means)


def one_rate(method: Method, settings: BenchSettings, results: Results, protocol: dict) -> float:
    """The method's one learning rate for every task: the rate (:func:`rates_run`) with the best mean validation
    accuracy over the tuning tasks (:meth:`BenchSettings.tuning_tasks`) at the first seed; only rates that finished on
    every tuning task compete (ties: the smaller rate)."""
    tasks = settings.tuning_tasks()
    if not tasks:
        raise ValueError(f"One rate per method is chosen on tuning tasks, but every task of this run is held out "
                         f"({', '.join(settings.tasks)}); add a task that is not in HELD_OUT_TASKS.")
    means = validation_means(method, tasks, settings, results, protocol)
    if not means:
        raise RuntimeError(f"No rate of {method.name} has finished seed-{settings.seeds[0]} runs on every tuning task "
                           f"({', '.join(tasks)}) to choose one rate from.")
    return chosen_rate(means)
