"""README's quick start really runs, and prints what it claims."""

import re
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

README = Path(__file__).resolve().parents[2] / "README.md"


def test_quick_start_runs(tmp_path):
    code = re.search(r"## Quick start\n.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trainable params: 48 " in result.stdout  # the default: 12 modules x 2 templates x 2 blocks of rows
    assert "48 coefficients in 6 groups" in result.stdout
    saved = load_file(tmp_path / "recast-quickstart" / "adapter_model.safetensors")
    assert all(".recast_coefficients" in key for key in saved)  # coefficients only: no template, no base weight
    assert sum(tensor.numel() for tensor in saved.values()) == 48
    assert any(tensor.abs().sum() > 0 for tensor in saved.values())  # the three training steps moved them


def _documented_commands() -> list[tuple[str, str]]:
    """Every ``peft-recast`` command shown in README.md and docs/ but the dated log (code blocks and inline code;
    continued lines joined, comments dropped), with its file."""
    commands = []
    for path in [README, *sorted((README.parent / "docs").rglob("*.md"))]:
        if path.name == "log.md":
            continue
        text = path.read_text().replace("\\\n", " ")
        for match in re.finditer(r"(?:^|`)(?:\.venv/bin/)?peft-recast ([^`\n]*)", text, re.M):
            commands.append((path.name, match.group(1).split("  #")[0].strip()))
    return commands


def test_every_documented_command_parses():
    """Each documented ``peft-recast`` command names a real subcommand with real options (argparse exits with code 2
    on an unknown one); an upper-case placeholder (``DIR``, ``N``) stands for a value, and a command with shell
    variables or ``...`` is parsed up to them."""
    import shlex

    import pytest

    from peft_recast.apps.arguments import build_parser

    commands = _documented_commands()
    assert len(commands) >= 10 and any(name == "README.md" for name, _ in commands)
    for name, command in commands:
        words = ["1" if re.fullmatch(r"[A-Z_]+", word) else word for word in shlex.split(command)]  # DIR, N
        cut = next((i for i, word in enumerate(words) if re.search(r"[$<\[*]|\.\.\.", word)), len(words))
        words = words[: cut - 1 if 0 < cut < len(words) and words[cut - 1].startswith("--") else cut]
        try:
            build_parser().parse_args(words)
        except SystemExit as error:
            pytest.fail(f"{name}: `peft-recast {command}` does not parse (exit {error.code})")


def test_readme_says_how_much_the_full_bench_runs():
    """The warnings beside ``peft-recast bench`` without ``--quick`` (set-up and results) give the methods, chains and
    training runs that the default settings make, counted here the way ``lrs_to_run`` chooses the runs: seed 0 sweeps
    each method's grid (with ``--one-rate`` on the tuning tasks only), later seeds run one rate, the probe runs once."""
    from peft_recast.apps.bench.methods import METHODS
    from peft_recast.apps.bench.results import BenchSettings
    from peft_recast.apps.tasks import HELD_OUT_TASKS

    def training_runs(settings: BenchSettings) -> int:
        total = 0
        for method in (METHODS[name] for name in settings.methods):
            for task in settings.tasks:
                sweep = method.kind != "probe" and not (settings.one_rate and task in HELD_OUT_TASKS)
                total += (len(method.lrs) if sweep else 1) + len(settings.seeds) - 1
        return total

    text = " ".join(README.read_text().split())
    full, small_data = BenchSettings(), BenchSettings(one_rate=True)
    chains = len(full.methods) * len(full.seeds)
    assert (f"`peft-recast bench` runs all {len(METHODS)} methods with {len(full.seeds)} seeds each: {chains:,} method "
            f"× seed chains of {len(full.tasks)} tasks, about {round(training_runs(full), -2):,} training runs") in text
    assert f"runs all {chains:,} chains, about {round(training_runs(small_data), -2):,} training runs" in text
