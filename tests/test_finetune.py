"""The `finetune` study: its pretrained model is built once into the cache and loaded offline through
`from_pretrained`; a reduced configuration registers, verifies under `--runner process --workers 2` and under
`--runner dask` (the same outcomes), and calibrates; removing a person's sentences lowers the log-probability of
their held-out facts more than anyone else's."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import duckdb
import pytest
import torch

from flows.cli import main
from retrain import load_study

pytestmark = pytest.mark.full  # trains transformers with the Trainer, runs the flows and worker processes
SPEC = "finetune:people=3,seeds=1,epochs=8"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh $IFLEDGER_CACHE (the built-in model is pretrained into it once), and no hub access."""
    with pytest.MonkeyPatch.context() as env:
        folder = tmp_path_factory.mktemp("cache")
        env.setenv("IFLEDGER_CACHE", str(folder))
        env.setenv("HF_HUB_OFFLINE", "1")
        yield folder


def cli(db: Path, *args: str) -> tuple[int, str]:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = main(["--db", str(db), *args])
    return code, out.getvalue()


def test_the_pretrained_model_is_built_once_and_loaded_offline_with_from_pretrained(cache):
    from transformers import AutoModelForCausalLM

    study = load_study(SPEC)
    folder = Path(study.checkpoint)
    assert folder.parent == cache and folder.name.startswith("finetune-pretrained-")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    built = (folder / "model.safetensors").stat().st_mtime_ns
    lm = AutoModelForCausalLM.from_pretrained(folder)
    pretrained = torch.cat([p.detach().reshape(-1) for p in lm.parameters()])
    assert torch.equal(study.init_params(0), pretrained)
    assert torch.equal(study.init_params(1), pretrained)  # fine-tuning starts from it whatever the seed
    again = load_study(SPEC)  # reused, not pretrained again
    assert again.checkpoint == study.checkpoint and again.study_hash == study.study_hash
    assert (folder / "model.safetensors").stat().st_mtime_ns == built
    named = load_study(f"{SPEC},pretrained={folder}")  # any folder, by the same from_pretrained
    assert named.config()["pretrained_sha256"] == study.config()["pretrained_sha256"]
    assert torch.equal(named.init_params(0), pretrained)


def test_a_pretrained_folder_that_does_not_load_is_refused_in_one_line(cache, tmp_path, capsys):
    db = tmp_path / "l.duckdb"
    assert main(["--db", str(db), "register", f"{SPEC},pretrained={tmp_path / 'missing'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not load with from_pretrained" in err[0], err
    assert not db.exists()


def test_a_reduced_run_verifies_under_process_and_dask_workers_and_removal_lowers_the_persons_facts(
        prefect_harness, cache, tmp_path):
    db, other = tmp_path / "process.duckdb", tmp_path / "dask.duckdb"
    code, out = cli(db, "register", SPEC)
    assert code == 0, out
    shutil.copy(db, other)
    shutil.copy(Path(f"{db}.receipts"), Path(f"{other}.receipts"))
    assert cli(db, "verify", "--runner", "process", "--workers", "2")[0] == 0
    assert cli(other, "verify", "--runner", "dask", "--workers", "2")[0] == 0
    outcomes = {}
    for ledger in (db, other):
        assert cli(ledger, "calibrate")[0] == 0
        assert cli(ledger, "audit")[0] == 0
        con = duckdb.connect(str(ledger), read_only=True)
        runs = con.execute("SELECT count(*) FILTER (status = 'done'), count(checkpoint_sha256), count(*) "
                           "FROM runs").fetchone()
        assert runs == (4, 4, 4)  # 3 people's groups and the full-data model, one seed
        assert con.execute("SELECT pairing FROM studies").fetchall() == [("dropped",)]
        methods = {m.partition(":")[0] for (m,) in con.execute("SELECT DISTINCT method FROM calibration").fetchall()}
        assert methods == {"cg", "grad_dot"}  # the defaults
        outcomes[ledger] = dict(((s, m), v) for s, m, v in con.execute(
            "SELECT r.set_id, o.measurement_id, o.value FROM outcomes o JOIN runs r USING (run_id)").fetchall())
        effects = con.execute(
            "SELECT s.label, e.measurement_id, e.effect FROM effects e JOIN removal_sets s USING (set_id)").fetchall()
        con.close()
    assert outcomes[db].keys() == outcomes[other].keys()
    assert max(abs(outcomes[db][k] - outcomes[other][k]) for k in outcomes[db]) < 1e-4  # the same Trainer runs
    by_set: dict[str, dict[bool, list[float]]] = {}
    for label, measurement, effect in effects:
        person = label.rpartition("=")[2]
        by_set.setdefault(person, {True: [], False: []})[measurement.split("/")[1] == person].append(effect)
    assert len(by_set) == 3
    for person, split in by_set.items():
        own, others = sum(split[True]) / 3, sum(split[False]) / 6
        assert own < -0.5 and own < others - 0.5, (person, split)
