"""Devices and dtypes: `--device` resolution, the study hash independent of the device, and float32 and bfloat16
studies that train, measure and predict (bfloat16 refusing the explicit solve in one line)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from predictions import build, parse, parse_method, predict
from retrain import Recipe, Study, train
from retrain.engine import measure
from retrain.studies.linreg import LinReg
from retrain.study import resolve_device
from store import InputError


def test_auto_is_cuda_only_where_torch_sees_a_gpu_and_a_missing_gpu_is_refused():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "meta", "cuda:99", "gpu"):
        with pytest.raises(InputError, match="--device"):
            resolve_device(bad)


def test_the_study_hash_and_its_tensors_do_not_depend_on_the_device():
    study = LinReg()
    before, x = study.study_hash, study.tensors("train")[0]
    study.use_device(resolve_device("auto"))
    assert study.device == resolve_device("auto")
    assert study.tensors("train")[0].device.type == study.device.type
    assert study.flat.module.weight.device.type == study.device.type
    assert LinReg().use_device(resolve_device("auto")).config() == LinReg().config()
    assert before == study.study_hash
    torch.testing.assert_close(study.tensors("train")[0].cpu(), x)


class Small(LinReg):
    """linreg's data, a tanh MLP trained by SGD (the newton optimizer has no bfloat16 solve)."""

    recipe = Recipe(optimizer="sgd", epochs=8, lr=0.05, batch_size=32, seeds=1, dtype="float64")

    def model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 1))


class Small32(Small):
    recipe = Recipe(optimizer="sgd", epochs=8, lr=0.05, batch_size=32, seeds=1, dtype="float32")


class Small16(Small):
    recipe = Recipe(optimizer="sgd", epochs=8, lr=0.05, batch_size=32, seeds=1, dtype="bfloat16")


def pearson(a: Tensor, b: Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]).double())[0, 1].item()


@pytest.fixture(scope="module")
def reference() -> tuple[Tensor, dict[str, Tensor]]:
    """The float64 model and its predictions of every matrix-free method (and exact)."""
    study = Small()
    theta = train(study, torch.ones(1, study.n_train), [0]).params
    sets = build(parse("random:alpha=0.1,k=10"), study)
    return theta, {spec: prediction_values(study, spec, theta, sets) for spec in SPECS + ["exact"]}


SPECS = ["grad_dot", "cg:iterations=30", "arnoldi:rank=20,iterations=40", "ekfac", "lissa:iterations=100"]


def prediction_values(study: Study, spec: str, thetas: Tensor, sets) -> Tensor:
    return torch.tensor([r.predicted for r in predict(study, parse_method(spec, study), thetas, sets)])


@pytest.mark.full  # seconds of solves or training: the full tier (make test-fast stays quick)
@pytest.mark.parametrize("cls, agreement", [(Small32, 0.999), (Small16, 0.9)])
def test_float32_and_bfloat16_studies_train_measure_and_predict(reference, cls, agreement):
    """Trained in the dtype, the model's loss falls and its measurements are finite; the predictions at the float64
    model cast to the dtype agree with float64's (Pearson ≥ 0.999 in float32, ≥ 0.9 in bfloat16's 8-bit
    mantissa); under bfloat16 `exact` is refused in one line."""
    study = cls()
    dtype = getattr(torch, study.recipe.dtype)
    trained = train(study, torch.ones(1, study.n_train), [0])
    assert trained.params.dtype == dtype and trained.failures == [None]
    start = train(study, torch.ones(1, study.n_train), [0], epochs=0).train_loss
    assert trained.train_loss.item() < 0.8 * start.item()
    assert torch.isfinite(measure(study, trained.params)).all()
    theta, expected = reference
    sets = build(parse("random:alpha=0.1,k=10"), study)
    for spec in SPECS + (["exact"] if dtype != torch.bfloat16 else []):
        predicted = prediction_values(study, spec, theta.to(dtype), sets)
        assert torch.isfinite(predicted).all(), spec
        assert pearson(predicted, expected[spec]) >= agreement, spec
    if dtype == torch.bfloat16:
        with pytest.raises(InputError, match="bfloat16; use a matrix-free method"):
            prediction_values(study, "exact", theta.to(dtype), sets)


def test_a_bfloat16_newton_recipe_is_refused_in_one_line():
    with pytest.raises(InputError, match="newton .* bfloat16"):
        Recipe(optimizer="newton", dtype="bfloat16")
    with pytest.raises(InputError, match="dtype 'float16' is not one of"):
        Recipe(dtype="float16")


def test_a_device_torch_does_not_see_is_refused_in_one_line_before_the_ledger_is_touched(tmp_path, capsys):
    from flows.cli import main

    db = tmp_path / "ledger.duckdb"
    for command in (["register", "linreg"], ["verify"], ["detect", "digits-mislabel"]):
        assert main(["--db", str(db), *command, "--device", "cuda:99"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--device cuda:99" in err, err
    assert not db.exists()


def test_the_resolved_device_is_stored_with_the_invocation(linreg_ledger):
    import json

    import duckdb

    with duckdb.connect(str(linreg_ledger["db"]), read_only=True) as con:
        rows = con.execute("SELECT config FROM invocations WHERE command = 'run'").fetchall()
    configs = [json.loads(c) for c, in rows]
    assert configs and all(c["register"]["device"] == c["verify"]["device"] == str(resolve_device("auto"))
                           for c in configs)
