"""The ``peft-recast`` command line's parser: every subcommand, its options and help, and the bench settings its options
ask for. :mod:`.cli` runs what the parsed arguments name.

Nothing imported here may import torch, PEFT or transformers (seconds): ``peft-recast --help`` builds the parser from
this module alone (tests/apps/test_cli_help.py checks it).
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shutil
from typing import TYPE_CHECKING, Sequence

from ..presets import HEAD_LR, RECOMMENDED_LR, MimicrySettings
from .bench import methods as bench_methods
from .tasks import TASKS

if TYPE_CHECKING:
    from .bench.results import BenchSettings

DEFAULT_TASKS = ("trec6", "sms")  # of demo and sweep
DEFAULT_SWEEP_LRS = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)

DEVICE_HELP = "cpu, cuda (or cuda:N) or auto (default: cuda if available)"
THREADS_HELP = "CPU threads for torch (default: as many as the cores that other processes leave free)"


# name -> (one line for ``peft-recast --help``, the description of ``peft-recast NAME --help``)
COMMANDS = {
    "demo": ("linear probe vs RECAST on real tasks; save, reload and check the adapter",
             "Adapt all-MiniLM-L6-v2 with RECAST (48 coefficients) and a linear probe on real text tasks, save the "
             "adapter, reload it onto a fresh base model and check the predictions. About 3 minutes on 2 idle CPU "
             "cores with the defaults."),
    "sweep": ("validation accuracy of RECAST per coefficient learning rate (and of the linear probe)",
              "Train RECAST at each learning rate of --lrs on a task and report the validation accuracy next to a "
              "linear probe's."),
    "train": ("train a RECAST adapter on a built-in task or your own CSV/JSON lines/Parquet data (Trainer)",
              "Train RECAST (48 coefficients on MiniLM) and a linear head on a sentence encoder with transformers' "
              "Trainer: the head alone first, then both at the recommended learning rate, a validation pass and a "
              "checkpoint per epoch, the best state kept (the head alone when no epoch beats it). The run folder "
              "holds adapter/ (a plain PEFT adapter of the base model, head.safetensors, task.json), the checkpoints "
              "and results.json. Data: --task (built in) or --data FILE with --text-column and --label-column."),
    "evaluate": ("accuracy, macro-F1 and confusion matrix of a saved run on a task split or your own data",
                 "Load a run written by `peft-recast train` or `peft-recast demo` onto a fresh base model and report "
                 "accuracy, macro-F1 and the confusion matrix on a built-in task's split or on --data (a PNG and "
                 "evaluation.json with --output-dir)."),
    "predict": ("the label and its probability for every text of a file or of standard input",
                "Load a saved run and write one JSON line per example, {\"label\": ..., \"probability\": ...}, for "
                "the texts of --data (a file, or - for standard input: one text per line, or JSON lines)."),
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


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads``, the same for every command that computes (:mod:`.cli` applies it)."""
    parser.add_argument("--threads", type=int, default=None, metavar="N", help=THREADS_HELP)


def _add_common(parser: argparse.ArgumentParser, tasks: Sequence[str]) -> None:
    parser.add_argument("--task", nargs="+", choices=sorted(TASKS), default=list(tasks), metavar="TASK",
                        help=f"task(s) to run, from {', '.join(TASKS)} (default: {' '.join(tasks)})")
    parser.add_argument("--max-train", type=int, default=None,
                        help="use only the first N training examples of each task (default: all, at most 2,000)")
    parser.add_argument("--max-eval", type=int, default=None,
                        help="evaluate on the first N test (demo) or validation (sweep) examples (default: all)")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the head initialisation and batch order "
                        "(default: 0)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--batch-size", type=int, default=32, help="examples per training step (default: 32)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per text (default: the task's own, 64 for short texts, 128 for bbc, newsgroups, clothing)")
    add_threads_argument(parser)
    parser.add_argument("--head-lr", type=float, default=HEAD_LR,
                        help=f"peak AdamW learning rate of the classifier head (default: {HEAD_LR:g})")


def add_demo_arguments(demo: argparse.ArgumentParser, sweep: argparse.ArgumentParser) -> None:
    """The options of ``peft-recast demo`` and ``peft-recast sweep``."""
    _add_common(demo, DEFAULT_TASKS)
    demo.add_argument("--output-dir", default=os.path.join("runs", "demo"),
                      help="where adapters and demo_results.json go (default: ./runs/demo)")
    demo.add_argument("--lr", type=float, default=RECOMMENDED_LR,
                      help=f"peak AdamW learning rate of the RECAST coefficients (default: {RECOMMENDED_LR:g})")
    _add_common(sweep, ("trec6",))
    sweep.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_SWEEP_LRS),
                       help="coefficient learning rates to try (default: "
                       f"{' '.join(f'{lr:g}' for lr in DEFAULT_SWEEP_LRS)})")
    sweep.add_argument("--output", default=None, help="write the results to this JSON file")
    sweep.set_defaults(lr=RECOMMENDED_LR)


def _add_data_arguments(parser: argparse.ArgumentParser, label: bool = True) -> None:
    parser.add_argument("--text-column", default=None,
                        help="the column of the texts (default: text, or the column the run was trained on)")
    parser.add_argument("--text-pair-column", default=None,
                        help="a column of second texts, for sentence-pair tasks (default: none)")
    if label:
        parser.add_argument("--label-column", default=None,
                            help="the column of the labels (default: label, or the column the run was trained on)")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``peft-recast train`` and ``examples/train_with_trainer.py``."""
    source = parser.add_argument_group("data and model")
    source.add_argument("--task", default=None, choices=sorted(TASKS), metavar="TASK",
                        help=f"a built-in task: {', '.join(sorted(TASKS))} (default: trec6 when --data is not given)")
    source.add_argument("--data", default=None, metavar="FILE",
                        help="your own training data: a .csv, .tsv, .jsonl, .json or .parquet file, or a folder saved "
                        "with datasets' save_to_disk")
    source.add_argument("--validation-data", default=None, metavar="FILE",
                        help="validation data in the same form (default: 10%% of --data, drawn with --seed)")
    _add_data_arguments(source)
    source.set_defaults(text_column="text", label_column="label")
    source.add_argument("--model", default=None,
                        help="the encoder: a local folder or Hub id that AutoModel loads (default: the pip "
                        "all-MiniLM-L6-v2)")
    source.add_argument("--preset", default=None, metavar="NAME",
                        help="a RecastConfig preset, such as ladder-24, ladder-144 or ladder-648 (default: RecastConfig(), "
                        "48 numbers on MiniLM)")
    source.add_argument("--target-modules", nargs="+", default=None, metavar="NAME",
                        help="names of the layers to adapt, instead of the model type's defaults")
    parser.add_argument("--output-dir", default=os.path.join("runs", "trainer"),
                        help="the run folder: checkpoints, adapter/ and results.json (default: ./runs/trainer)")
    parser.add_argument("--max-train", type=int, default=None,
                        help="use the first N training examples (default: all; a built-in task has at most 2,000)")
    parser.add_argument("--max-eval", type=int, default=None,
                        help="cap a built-in task's validation and test splits at N examples (default: 500 and 1,000)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per text (default: 128, or the built-in task's own)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs (default: 3)")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per training step (default: 32)")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate of the RECAST coefficients (default: peft_recast.recommended_lr of "
                        f"the config: {RECOMMENDED_LR:g} for the default)")
    parser.add_argument("--head-lr", type=float, default=HEAD_LR,
                        help=f"peak learning rate of the classifier head (default: {HEAD_LR:g})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the head, the batch order and the validation cut "
                        "(default: 0)")
    parser.add_argument("--resume-from-checkpoint", default=None, metavar="CHECKPOINT",
                        help="continue an interrupted run from OUTPUT_DIR/checkpoint-N ('last': the newest one)")
    parser.add_argument("--no-head-first", action="store_true",
                        help="train head and coefficients together from a random head (default: the head alone first, "
                        "on the frozen encoder, then both)")
    parser.add_argument("--channels", type=int, default=0, metavar="N",
                        help="after the head's run, give the N output rows that rank highest on the first training "
                        "batches (first-order Taylor importance) coefficients of their own: 2 numbers each "
                        "(default: 0)")


def add_evaluate_arguments(evaluate: argparse.ArgumentParser, predict: argparse.ArgumentParser) -> None:
    """The options of ``peft-recast evaluate`` and ``peft-recast predict``."""
    for parser in (evaluate, predict):
        parser.add_argument("run", help="a run folder of `peft-recast train` (or its adapter/ folder), or a task "
                            "folder of `peft-recast demo`")
        parser.add_argument("--batch-size", type=int, default=64, help="examples per forward pass (default: 64)")
    evaluate.add_argument("--data", default=None, metavar="FILE",
                          help="labelled data (.csv, .tsv, .jsonl, .json, .parquet, a saved dataset, or - for "
                          "standard input) instead of a built-in task")
    _add_data_arguments(evaluate)
    evaluate.add_argument("--task", default=None, choices=sorted(TASKS), metavar="TASK",
                          help="a built-in task (default: the one the run was trained on)")
    evaluate.add_argument("--split", default="test", choices=("test", "validation", "train"),
                          help="the built-in task's split (default: test)")
    evaluate.add_argument("--max-eval", type=int, default=None, help="evaluate on the first N examples only")
    evaluate.add_argument("--output-dir", default=None,
                          help="also write confusion_matrix.png and evaluation.json here (default: print only)")
    predict.add_argument("--data", required=True, metavar="FILE",
                         help="texts to label: a file as for train, or - for standard input (one text per line, or "
                         "JSON lines)")
    _add_data_arguments(predict, label=False)
    predict.add_argument("--output", default=None, metavar="FILE",
                         help="where the JSON lines go (default: standard output)")


def _add_mimicry_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = MimicrySettings()
    parser.add_argument("--model", default=None, help="model directory or Hub id (default: the pip MiniLM-L6)")
    parser.add_argument("--preset", default="attention", help="paper variant: attention, mlp, attention+mlp, conv "
                        "(default: attention)")
    parser.add_argument("--target-modules", nargs="+", default=None, metavar="NAME",
                        help="names of the layers to mimic, instead of the preset's targets")
    parser.add_argument("--fused-modules", nargs="+", default=None, metavar="NAME",
                        help="target names whose weights are stacked into one before mimicry (as q, k, v)")
    parser.add_argument("--layers-per-group", type=int, default=2,
                        help="layers per group (default: 2, the official code's 12 layers / G=6); 0: preset's G")
    parser.add_argument("--num-templates", type=int, default=None,
                        help="templates per group, n (default: the preset's, 2)")
    parser.add_argument("--num-coefficient-sets", type=int, default=None,
                        help="coefficient sets per layer, K (default: the preset's, 2)")
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help=f"mimicry steps (default: {defaults.steps})")
    parser.add_argument("--lr", type=float, default=defaults.lr,
                        help=f"RMSprop learning rate (default: {defaults.lr:g})")
    parser.add_argument("--lr-step", type=int, default=None,
                        help="StepLR period: the rate is multiplied by --lr-gamma every N steps (default: steps / 5, "
                        "the paper's 200 of 1000)")
    parser.add_argument("--lr-gamma", type=float, default=defaults.lr_gamma,
                        help=f"StepLR factor applied to the rate every --lr-step steps (default: {defaults.lr_gamma:g})")
    parser.add_argument("--noise-std", type=float, default=defaults.noise_std,
                        help="standard deviation of the Gaussian noise added to the coefficients at every step; 0 "
                        f"for none (default: {defaults.noise_std:g})")
    parser.add_argument("--clip-norm", type=float, default=defaults.clip_norm,
                        help=f"largest gradient norm, over all templates and coefficients (default: "
                        f"{defaults.clip_norm:g})")
    parser.add_argument("--loss-weight", type=float, default=defaults.loss_weight,
                        help=f"factor of the SmoothL1 reconstruction loss (default: {defaults.loss_weight:g})")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help=f"seed of the template and coefficient initialisation and of the noise (default: "
                        f"{defaults.seed})")
    add_threads_argument(parser)


def add_mimicry_arguments(mimic: argparse.ArgumentParser, fidelity: argparse.ArgumentParser) -> None:
    """The options of ``peft-recast mimic`` and ``peft-recast fidelity``."""
    for parser in (mimic, fidelity):
        _add_mimicry_arguments(parser)
    mimic.add_argument("--output", default=os.path.join("runs", "template-bank"),
                       help="directory (or .safetensors file) for the bank (default: ./runs/template-bank)")
    fidelity.add_argument("--bank-dir", default=os.path.join("runs", "fidelity"),
                          help="where the gradient bank is written (default: ./runs/fidelity)")
    fidelity.add_argument("--samples", type=int, default=32, help="sample texts for the output cosines (default: 32)")
    fidelity.add_argument("--json", default=None, help="also write the reports to this JSON file")


def _method_name(name: str) -> str:
    """``--method``'s type: a known method name, else an error that names the nearest ones (argparse's ``choices``
    would print all of them)."""
    methods = bench_methods.METHODS
    if name in methods:
        return name
    near = difflib.get_close_matches(name, list(methods), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(filter(None, [', '.join(near[:-1]), near[-1]]))}?" if near else ""
    raise argparse.ArgumentTypeError(f"unknown method {name!r}{hint} ('peft-recast bench --help' lists every method, "
                                     "family by family)")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``peft-recast bench``."""
    methods = bench_methods
    parser.add_argument("--quick", action="store_true",
                        help=f"a few minutes: tasks {' '.join(methods.QUICK_TASKS)}, methods "
                        f"{' '.join(methods.QUICK_METHODS)}, one seed, each method at its default learning rate, 500 "
                        "training examples")
    parser.add_argument("--ladder", action="store_true",
                        help="the budget ladder: probe, every RECAST rung, FourierFT at each rung's count, LoRA r=8")
    parser.add_argument("--task", nargs="+", default=None, metavar="TASK",
                        help=f"tasks, in the order they arrive (default: {' '.join(methods.ALL_TASKS)})")
    parser.add_argument("--method", nargs="+", default=None, type=_method_name, metavar="METHOD",
                        help=f"methods by name (default: all {len(methods.METHODS)}); the names, family by family, are "
                        "listed below")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: 0 1 2)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the learning-rate sweep (default rates)")
    parser.add_argument("--lrs", type=float, nargs="+", default=None, metavar="LR",
                        help="the rates the first seed's sweep runs instead of each method's grid (e.g. one more rate "
                        "below it); every rate with records still competes for the chosen rate")
    parser.add_argument("--one-rate", action="store_true",
                        help="report each method at one learning rate for every task (its best mean validation "
                        "accuracy over the tuning tasks at the first seed); held-out tasks run at that rate only")
    parser.add_argument("--probe-candidate", action="store_true",
                        help="report each run, or the linear probe of its task and seed where the probe's validation "
                        "accuracy is higher (what `peft-recast train` keeps); needs the probe among the records")
    parser.add_argument("--small-data", action="store_true",
                        help=f"the small-data protocol: {methods.SMALL_DATA_TRAIN:,} training examples per task, "
                        f"{methods.SMALL_DATA_EPOCHS} epochs (where a user starts; the CPU runs it in full)")
    parser.add_argument("--no-costs", action="store_true", help="skip the step time / memory / latency measurements")
    parser.add_argument("--max-train", type=int, default=None, help="training examples per task (default: all, <= 2,000)")
    parser.add_argument("--max-eval", type=int, default=None, help="validation and test examples per task (default: all)")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs (default: 4)")
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
    parser.add_argument("--serving-scale", type=int, default=None, metavar="N",
                        help="with --serving: instead, N RECAST adapters on one MiniLM (load time, resident memory "
                        "per adapter, a batch of one row per adapter vs one adapter, every row vs its adapter alone)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_threads_argument(parser)


def bench_settings(args: argparse.Namespace) -> BenchSettings:
    """The :class:`~peft_recast.apps.bench.results.BenchSettings` that ``peft-recast bench`` options ask for."""
    from .bench.methods import LADDER_METHODS, QUICK_METHODS, QUICK_TASKS, SMALL_DATA_EPOCHS, SMALL_DATA_TRAIN
    from .bench.results import BenchSettings

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
    settings.one_rate, settings.probe_candidate = args.one_rate, args.probe_candidate
    settings.lrs = args.lrs
    unknown = [task for task in settings.tasks if task not in TASKS]
    if unknown:
        raise SystemExit(f"Unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}.")
    return settings


def _plain(text: str) -> str:
    """Help text as a terminal shows it: Markdown borrowed from the docs (`code`, **bold**) as 'code' and bold."""
    return re.sub(r"`([^`\n]+)`", r"'\1'", text).replace("**", "")


class _KeepLines(argparse.HelpFormatter):
    """argparse's help in plain text (:func:`_plain`), where a description or epilog written over several lines keeps
    its lines."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        text = _plain(text)
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _expand_help(self, action: argparse.Action) -> str:
        return _plain(super()._expand_help(action))


def build_parser() -> argparse.ArgumentParser:
    """The ``peft-recast`` parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="peft-recast",
        description="RECAST for PEFT: train, evaluate, inspect and benchmark adapters of a real pretrained encoder on "
        "real text tasks, offline (the model and the data come from pip packages). 'peft-recast COMMAND --help' "
        "describes each command.",
        formatter_class=_KeepLines,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub = {name: commands.add_parser(name, help=summary, description=description, formatter_class=_KeepLines,
                                     aliases=["eval"] if name == "evaluate" else [])
           for name, (summary, description) in COMMANDS.items()}
    methods, width = bench_methods, min(100, shutil.get_terminal_size().columns - 2)  # argparse's width, at most 100
    sub["bench"].epilog = f"{methods.method_names_help(width)}\n\n{methods.method_families_help(width)}"
    add_demo_arguments(sub["demo"], sub["sweep"])
    add_train_arguments(sub["train"])
    add_evaluate_arguments(sub["evaluate"], sub["predict"])
    sub["inspect"].add_argument("path", help="adapter directory (or a file in it)")
    sub["inspect"].add_argument("--json", action="store_true", help="print the summary as JSON")
    add_mimicry_arguments(sub["mimic"], sub["fidelity"])
    add_bench_arguments(sub["bench"])
    for name, command in sub.items():  # one --threads, the same for every command that computes
        if name != "inspect":
            try:
                add_threads_argument(command)
            except argparse.ArgumentError:  # its own add_*_arguments added it
                pass
    return parser
