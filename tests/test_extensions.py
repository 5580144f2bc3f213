"""Extension points: the one spec grammar, help generated from the options' metadata, and a method, a removal-set
kind and a regime added from a user's file (`file.py:Class`) without touching the package."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest

from flows.cli import main, plan_options
from flows.configs import RegisterConfig
from flows.pipeline import plan, register_flow
from retrain.options import Extension, Registry, label, option, parse_options
from retrain.study import resolve_device
from store.records import InputError


@dataclass(frozen=True)
class ToyOptions:
    steps: int = option("how many steps", 3, minimum=1, maximum=10)
    rate: float | None = option("a rate", default_text="the study's")
    sizes: tuple[int, ...] = option("sizes", (5,), many=True, minimum=1)
    mode: str = option("how", "fast", choices=("fast", "slow"))


class Toy(Extension):
    """A toy extension."""

    name = "toy"
    Options = ToyOptions


TOYS = Registry("toy", Extension, [Toy])


def test_the_grammar_parses_types_lists_and_defaults():
    cls, options = TOYS.parse("toy:sizes=1,2,steps=4,rate=1e-3,sizes=7")
    assert cls is Toy
    assert options == ToyOptions(steps=4, rate=1e-3, sizes=(1, 2, 7), mode="fast")
    assert TOYS.parse("toy")[1] == ToyOptions()
    assert TOYS.parse("toy:steps=1e1")[1].steps == 10 and isinstance(TOYS.parse("toy:steps=1e1")[1].steps, int)
    assert label("toy", options, ToyOptions()) == "toy:steps=4,rate=0.001,sizes=1,2,7"
    assert label("toy", ToyOptions(steps=3), ToyOptions()) == "toy"  # a default given explicitly is not named


@pytest.mark.parametrize("spec, message", [
    ("toy:speed=2", "option 'speed=2' not understood; toy takes steps=, rate=, sizes=, mode="),
    ("toy:steps=2.5", "steps needs an integer, got '2.5'"),
    ("toy:rate=fast", "rate needs a number, got 'fast'"),
    ("toy:steps=0", "steps=0 must be at least 1 (how many steps)"),
    ("toy:steps=11", "steps=11 must be at most 10"),
    ("toy:sizes=3,0", "sizes=0 must be at least 1"),
    ("toy:mode=medium", "mode=medium is not one of fast, slow"),
    ("toy:4", "option '4' not understood"),  # a bare value extends only a list option
    ("robot", "unknown toy 'robot'; use one of toy or path/to/file.py:ClassName"),
])
def test_bad_options_name_the_key_and_what_it_takes(spec, message):
    with pytest.raises(InputError) as error:
        TOYS.parse(spec)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_help_is_generated_from_the_metadata():
    assert TOYS.help().splitlines() == [
        "toy: A toy extension.",
        "    steps=INT: how many steps (default 3)",
        "    rate=FLOAT: a rate (default the study's)",
        "    sizes=INT,...: sizes (default 5)",
        "    mode=fast|slow: how (default fast)",
    ]
    assert parse_options(ToyOptions, "", "toy", "toy") == ToyOptions()


def test_the_readme_lists_exactly_the_generated_options(capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"<!-- options -->\s*```\n(.*?)\n```", readme, re.S)
    assert block, "README lost its generated option list"
    assert block.group(1) == plan_options()  # regenerate the block from `flows.cli.plan_options()`
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert all(line.strip() in out for line in plan_options().splitlines())


EXTENSIONS = '''
from dataclasses import dataclass

import torch

from predictions.methods import CurvatureMethod
from predictions.removal_sets import ModificationKind
from retrain.curvature import damped_gauss_newton
from retrain.engine import train
from retrain.options import option
from retrain.regimes import Regime
from store.records import RemovalSetRecord


class Cholesky(CurvatureMethod):
    """The damped Gauss-Newton solved by a Cholesky factorisation."""

    name = "cholesky"

    def inverse_product(self, study, theta, vectors):
        factor = torch.linalg.cholesky(damped_gauss_newton(study, theta, self.options.damping))
        return torch.cholesky_solve(vectors, factor)


@dataclass(frozen=True)
class StrideOptions:
    step: int = option("distance between the removed points", 40, minimum=2)
    count: int = option("how many sets (offsets 0, 1, ...)", 4, minimum=1)


class Stride(ModificationKind):
    """Every step-th training point, from each offset."""

    name = "stride"
    Options = StrideOptions

    def build(self, study):
        o = self.options
        return [RemovalSetRecord(study.study_hash, self.name, f"stride:{o.step}+{r}",
                                 tuple(range(r, study.n_train, o.step))) for r in range(o.count)]


@dataclass(frozen=True)
class ExtraOptions:
    extra: int = option("Newton steps beyond the recipe's", 1, minimum=0)


class LongNewton(Regime):
    """Retrain from scratch with more steps than the recipe."""

    name = "long"
    Options = ExtraOptions

    def steps(self, study):
        return study.recipe.epochs + self.options.extra

    def train(self, study, masks, seeds, full_params, progress=None):
        return train(study, masks, seeds, epochs=self.steps(study), progress=progress)
'''


def test_a_users_method_kind_and_regime_go_through_register_verify_calibrate(prefect_harness, tmp_path):
    # no capsys here: Prefect's log handler must not keep a per-test stream that closes when the test ends
    file = tmp_path / "extensions.py"
    file.write_text(EXTENSIONS)
    db = str(tmp_path / "ledger.duckdb")
    assert main(["--db", db, "register", "linreg", "--methods", "exact", f"{file}:Cholesky",
                 "--sets", f"{file}:Stride:step=50,count=3"]) == 0
    assert main(["--db", db, "verify", "linreg", "--regimes", f"{file}:LongNewton:extra=2"]) == 0
    assert main(["--db", db, "calibrate", "--format", "csv"]) == 0
    con = duckdb.connect(db, read_only=True)
    sets = con.execute("SELECT kind, count(*), min(size), max(size) FROM removal_sets WHERE kind <> 'full' "
                       "GROUP BY kind").fetchall()
    assert sets == [("stride", 3, 7, 7)]  # 342 = 6 × 50 + 42 points: offsets below 42 take 7
    runs = con.execute("SELECT regime, status, count(*) FROM runs WHERE regime <> 'scratch' GROUP BY ALL").fetchall()
    assert runs == [("long:extra=2", "done", 3 * 2 + 2)]  # 3 sets and the full set, 2 seeds
    gap = con.execute("SELECT max(abs(a.predicted - b.predicted)), count(*) FROM predictions a JOIN predictions b "
                      "USING (set_id, measurement_id) WHERE a.method = 'cholesky' AND b.method = 'exact'").fetchone()
    assert gap[1] == 3 * 100 and gap[0] < 1e-10  # the user's solve is the explicit inverse's
    rows = con.execute("SELECT method, regime, set_kind, n, pearson FROM calibration ORDER BY method").fetchall()
    written = con.execute("SELECT i.command, i.config, count(*) FROM (SELECT invocation_id FROM predictions UNION ALL "
                          "SELECT invocation_id FROM runs) JOIN invocations i USING (invocation_id) GROUP BY ALL "
                          "ORDER BY command").fetchall()
    con.close()
    register, verify = (json.loads(config) for _, config, _ in written)
    assert [(c, n) for c, _, n in written] == [("register", 2 * 300 + 2), ("verify", 8)]  # the full runs: register
    assert register == {"db": db, "study": "linreg", "methods": ["exact", f"{file}:Cholesky"],
                        "sets": [f"{file}:Stride:step=50,count=3"], "supplied_must_reproduce": False,
                        "weight_changes": False, "device": str(resolve_device("auto"))}
    assert verify["regimes"] == [f"{file}:LongNewton:extra=2"] and verify["chunk_size"] == 64
    replayed = register_flow(plan(RegisterConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                    for k, v in register.items()})))
    assert (replayed.sets, replayed.predictions_added) == (3, 0)  # the same request: nothing new
    assert [r[:4] for r in rows] == [("cholesky", "long:extra=2", "stride", 300),
                                     ("exact", "long:extra=2", "stride", 300)]
    assert all(r[4] > 0.99 for r in rows)  # ridge: first order is close for small sets


def test_a_user_class_that_is_not_an_extension_is_refused(tmp_path, capsys):
    (tmp_path / "x.py").write_text("class Cholesky:\n    name = 'c'\n")
    argv = ["--db", str(tmp_path / "l.duckdb"), "register", "linreg", "--methods", f"{tmp_path / 'x.py'}:Cholesky"]
    assert main(argv) == 2
    assert "has no Method subclass named 'Cholesky'" in capsys.readouterr().err
    assert not (tmp_path / "l.duckdb").exists()
