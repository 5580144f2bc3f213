"""Torch threads are shared among the ifledger processes computing at once and among a process's workers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from flows import cores
from flows.cli import main
from store.queue import process_start


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A private registry of computing processes on a 4-core machine, no override."""
    monkeypatch.setattr(cores, "registry", lambda: tmp_path / "computing")
    monkeypatch.setattr(cores, "cores", lambda: 4)
    monkeypatch.delenv(cores.THREADS_VARIABLE, raising=False)
    return tmp_path / "computing"


def test_processes_computing_share_the_cores_and_dead_ones_are_forgotten(machine):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert cores.threads_for() == 4  # alone, not even registered
        with cores.computing():
            assert cores.processes_computing() == 1 and cores.threads_for() == 4
            assert cores.threads_for(workers=2) == 2
            (machine / f"{other.pid}-{process_start(other.pid)}").touch()  # a second ifledger computing
            assert cores.processes_computing() == 2 and cores.threads_for() == 2 and cores.threads_for(3) == 1
            (machine / f"{other.pid}-{process_start(other.pid) + 1}").touch()  # its pid, another start: reused
            (machine / "999999999-1").touch()  # killed with -9: its file stayed behind
            assert cores.processes_computing() == 2
            alive = sorted(p.name.split("-")[0] for p in machine.iterdir())
            assert alive == sorted([str(other.pid), str(os.getpid())])  # the stale files are removed
        assert cores.processes_computing() == 1  # this process's file went with the block
    finally:
        other.kill()
        other.wait()
    assert cores.processes_computing() == 0


def test_share_cores_sets_torchs_threads_and_the_variable_overrides(machine, monkeypatch):
    before = torch.get_num_threads()
    try:
        with cores.computing():
            assert cores.share_cores(workers=4) == 1 and torch.get_num_threads() == 1
            monkeypatch.setenv(cores.THREADS_VARIABLE, "3")
            assert cores.share_cores(workers=4) == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_thread_count_is_refused_before_anything_is_written(machine, monkeypatch, tmp_path, capsys, value):
    monkeypatch.setenv(cores.THREADS_VARIABLE, value)
    assert main(["--db", str(tmp_path / "l.duckdb"), "register", "linreg"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ifledger: error: {cores.THREADS_VARIABLE}={value!r}") and "\n" not in err
    assert not (tmp_path / "l.duckdb").exists()
