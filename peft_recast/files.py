"""Writing files so that an interrupted write never leaves a file that loads."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import IO, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


@contextmanager
def atomic_write(path: PathLike, mode: str = "w", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file next to ``path`` for writing; on a clean exit it is flushed, synced and renamed onto
    ``path`` (``os.replace``, atomic on POSIX and Windows). On an exception the temporary file is removed and ``path``
    keeps its previous content (or stays absent).

    Example::

        with atomic_write("results.json") as handle:
            json.dump(results, handle)
    """
    if "w" not in mode:
        raise ValueError(f"atomic_write opens files for writing; mode must contain 'w', got {mode!r}.")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates the file 0600; give it the mode open() would
    try:
        with os.fdopen(descriptor, mode, encoding=encoding if "b" not in mode else None) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
