"""`ifledger schedule verify`: the verify flow as a Prefect deployment that runs on an interval or a cron."""

from __future__ import annotations

import re
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path

from prefect.deployments.runner import RunnerDeployment

from flows.configs import VerifyConfig
from flows.pipeline import verify_flow
from flows.runner import task_slots
from store import InputError

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_every(text: str) -> timedelta:
    """`90s`, `30m`, `1h`, `2d` -> a positive timedelta."""
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if not match or int(match[1]) == 0:
        raise InputError(f"--every {text!r}: give a positive number and a unit, e.g. 30m, 1h or 1d")
    return timedelta(seconds=int(match[1]) * UNITS[match[2]])


def verify_deployment(name: str, config: VerifyConfig, every: str | None = None, cron: str | None = None
                      ) -> RunnerDeployment:
    """The verify flow with `config` (its ledger path made absolute, its runner options checked before the
    deployment is built) every `every` or on `cron`."""
    if (every is None) == (cron is None):
        raise InputError("give exactly one of --every (e.g. 1h) and --cron (e.g. \"0 * * * *\")")
    task_slots(config.runner, config.workers, config.address, config.pool)
    interval = parse_every(every) if every is not None else None
    config = replace(config, db=str(Path(config.db).resolve()))
    try:
        return verify_flow.to_deployment(name=name, interval=interval, cron=cron, parameters={"config": asdict(config)})
    except ValueError as e:  # pydantic's, for a malformed cron string
        raise InputError(f"--cron {cron!r} is not a cron expression (minute hour day month weekday)") from e
