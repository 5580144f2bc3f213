"""The cleaning prediction on a reduced digits-mislabel: flag the top p% by self-influence, remove them or relabel
them to the models' predicted class, beside a random p% and the oracle (the true flips), registered before
retraining and verified by `scratch` retraining with paired seeds; and the report's detection and cleaning
sections."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from flows.cli import main
from reports.render import report_folder

pytestmark = pytest.mark.full  # real training through the flows (~50 s of CPU)

SMALL = '''
from retrain import Recipe
from retrain.studies.mislabel import DigitsMislabel


class SmallMislabel(DigitsMislabel):
    name = "digits-mislabel-small"
    recipe = Recipe(optimizer="sgd", epochs=10, lr=0.05, momentum=0.9, batch_size=64, weight_decay=1e-3,
                    seeds=2, damping=2e-3)
'''


@pytest.fixture(scope="module")
def cleaned(prefect_harness, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("cleaning")
    (folder / "small.py").write_text(SMALL)
    db = str(folder / "l.duckdb")
    spec = f"{folder / 'small.py'}:SmallMislabel"
    sets = ["--sets", "flagged:p=10,by=exact", "--sets", "flagged:p=10,by=random", "--sets", "oracle"]
    assert main(["--db", db, "run", spec, "--methods", "exact", *sets, "--regimes", "scratch",
                 "--report-dir", str(folder / "r")]) == 0
    assert main(["--db", db, "detect", spec, "--methods", "exact", "grad_dot", "loss", "random"]) == 0
    assert main(["--db", db, "report", "digits-mislabel-small", "--report-dir", str(folder / "r")]) == 0
    return db


def test_self_influence_flags_far_more_flips_than_random_and_relabelling_them_helps(cleaned):
    con = duckdb.connect(cleaned, read_only=True)
    try:
        sets = con.execute(
            "SELECT s.label, s.size, count(f.train_index), count(*) FILTER (WHERE s.new_labels[i] = f.true_label) "
            "FROM removal_sets s, unnest(range(1, len(s.indices) + 1)) u(i) "
            "LEFT JOIN flipped_labels f ON f.study_hash = s.study_hash AND f.train_index = s.indices[i] "
            "WHERE s.kind IN ('flagged', 'oracle') GROUP BY ALL").fetchall()
        effects = dict(con.execute(
            "SELECT s.label, e.effect FROM effects e JOIN removal_sets s USING (set_id) "
            "WHERE e.measurement_id = 'query_loss/mean' AND e.regime = 'scratch'").fetchall())
        predicted = dict(con.execute(
            "SELECT s.label, p.predicted FROM predictions p JOIN removal_sets s USING (set_id) "
            "WHERE p.measurement_id = 'query_loss/mean'").fetchall())
        n_flipped = con.execute("SELECT count(*) FROM flipped_labels").fetchone()[0]
    finally:
        con.close()
    hits = {label: (size, flips, fixed) for label, size, flips, fixed in sets}
    size = hits["flagged:by=exact,p=10,fix=remove"][0]
    assert hits["oracle:labels=true,fix=relabel"] == (n_flipped, n_flipped, n_flipped)  # the oracle is the truth
    assert len(hits) == 6 and hits["flagged:by=random,p=10,fix=relabel"][0] == size
    exact, random = hits["flagged:by=exact,p=10,fix=relabel"][1], hits["flagged:by=random,p=10,fix=relabel"][1]
    assert exact >= 0.6 * n_flipped and exact > random + 0.4 * n_flipped  # random flags ~10% of the flips
    # the models' predicted class restores most flagged flips to their true label (no truth read to do it)
    assert hits["flagged:by=exact,p=10,fix=relabel"][2] >= 0.5 * exact
    assert effects["flagged:by=exact,p=10,fix=relabel"] < 0 and effects["flagged:by=exact,p=10,fix=remove"] < 0
    assert effects["flagged:by=exact,p=10,fix=relabel"] < effects["flagged:by=random,p=10,fix=relabel"]
    assert predicted["flagged:by=exact,p=10,fix=relabel"] < 0  # the registered prediction said it would help
    assert set(predicted) == set(effects)  # every cleaning set is predicted and verified


def test_the_report_plots_detection_and_names_the_methods_that_do_not_beat_the_loss_baseline(cleaned):
    folder = report_folder(cleaned, "digits-mislabel-small", Path(cleaned).parent / "r")
    report = (folder / "report.md").read_text()
    assert (folder / "detection.png").stat().st_size > 10_000 and "![recall against inspected fraction]" in report
    con = duckdb.connect(cleaned, read_only=True)
    try:
        verdicts = con.execute("SELECT method, list(versus_loss) FROM detection WHERE method NOT IN ('loss', 'random') "
                               "GROUP BY method").fetchall()
    finally:
        con.close()
    assert len(verdicts) == 2
    for method, per_fraction in verdicts:
        beaten = f"**{method} does not beat the training-loss baseline**" in report
        assert beaten == ("better" not in per_fraction), (method, per_fraction)
    assert "## Cleaning flagged points" in report and "| scratch | flagged:by=exact,p=10,fix=relabel | 144 |" in report


@pytest.mark.parametrize("spec, message", [
    ("oracle", "linreg knows no mislabelled points"),
    ("flagged:p=10,fix=relabel", "needs a classifier"),
    ("flagged:p=10,by=nope", "by=nope is not one of exact"),
])
def test_a_cleaning_that_cannot_be_built_is_refused_before_anything_is_written(prefect_harness, tmp_path, capsys,
                                                                                spec, message):
    db = tmp_path / "l.duckdb"
    assert main(["--db", str(db), "register", "linreg", "--sets", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not db.exists()
