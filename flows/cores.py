"""Torch threads for this process: the cores it may run on (its CPU affinity), shared among the ifledger processes
computing on this machine at the moment and among this process's workers,
threads = max(1, cores ÷ (processes computing × workers)), re-read at every task start so that a process that
started alone gives up cores when a second one starts. Two processes that each take every core slow each other
5–8× on a 2-core machine (their OpenMP threads spin against each other); `IFLEDGER_THREADS=N` overrides.

A process counts as computing while a flow command runs (`computing()`): it leaves a file named by its pid and the
pid's start time in a folder of the temp directory; a file whose process is gone (even after `kill -9`) is ignored
and removed by the next reader."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from store import InputError
from store.queue import process_start

THREADS_VARIABLE = "IFLEDGER_THREADS"
log = logging.getLogger("ifledger.cores")


def registry() -> Path:
    """The folder of the computing processes' files (one per user, in the temp directory)."""
    return Path(tempfile.gettempdir()) / f"ifledger-computing-{os.getuid()}"


def cores() -> int:
    """The cores this process may run on (its CPU affinity; all of the machine's where affinity is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def processes_computing() -> int:
    """How many ifledger processes are computing now (this one included when it is), forgetting dead ones."""
    live = 0
    for entry in registry().glob("*-*"):
        pid, started = entry.name.split("-", 1)
        if pid.isdigit() and started.isdigit() and process_start(int(pid)) == int(started):
            live += 1
        else:
            entry.unlink(missing_ok=True)
    return live


@contextlib.contextmanager
def computing() -> Iterator[None]:
    """Count this process among those computing while the block runs."""
    folder = registry()
    folder.mkdir(mode=0o700, exist_ok=True)
    entry = folder / f"{os.getpid()}-{process_start(os.getpid())}"
    entry.touch()
    try:
        yield
    finally:
        entry.unlink(missing_ok=True)


def threads_for(workers: int = 1) -> int:
    """The torch threads one of this process's `workers` takes: `IFLEDGER_THREADS`, or cores ÷ (processes computing
    × workers), at least 1."""
    fixed = os.environ.get(THREADS_VARIABLE, "").strip()
    if fixed:
        if not fixed.isdigit() or int(fixed) < 1:
            raise InputError(f"{THREADS_VARIABLE}={fixed!r}: set it to a whole number of threads, at least 1")
        return int(fixed)
    return max(1, cores() // (max(1, processes_computing()) * workers))


def share_cores(workers: int = 1) -> int:
    """Set torch's threads for one of `workers` of this process (see `threads_for`); says so in the log (shown
    with `--verbose`) when the number changes."""
    import torch

    threads = threads_for(workers)
    if torch.get_num_threads() != threads:
        log.info("%d torch thread(s): %d cores, %d ifledger process(es) computing, %d worker(s)%s", threads, cores(),
                 processes_computing(), workers, f" ({THREADS_VARIABLE})" if os.environ.get(THREADS_VARIABLE) else "")
        torch.set_num_threads(threads)
    return threads
