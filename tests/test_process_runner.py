"""`verify --runner process`: its worker processes die with it, even when it is killed with SIGKILL (they trained
on as ~650 MB orphans before)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from test_scheduling import HANG, ifledger, query, registered  # noqa: F401 (registered is a fixture)

pytestmark = pytest.mark.full


def _workers(parent: int) -> list[int]:
    """The multiprocessing workers whose parent is `parent`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, IndexError):
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and b"spawn_main" in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
    return found


def _alive(pid: int) -> bool:
    with contextlib.suppress(OSError, IndexError):
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    return False


def test_process_workers_die_with_a_killed_verify(registered):  # noqa: F811
    db = registered.with_name("orphans.duckdb")
    shutil.copy(registered, db)
    verify = ifledger(db, "verify", "--runner", "process", "--workers", "2", "--chunk-size", "2",
                      start_new_session=True)
    try:
        deadline = time.monotonic() + HANG
        while query(db, "SELECT count(*) FROM runs WHERE status = 'running'")[0][0] == 0 or not _workers(verify.pid):
            assert verify.poll() is None and time.monotonic() < deadline, verify.communicate()[1][-2000:]
            time.sleep(0.2)
        workers = _workers(verify.pid)
        verify.send_signal(signal.SIGKILL)  # the verify alone, not its process group
        verify.wait()
        deadline = time.monotonic() + 60
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(map(_alive, workers)), [w for w in workers if _alive(w)]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(verify.pid, signal.SIGKILL)
        verify.communicate()
