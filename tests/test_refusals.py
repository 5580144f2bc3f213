"""Bad files are refused whole with one line and exit 2, leaving the ledger and its receipts unchanged: strict
imports of other libraries' predictions, and study files that cannot be run."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import file_digest

from flows.cli import main
from store import removal_set_id


@pytest.fixture
def ledger(linreg_ledger, tmp_path) -> str:
    db = tmp_path / "copy.duckdb"
    shutil.copy(linreg_ledger["db"], db)
    shutil.copy(f"{linreg_ledger['db']}.receipts", f"{db}.receipts")
    return str(db)


def _refused(argv: list[str], db: str, capsys, message: str) -> None:
    before = (file_digest(db), file_digest(f"{db}.receipts"))
    capsys.readouterr()
    assert main(["--db", db, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err  # no Prefect log lines before it
    assert (file_digest(db), file_digest(f"{db}.receipts")) == before


HEADER = "indices,measurement_id,predicted\n"
CSV_CASES = {
    "conflicting duplicates": (HEADER + "1,query_loss/0,0.5\n1,query_loss/0,-99\n", "a second prediction"),
    "1_000": (HEADER + "1,query_loss/0,1_000\n", "predicted '1_000' is not a finite number"),
    "an index written 1_0": (HEADER + "1_0,query_loss/0,1\n", "whole numbers"),
    "true as a prediction": (HEADER + "1,query_loss/0,true\n", "not a finite number"),
    "every training point": (HEADER + " ".join(map(str, range(342))) + ",query_loss/0,1\n", "every one of the 342"),
    "an over-long field": (HEADER + "1,query_loss/0," + "9" * 200_000 + "\n", "not readable CSV"),
    "unquoted 3,7,9": (HEADER + "3,7,9,query_loss/0,0.5\n", "5 fields where the header has 3"),
    "a row short of a field": (HEADER + "3,query_loss/0\n", "2 fields where the header has 3"),
    "a duplicated predicted column": ("indices,measurement_id,predicted,predicted\n1,query_loss/0,0.5,9\n",
                                      "column 'predicted' appears twice"),
    "Arabic-Indic digits as a prediction": (HEADER + "1,query_loss/0,\u0665\n", "not a finite number"),
    "fullwidth digits as an index": (HEADER + "\uff11,query_loss/0,0.5\n", "whole numbers"),
    "1e-400, which underflows to 0.0": (HEADER + "1,query_loss/0,1e-400\n", "too small for a double"),
}


@pytest.mark.parametrize("case", CSV_CASES)
def test_a_bad_csv_is_refused_with_one_line(ledger, tmp_path, capsys, case):
    content, message = CSV_CASES[case]
    (tmp_path / "p.csv").write_text(content)
    _refused(["import-predictions", str(tmp_path / "p.csv"), "--study", "linreg", "--method", "m"], ledger, capsys,
             message)


def test_a_set_id_that_contradicts_its_indices_is_refused(ledger, tmp_path, capsys, linreg_ledger):
    import duckdb

    con = duckdb.connect(ledger, read_only=True)
    (study_hash,) = con.execute("SELECT study_hash FROM studies").fetchone()
    con.close()
    (tmp_path / "p.csv").write_text(f"set_id,indices,measurement_id,predicted\n{removal_set_id(study_hash, [2])},1,"
                                    "query_loss/0,1\n")
    _refused(["import-predictions", str(tmp_path / "p.csv"), "--study", "linreg", "--method", "m"], ledger, capsys,
             "contradicts the row's indices")


def test_a_set_id_naming_the_full_data_set_is_refused(ledger, tmp_path, capsys):
    import duckdb

    con = duckdb.connect(ledger, read_only=True)
    (full,) = con.execute("SELECT set_id FROM removal_sets WHERE kind = 'full'").fetchone()
    con.close()
    (tmp_path / "p.csv").write_text(f"set_id,measurement_id,predicted\n{full},query_loss/0,0.5\n")
    _refused(["import-predictions", str(tmp_path / "p.csv"), "--study", "linreg", "--method", "m"], ledger, capsys,
             "is the full-data set")


def test_a_non_utf8_file_is_refused_and_a_bom_accepted(ledger, tmp_path, capsys):
    (tmp_path / "p.csv").write_bytes(HEADER.encode() + b"1,query_loss/0,0.5\n2,query_loss/\xff,1\n")
    _refused(["import-predictions", str(tmp_path / "p.csv"), "--study", "linreg", "--method", "m"], ledger, capsys,
             "not UTF-8")
    (tmp_path / "bom.csv").write_text("\ufeff" + HEADER + "1,query_loss/0,0.5\n", encoding="utf-8")
    assert main(["--db", ledger, "import-predictions", str(tmp_path / "bom.csv"), "--study", "linreg",
                 "--method", "bom"]) == 0


PARQUET_CASES = {
    "fractional indices": ({"indices": pa.array([[1.7, 2.2]]), "predicted": pa.array([0.5])}, "whole numbers"),
    "boolean predictions": ({"indices": pa.array([[1]]), "predicted": pa.array([True])}, "holds bool"),
    "string predictions": ({"indices": pa.array([[1]]), "predicted": pa.array(["0.5"])}, "holds string"),
    "indices as a plain integer": ({"indices": pa.array([3]), "predicted": pa.array([0.5])}, "a list of whole"),
    "indices as fullwidth digits": ({"indices": pa.array([["\uff13"]]), "predicted": pa.array([0.5])}, "whole numbers"),
}


@pytest.mark.parametrize("case", PARQUET_CASES)
def test_a_bad_parquet_is_refused_with_one_line(ledger, tmp_path, capsys, case):
    columns, message = PARQUET_CASES[case]
    pq.write_table(pa.table({**columns, "measurement_id": pa.array(["query_loss/0"])}), tmp_path / "p.parquet")
    _refused(["import-predictions", str(tmp_path / "p.parquet"), "--study", "linreg", "--method", "m"], ledger,
             capsys, message)


STUDY_CASES = {
    "dataset() raises": ("    def dataset(self):\n        raise RuntimeError('no data today')\n",
                         "dataset() failed: RuntimeError: no data today"),
    "no query split": ("    def dataset(self):\n        d = super().dataset()\n        del d['query']\n"
                       "        return d\n", "no 'query' split"),
    "a scalar loss": ("    def loss(self, outputs, targets):\n        return super().loss(outputs, targets).mean()\n",
                      "one loss per example"),
    "a loss that mixes examples": ("    def loss(self, outputs, targets):\n"
                                   "        losses = super().loss(outputs, targets)\n"
                                   "        return losses - losses.mean()\n", "from that example alone"),
    "NaN measurements": ("    def measure(self, forward):\n"
                         "        return {k: v * float('nan') for k, v in super().measure(forward).items()}\n",
                         "non-finite"),
    "an undeclared measurement": ("    def measure(self, forward):\n"
                                  "        return {**super().measure(forward), 'extra': forward.__call__}\n",
                                  "undeclared ['extra']"),
    "sys.exit(0) at import": ("import sys\nsys.exit(0)\n", "called sys.exit(0)"),
    "a loss that returns integers": ("    def loss(self, outputs, targets):\n"
                                     "        return (super().loss(outputs, targets) * 100).long()\n",
                                     "floating-point losses"),
}
LATER_CASES = {  # past the start-up check, while the full-data models train (the study is registered by then)
    "measure() raising after the start-up check": ("    calls = 0\n\n    def measure(self, forward):\n"
                                                   "        type(self).calls += 1\n"
                                                   "        if type(self).calls > 1:\n"
                                                   "            raise RuntimeError('broke later')\n"
                                                   "        return super().measure(forward)\n",
                                                   "broken.measure() failed: RuntimeError: broke later"),
    "NaN measurements after the start-up check": ("    calls = 0\n\n    def measure(self, forward):\n"
                                                  "        type(self).calls += 1\n"
                                                  "        values = super().measure(forward)\n"
                                                  "        return values if type(self).calls == 1 else "
                                                  "{k: v * float('nan') for k, v in values.items()}\n",
                                                  "non-finite measurement"),
}


@pytest.mark.parametrize("case", LATER_CASES)
def test_a_study_failing_after_its_start_up_check_ends_in_one_line(ledger, tmp_path, capsys, case):
    body, message = LATER_CASES[case]
    (tmp_path / "broken.py").write_text("from retrain.studies.linreg import LinReg\n\n\nclass Broken(LinReg):\n"
                                        "    name = 'broken'\n" + body)
    capsys.readouterr()
    assert main(["--db", ledger, "register", f"{tmp_path / 'broken.py'}:Broken", "--sets", "single:n=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err  # no Prefect traceback before it
    assert main(["--db", ledger, "audit"]) == 0


@pytest.mark.parametrize("case", STUDY_CASES)
def test_a_study_that_cannot_run_is_refused_before_anything_is_written(ledger, tmp_path, capsys, case):
    body, message = STUDY_CASES[case]
    study = "from retrain.studies.linreg import LinReg\n\n\nclass Broken(LinReg):\n    name = 'broken'\n"
    (tmp_path / "broken.py").write_text(body + "\n" + study if case.startswith("sys.exit") else study + body)
    _refused(["register", f"{tmp_path / 'broken.py'}:Broken", "--sets", "single:n=3"], ledger, capsys, message)
