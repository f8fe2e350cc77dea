"""``peft-recast``: every subcommand of the command line, its options, and the dispatch to the code that runs it.

======================  =====================================================================================
``demo``                linear probe vs RECAST on real tasks; save, reload and check the adapter (:mod:`.demo`)
``sweep``               validation accuracy of RECAST per coefficient learning rate (:mod:`.demo`)
``train``               train an adapter with ``transformers.Trainer`` (:mod:`.trainer`)
``eval``                accuracy of a saved adapter (:mod:`.trainer`)
``inspect``             what an adapter directory holds (:mod:`peft_recast.adapter_info`)
``mimic``               gradient Neural Mimicry: fit and save a template bank (:mod:`.mimic`)
``fidelity``            closed-form vs gradient mimicry: errors, cosines, time (:mod:`.mimic`)
``bench``               RECAST against PEFT's tuners, task after task on one model (:mod:`.bench`)
======================  =====================================================================================

Everything runs offline: the model and the data come from installed packages. Unless the user set it,
``HF_HUB_OFFLINE=1`` is set for every command that reads local files only, so that no library asks the Hub.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

from .. import RECOMMENDED_LR
from ..bank import MimicrySettings
from .bench.methods import (
    ALL_TASKS,
    LADDER_METHODS,
    METHODS,
    QUICK_METHODS,
    QUICK_TASKS,
    SMALL_DATA_EPOCHS,
    SMALL_DATA_TRAIN,
    method_families_help,
)
from .bench.results import BenchSettings
from .demo import DEFAULT_SWEEP_LRS, DEFAULT_TASKS
from .loop import DEFAULT_HEAD_LR
from .runtime import ThreadGovernor, resolve_device, set_thread_governor, torch_threads
from .tasks import TASKS

DEVICE_HELP = "cpu, cuda (or cuda:N) or auto (default: cuda if available)"
THREADS_HELP = "CPU threads for torch (default: follows the cores that other processes leave free)"


# name -> (one line for ``peft-recast --help``, the description of ``peft-recast NAME --help``)
COMMANDS = {
    "demo": ("linear probe vs RECAST on real tasks; save, reload and check the adapter",
             "Adapt all-MiniLM-L6-v2 with RECAST (48 coefficients) and a linear probe on real text tasks, save the "
             "adapter, reload it onto a fresh base model and check the predictions. About 3 minutes on 2 idle CPU "
             "cores with the defaults."),
    "sweep": ("validation accuracy of RECAST per coefficient learning rate (and of the linear probe)",
              "Train RECAST at each learning rate of --lrs on a task and report the validation accuracy next to a "
              "linear probe's."),
    "train": ("train a RECAST adapter on a task with transformers' Trainer (checkpoints, resume, best model)",
              "Fine-tune RECAST (48 coefficients) and a linear head on all-MiniLM-L6-v2 with transformers' Trainer: a "
              "checkpoint and a validation pass per epoch, the best checkpoint kept, --resume-from-checkpoint to "
              "continue. The best adapter is saved to OUTPUT_DIR/adapter with a task.json."),
    "eval": ("accuracy of a saved adapter on a task's test (or validation) split",
             "Load an adapter written by `peft-recast train` or `peft-recast demo` onto a fresh base model and report "
             "its accuracy on a task split."),
    "inspect": ("what an adapter directory holds: groups, coefficients, bytes, fingerprint, base model",
                "Read an adapter directory without loading any model: its template groups, coefficients, file bytes, "
                "base-model fingerprint and the base model it belongs to."),
    "mimic": ("fit a template bank by gradient Neural Mimicry (the paper's procedure) and save it",
              "Learn templates and coefficients for a pretrained model by gradient descent on the reconstruction "
              "loss (SmoothL1, RMSprop; the paper's settings by default) and write the template bank (safetensors) "
              "that adapters name in RecastConfig.template_bank."),
    "fidelity": ("closed-form vs gradient mimicry: reconstruction error, weight and output cosines, time",
                 "Mimic a pretrained model both ways and report per template group the relative reconstruction "
                 "error, the cosine of generated vs pretrained weights and of layer outputs (mimicked vs original "
                 "model on real text from the TREC-6 package), with the wall time of each method."),
    "bench": ("RECAST against PEFT's tuners, task after task on one model: accuracy, numbers, costs",
              "Every method learns the tasks one after another on one all-MiniLM-L6-v2, each task with its own "
              "adapter and head; earlier tasks are re-tested after the last one and after a reload; step time, "
              "memory, latency and mixed-batch throughput are measured side by side. Resumes where it stopped."),
}


def _add_common(parser: argparse.ArgumentParser, tasks: Sequence[str]) -> None:
    parser.add_argument("--task", nargs="+", choices=sorted(TASKS), default=list(tasks), metavar="TASK",
                        help=f"task(s) to run, from {', '.join(TASKS)} (default: {' '.join(tasks)})")
    parser.add_argument("--max-train", type=int, default=None,
                        help="use only the first N training examples of each task (default: all, at most 2,000)")
    parser.add_argument("--max-eval", type=int, default=None,
                        help="evaluate on the first N test (demo) or validation (sweep) examples (default: all)")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the head initialisation and batch order")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--batch-size", type=int, default=32, help="(default: 32)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per text (default: the task's own, 64 for short texts, 128 for bbc, newsgroups, clothing)")
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    parser.add_argument("--head-lr", type=float, default=DEFAULT_HEAD_LR,
                        help=f"peak AdamW learning rate of the classifier head (default: {DEFAULT_HEAD_LR:g})")


def add_demo_arguments(demo: argparse.ArgumentParser, sweep: argparse.ArgumentParser) -> None:
    """The options of ``peft-recast demo`` and ``peft-recast sweep``."""
    _add_common(demo, DEFAULT_TASKS)
    demo.add_argument("--output-dir", default=os.path.join("runs", "demo"),
                      help="where adapters and demo_results.json go (default: ./runs/demo)")
    demo.add_argument("--lr", type=float, default=RECOMMENDED_LR,
                      help=f"peak AdamW learning rate of the RECAST coefficients (default: {RECOMMENDED_LR:g})")
    _add_common(sweep, ("trec6",))
    sweep.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_SWEEP_LRS),
                       help="coefficient learning rates to try")
    sweep.add_argument("--output", default=None, help="write the results to this JSON file")
    sweep.set_defaults(lr=RECOMMENDED_LR)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``peft-recast train`` and ``examples/train_with_trainer.py``."""
    parser.add_argument("--task", default="trec6", choices=sorted(TASKS), help="task to train on (default: trec6)")
    parser.add_argument("--output-dir", default=os.path.join("runs", "trainer"),
                        help="checkpoints go here, the best adapter to OUTPUT_DIR/adapter (default: ./runs/trainer)")
    parser.add_argument("--max-train", type=int, default=400, help="training examples (default: 400)")
    parser.add_argument("--max-eval", type=int, default=None,
                        help="cap the validation and test splits at N examples (default: all, 500 and 1,000)")
    parser.add_argument("--epochs", type=int, default=3, help="(default: 3)")
    parser.add_argument("--batch-size", type=int, default=32, help="(default: 32)")
    parser.add_argument("--lr", type=float, default=RECOMMENDED_LR,
                        help=f"learning rate of the RECAST coefficients (default: {RECOMMENDED_LR:g})")
    parser.add_argument("--head-lr", type=float, default=DEFAULT_HEAD_LR,
                        help=f"learning rate of the classifier head (default: {DEFAULT_HEAD_LR:g})")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    parser.add_argument("--resume-from-checkpoint", default=None, metavar="CHECKPOINT",
                        help="continue an interrupted run from OUTPUT_DIR/checkpoint-N ('last': the newest one)")
    parser.add_argument("--no-head-first", action="store_true",
                        help="train head and coefficients together from a random head (default: the head alone first, "
                        "on the frozen encoder, then both)")
    parser.add_argument("--channels", type=int, default=0, metavar="N",
                        help="after the head's run, give the N output rows that rank highest on the first training "
                        "batches (first-order Taylor importance) coefficients of their own: 2 numbers each "
                        "(default: 0)")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``peft-recast eval``."""
    parser.add_argument("adapter", help="adapter directory written by `peft-recast train` or `peft-recast demo`")
    parser.add_argument("--task", default=None, choices=sorted(TASKS),
                        help="task to evaluate on (default: the one in the adapter's task.json)")
    parser.add_argument("--split", default="test", choices=("test", "validation", "train"), help="(default: test)")
    parser.add_argument("--max-eval", type=int, default=None, help="evaluate on the first N examples only")
    parser.add_argument("--batch-size", type=int, default=64, help="(default: 64)")


def _add_mimicry_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = MimicrySettings()
    parser.add_argument("--model", default=None, help="model directory or Hub id (default: the pip MiniLM-L6)")
    parser.add_argument("--preset", default="attention", help="paper variant: attention, mlp, attention+mlp, conv "
                        "(default: attention)")
    parser.add_argument("--target-modules", nargs="+", default=None, help="instead of the preset's targets")
    parser.add_argument("--fused-modules", nargs="+", default=None, help="target names fused into one weight")
    parser.add_argument("--layers-per-group", type=int, default=2,
                        help="layers per group (default 2, the official code's 12 layers / G=6); 0: preset's G")
    parser.add_argument("--num-templates", type=int, default=None, help="n (default: the preset's, 2)")
    parser.add_argument("--num-coefficient-sets", type=int, default=None, help="K (default: the preset's, 2)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help=f"mimicry steps (default {defaults.steps})")
    parser.add_argument("--lr", type=float, default=defaults.lr, help=f"RMSprop learning rate (default {defaults.lr})")
    parser.add_argument("--lr-step", type=int, default=None,
                        help="StepLR period (default: steps / 5, the paper's 200 of 1000)")
    parser.add_argument("--lr-gamma", type=float, default=defaults.lr_gamma)
    parser.add_argument("--noise-std", type=float, default=defaults.noise_std)
    parser.add_argument("--clip-norm", type=float, default=defaults.clip_norm)
    parser.add_argument("--loss-weight", type=float, default=defaults.loss_weight)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")


def add_mimicry_arguments(mimic: argparse.ArgumentParser, fidelity: argparse.ArgumentParser) -> None:
    """The options of ``peft-recast mimic`` and ``peft-recast fidelity``."""
    for parser in (mimic, fidelity):
        _add_mimicry_arguments(parser)
    mimic.add_argument("--output", default=os.path.join("runs", "template-bank"),
                       help="directory (or .safetensors file) for the bank (default: ./runs/template-bank)")
    fidelity.add_argument("--bank-dir", default=os.path.join("runs", "fidelity"),
                          help="where the gradient bank is written (default: ./runs/fidelity)")
    fidelity.add_argument("--samples", type=int, default=32, help="sample texts for the output cosines (default 32)")
    fidelity.add_argument("--json", default=None, help="also write the reports to this JSON file")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``peft-recast bench``."""
    parser.add_argument("--quick", action="store_true",
                        help=f"a few minutes: tasks {' '.join(QUICK_TASKS)}, methods {' '.join(QUICK_METHODS)}, one "
                        "seed, each method at its default learning rate, 500 training examples")
    parser.add_argument("--ladder", action="store_true",
                        help="the budget ladder: probe, every RECAST rung, FourierFT at each rung's count, LoRA r=8")
    parser.add_argument("--task", nargs="+", default=None, metavar="TASK",
                        help=f"tasks, in the order they arrive (default: {' '.join(ALL_TASKS)})")
    parser.add_argument("--method", nargs="+", default=None, choices=list(METHODS), metavar="METHOD",
                        help="methods by name (default: all); the names, family by family, are listed below")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: 0 1 2)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the learning-rate sweep (default rates)")
    parser.add_argument("--one-rate", action="store_true",
                        help="report each method at one learning rate for every task (its best mean validation "
                        "accuracy over the tuning tasks at the first seed); held-out tasks run at that rate only")
    parser.add_argument("--small-data", action="store_true",
                        help=f"the small-data protocol: {SMALL_DATA_TRAIN:,} training examples per task, "
                        f"{SMALL_DATA_EPOCHS} epochs (where a user starts; the CPU runs it in full)")
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
    parser.add_argument("--serving", action="store_true",
                        help="instead of accuracy: one model serving N task adapters at once, RECAST vs LoRA r=8 "
                        "(mixed-batch throughput, adapter load time, bytes per adapter, unmerged latency)")
    parser.add_argument("--serving-adapters", type=int, nargs="+", default=[1, 16, 256, 1024], metavar="N",
                        help="distinct adapters per batch for --serving (default: 1 16 256 1024)")
    parser.add_argument("--serving-rows", type=int, default=1024, help="rows of the --serving batch (default: 1024)")
    parser.add_argument("--serving-tokens", type=int, default=32, help="tokens per row for --serving (default: 32)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)


def bench_settings(args: argparse.Namespace) -> BenchSettings:
    """The :class:`~peft_recast.apps.bench.results.BenchSettings` that ``peft-recast bench`` options ask for."""
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
    if args.small_data:
        settings.max_train, settings.epochs = args.max_train or SMALL_DATA_TRAIN, SMALL_DATA_EPOCHS
    settings.one_rate = args.one_rate
    unknown = [task for task in settings.tasks if task not in TASKS]
    if unknown:
        raise SystemExit(f"Unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}.")
    return settings


class _KeepLines(argparse.HelpFormatter):
    """argparse's help, except that a description or epilog written over several lines keeps its lines."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def build_parser() -> argparse.ArgumentParser:
    """The ``peft-recast`` parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="peft-recast",
        description="RECAST for PEFT: train, evaluate, inspect and benchmark adapters of a real pretrained encoder on "
        "real text tasks, offline (the model and the data come from pip packages). `peft-recast COMMAND --help` "
        "describes each command.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub = {name: commands.add_parser(name, help=summary, description=description, formatter_class=_KeepLines)
           for name, (summary, description) in COMMANDS.items()}
    sub["bench"].epilog = "METHOD names, family by family:\n" + method_families_help()
    add_demo_arguments(sub["demo"], sub["sweep"])
    add_train_arguments(sub["train"])
    add_eval_arguments(sub["eval"])
    for name in ("train", "eval"):
        sub[name].add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    sub["inspect"].add_argument("path", help="adapter directory (or a file in it)")
    sub["inspect"].add_argument("--json", action="store_true", help="print the summary as JSON")
    add_mimicry_arguments(sub["mimic"], sub["fidelity"])
    add_bench_arguments(sub["bench"])
    return parser


def _run_inspect(args: argparse.Namespace) -> int:
    from ..adapter_info import format_inspection, inspect_adapter

    try:
        info = inspect_adapter(args.path)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"peft-recast inspect: {error}") from error
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0


def _run_trainer_command(args: argparse.Namespace) -> int:
    from .trainer import run_eval, run_train

    with torch_threads(args.threads):
        try:
            if args.command == "train":
                run_train(args)
            else:
                run_eval(args)
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"peft-recast {args.command}: {error}") from error
    return 0


def run_bench_command(args: argparse.Namespace) -> int:
    """``peft-recast bench``; exit status 1 if any task's predictions changed after later tasks or a reload."""
    from .bench import run_bench
    from .bench.serving import SERVING_METHODS

    if args.serving:
        from .bench.serving import ServingSettings, run_serving

        settings = ServingSettings(adapters=sorted(set(args.serving_adapters)), rows=args.serving_rows,
                                   tokens=args.serving_tokens, repeats=args.cost_repeats, device=args.device,
                                   output_dir=args.output_dir or os.path.join("runs", "bench-serving"))
        if min(settings.adapters) < 1 or max(settings.adapters) > settings.rows:
            raise SystemExit(f"--serving-adapters must lie between 1 and --serving-rows ({settings.rows}).")
        methods = [name for name in args.method or SERVING_METHODS if name in SERVING_METHODS]
        if args.method and len(methods) != len(args.method):
            raise SystemExit(f"--serving measures {', '.join(SERVING_METHODS)}; --method names {args.method}.")
        run_serving(settings, methods)
        return 0
    train = not (args.report or args.costs_only)
    report = run_bench(bench_settings(args), costs=args.costs_only or (train and not args.no_costs), train=train,
                       merge=args.merge or ())
    return 1 if report["changed"] else 0


def _run_demo_or_sweep(args: argparse.Namespace) -> int:
    from .demo import run_demo, run_sweep

    if args.command == "sweep":
        run_sweep(args)
        return 0
    results = run_demo(args)
    failed = [r["task"] for r in results["reloads"] if not r["predictions_match"]]
    if failed:
        print(f"ERROR: the reloaded adapter gives different predictions on: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _with_thread_governor(args: argparse.Namespace, run) -> int:
    """Run a training command with ``--threads`` torch threads, or (on the CPU, without it) a thread governor that
    follows the cores other processes leave free."""
    for name in ("epochs", "batch_size", "max_train", "max_eval", "max_length", "threads"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")
    with torch_threads(args.threads) as threads:
        try:
            if resolve_device(args.device).type == "cpu":
                if args.threads is not None:
                    note = "set by --threads"
                else:
                    governor = ThreadGovernor()
                    set_thread_governor(governor)
                    time.sleep(0.5)
                    threads = governor.update(force=True)
                    note = "follows the cores other processes leave free; --threads to fix"
                print(f"Using {threads} CPU thread(s) on {os.cpu_count()} cores ({note})", flush=True)
            return run(args)
        finally:
            set_thread_governor(None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default: the process's arguments) and run the subcommand; returns the exit status."""
    args = build_parser().parse_args(argv)
    if getattr(args, "model", None) is None:  # local files only: never ask the Hub (the user's setting wins)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.command == "inspect":
        return _run_inspect(args)
    if args.command in ("train", "eval"):
        return _run_trainer_command(args)
    if args.command in ("mimic", "fidelity"):
        from .mimic import run_mimicry_command

        return run_mimicry_command(args)
    if args.command == "bench":
        return _with_thread_governor(args, run_bench_command)
    return _with_thread_governor(args, _run_demo_or_sweep)


if __name__ == "__main__":
    sys.exit(main())
