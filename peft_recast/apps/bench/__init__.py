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

The modules follow the benchmark's seams: :mod:`.methods` (the methods, read from one experiment file each under
``experiments/``: PEFT config, rate grid, recipe flags), :mod:`.results` (settings, run keys, the resumable store),
:mod:`.models` (one method's model, saving and loading runs), :mod:`.runner` (the task chains and forgetting checks),
:mod:`.costs` (side-by-side ratios) and :mod:`.report` (table and plots).
"""

import importlib
from typing import TYPE_CHECKING, Any

# The module of each name, imported on first access (PEP 562): the command line reads `.methods` (standard library
# only) to build its help without importing torch and PEFT, which the other modules need.
_SOURCES = {
    "measure_costs": "costs", "training_memory": "costs", "FAMILIES": "methods", "LADDER_METHODS": "methods",
    "LADDER_SIZES": "methods", "METHODS": "methods", "QUICK_METHODS": "methods", "QUICK_TASKS": "methods",
    "Family": "methods", "Method": "methods", "load_head": "models", "PLOT_FILE": "report", "TABLE_FILE": "report",
    "RESULTS_FILE": "results", "BenchSettings": "results", "Results": "results", "best_lr": "results",
    "lrs_to_run": "results", "one_rate": "results", "run_key": "results", "check_forgetting": "runner",
    "predictions": "runner", "run_bench": "runner", "train_run": "runner",
}
__all__ = [
    "FAMILIES", "LADDER_METHODS", "LADDER_SIZES", "METHODS", "PLOT_FILE", "QUICK_METHODS", "QUICK_TASKS",
    "RESULTS_FILE", "TABLE_FILE", "BenchSettings", "Family", "Method", "Results", "best_lr", "check_forgetting",
    "load_head", "lrs_to_run", "measure_costs", "one_rate", "predictions", "run_bench", "run_key", "train_run",
    "training_memory",
]

if TYPE_CHECKING:
    from .costs import measure_costs, training_memory
    from .methods import FAMILIES, LADDER_METHODS, LADDER_SIZES, METHODS, QUICK_METHODS, QUICK_TASKS, Family, Method
    from .models import load_head
    from .report import PLOT_FILE, TABLE_FILE
    from .results import RESULTS_FILE, BenchSettings, Results, best_lr, lrs_to_run, one_rate, run_key
    from .runner import check_forgetting, predictions, run_bench, train_run


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_SOURCES[name]}"), name)
    globals()[name] = value
    return value
