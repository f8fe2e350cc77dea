"""``peft_recast.files.atomic_write``: an interrupted write never leaves a file that loads half-written."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from peft_recast.files import atomic_write

REPO = Path(__file__).resolve().parents[2]


def _leftovers(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".tmp"))


def test_writes_text_and_binary(tmp_path):
    with atomic_write(tmp_path / "results.json") as handle:
        json.dump({"a": 1}, handle)
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": 1}
    tensors = {"x": torch.arange(6.0).reshape(2, 3)}
    with atomic_write(tmp_path / "bank.safetensors", "wb") as handle:
        handle.write(save(tensors))
    assert torch.equal(load_file(tmp_path / "bank.safetensors")["x"], tensors["x"])
    assert _leftovers(tmp_path) == []


def test_creates_missing_directories_and_replaces_old_content(tmp_path):
    path = tmp_path / "deep" / "er" / "file.txt"
    with atomic_write(path) as handle:
        handle.write("old")
    with atomic_write(path) as handle:
        handle.write("new")
    assert path.read_text() == "new"
    assert _leftovers(path.parent) == []


@pytest.mark.parametrize("interruption", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_write_keeps_the_previous_file_and_leaves_no_temporary_file(tmp_path, interruption):
    path = tmp_path / "results.json"
    path.write_text('{"complete": true}')
    with pytest.raises(type(interruption)):
        with atomic_write(path) as handle:
            handle.write('{"complete": fal')  # half of the new content, then the interruption
            handle.flush()
            raise interruption
    assert json.loads(path.read_text()) == {"complete": True}
    assert _leftovers(tmp_path) == []


def test_interrupted_first_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "new.safetensors", "wb") as handle:
            handle.write(b"\x00" * 10)
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


def test_killed_process_leaves_the_previous_file_intact(tmp_path):
    """SIGKILL runs no clean-up: the target keeps its old content; the partial data sits in a hidden ``.<name>.*.tmp``
    file next to it, which nothing loads (and the next write does not reuse)."""
    path = tmp_path / "bank.safetensors"
    old = {"x": torch.ones(3)}
    path.write_bytes(save(old))
    script = textwrap.dedent(
        f"""
        import importlib.util, time
        spec = importlib.util.spec_from_file_location("files", {str(REPO / "peft_recast" / "files.py")!r})
        files = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(files)  # files.py alone: no torch/peft import, so the child starts in a blink
        atomic_write = files.atomic_write
        with atomic_write({str(path)!r}, "wb") as handle:
            handle.write(b"\\x01" * 4096)
            handle.flush()
            print("WRITING", flush=True)
            time.sleep(60)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "WRITING"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert torch.equal(load_file(path)["x"], old["x"])
    leftovers = _leftovers(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].startswith(".bank.safetensors.")
    with atomic_write(path, "wb") as handle:
        handle.write(save({"x": torch.zeros(2)}))
    assert torch.equal(load_file(path)["x"], torch.zeros(2))


def test_refuses_read_modes(tmp_path):
    with pytest.raises(ValueError, match="mode must contain 'w', got 'r'"):
        with atomic_write(tmp_path / "x", "r"):
            pass
    assert os.listdir(tmp_path) == []


def test_atomic_write_gives_the_file_the_mode_open_would(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    with atomic_write(tmp_path / "atomic.txt") as handle:
        handle.write("x")
    assert (tmp_path / "atomic.txt").stat().st_mode == plain.stat().st_mode
