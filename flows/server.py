"""The temporary Prefect server of one command. Prefect 3 starts its own (`SubprocessASGIServer`: uvicorn in a
child process, given 20 s to answer) when no PREFECT_API_URL is set; that child outlives a `kill -9` of the
command, and a loaded machine can take longer than 20 s to start it. So a command that runs flows starts the same
server itself, as a child that the kernel kills when the command dies (PR_SET_PDEATHSIG), waits for it as long
as a loaded machine needs, points Prefect (and any worker process) at it, and stops it when done."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import IO

from store import InputError

STARTUP_SECONDS = 300.0  # Prefect's default is 20 s; under load the server has taken longer
PR_SET_PDEATHSIG = 1
_TEMPORARY: set[str] = set()  # the API URLs of the temporary servers this process runs


def temporary_api(url: str) -> bool:
    """Whether `url` is a temporary server of this process (which no other machine's worker can rely on)."""
    return url in _TEMPORARY


def _die_with_parent() -> None:
    """In the child, before exec: ask the kernel to SIGKILL it when its parent dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(port: int, log: IO[bytes]) -> subprocess.Popen:
    """The command line Prefect's SubprocessASGIServer runs (its UI off), as a child that dies with us."""
    import prefect
    from prefect.settings import get_current_settings

    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
           **get_current_settings().to_environment_variables(exclude_unset=True)}
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
         "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "error",
         "--lifespan", "on"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None)


def _wait_healthy(server: subprocess.Popen, url: str, seconds: float) -> bool:
    """Poll the server's health endpoint until it answers (True) or it exits or time runs out (False)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and server.poll() is None:
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            if response.status == 200:
                return True
        time.sleep(0.2)
    return False


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@contextlib.contextmanager
def prefect_api(startup_seconds: float = STARTUP_SECONDS) -> Iterator[None]:
    """Run the block against a Prefect API: the one configured (PREFECT_API_URL, a test harness), else a
    temporary server of this process's own that dies with it."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if get_current_settings().api.url:
        yield
        return
    with tempfile.TemporaryFile() as log:
        server, url = _started(log, startup_seconds)
        previous = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url  # for worker processes (process and dask runners)
        _TEMPORARY.add(url)
        try:
            with temporary_settings({PREFECT_API_URL: url}):
                yield
        finally:
            _TEMPORARY.discard(url)
            if previous is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = previous
            _stop(server)


def _started(log: IO[bytes], startup_seconds: float) -> tuple[subprocess.Popen, str]:
    """A server that answers, and its API URL; refused with one line if none starts in time."""
    for _ in range(3):  # exit code 3: the port was taken meanwhile
        server = _start(_free_port(), log)
        url = f"http://127.0.0.1:{server.args[server.args.index('--port') + 1]}/api"
        if _wait_healthy(server, url, startup_seconds):
            return server, url
        _stop(server)
        if server.returncode != 3:
            log.seek(0)
            detail = (log.read().decode(errors="replace").strip().splitlines() or [""])[-1]
            raise InputError(f"the temporary Prefect server did not start within {startup_seconds:g} s"
                             + (f" ({detail})" if detail else "") + "; or set PREFECT_API_URL to a running server")
    raise InputError("the temporary Prefect server found no free port; set PREFECT_API_URL to a running server")
