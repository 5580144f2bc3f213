"""The study's own trainer: one model per job, trained by the study's `train_model` hook or its `train_command`
instead of the batched engine; ifledger writes the job's files, runs it, loads the checkpoint on the job's device
and flattens it in the study's `FlatModel` order, to be measured as every other model is."""

from __future__ import annotations

import hashlib
import shlex
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from store.records import InputError

if TYPE_CHECKING:
    from retrain.study import Study

CHECKPOINT = "model.pt"  # the checkpoint a `train_command` writes in its job's folder
PAIRINGS = ("masked", "dropped")


@dataclass(frozen=True)
class TrainingJob:
    """One model for the study's trainer to train.

    seed: the seed (initialisation and example order); regime: "scratch" (train from the seed's initialisation:
    the full-data model is a scratch job that keeps every example) or "warm" (continue the full-data model in
    `init` for `epochs` epochs, epochs first_epoch, first_epoch + 1, ... of the study's `example_order`, with
    fresh optimizer state and schedule); kept: the training indices to train on; new_labels: a relabel set's
    points and their new labels (those points are kept) or None; init: warm's starting checkpoint (a state_dict
    file, `torch.save(model.state_dict())`), else None; out: a fresh folder for this job, holding only kept_file
    (and labels_file), removed once the model is measured (the working directory of a `train_command`); device:
    the device `--device` resolved to ("cpu", "cuda" or "cuda:N"), where the checkpoint is loaded; kept_file:
    `kept`, one index a line; labels_file: `new_labels`, "index label" a line (written only for a relabel set)."""

    seed: int
    regime: str
    kept: tuple[int, ...]
    new_labels: dict[int, float] | None
    init: Path | None
    out: Path
    device: str
    epochs: int
    first_epoch: int = 0

    @property
    def kept_file(self) -> Path:
        return self.out / "kept.txt"

    @property
    def labels_file(self) -> Path:
        return self.out / "labels.txt"

    @property
    def checkpoint(self) -> Path:
        """Where a `train_command` writes the trained model's state_dict: `{out}/model.pt`."""
        return self.out / CHECKPOINT

    def write_files(self) -> None:
        """The job's folder and its index files, for a trainer that reads files."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.kept_file.write_text("".join(f"{i}\n" for i in self.kept))
        if self.new_labels is not None:
            self.labels_file.write_text("".join(f"{i} {v!r}\n" for i, v in sorted(self.new_labels.items())))

    def template_fields(self) -> dict[str, str]:
        """The fields a `train_command` may name: every field of the job, `kept_file`, `labels_file`, `checkpoint`
        and `python` (this interpreter)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values |= {"kept_file": self.kept_file, "labels_file": self.labels_file, "checkpoint": self.checkpoint,
                   "python": sys.executable}
        return {k: "" if v is None else str(v) for k, v in values.items()}


class TrainerFailure(Exception):
    """The study's trainer did not give a model: its run is recorded as failed with this reason."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def command_arguments(command: str, job_fields: Mapping[str, str], base: Path) -> list[str]:
    """The argument list of a `train_command` for one job: the template split as a shell would (quotes, no
    expansion), each argument's fields filled in (a field is one argument however many spaces it holds, an empty one
    an empty argument), and each argument that names a file relative to `base` (the study file's folder) made
    absolute, so that it runs in the job's folder."""
    try:
        args = [a.format(**job_fields) for a in shlex.split(command)]
    except (KeyError, IndexError, ValueError) as e:
        raise InputError(f"train_command {command!r}: {type(e).__name__}: {e}; its fields are "
                         f"{', '.join('{' + k + '}' for k in job_fields)}") from None
    return [str((base / a).resolve()) if not Path(a).is_absolute() and (base / a).is_file() else a for a in args]


def command_scripts(command: str, base: Path) -> dict[str, str]:
    """The files a `train_command` names (after filling its fields with placeholders), path -> sha256: part of the
    study hash, so that editing the training script makes a new study. The interpreter itself is not hashed."""
    placeholder = {f.name: "0" for f in fields(TrainingJob)} | {"kept_file": "0", "labels_file": "0",
                                                                   "checkpoint": "0", "python": "python"}
    scripts = {}
    for arg in command_arguments(command, placeholder, base):
        path = Path(arg)
        if path.is_absolute() and path.is_file() and arg != sys.executable:
            scripts[arg] = file_sha256(path)
    return scripts


def run_job(study: Study, job: TrainingJob) -> tuple[Tensor, str]:
    """Train one model with the study's trainer: the flat parameters [P] (on the CPU, in the recipe's dtype) and the
    sha256 of its checkpoint file (a state_dict the hook returned is saved as `{out}/model.pt` first). Raises
    TrainerFailure when the trainer raises, exits non-zero or gives no loadable model of the study's shape."""
    job.write_files()
    if study.train_command:
        args = command_arguments(study.train_command, job.template_fields(), study.source_dir)
        try:
            done = subprocess.run(args, cwd=job.out, capture_output=True, text=True)
        except OSError as e:
            raise TrainerFailure(f"train_command could not start: {type(e).__name__}: {e}") from None
        if done.returncode != 0:
            last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or [""]
            raise TrainerFailure(f"train_command exited {done.returncode}: {last[0][:300]}")
        result: Mapping[str, Tensor] | str | Path | None = None
    else:
        try:
            result = study.train_model(job)
        except Exception as e:
            raise TrainerFailure(f"train_model raised {type(e).__name__}: {e}") from None
    if isinstance(result, Mapping):
        torch.save({k: v.detach().cpu() for k, v in result.items()}, job.checkpoint)
        path = job.checkpoint
    else:
        path = job.checkpoint if result is None else Path(result)
    if not path.is_file():
        raise TrainerFailure(f"the trainer wrote no checkpoint {path}")
    try:
        state = torch.load(path, map_location=job.device, weights_only=True)
    except Exception as e:
        raise TrainerFailure(f"checkpoint {path} does not load: {type(e).__name__}: {e}") from None
    try:
        theta = study.flat_params(state, f"{study.name}: checkpoint of the {job.regime} job of seed {job.seed}")
    except InputError as e:
        raise TrainerFailure(str(e)) from None
    return theta.cpu(), file_sha256(path)

