"""A study trained by its own code (retrain.trainer): a plain torch loop with the engine's masking semantics gives
the engine's outcomes; a data-loader trainer (examples dropped) and a command-template trainer run end to end and
the ledger says how they pair; a trainer that fails gives failed runs with their reason."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import duckdb
import pytest
import torch

from flows.cli import main
from flows.runner import dask_worker_gpu, visible_gpus, worker_gpu
from retrain import load_study
from retrain.regimes import Job, run_regime, train_full
from retrain.trainer import command_arguments
from store.records import InputError

# a small SGD study (two layers, 42 examples: a last partial batch, 2 seeds), an engine-trained base and trainers
STUDY = '''
import dataclasses

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
    default_sets = ("single:n=3",)

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
    recipe = dataclasses.replace(Tiny.recipe, seeds=1)  # one seed: each job starts a Python process
    train_command = ("{python} train_tiny.py --keep {kept_file} --seed {seed} --init {init} --epochs {epochs} "
                     "--first-epoch {first_epoch} --out {out}")


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

# the command-template trainer: a plain torch script that knows nothing of ifledger (the study's data, model,
# initialisation and example order rebuilt from their seeds), masking removed examples; it writes {out}/model.pt
SCRIPT = '''
import argparse
from pathlib import Path

import torch
from torch import nn

parser = argparse.ArgumentParser()
for name in ("--keep", "--init", "--out"):
    parser.add_argument(name)
for name in ("--seed", "--epochs", "--first-epoch"):
    parser.add_argument(name, type=int)
a = parser.parse_args()
g = torch.Generator().manual_seed(0)
x = torch.randn(47, 3, generator=g, dtype=torch.float64)
y = torch.tanh(x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)) + 0.1 * torch.randn(
    47, generator=g, dtype=torch.float64)
x, y = x[:42], y[:42]
torch.manual_seed(a.seed)
model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(torch.float64)
if a.init:
    model.load_state_dict(torch.load(a.init, weights_only=True))
keep = torch.zeros(42, dtype=torch.bool)
keep[[int(i) for i in Path(a.keep).read_text().split()]] = True
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
for epoch in range(a.first_epoch, a.first_epoch + a.epochs):
    order = torch.randperm(42, generator=torch.Generator().manual_seed(a.seed * 1_000_003 + epoch))
    for b in range(0, 42, 8):
        idx = order[b : b + 8]
        w = keep[idx].to(torch.float64)
        loss = (w * 0.5 * (model(x[idx]).squeeze(-1) - y[idx]) ** 2).sum() / w.sum().clamp(min=1)
        opt.zero_grad()
        loss.backward()
        opt.step()
torch.save(model.state_dict(), Path(a.out) / "model.pt")
'''


@pytest.fixture
def tiny(tmp_path) -> Path:
    (tmp_path / "tiny.py").write_text(STUDY)
    (tmp_path / "train_tiny.py").write_text(SCRIPT)
    return tmp_path / "tiny.py"


@pytest.fixture(scope="module")
def ledger(prefect_harness, tmp_path_factory) -> Path:
    """One ledger: the engine's `tiny`, and the same study trained by a masking torch loop (thread runner), by a
    dropping data loader (process runner, 2 workers) and by a command template, each run with scratch and warm."""
    folder = tmp_path_factory.mktemp("trainer")
    (folder / "tiny.py").write_text(STUDY)
    (folder / "train_tiny.py").write_text(SCRIPT)
    db = folder / "l.duckdb"
    for cls, extra in (("Tiny", ()), ("TinyMasked", ()), ("TinyDropped", ("--runner", "process", "--workers", "2")),
                       ("TinyCommand", ())):
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["--db", str(db), "run", f"{folder / 'tiny.py'}:{cls}", "--regimes", "scratch", "warm",
                         "--report-dir", str(folder / "reports"), *extra]) == 0
    return db


def _outcomes(db: Path, study: str) -> dict[tuple, float]:
    """(set's indices, seed, regime, measurement) -> outcome of the study's done runs."""
    con = duckdb.connect(str(db), read_only=True)
    rows = con.execute("SELECT s.indices, r.seed, r.regime, o.measurement_id, o.value FROM runs r "
                       "JOIN studies t USING (study_hash) JOIN removal_sets s USING (set_id) JOIN outcomes o "
                       "USING (run_id) WHERE t.study = ? AND r.status = 'done'", [study]).fetchall()
    con.close()
    return {(tuple(i), seed, regime, m): v for i, seed, regime, m, v in rows}


def _sql(db: Path, query: str) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(query).fetchall()
    finally:
        con.close()


RUNS = (3 + 1) * 2 * 2  # (sets + full) × seeds × regimes


def test_a_masking_torch_loop_gives_the_engines_outcomes(ledger):
    engine, trainer = _outcomes(ledger, "tiny"), _outcomes(ledger, "tiny-masked")
    assert len(engine) == RUNS * 5  # × measurements
    assert engine.keys() == trainer.keys()
    assert max(abs(engine[k] - trainer[k]) for k in engine) < 1e-8
    assert max(abs(engine[k]) for k in engine) > 1e-3  # not trivially equal
    # every trainer run records its checkpoint
    assert _sql(ledger, "SELECT t.study, t.pairing, count(r.checkpoint_sha256), count(*) FROM runs r JOIN studies t "
                        "USING (study_hash) WHERE r.status = 'done' GROUP BY ALL ORDER BY 1") == [
        ("tiny", "masked", 0, RUNS), ("tiny-command", "masked", RUNS // 2, RUNS // 2),
        ("tiny-dropped", "dropped", RUNS, RUNS), ("tiny-masked", "masked", RUNS, RUNS)]
    assert _sql(ledger, "SELECT count(*) FROM calibration WHERE study = 'tiny-masked'")[0][0] > 0
    assert main(["--db", str(ledger), "audit"]) == 0


def test_a_dropping_data_loader_runs_end_to_end_and_the_ledger_says_dropped(ledger):
    assert _sql(ledger, "SELECT pairing, config->>'$.trainer.pairing' FROM studies WHERE study = 'tiny-dropped'"
                ) == [("dropped", "dropped")]
    assert _sql(ledger, "SELECT count(*) FROM calibration WHERE study = 'tiny-dropped'")[0][0] > 0
    engine, dropped = _outcomes(ledger, "tiny"), _outcomes(ledger, "tiny-dropped")
    full = {k: v for k, v in engine.items() if k[0] == () and k[2] == "scratch"}
    assert max(abs(full[k] - dropped[k]) for k in full) < 1e-8  # nothing dropped: the same model
    assert max(abs(engine[k] - dropped[k]) for k in engine) > 1e-6  # a dropped example changes the batches


def test_a_command_template_trains_end_to_end(ledger):
    engine, command = _outcomes(ledger, "tiny"), _outcomes(ledger, "tiny-command")
    assert len(command) == RUNS // 2 * 5 and command.keys() <= engine.keys()  # seed 0
    assert max(abs(engine[k] - command[k]) for k in command) < 1e-8


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
    with pytest.raises(InputError, match="its fields are"):
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
    (tiny.parent / "bad.py").write_text(STUDY + "\n\nclass Bad(TinyMasked):\n    pairing = 'shuffled'\n\n\n"
                                        "class EngineDropped(Tiny):\n    pairing = 'dropped'\n")
    with pytest.raises(InputError, match="pairing must be one of masked, dropped"):
        load_study(f"{tiny.parent / 'bad.py'}:Bad")
    with pytest.raises(InputError, match="the engine masks removed examples"):
        load_study(f"{tiny.parent / 'bad.py'}:EngineDropped")


def test_each_process_worker_gets_its_own_gpu_when_several_are_visible():
    assert visible_gpus(None, 0) == [] and visible_gpus(None, 2) == ["0", "1"]
    assert visible_gpus("3, 5", 8) == ["3", "5"]
    assert [worker_gpu(i, ["3", "5"]) for i in range(4)] == ["3", "5", "3", "5"]
    assert worker_gpu(0, ["0"]) is None and worker_gpu(1, []) is None
    assert torch.cuda.device_count() >= 0


def test_the_masking_loop_matches_the_engine_for_removal_and_relabel_sets_without_flows(tiny):
    engine, masked = load_study(f"{tiny}:Tiny"), load_study(f"{tiny}:TinyMasked")
    full = {0: train_full(engine, [0], "full")[0][0]}
    jobs = [Job("full", 0, ()), Job("removed", 0, (3, 17, 40)), Job("relabelled", 0, (5, 8), (2.5, -1.0))]
    for regime in ("scratch", "warm"):
        expected = run_regime(engine, regime, jobs, full)
        got = run_regime(masked, regime, jobs, full)
        for e, g in zip(expected, got):
            assert g.status == "done" and g.outcomes.keys() == e.outcomes.keys()
            assert max(abs(e.outcomes[m] - g.outcomes[m]) for m in e.outcomes) < 1e-8
        assert expected[1].outcomes != expected[0].outcomes != expected[2].outcomes  # the sets change the model


def test_only_the_regimes_a_study_trainer_trains_go_one_model_per_task(tiny):
    """scratch and warm of a study with its own trainer are one model per job; pbrf and frozen are solved or trained
    by the engine for every study, so they keep the asked chunk size (as they do for an engine-trained study)."""
    from retrain.regimes import parse_regime

    masked, engine = load_study(f"{tiny}:TinyMasked"), load_study(f"{tiny}:Tiny")
    sizes = {spec: (parse_regime(spec).chunk_size(masked, 64), parse_regime(spec).chunk_size(engine, 64))
             for spec in ("scratch", "warm", "pbrf", "frozen:scope=^0\\.,from=full")}
    assert sizes == {"scratch": (1, 64), "warm": (1, 64), "pbrf": (64, 64), "frozen:scope=^0\\.,from=full": (64, 64)}


def test_a_local_dask_worker_takes_the_gpu_of_its_name(monkeypatch):
    from distributed import Client

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "unset")  # restored after the test; the workers are threads here
    with Client(processes=False, n_workers=2, threads_per_worker=1, dashboard_address=None) as client:
        worker = [a for a, w in client.scheduler_info()["workers"].items() if w["name"] == 1][0]
        client.submit(dask_worker_gpu, ["3", "5"], workers=[worker], pure=False).result(timeout=120)
        if not torch.cuda.is_initialized():
            assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    dask_worker_gpu(["3", "5"])  # outside a worker: nothing


class _TiedNet(torch.nn.Module):
    """An embedding and an output layer sharing one weight, as GPT-2's wte and lm_head do."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(5, 3)
        self.out = torch.nn.Linear(3, 5, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(x))


def test_a_tied_models_state_dict_loads_and_a_tie_broken_in_it_is_refused():
    from datasets import Dataset, DatasetDict

    from retrain import Recipe, Study

    class Tied(Study):
        name = "tied"
        recipe = Recipe(seeds=1, epochs=1)

        def dataset(self) -> DatasetDict:
            d = Dataset.from_dict({"x": [0, 1, 2], "y": [1, 2, 3]})
            return DatasetDict(train=d, query=d)

        def model(self) -> torch.nn.Module:
            return _TiedNet()

        def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(outputs, targets.long(), reduction="none")

    study, state = Tied(), _TiedNet().state_dict()  # what `model.state_dict()` returns: both names
    assert sorted(state) == ["emb.weight", "out.weight"] and study.flat.names == ["emb.weight"]
    assert torch.equal(study.flat_params(state, "checkpoint"), state["emb.weight"].reshape(-1).double())
    state["out.weight"] = state["out.weight"] + 1
    with pytest.raises(InputError, match="'out.weight' differs from 'emb.weight'"):
        study.flat_params(state, "checkpoint")
