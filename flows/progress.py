"""Progress of retraining and scoring that never goes silent: a tqdm bar on a terminal, and otherwise one line every
`IFLEDGER_PROGRESS_SECONDS` (default 30) with, per regime (or method), models done/total, models per second and an
ETA measured on this run. Retraining work is counted in model-steps (a model of a regime takes its budget of epochs
or steps); scoring in seed models."""

from __future__ import annotations

import datetime as dt
import os
import sys
import threading
import time
from typing import TextIO

from tqdm.auto import tqdm

DEFAULT_SECONDS = 30.0


class RetrainProgress:
    """Thread-safe counters per regime. `steps` maps a regime to its steps per model, `models` to how many
    models this run plans to train in it."""

    fractional = False  # whether the line shows models begun as fractions

    def __init__(self, name: str, steps: dict[str, int], models: dict[str, int], stream: TextIO | None = None,
                 every: float | None = None, action: str = "retraining"):
        self.name, self.steps, self.action = name, steps, action
        self.total = {r: models.get(r, 0) * steps[r] for r in steps if models.get(r)}
        self.done = dict.fromkeys(self.total, 0)
        self.started: dict[str, float] = {}
        self.stream = stream or sys.stderr
        self.every = every if every is not None else float(os.environ.get("IFLEDGER_PROGRESS_SECONDS",
                                                                          DEFAULT_SECONDS))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._bar: tqdm | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RetrainProgress:
        if self.stream.isatty():
            self._bar = tqdm(total=sum(self.total.values()), unit="model-step", file=self.stream,
                             desc=f"{self.name}: {self.action} {self.models_total()} models")
        else:
            self._thread = threading.Thread(target=self._report, daemon=True, name="ifledger-progress")
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._bar is not None:
            self._bar.close()

    def models_total(self) -> int:
        return sum(t // self.steps[r] for r, t in self.total.items())

    def start(self, regime: str) -> None:
        """The regime's first chunk starts now: its rate is measured from here."""
        with self._lock:
            self.started.setdefault(regime, time.monotonic())

    def advance(self, regime: str, model_steps: float) -> None:
        with self._lock:
            self.done[regime] = min(self.done[regime] + model_steps, self.total[regime])
        if self._bar is not None:
            self._bar.update(model_steps)

    def drop(self, regime: str, models: int) -> None:
        """`models` of the plan were taken by another verify: this run will not train them."""
        with self._lock:
            self.total[regime] -= models * self.steps[regime]
        if self._bar is not None:
            self._bar.total -= models * self.steps[regime]
            self._bar.refresh()

    def line(self) -> str:
        """`NAME: scratch 128/640 models, 1.92 models/s, eta 0:04:27; warm 0/640 models`."""
        now = time.monotonic()
        parts = []
        with self._lock:
            for regime, total in self.total.items():
                steps, done = self.steps[regime], self.done[regime]
                shown = f"{done / steps:.2f}".rstrip("0").rstrip(".") if self.fractional else int(done // steps)
                text = f"{regime} {shown}/{int(total // steps)} models"
                elapsed = now - self.started[regime] if regime in self.started else 0.0
                if done and elapsed > 0:
                    rate = done / elapsed  # model-steps per second, this run, this regime
                    eta = dt.timedelta(seconds=round((total - done) / rate))
                    text += f", {rate / steps:.3g} models/s, eta {eta}"
                parts.append(text)
        return f"{self.name}: " + "; ".join(parts)

    def _report(self) -> None:
        while not self._stop.wait(self.every):
            print(self.line(), file=self.stream, flush=True)
        print(self.line(), file=self.stream, flush=True)


class ScoringProgress(RetrainProgress):
    """One method's scoring, counted in seed models (`NAME: scoring cg 1.37/5 models, 0.02 models/s, eta 0:03:20`);
    called with the fraction of a model just done (an iterative solver's steps within a model, too)."""

    fractional = True

    def __init__(self, name: str, method: str, models: int, stream: TextIO | None = None, every: float | None = None):
        self.key = f"scoring {method}"
        super().__init__(name, {self.key: 1}, {self.key: models}, stream, every, action=self.key)

    def __enter__(self) -> ScoringProgress:
        super().__enter__()
        self.start(self.key)
        return self

    def __call__(self, models: float) -> None:
        self.advance(self.key, models)
