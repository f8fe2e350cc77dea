"""Obtain PEFT's own test suite for exactly the installed PEFT version (from its PyPI sdist) and make it importable.

PEFT's test code is never committed here: it is downloaded with pip at test time into a cache directory outside the
repository (``$PEFT_RECAST_CACHE`` or ``~/.cache/peft_recast``), unpacked once per version, given the ``__init__.py``
that the sdist lacks, and imported as the package :data:`PACKAGE`.

Environment variables:
    PEFT_RECAST_CACHE: cache root (default ``~/.cache/peft_recast``).
    PEFT_RECAST_PEFT_SDIST: path of an already downloaded ``peft-<version>.tar.gz`` to use instead of pip (offline CI).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "peft_upstream_tests"
PEFT_VERSION = importlib.metadata.version("peft")


class PeftSdistUnavailable(RuntimeError):
    """The PEFT sdist could not be obtained: the peer suite cannot run (this is an error, never a skip)."""


def cache_root() -> Path:
    return Path(os.environ.get("PEFT_RECAST_CACHE") or Path.home() / ".cache" / "peft_recast").expanduser()


def _download_sdist(dest: Path) -> Path:
    given = os.environ.get("PEFT_RECAST_PEFT_SDIST")
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise PeftSdistUnavailable(f"PEFT_RECAST_PEFT_SDIST={given!r} is not a file.")
        return path
    cmd = [
        sys.executable, "-m", "pip", "download", f"peft=={PEFT_VERSION}",
        "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check", "-d", str(dest),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sdists = sorted(dest.glob(f"peft-{PEFT_VERSION}.tar.gz"))
    if proc.returncode != 0 or not sdists:
        raise PeftSdistUnavailable(
            f"Could not download the sdist of peft=={PEFT_VERSION} (needed for PEFT's own test suite, which this "
            f"harness runs against RECAST).\nCommand: {' '.join(cmd)}\nExit code: {proc.returncode}\n"
            f"pip output (tail):\n{(proc.stdout + proc.stderr)[-3000:]}\n"
            "Fix network access to PyPI, or download the file elsewhere and point PEFT_RECAST_PEFT_SDIST at it."
        )
    return sdists[0]


def ensure_peft_tests() -> Path:
    """Return the directory to put on ``sys.path`` so that ``import peft_upstream_tests`` works (idempotent)."""
    version_dir = cache_root() / "peft-sdist" / f"peft-{PEFT_VERSION}"
    package_dir = version_dir / PACKAGE
    marker = package_dir / ".complete"
    if marker.exists():
        return version_dir
    version_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=version_dir) as tmp:
        tmp = Path(tmp)
        sdist = _download_sdist(tmp)
        prefix = f"peft-{PEFT_VERSION}/tests/"
        staging = tmp / PACKAGE
        staging.mkdir()
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
            if not any(m.name == prefix + "testing_common.py" for m in members):
                raise PeftSdistUnavailable(f"{sdist} does not contain {prefix}testing_common.py.")
            for member in members:
                relative = member.name[len(prefix) :]
                if ".." in Path(relative).parts:
                    continue
                target = staging / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        (staging / "__init__.py").write_text(f'"""PEFT {PEFT_VERSION} tests from the PyPI sdist (unmodified)."""\n')
        (staging / ".complete").write_text(sdist.name + "\n")
        if package_dir.exists():
            shutil.rmtree(package_dir)
        staging.rename(package_dir)
    return version_dir
