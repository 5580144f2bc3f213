"""The options of `register`, `verify`, `run` and `import-predictions`, one dataclass each. The CLI builds one
and passes it whole to the flow, and the flow stores it with the code version in the ledger's chained
`invocations` table (predictions and runs name their invocation), so any result can be replayed:
`RegisterConfig(**config)` from the ledger is the same request. Empty tuples mean the study's defaults."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RegisterConfig:
    db: str
    study: str  # a built-in name or path/to/file.py:ClassName
    methods: tuple[str, ...] = ()
    sets: tuple[str, ...] = ()
    supplied_must_reproduce: bool = False  # refuse a supplied model the recipe does not reproduce
    weight_changes: bool = False  # also register each method's predicted weight change per set and block
    device: str = "cpu"  # where full-data models are trained and predictions computed, as resolved (cpu, cuda:0)


@dataclass(frozen=True)
class VerifyConfig:
    db: str
    study: str | None = None  # None: every registered study
    regimes: tuple[str, ...] = ()
    chunk_size: int = 64
    retry_failed: bool = False
    runner: str = "thread"  # thread | process | dask | pool
    workers: int | None = None
    address: str | None = None
    device: str = "cpu"  # where each chunk trains and measures, as resolved (cpu, cuda:0)
    pool: str | None = None  # the Prefect work pool of the pool runner


@dataclass(frozen=True)
class ImportConfig:
    db: str
    study: str
    file: str  # CSV or Parquet of another library's predictions
    method: str  # stored as imported:<method>


@dataclass(frozen=True)
class RunConfig:
    register: RegisterConfig
    verify: VerifyConfig  # run verifies the study it registered, in the same ledger
    report_dir: str = "ifledger-reports"


@dataclass(frozen=True)
class BenchConfig:
    register: RegisterConfig  # empty methods: every built-in method and every installed peer's
    verify: VerifyConfig
    report_dir: str = "ifledger-reports"
