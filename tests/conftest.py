"""One Prefect test harness per session, a private PREFECT_HOME, quiet logs, and the two test tiers.

Tiers: a test that runs Prefect flows, drives `ifledger` in subprocesses, or trains digits-mlp (it uses one of
`FULL_TIER_FIXTURES`, directly or through another fixture) is marked `full`. `make test-fast` runs the others
(unit and closed-form tests: `pytest -m "not full"`); `make test` and CI run both."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import tempfile
from pathlib import Path

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="ifledger-prefect-"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:  # `pytest -n K`: this worker's torch, and the ifledger processes it starts, take a K-th of the cores
    share = str(max(1, (os.cpu_count() or 1) // WORKERS))  # (set before torch is imported: it reads OMP_NUM_THREADS)
    os.environ.setdefault("OMP_NUM_THREADS", share)
    os.environ.setdefault("IFLEDGER_THREADS", share)

import pytest  # noqa: E402

FULL_TIER_FIXTURES = {"prefect_harness", "digits", "registered"}


# Files whose tests take minutes, run first: under `pytest -n K --dist loadfile` (make test) each file goes whole to
# one worker in collection order, and a long file handed out last would leave the other workers idle at the end.
LONG_FILES = ("test_scheduling.py", "test_pool_runner.py", "test_trainer.py", "test_sets.py", "test_scope.py",
              "test_estimators.py", "test_process_runner.py", "test_tamper.py", "test_reversal.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if FULL_TIER_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("full"):
            item.add_marker(pytest.mark.full)
    items.sort(key=lambda item: LONG_FILES.index(item.path.name) if item.path.name in LONG_FILES else len(LONG_FILES))


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def readme_block(marker: str) -> str:
    """The Python code block of README.md between `<!-- marker -->` and `<!-- /marker -->`."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", readme, re.S)
    assert block, f"README lost its {marker} block"
    return block.group(1)


def file_digest(path: Path) -> str:
    """Content hash of a file (to show that a refused command left the ledger unchanged)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def linreg_ledger(prefect_harness, tmp_path_factory) -> dict:
    """`ifledger run linreg` once, through the real Prefect flows, with what it printed; shared by the end-to-end
    tests."""
    from flows.cli import main

    folder = tmp_path_factory.mktemp("linreg")
    db = folder / "ledger.duckdb"
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = main(["--db", str(db), "run", "linreg", "--report-dir", str(folder / "reports")])
    assert code == 0
    return {"db": db, "reports": folder / "reports", "out": out.getvalue()}


def small_digits(name: str, body: str = "") -> str:
    """Source of a CI-sized digits-mlp study class `SmallDigits` (3 seeds, 10 measurements) named `name`, with
    `body` appended to the class."""
    return f'''
from retrain import Recipe
from retrain.studies.digits import DigitsMLP


class SmallDigits(DigitsMLP):
    name = "{name}"
    recipe = Recipe(optimizer="sgd", epochs=40, lr=0.05, momentum=0.9, batch_size=64, weight_decay=1e-3,
                    seeds=3, damping=2e-3, warm_epochs=10, pbrf_steps=100)
    n_measurements = 10
''' + body
