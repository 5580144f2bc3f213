"""Recipes: the batched engine trains exactly what a torch.optim loop on an nn.Module trains (optimizers,
schedules, clipping, example order, removal masks), and recipes hash by meaning."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import readme_block
from datasets import Dataset, DatasetDict
from torch import Tensor, nn

from flows.cli import main
from retrain import Recipe, Study, load_study, train
from retrain.optimizers import recipe_options
from store import InputError

README = Path(__file__).resolve().parents[1] / "README.md"
N, BATCH = 40, 16  # three batches per epoch, the last one partial


class Blobs(Study):
    """A small MLP classifier on fixed random data; the example order of a numpy data loader: one
    `default_rng(1000 + seed)` per run, a fresh permutation each epoch."""

    name = "blobs"
    recipe = Recipe(epochs=3, batch_size=BATCH, lr=0.1, seeds=2)

    def dataset(self) -> DatasetDict:
        rng = np.random.default_rng(0)
        split = lambda n: Dataset.from_dict({"x": rng.normal(size=(n, 5)).tolist(),  # noqa: E731
                                             "y": rng.integers(0, 3, n).tolist()})
        return DatasetDict(train=split(N), query=split(6))

    def model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets, reduction="none")

    def example_order(self, seed: int, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(1000 + seed)
        return [rng.permutation(self.n_train) for _ in range(epoch + 1)][-1]


def blobs(**recipe) -> Study:
    study = type("Custom", (Blobs,), {"recipe": Recipe(**{"epochs": 3, "batch_size": BATCH, **recipe})})()
    study.flat  # noqa: B018
    return study


def reference_schedule(opt: torch.optim.Optimizer, spec: str, total: int, lr: float):
    """torch.optim.lr_scheduler for the schedule specs used below."""
    sched = torch.optim.lr_scheduler
    if spec == "constant":
        return sched.LambdaLR(opt, lambda t: 1.0)
    if spec == "linear:floor=0.1":
        return sched.LinearLR(opt, start_factor=1.0, end_factor=0.1, total_iters=total)
    assert spec == "cosine:warmup=4,floor=0.05"
    return sched.SequentialLR(opt, [sched.LinearLR(opt, start_factor=1 / 4, end_factor=1.0, total_iters=3),
                                    sched.CosineAnnealingLR(opt, T_max=total - 4, eta_min=0.05 * lr)],
                              milestones=[4])


def torch_optim_loop(study: Study, mask: Tensor, seed: int) -> Tensor:
    """One model, the way a user trains it: nn.Module, torch.optim, lr_scheduler, clip_grad_norm_, and a numpy
    data loader's order; removed examples get weight 0 in the mean loss of their batch."""
    r = study.recipe
    x, y = study.tensors("train")
    model = study.model().to(x.dtype)
    nn.utils.vector_to_parameters(study.init_params(seed), model.parameters())
    name, _, options = r.optimizer.partition(":")
    kw = dict(kv.split("=") for kv in filter(None, options.split(",")))
    if name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay,
                              nesterov=kw.get("nesterov") == "true", dampening=float(kw.get("dampening", 0)))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=r.weight_decay,
                                betas=(float(kw.get("beta1", 0.9)), float(kw.get("beta2", 0.999))))
    n, size = len(y), r.batch_size
    batches = n // size if r.drop_last else -(-n // size)
    scheduler = reference_schedule(opt, r.schedule, r.epochs * batches, r.lr)
    w = mask.to(x.dtype)
    rng = np.random.default_rng(1000 + seed)
    for epoch in range(r.epochs):
        order = torch.as_tensor(rng.permutation(n)) if isinstance(study, Blobs) else study.checked_order(seed, epoch)
        for b in range(batches):
            idx = order[b * size : (b + 1) * size]
            opt.zero_grad()
            loss = (w[idx] * study.loss(model(x[idx]), y[idx])).sum() / w[idx].sum().clamp(min=1)
            loss.backward()
            if r.max_grad_norm:
                nn.utils.clip_grad_norm_(model.parameters(), r.max_grad_norm)
            opt.step()
            scheduler.step()
    return nn.utils.parameters_to_vector(model.parameters()).detach()


RECIPES = [
    dict(optimizer="sgd", momentum=0.9, schedule="linear:floor=0.1"),
    dict(optimizer="sgd:nesterov=true", momentum=0.8, schedule="constant", drop_last=True),
    dict(optimizer="sgd:dampening=0.3", momentum=0.9, schedule="linear:floor=0.1", max_grad_norm=0.2),
    dict(optimizer="adamw", lr=0.01, weight_decay=0.05, schedule="cosine:warmup=4,floor=0.05", max_grad_norm=0.3),
    dict(optimizer="adamw:beta2=0.95", lr=0.02, weight_decay=0.0, schedule="constant"),
]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r['optimizer']}+{r['schedule']}")
def test_batched_engine_equals_torch_optim_one_model_at_a_time(recipe):
    study = blobs(**recipe)
    first_epoch = np.random.default_rng(1000).permutation(N)
    masks = torch.ones(4, N, dtype=torch.bool)
    masks[1, [3, 17, 30]] = False
    masks[2, torch.as_tensor(first_epoch[BATCH : 2 * BATCH])] = False  # seed 0's second batch: nothing kept
    masks[3, ::2] = False
    seeds = [0, 1, 0, 1]
    batched = train(study, masks, seeds).params
    reference = torch.stack([torch_optim_loop(study, masks[k], s) for k, s in enumerate(seeds)])
    assert (batched - reference).abs().max() < 1e-10
    assert (batched[0] - batched[2]).abs().max() > 1e-3  # the masks matter (and the empty batch too)


def test_clipping_is_active_in_the_clipped_recipes():
    study = blobs(optimizer="adamw", lr=0.01, max_grad_norm=0.3)
    clipped, free = train(study, torch.ones(1, N, dtype=torch.bool), [0]).params, \
        train(blobs(optimizer="adamw", lr=0.01), torch.ones(1, N, dtype=torch.bool), [0]).params
    assert (clipped - free).abs().max() > 1e-4


def test_example_order_hook_reproduces_numpy_permutations():
    study = blobs()
    rng = np.random.default_rng(1000 + 7)
    for epoch in range(3):
        assert torch.equal(study.checked_order(7, epoch), torch.as_tensor(rng.permutation(N)))


def test_an_order_that_is_not_n_indices_is_refused():
    class Short(Blobs):
        def example_order(self, seed, epoch):
            return list(range(N - 1))

    with pytest.raises(InputError, match="must return 40 indices"):
        Short().checked_order(0, 0)


def test_schedules_match_torch_lr_scheduler():
    total, lr = 23, 0.5
    for spec in ("constant", "linear:floor=0.1", "cosine:warmup=4,floor=0.05"):
        schedule = Recipe(schedule=spec).make_schedule()
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
        reference = reference_schedule(opt, spec, total, lr)
        for t in range(total):
            assert abs(lr * schedule.factor(t, total) - opt.param_groups[0]["lr"]) < 1e-12, (spec, t)
            opt.step()
            reference.step()


def test_recipes_hash_by_meaning():
    old_fields = {"optimizer", "epochs", "lr", "momentum", "batch_size", "weight_decay", "seeds", "damping",
                  "warm_epochs", "pbrf_steps", "dtype"}
    assert set(Recipe().config()) == old_fields  # defaults of later fields leave old studies' hashes alone
    assert Recipe(optimizer="adamw:beta1=0.9,eps=1e-8").config() == Recipe(optimizer="adamw").config()
    assert Recipe(schedule="cosine:floor=0.0").schedule == "cosine"
    hashes = {blobs(**r).study_hash for r in [{}, *RECIPES, {"drop_last": True}, {"max_grad_norm": 1.0}]}
    assert len(hashes) == len(RECIPES) + 3


@pytest.mark.parametrize("fields, message", [
    ({"optimizer": "adam"}, "unknown optimizer 'adam'"),
    ({"optimizer": "adamw:beta3=1"}, "option 'beta3=1' not understood"),
    ({"optimizer": "adamw:beta2=2"}, "beta2=2 must be at most 1"),
    ({"optimizer": "sgd:nesterov=true", "momentum": 0.0}, "Nesterov momentum needs momentum > 0"),
    ({"schedule": "cosine:warmup=x"}, "warmup needs an integer"),
    ({"schedule": "step"}, "unknown schedule 'step'"),
    ({"max_grad_norm": -1.0}, "max_grad_norm"),
])
def test_bad_recipes_are_refused_in_one_line(fields, message):
    with pytest.raises(InputError, match=message):
        Recipe(**fields)


def test_drop_last_with_fewer_examples_than_a_batch_is_refused():
    from retrain.study import check_runnable

    check_runnable(blobs(drop_last=True), "Custom")  # 40 examples, batches of 16: two full batches an epoch
    with pytest.raises(InputError, match="trains no step"):
        check_runnable(blobs(drop_last=True, batch_size=N + 1), "Custom")
    check_runnable(blobs(batch_size=N + 1), "Custom")  # without drop_last the one partial batch trains


@pytest.mark.full  # loads digits
def test_the_digits_recipe_trains_what_torch_optim_trains():
    """SGD with momentum and weight decay does torch.optim.SGD's arithmetic (g + wd·θ, then θ − lr·buf, each an
    add with alpha): the study's models, removal masks included, come out as torch.optim's to 1e-12. The two are
    different computation graphs (batched under vmap, and one nn.Module at a time), so their bits agree only where
    the CPU's kernels happen to reduce in the same order: equal here on some CPUs, 4e-16 apart on others."""
    base = load_study("digits-mlp")
    study = type("ThreeEpochs", (type(base),), {"recipe": dataclasses.replace(base.recipe, epochs=3)})()
    masks = torch.ones(3, study.n_train, dtype=torch.bool)
    masks[1, [3, 17, 30]] = False
    masks[2, ::2] = False
    seeds = [0, 1, 0]
    reference = torch.stack([torch_optim_loop(study, masks[k], s) for k, s in enumerate(seeds)])
    torch.testing.assert_close(train(study, masks, seeds).params, reference, rtol=0, atol=1e-12)


def test_readme_recipe_example_runs_end_to_end(prefect_harness, tmp_path, capsys):
    (tmp_path / "wine_study.py").write_text(readme_block("example-recipe"))
    db = tmp_path / "l.duckdb"
    spec = f"{tmp_path / 'wine_study.py'}:WineMLP"
    assert main(["--db", str(db), "run", spec, "--sets", "single:n=10", "--regimes", "scratch", "pbrf",
                 "--report-dir", str(tmp_path / "r")]) == 0
    assert "wine-mlp" in capsys.readouterr().out
    con = duckdb.connect(str(db), read_only=True)
    recipe = json.loads(con.execute("SELECT config FROM studies").fetchone()[0])["recipe"]
    statuses = con.execute("SELECT status, count(*) FROM runs GROUP BY ALL").fetchall()
    pbrf = con.execute("SELECT pearson FROM calibration WHERE regime = 'pbrf'").fetchone()[0]
    con.close()
    assert (recipe["optimizer"], recipe["schedule"]) == ("adamw:beta2=0.99", "cosine:warmup=20")
    assert statuses == [("done", 2 * 11 * 2)]  # seeds × (10 sets + the full-data baseline) × regimes
    assert pbrf > 0.9  # influence is the first-order PBRF solution on J, AdamW or not


def test_a_users_schedule_class_from_a_file(tmp_path):
    (tmp_path / "steps.py").write_text(
        "from retrain.optimizers import Schedule\n\n\n"
        "class Halving(Schedule):\n"
        "    name = 'halving'\n\n"
        "    def decay(self, p):\n"
        "        return 0.5 if p >= 0.5 else 1.0\n")
    recipe = Recipe(schedule=f"{tmp_path / 'steps.py'}:Halving")
    assert [recipe.make_schedule().factor(t, 4) for t in range(4)] == [1.0, 1.0, 0.5, 0.5]
    ones = torch.ones(1, N, dtype=torch.bool)
    halving, constant = (train(blobs(schedule=s), ones, [0]).params for s in (recipe.schedule, "constant"))
    assert (halving - constant).abs().max() > 1e-4
    with pytest.raises(InputError, match="no Schedule subclass named 'Nope'"):
        Recipe(schedule=f"{tmp_path / 'steps.py'}:Nope")


def test_readme_lists_the_optimizers_and_schedules_as_generated():
    block = re.search(r"<!-- recipe-options -->\s*```\n(.*?)\n```", README.read_text(), re.S)
    assert block and block.group(1) == recipe_options()


def test_pbrf_without_curvature_matrices_reaches_the_optimum_under_a_small_adamw_lr(monkeypatch):
    """Above EXPLICIT_MAX_PARAMS the PBRF solver forms no P × P matrix and takes gradient steps scaled by the
    recipe's lr; under AdamW's small lr they must still reach, within the budget, the optimum that the Newton-
    preconditioned solver finds (capped at lr, the steps used to leave θ* nearly where it was)."""
    import retrain.regimes as regimes

    study = blobs(optimizer="adamw", lr=1e-4, weight_decay=1e-2, damping=0.05, pbrf_steps=300)
    theta_star = train(study, torch.ones(1, N, dtype=torch.bool), [0]).params.expand(3, -1)
    masks = torch.ones(3, N, dtype=torch.bool)
    masks[[0, 1, 2], [5, 17, 30]] = False
    newton = regimes.pbrf(study, theta_star, masks)
    monkeypatch.setattr(regimes, "EXPLICIT_MAX_PARAMS", 0)
    gradient = regimes.pbrf(study, theta_star, masks)
    assert all(newton.converged) and all(gradient.converged)
    gap = (gradient.params - newton.params).norm(dim=1) / (newton.params - theta_star).norm(dim=1)
    assert gap.max() < 1e-5, gap


def test_initial_parameters_do_not_depend_on_whether_the_module_was_built_yet():
    study = Blobs()  # its module not built: the first init_params builds it
    assert torch.equal(study.init_params(0), study.init_params(0))
