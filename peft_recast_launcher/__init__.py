"""The ``peft-recast`` console script: the command line, started without the library's heavy imports.

Python runs ``peft_recast/__init__.py`` before any module inside the package, and that file imports torch, PEFT and
transformers (seconds) to register RECAST with PEFT. This module lives outside the package so that it can set
``peft_recast.DEFER_IMPORTS_ENV`` before that file runs: the package then defers those imports to first use, and
``peft-recast --help`` answers at once. The variable is removed right after the import, so that nothing the command
starts inherits it; the command line registers RECAST itself before it runs a command.
"""

import os
from typing import Optional, Sequence

# peft_recast.DEFER_IMPORTS_ENV (not imported from there: that would run the package's imports first)
DEFER_IMPORTS_ENV = "_PEFT_RECAST_DEFER_IMPORTS"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``peft-recast``: :func:`peft_recast.apps.cli.main` with the package's heavy imports deferred."""
    before = os.environ.get(DEFER_IMPORTS_ENV)
    os.environ[DEFER_IMPORTS_ENV] = "1"
    try:
        from peft_recast.apps.cli import main as cli_main
    finally:
        if before is None:
            del os.environ[DEFER_IMPORTS_ENV]
        else:
            os.environ[DEFER_IMPORTS_ENV] = before
    return cli_main(argv)
