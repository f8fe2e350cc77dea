"""``peft-recast``: runs each subcommand of the command line (its parser and options: :mod:`.arguments`).

======================  =====================================================================================
``demo``                linear probe vs RECAST on real tasks; save, reload and check the adapter (:mod:`.demo`)
``sweep``               validation accuracy of RECAST per coefficient learning rate (:mod:`.demo`)
``train``               train an adapter on a built-in task or one's own file (:mod:`.classify`, :mod:`.trainer`)
``evaluate`` (``eval``)  accuracy, macro-F1, confusion matrix of a saved run (:mod:`.classify`)
``predict``             label and probability per text of a file or standard input (:mod:`.classify`)
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
import logging
import os
import sys
import time
import warnings
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

# Nothing imported here may import torch, PEFT or transformers (seconds): `peft-recast --help` builds the parser from
# these modules alone (tests/apps/test_cli_help.py checks it). Commands import what they run inside their functions.
from .arguments import bench_settings, build_parser
from .runtime import ThreadGovernor, resolve_device, set_thread_governor, torch_threads


def _run_inspect(args: argparse.Namespace) -> int:
    """``peft-recast inspect``: reads files only; a path that is missing or not a RECAST adapter prints one line and
    exits with status 2."""
    from ..adapter_info import format_inspection, inspect_adapter

    try:
        info = inspect_adapter(args.path)
    except (FileNotFoundError, ValueError) as error:
        print(f"peft-recast inspect: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0


def _run_classifier_command(args: argparse.Namespace) -> int:
    """``train``, ``evaluate`` and ``predict``: bad input prints one line and exits with status 2, having written
    nothing; a run that fails later exits with status 1."""
    from .classify import run_evaluate, run_predict, run_train
    from .textdata import UsageError

    command = "evaluate" if args.command == "eval" else args.command
    run = {"train": run_train, "evaluate": run_evaluate, "predict": run_predict}[command]
    with warnings.catch_warnings():
        # transformers deprecates a method that PEFT calls on every wrapped model; it says nothing to a user
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        try:
            run(args)
        except UsageError as error:
            print(f"peft-recast {command}: error: {error}", file=sys.stderr)
            return 2
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"peft-recast {command}: {error}") from error
    return 0


def run_bench_command(args: argparse.Namespace) -> int:
    """``peft-recast bench``; exit status 1 if any task's predictions changed after later tasks or a reload."""
    from .bench import run_bench
    from .bench.serving import SERVING_METHODS

    if args.serving and args.serving_scale is not None:
        from .bench.serving import ScaleSettings, run_serving_scale

        if args.serving_scale < 1:
            raise SystemExit("--serving-scale must be at least 1.")
        run_serving_scale(ScaleSettings(adapters=args.serving_scale, tokens=args.serving_tokens,
                                        repeats=args.cost_repeats, device=args.device,
                                        output_dir=args.output_dir or os.path.join("runs", "bench-serving")))
        return 0
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


def _check_counts(args: argparse.Namespace) -> None:
    """A count option below 1 (``--epochs 0``): one line and exit status 2, before anything is imported or run."""
    for name in ("epochs", "batch_size", "max_train", "max_eval", "max_length", "threads"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            print(f"peft-recast {args.command}: error: --{name.replace('_', '-')} must be a positive integer, got "
                  f"{value}.", file=sys.stderr)
            raise SystemExit(2)


def _with_thread_governor(args: argparse.Namespace, run) -> int:
    """Run a command with ``--threads`` torch threads or, on the CPU without it, as many as the cores that other
    processes leave free: a thread governor re-checks them every few seconds in the training loops that tick it
    (demo, sweep, bench) and sets them once at the start elsewhere. The count is printed, except by ``predict``, whose
    standard output is its JSON lines."""
    with torch_threads(args.threads) as threads:
        try:
            if resolve_device(getattr(args, "device", "auto")).type == "cpu":
                if args.threads is not None:
                    note = "set by --threads"
                else:
                    governor = ThreadGovernor()
                    set_thread_governor(governor)
                    time.sleep(0.5)
                    threads = governor.update(force=True)
                    note = "follows the cores other processes leave free; --threads to fix"
                if args.command != "predict":
                    print(f"Using {threads} CPU thread(s) on {os.cpu_count()} cores ({note})", flush=True)
            return run(args)
        finally:
            set_thread_governor(None)


# Messages of other libraries that the command line drops, by logger: bitsandbytes (which PEFT imports) logs this one
# at import on CPUs with AVX512-BF16 when the optional `kernels` package is missing, then uses its own kernel; nothing
# a user of these commands needs to act on. Every other message of these loggers passes.
THIRD_PARTY_NOTICES = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
}


class _DropNotice(logging.Filter):
    """Drops the records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextmanager
def quiet_third_party_notices() -> Iterator[None]:
    """Inside the block, the loggers of :data:`THIRD_PARTY_NOTICES` drop those messages (the command line runs every
    command inside it; a library user's process keeps them)."""
    filters = [(logging.getLogger(name), _DropNotice(prefix)) for name, prefix in THIRD_PARTY_NOTICES.items()]
    for logger, notice in filters:
        logger.addFilter(notice)
    try:
        yield
    finally:
        for logger, notice in filters:
            logger.removeFilter(notice)


def _run_command(args: argparse.Namespace) -> int:
    """The command that ``args`` names (not ``inspect``), once RECAST is registered and the threads are set."""
    if args.command in ("train", "evaluate", "eval", "predict"):
        return _run_classifier_command(args)
    if args.command in ("mimic", "fidelity"):
        from .mimic import run_mimicry_command

        return run_mimicry_command(args)
    if args.command == "bench":
        return run_bench_command(args)
    return _run_demo_or_sweep(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default: the process's arguments) and run the subcommand; returns the exit status."""
    args = build_parser().parse_args(argv)
    if getattr(args, "model", None) is None:  # local files only: never ask the Hub (the user's setting wins)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.command == "inspect":  # reads files only: needs neither PEFT nor torch's threads
        return _run_inspect(args)
    _check_counts(args)
    from .. import register

    with quiet_third_party_notices():
        register()  # `peft-recast` imports the package with its imports deferred (peft_recast_launcher)
        return _with_thread_governor(args, _run_command)


if __name__ == "__main__":
    sys.exit(main())
