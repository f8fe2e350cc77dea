"""The command line as a new user meets it: a fast and quiet ``--help``, every option described in plain text, one
``--threads``, ``bench --method`` grouped and checked, one-line errors; and the bench plot's legend."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import peft_recast
import peft_recast_launcher
from peft_recast.apps import arguments, cli

HEAVY = ("torch", "peft", "transformers", "bitsandbytes", "numpy")


def _run_python(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Each subcommand's parser once (an alias such as ``eval`` shares its command's parser)."""
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    unique: dict[int, str] = {}
    for name, command in action.choices.items():
        unique.setdefault(id(command), name)
    return {name: action.choices[name] for name in unique.values()}


def test_help_and_a_missing_path_import_neither_torch_nor_peft(tmp_path):
    """What the console script does for ``--help``, every ``COMMAND --help`` and ``inspect`` of a missing path: none of
    them imports torch, PEFT, transformers, bitsandbytes or numpy (deterministic, unlike a timing)."""
    missing = tmp_path / "no" / "such" / "adapter"
    code = """
import json, sys
import peft_recast_launcher

def run(argv):
    try:
        return peft_recast_launcher.main(argv)
    except SystemExit as stop:
        return stop.code

codes = [run(["--help"])]
from peft_recast.apps.arguments import COMMANDS  # imported by the launcher's run: the package's imports deferred

codes += [run(argv) for argv in (*[[name, "--help"] for name in COMMANDS], ["inspect", sys.argv[1]])]
heavy = sorted({name.split(".")[0] for name in sys.modules} & %r)
print(json.dumps({"codes": codes, "heavy": heavy}))
""" % (set(HEAVY),)
    done = _run_python(code, str(missing))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["heavy"] == []
    assert result["codes"] == [0] * (1 + len(arguments.COMMANDS)) + [2]
    assert done.stderr == f"peft-recast inspect: error: {missing}: no such file or folder\n"
    assert done.stdout.count("usage: peft-recast") == 1 + len(arguments.COMMANDS)


def test_the_console_script_is_the_launcher_and_prints_no_third_party_message():
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="peft-recast")
    assert script.value == "peft_recast_launcher:main"
    path = Path(sys.executable).with_name("peft-recast")
    if not path.exists():
        pytest.skip("no peft-recast script beside this Python")
    done = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stderr == "" and done.stdout.startswith("usage: peft-recast")


def test_a_command_prints_no_third_party_message(tmp_path):
    """A command that imports PEFT (and with it bitsandbytes, which on CPUs with AVX512-BF16 logs that its optional
    ``kernels`` package is missing) writes nothing to standard error."""
    argv = ["bench", "--report", "--output-dir", str(tmp_path), "--task", "trec6", "--method", "probe",
            "--threads", "1"]
    done = _run_python("import sys, peft_recast_launcher; sys.exit(peft_recast_launcher.main(sys.argv[1:]))", *argv,
                       env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert (tmp_path / "table.md").exists()


def test_the_quieted_notice_is_that_one_message_only(caplog):
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    notice = cli.THIRD_PARTY_NOTICES[logger.name] + ": No module named 'kernels'. Please make sure ..."
    with caplog.at_level(logging.WARNING), cli.quiet_third_party_notices():
        logger.warning(notice)
        logger.warning("something else went wrong")
    assert [record.getMessage() for record in caplog.records] == ["something else went wrong"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        logger.warning(notice)  # outside the command line, a library user sees it
    assert [record.getMessage() for record in caplog.records] == [notice]


def test_the_launcher_leaves_the_environment_as_it_was(monkeypatch):
    name = peft_recast_launcher.DEFER_IMPORTS_ENV
    assert name == peft_recast.DEFER_IMPORTS_ENV
    for before in (None, "0"):
        if before is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, before)
        with pytest.raises(SystemExit) as stop:
            peft_recast_launcher.main(["--help"])
        assert stop.value.code == 0 and os.environ.get(name) == before


def test_deferred_package_imports_and_registers_on_first_access():
    """With the launcher's variable set, ``import peft_recast`` imports no PEFT; the first public name it is asked for
    imports it and registers RECAST, and every public name is the object the eager import gives."""
    code = """
import json, sys
import peft_recast
assert "peft" not in sys.modules and "torch" not in sys.modules, sorted(sys.modules)
config = peft_recast.RecastConfig
from peft import PeftType
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.RECAST] is config
names = {name: [getattr(value, "__module__", None), getattr(value, "__qualname__", repr(value))]
         for name, value in ((name, getattr(peft_recast, name)) for name in peft_recast.__all__)}
assert set(peft_recast.__all__) <= set(dir(peft_recast))
try:
    peft_recast.no_such_name
except AttributeError as error:
    assert "no_such_name" in str(error)
else:
    raise AssertionError("no AttributeError")
print(json.dumps(names))
"""
    done = _run_python(code, env={peft_recast.DEFER_IMPORTS_ENV: "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    deferred = json.loads(done.stdout.splitlines()[-1])
    eager = {name: [getattr(value, "__module__", None), getattr(value, "__qualname__", repr(value))]
             for name, value in ((name, getattr(peft_recast, name)) for name in peft_recast.__all__)}
    assert deferred == eager


def test_import_peft_recast_registers_recast_with_peft_at_once():
    """For library users nothing changes: ``import peft_recast`` alone makes RECAST a PEFT type."""
    code = """
import peft_recast
from peft import PeftType
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.RECAST] is peft_recast.RecastConfig
print("registered")
"""
    done = _run_python(code)
    assert done.returncode == 0 and done.stdout.strip().endswith("registered"), done.stderr[-3000:]


def test_every_option_of_every_command_says_what_it_does():
    """A help text with words besides its default: ``(default: 32)`` alone does not say what the option is."""
    parser = arguments.build_parser()
    undescribed = []
    for name, command in _commands(parser).items():
        assert command.description, name
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            words = re.sub(r"\([^()]*\)", "", action.help or "").strip(" ;,.")
            if not re.search(r"[a-z]{3}", words):
                undescribed.append(f"{name} {'/'.join(action.option_strings) or action.dest}: {action.help!r}")
    assert undescribed == []


def test_no_markdown_in_any_help():
    parser = arguments.build_parser()
    for name, text in [("peft-recast", parser.format_help()),
                       *[(name, command.format_help()) for name, command in _commands(parser).items()]]:
        assert not re.search(r"`|\*\*|\]\(", text), (name, re.findall(r".*(?:`|\*\*|\]\().*", text))
    assert arguments._plain("written by `peft-recast train`, **one** rate") == "written by 'peft-recast train', one rate"


def test_threads_is_one_option_with_one_default_for_every_command_that_computes():
    for name, command in _commands(arguments.build_parser()).items():
        threads = [action for action in command._actions if "--threads" in action.option_strings]
        if name == "inspect":  # reads files only
            assert threads == []
            continue
        (action,) = threads
        assert (action.help, action.default, action.type) == (arguments.THREADS_HELP, None, int), name


def test_counts_below_one_are_one_line_and_exit_2(capsys):
    for argv in (["demo", "--epochs", "0"], ["bench", "--threads", "0"], ["mimic", "--threads", "-1"]):
        with pytest.raises(SystemExit) as stop:
            cli.main(argv)
        assert stop.value.code == 2
        error = capsys.readouterr().err
        assert error == f"peft-recast {argv[0]}: error: {argv[1]} must be a positive integer, got {argv[2]}.\n"


def test_bench_method_names_are_checked_with_a_short_message(capsys):
    parser = arguments.build_parser()
    assert parser.parse_args(["bench", "--method", "recast", "lora-r8"]).method == ["recast", "lora-r8"]
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["bench", "--method", "recast", "lora8"])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert "argument --method: unknown method 'lora8'; did you mean lora-r8" in error
    assert "'peft-recast bench --help' lists every method" in error
    named = set(re.findall(r"[\w-]+", error)) & set(arguments.bench_methods.METHODS)
    assert len(named) <= 3, named  # the nearest names, not all of them


def test_bench_help_groups_and_explains_every_method():
    from peft_recast.apps.bench.methods import FAMILIES, METHODS, QUICK_METHODS

    text = _commands(arguments.build_parser())["bench"].format_help()
    epilog = text[text.index("METHOD names:"):]
    assert f"{len(METHODS)} methods in {len(FAMILIES)} families" in " ".join(epilog.split())
    assert f"--quick: {' '.join(QUICK_METHODS)}" in " ".join(epilog.split())
    listed = [word for line in epilog.splitlines() if line.startswith("    ") for word in line.split()]
    assert listed == list(METHODS)  # whole names, family by family, in order
    for family in FAMILIES.values():
        assert f"{family.name}: {family.about}" in epilog


def test_the_accuracy_plots_legend_uses_the_tables_names_and_recast_stands_out(tmp_path, monkeypatch):
    from peft_recast.apps.bench import report
    from peft_recast.apps.bench.methods import METHODS

    figures = []
    monkeypatch.setattr(report, "save_figure", lambda figure, path: figures.append(figure))

    def row(method, numbers, mean):
        return dict(method=method, label=METHODS[method].label, trainable=numbers, mean=mean,
                    tasks={"trec6": dict(spread=0.5)})

    rows = [row("fourierft-48", 48, 78.0), row("probe", 0, 70.0), row("fourierft-144", 144, 79.0),
            row("recast", 48, 80.0), row("recast-24", 24, 79.5), row("recast-hf", 48, 81.0),
            row("recast-144-hf", 144, 82.0), row("lora-r8", 73728, 85.0), row("bands-24", 24, 80.5),
            row("bands-48", 48, 81.5)]
    report.plot_accuracy(rows, str(tmp_path / "plot.png"))
    (axis,) = figures[0].axes
    texts = axis.get_legend().get_texts()
    assert [text.get_text() for text in texts] == [
        "linear probe (head only)",  # a single row: its table label
        "RECAST, 24-48 numbers",  # rungs whose labels differ in more than numbers: the words they share
        "RECAST … head first, 48-144 numbers",
        "RECAST spectral_bands, q,v, 2 bands x … of rows, … head first, 24-48 numbers",  # RECAST by its family folder
        "FourierFT, 4-12 frequencies, q,v",  # rungs that differ in numbers only: the numbers as a range
        "LoRA r=8, q,v",
    ]
    assert [text.get_fontweight() for text in texts] == ["normal", "bold", "bold", "bold", "normal", "normal"]
    widths = {container.get_label(): container.lines[0].get_linewidth() for container in axis.containers}
    recast = ["RECAST, 24-48 numbers", "RECAST … head first, 48-144 numbers",
              "RECAST spectral_bands, q,v, 2 bands x … of rows, … head first, 24-48 numbers"]
    assert min(widths[label] for label in recast) > 2 * max(
        widths["FourierFT, 4-12 frequencies, q,v"], widths["LoRA r=8, q,v"])
