"""Where the applications compute: the device, and torch's CPU threads (fixed, or following the free cores).

torch is imported by the functions that use it, not with the module: the command line imports this module to build
its parser, and ``peft-recast --help`` must not wait for torch.
"""

from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator, Optional

if TYPE_CHECKING:
    import torch


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name} was requested but CUDA is not available on this machine.")
    return torch.device(name)


def _cpu_sample() -> Optional[tuple[float, float, int, int]]:
    """``(wall, this process's CPU seconds, total jiffies, idle jiffies)`` from ``/proc/stat``; ``None`` off Linux."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(value) for value in handle.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    return time.monotonic(), time.process_time(), sum(fields), fields[3] + fields[4]  # idle + iowait


class ThreadGovernor:
    """Keeps torch's CPU threads at the cores that other processes leave free, re-checked every ``interval`` s.

    On a small machine oversubscribed cores cost a lot: on 2 cores with another process computing, a MiniLM training
    step took 1.7-3 s with 2 threads and 0.4 s with 1, while on idle cores 2 threads are ~1.9x faster than 1.
    """

    def __init__(self, max_threads: Optional[int] = None, interval: float = 5.0) -> None:
        import torch

        self.max_threads = max_threads or torch.get_num_threads()
        self.interval = interval
        self.cores = os.cpu_count() or 1
        self.last = _cpu_sample()

    def other_busy_cores(self, sample: tuple[float, float, int, int]) -> Optional[float]:
        """Cores kept busy since the last sample by processes other than this one."""
        wall, cpu, total, idle = sample
        wall_0, cpu_0, total_0, idle_0 = self.last
        if total <= total_0 or wall <= wall_0:
            return None
        busy = (1 - (idle - idle_0) / (total - total_0)) * self.cores
        return max(0.0, busy - (cpu - cpu_0) / (wall - wall_0))

    def update(self, force: bool = False) -> int:
        """Re-check (at most every ``interval`` s unless ``force``) and set torch's thread count; returns it."""
        import torch

        if self.last is None:
            return torch.get_num_threads()
        if not force and time.monotonic() - self.last[0] < self.interval:
            return torch.get_num_threads()
        sample = _cpu_sample()
        if sample is None:
            return torch.get_num_threads()
        others = self.other_busy_cores(sample)
        self.last = sample
        if others is not None:
            threads = max(1, min(self.max_threads, self.cores - int(others + 0.5)))
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
        return torch.get_num_threads()


_governor: Optional[ThreadGovernor] = None


def set_thread_governor(governor: Optional[ThreadGovernor]) -> None:
    """Make :func:`tick` (called once per batch) keep ``governor`` up to date; ``None`` stops it."""
    global _governor
    _governor = governor


def tick() -> None:
    """Let the thread governor (if one is set) re-check the free cores; called once per batch."""
    if _governor is not None:
        _governor.update()


@contextmanager
def torch_threads(count: Optional[int] = None) -> Iterator[int]:
    """Run the block with ``count`` torch CPU threads (``None``: as they are) and restore the previous count after.

    Yields the thread count in force. Raises ``SystemExit`` for a count below 1 (it comes from ``--threads``).
    """
    import torch

    before = torch.get_num_threads()
    if count is not None:
        if count < 1:
            raise SystemExit(f"--threads must be a positive integer, got {count}.")
        torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def timed(function: Callable[[], object], device: Optional[torch.device] = None) -> float:
    """Wall seconds of one call of ``function`` (on a CUDA ``device``: with the queued work finished before and after)."""
    import torch

    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    function()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def median_seconds(function: Callable[[], object], repeats: int, device: Optional[torch.device] = None) -> float:
    """The median of ``repeats`` :func:`timed` calls, after one call that is not timed (one-time costs)."""
    function()
    return statistics.median(timed(function, device) for _ in range(repeats))


def side_by_side(calls: dict[str, Callable[[], object]], repeats: int, device: Optional[torch.device] = None,
                 description: Optional[str] = None) -> dict[str, float]:
    """Median :func:`timed` seconds of each of ``calls``, compared under the same machine load: one untimed call each
    (one-time costs: caches, allocations), then ``repeats`` rounds, each calling all of them, in an order that
    rotates by one per round. With a ``description``, a progress bar counts the rounds."""
    from tqdm.auto import tqdm

    names = list(calls)
    for name in names:
        calls[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_ in tqdm(range(repeats), desc=description, unit="round", disable=description is None, leave=False):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            seconds[name].append(timed(calls[name], device))
    return {name: statistics.median(values) for name, values in seconds.items()}
