"""A study trained by its own code (retrain.trainer): a plain torch loop with the engine's masking semantics gives
the engine's outcomes; a data-loader trainer (examples dropped) and a command-template trainer run end to end and
the ledger says how they pair; a trainer that fails gives failed runs with their reason."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import duckdb
import pytest
import torch

from flows.cli import main
from flows.runner import visible_gpus, worker_gpu
from retrain import load_study
from retrain.regimes import Job, run_regime
from retrain.trainer import command_arguments

# a small SGD study (two layers, 42 examples: a last partial batch, 2 seeds), an engine-trained base and trainers
STUDY = '''
import torch
from datasets import Dataset, DatasetDict
from torch import nn

from retrain import Recipe, Study


def sgd_loop(study, job, drop=False):
    """The recipe as a torch loop: the seed's initialisation (or job.init), the study's example order from
    job.first_epoch, minibatches of batch_size whose loss is the mean over their kept examples (drop=False: the
    engine's masking) or minibatches of the kept examples alone (drop=True: a data loader without the set)."""
    r = study.recipe
    model = study.model().to(torch.float64)
    start = study.flat.state_dict(study.init_params(job.seed)) if job.init is None else torch.load(
        job.init, map_location="cpu", weights_only=True)
    model.load_state_dict(start)
    x, y = study.tensors("train")
    y = y.clone()
    for i, label in (job.new_labels or {}).items():
        y[i] = label
    keep = torch.zeros(len(y), dtype=torch.bool)
    keep[list(job.kept)] = True
    opt = torch.optim.SGD(model.parameters(), lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay)
    for epoch in range(job.first_epoch, job.first_epoch + job.epochs):
        order = study.checked_order(job.seed, epoch)
        if drop:
            order = order[keep[order]]
        for b in range(0, len(order), r.batch_size):
            idx = order[b : b + r.batch_size]
            w = keep[idx].to(x.dtype)
            loss = (w * study.loss(model(x[idx]), y[idx])).sum() / w.sum().clamp(min=1)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.state_dict()


class Tiny(Study):
    name = "tiny"
    recipe = Recipe(optimizer="sgd", epochs=6, lr=0.1, momentum=0.9, batch_size=8, weight_decay=1e-3, seeds=2,
                    warm_epochs=3)
    default_sets = ("single:n=6",)

    def dataset(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(47, 3, generator=g, dtype=torch.float64)
        y = torch.tanh(x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)) + 0.1 * torch.randn(
            47, generator=g, dtype=torch.float64)
        split = lambda a, b: Dataset.from_dict({"x": a.tolist(), "y": b.tolist()})
        return DatasetDict(train=split(x[:42], y[:42]), query=split(x[42:], y[42:]))

    def model(self):
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))

    def loss(self, outputs, targets):
        return 0.5 * (outputs.squeeze(-1) - targets) ** 2


class TinyMasked(Tiny):
    name = "tiny-masked"

    def train_model(self, job):
        return sgd_loop(self, job)


class TinyDropped(Tiny):
    name = "tiny-dropped"
    pairing = "dropped"

    def train_model(self, job):
        torch.save(sgd_loop(self, job, drop=True), job.out / "dropped.pt")
        return job.out / "dropped.pt"


class TinyCommand(Tiny):
    name = "tiny-command"
    train_command = ("{python} train_tiny.py --keep {kept_file} --seed {seed} --regime {regime} --init {init} "
                     "--epochs {epochs} --first-epoch {first_epoch} --out {out}")


class TinyFailing(Tiny):
    name = "tiny-failing"

    def train_model(self, job):
        if len(job.kept) < self.n_train:
            raise RuntimeError("out of memory, say")
        return sgd_loop(self, job)


class TinySilent(Tiny):
    name = "tiny-silent"

    def train_model(self, job):
        return sgd_loop(self, job) if len(job.kept) == self.n_train else None
'''

# the command-template trainer: a script that is not imported by ifledger; it writes {out}/model.pt
SCRIPT = '''
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny import Tiny, sgd_loop  # noqa: E402

from retrain import TrainingJob  # noqa: E402

parser = argparse.ArgumentParser()
for name in ("--keep", "--regime", "--init", "--out"):
    parser.add_argument(name)
for name in ("--seed", "--epochs", "--first-epoch"):
    parser.add_argument(name, type=int)
a = parser.parse_args()
kept = tuple(int(line) for line in Path(a.keep).read_text().split())
job = TrainingJob(a.seed, a.regime, kept, None, Path(a.init) if a.init else None, Path(a.out), "cpu", a.epochs,
                  a.first_epoch)
torch.save(sgd_loop(Tiny(), job), Path(a.out) / "model.pt")
'''


@pytest.fixture
def tiny(tmp_path) -> Path:
    (tmp_path / "tiny.py").write_text(STUDY)
    (tmp_path / "train_tiny.py").write_text(SCRIPT)
    return tmp_path / "tiny.py"


def _run(db: Path, spec: str, *extra: str) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return main(["--db", str(db), "run", spec, "--regimes", "scratch", "warm", "--report-dir",
                     str(db.parent / "reports"), *extra])


def _outcomes(db: Path, study: str) -> dict[tuple, float]:
    """(set's indices, seed, regime, measurement) -> outcome of the study's done runs."""
    con = duckdb.connect(str(db), read_only=True)
    rows = con.execute("SELECT s.indices, r.seed, r.regime, o.measurement_id, o.value FROM runs r "
                       "JOIN studies t USING (study_hash) JOIN removal_sets s USING (set_id) JOIN outcomes o "
                       "USING (run_id) WHERE t.study = ? AND r.status = 'done'", [study]).fetchall()
    con.close()
    return {(tuple(i), seed, regime, m): v for i, seed, regime, m, v in rows}


def test_a_masking_torch_loop_gives_the_engines_outcomes(prefect_harness, tiny):
    db = tiny.parent / "l.duckdb"
    assert _run(db, f"{tiny}:Tiny") == 0
    assert _run(db, f"{tiny}:TinyMasked") == 0
    engine, trainer = _outcomes(db, "tiny"), _outcomes(db, "tiny-masked")
    assert len(engine) == (6 + 1) * 2 * 2 * 5  # (sets + full) × seeds × regimes × measurements
    assert engine.keys() == trainer.keys()
    assert max(abs(engine[k] - trainer[k]) for k in engine) < 1e-8
    assert max(abs(engine[k]) for k in engine) > 1e-3  # not trivially equal
    con = duckdb.connect(str(db), read_only=True)
    pairing = dict(con.execute("SELECT study, pairing FROM studies").fetchall())
    hashes = con.execute("SELECT t.study, count(r.checkpoint_sha256), count(*) FROM runs r JOIN studies t "
                         "USING (study_hash) GROUP BY ALL ORDER BY 1").fetchall()
    calibrated = con.execute("SELECT count(*) FROM calibration WHERE study = 'tiny-masked'").fetchone()[0]
    con.close()
    assert pairing == {"tiny": "masked", "tiny-masked": "masked"}
    assert hashes == [("tiny", 0, 28), ("tiny-masked", 28, 28)]  # every trainer run records its checkpoint
    assert calibrated > 0
    assert main(["--db", str(db), "audit"]) == 0


def test_a_dropping_data_loader_runs_end_to_end_and_the_ledger_says_dropped(prefect_harness, tiny):
    db = tiny.parent / "l.duckdb"
    assert _run(db, f"{tiny}:Tiny") == 0
    assert _run(db, f"{tiny}:TinyDropped", "--runner", "process", "--workers", "2") == 0
    con = duckdb.connect(str(db), read_only=True)
    pairing = con.execute("SELECT pairing, config->>'$.trainer.pairing' FROM studies WHERE study = 'tiny-dropped'"
                          ).fetchone()
    runs = con.execute("SELECT count(*) FILTER (status = 'done'), count(*) FROM runs JOIN studies USING (study_hash) "
                       "WHERE study = 'tiny-dropped'").fetchone()
    con.close()
    assert pairing == ("dropped", "dropped")
    assert runs == (28, 28)
    engine, dropped = _outcomes(db, "tiny"), _outcomes(db, "tiny-dropped")
    full = {k: v for k, v in engine.items() if k[0] == ()}
    assert max(abs(full[k] - dropped[k]) for k in full) < 1e-8  # nothing dropped: the same model
    assert max(abs(engine[k] - dropped[k]) for k in engine) > 1e-6  # a dropped example changes the batches


def test_a_command_template_trains_end_to_end(prefect_harness, tiny):
    db = tiny.parent / "l.duckdb"
    assert _run(db, f"{tiny}:Tiny") == 0
    assert _run(db, f"{tiny}:TinyCommand") == 0
    engine, command = _outcomes(db, "tiny"), _outcomes(db, "tiny-command")
    assert engine.keys() == command.keys()
    assert max(abs(engine[k] - command[k]) for k in engine) < 1e-8


def test_the_command_and_its_scripts_are_part_of_the_study_hash(tiny):
    study = load_study(f"{tiny}:TinyCommand")
    before = study.study_hash
    scripts = study.config()["trainer"]["scripts"]
    assert list(scripts) == [str(tiny.parent / "train_tiny.py")]
    (tiny.parent / "train_tiny.py").write_text(SCRIPT + "\n# edited\n")
    assert study.study_hash == before  # taken when it was loaded
    assert load_study(f"{tiny}:TinyCommand").study_hash != before
    assert load_study(f"{tiny}:Tiny").config().get("trainer") is None  # engine studies keep their hash


def test_command_fields_are_filled_and_scripts_made_absolute(tmp_path):
    (tmp_path / "train.py").write_text("")
    args = command_arguments("python train.py --seed {seed} --out {out}", {"seed": "3", "out": "/x y"}, tmp_path)
    assert args == ["python", str(tmp_path / "train.py"), "--seed", "3", "--out", "/x y"]
    with pytest.raises(Exception, match="its fields are"):
        command_arguments("python train.py --seeds {seeds}", {"seed": "3"}, tmp_path)


@pytest.mark.parametrize(("cls", "reason"), [("TinyFailing", "train_model raised RuntimeError: out of memory, say"),
                                             ("TinySilent", "the trainer wrote no checkpoint")])
def test_a_trainer_that_fails_gives_a_failed_run_with_its_reason(tiny, cls, reason):
    study = load_study(f"{tiny}:{cls}")
    full = {0: study.init_params(0)}
    done, failed = run_regime(study, "scratch", [Job("full", 0, ()), Job("s", 0, (3,))], full)
    assert (done.status, done.reason) == ("done", None) and done.checkpoint_sha256 and len(done.outcomes) == 5
    assert failed.status == "failed" and failed.reason.startswith(reason) and failed.outcomes == {}


def test_a_bad_pairing_is_refused(tiny):
    (tiny.parent / "bad.py").write_text(STUDY + "\n\nclass Bad(TinyMasked):\n    pairing = 'shuffled'\n")
    with pytest.raises(Exception, match="pairing must be one of masked, dropped"):
        load_study(f"{tiny.parent / 'bad.py'}:Bad").study_hash  # noqa: B018


def test_each_process_worker_gets_its_own_gpu_when_several_are_visible():
    assert visible_gpus(None, 0) == [] and visible_gpus(None, 2) == ["0", "1"]
    assert visible_gpus("3, 5", 8) == ["3", "5"]
    assert [worker_gpu(i, ["3", "5"]) for i in range(4)] == ["3", "5", "3", "5"]
    assert worker_gpu(0, ["0"]) is None and worker_gpu(1, []) is None
    assert torch.cuda.device_count() >= 0
