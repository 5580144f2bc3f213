"""Peer libraries as scoring methods, `bench` and `export-model`. The suite passes without any peer installed: tests
that run a peer skip when it is missing (`make peers` installs them)."""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch
from conftest import file_digest

from store import InputError

NO_LINEAR = '''
import torch
from torch import nn

from retrain.studies.linreg import LinReg


class Weights(nn.Module):
    """The ridge model without nn.Linear: kronfluence has nothing to track."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(10))
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return (x @ self.w + self.b)[:, None]


class NoLinear(LinReg):
    name = "no-linear"

    def model(self):
        return Weights()
'''


def _linreg_models():
    from retrain import load_study
    from retrain.regimes import train_full

    study = load_study("linreg")
    params, _ = train_full(study, [0, 1], "full")
    return study, torch.stack([params[0], params[1]])


def _slope(x: torch.Tensor, y: torch.Tensor) -> float:
    """Least-squares slope of y on x."""
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x * x).sum())


def test_state_dict_of_flat_parameters_loads_into_a_fresh_module():
    from retrain import load_study

    study = load_study("digits-mlp")
    theta = torch.randn(study.flat.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    module = study.model().to(torch.float64)
    module.load_state_dict(study.flat.state_dict(theta))
    x = study.tensors("train")[0][:7]
    assert torch.equal(module(x), study.flat(theta, x))


def test_peer_names_are_refused_in_one_line_when_unknown_or_missing(monkeypatch):
    import predictions.peers as peers
    from predictions import parse_method
    from retrain import load_study

    study = load_study("linreg")
    with pytest.raises(InputError, match="has no strategy 'nope'; use one of kronfluence:ekfac"):
        parse_method("kronfluence:nope", study)
    monkeypatch.setattr(peers, "installed", lambda library: False)
    with pytest.raises(InputError, match="kronfluence is not installed; install the peers with make peers"):
        parse_method("kronfluence:ekfac", study)


def _broken_peer():
    """A peer library whose `nan` strategy returns NaN and whose `crash` strategy raises."""
    from predictions.peers import PeerMethod

    class Broken(PeerMethod):
        library, distribution, module, strategies = "broken", "broken", "broken", ("nan", "crash")

        def library_scores(self, study, model, x, y):
            if self.strategy == "crash":
                raise ValueError("negative Ritz values\nsecond line")
            return torch.full((len(study.measurement_ids), len(y)), math.nan)

    return Broken


def test_a_peer_that_returns_nan_or_raises_is_a_failure_never_numbers():
    from predictions.peers import PeerFailure
    from retrain import load_study

    Broken = _broken_peer()
    study = load_study("linreg")
    thetas = torch.zeros(1, study.flat.n_params, dtype=torch.float64)
    with pytest.raises(PeerFailure, match=r"^broken:nan:models=1 returned ([0-9,]+) non-finite scores of \1$"):
        Broken("nan", Broken.Options(models=1), study).scores(study, thetas)
    with pytest.raises(PeerFailure, match=r"^broken:crash:models=1 raised ValueError: negative Ritz values$"):
        Broken("crash", Broken.Options(models=1), study).scores(study, thetas)


def test_bench_rows_put_ours_first_then_peers_then_failures_and_copy_the_view():
    from reports.bench import bench_rows

    columns = ["method", "regime", "set_kind", "pearson", "pearson_lo", "pearson_hi", "spearman", "spearman_lo",
               "spearman_hi", "noise_ceiling", "lds", "lds_lo", "lds_hi"]
    rows = [("kronfluence:kfac", "scratch", "single", 0.5, 0.4, 0.6, 0.55, 0.45, 0.65, 0.9, None, None, None),
            ("kronfluence:kfac", "scratch", "random", 0.3, 0.2, 0.4, 0.3, 0.2, 0.4, 0.8, 0.7, 0.6, 0.75),
            ("exact", "scratch", "single", 0.8, 0.7, 0.9, 0.85, 0.8, 0.9, 0.9, None, None, None)]
    header, table = bench_rows((columns, rows), ["kronfluence:ekfac", "kronfluence:kfac", "exact"],
                               {"kronfluence:ekfac": True, "kronfluence:kfac": True, "exact": False},
                               {"exact": (1.0, 2.0), "kronfluence:kfac": (3.0, 4.0)},
                               {"kronfluence:ekfac": "returned 3 non-finite scores"}, ["scratch"])
    got = [dict(zip(header, r)) for r in table]
    assert [r["method"] for r in got] == ["exact", "kronfluence:kfac", "kronfluence:ekfac"]
    assert got[1]["scratch_pearson"] == 0.5 and got[1]["scratch_pearson_ci"] == "[0.4, 0.6]"
    assert got[1]["lds"] == 0.7 and got[1]["lds_ci"] == "[0.6, 0.75]" and got[1]["seconds"] == 3.0
    assert got[2]["status"] == "failed: returned 3 non-finite scores" and got[2]["lds"] is None


def test_speed_notes_put_each_exact_and_lissa_beside_the_peers_with_both_lds():
    from reports.bench import speed_notes

    columns = ["method", "source", "seconds", "lds", "status"]
    rows = [("exact", "ours", 20.0, 0.81, "ok"), ("exact:models=1", "ours", 4.0, 0.75, "ok"),
            ("lissa:models=1", "ours", 10.0, 0.74, "ok"), ("kronfluence:ekfac:models=1", "peer", 2.0, 0.59, "ok"),
            ("dattri:lissa:models=1", "peer", 40.0, 0.40, "ok"), ("dattri:arnoldi:models=1", "peer", 1.0, None,
                                                                 "failed: NaN")]
    assert speed_notes(columns, rows) == [
        "exact scored in 10.00x the time of kronfluence:ekfac:models=1 (20.00 s against 2.00 s; LDS 0.810 against "
        "LDS 0.590), the fastest peer",
        "exact:models=1 scored in 2.00x the time of kronfluence:ekfac:models=1 (4.00 s against 2.00 s; LDS 0.750 "
        "against LDS 0.590), the fastest peer",
        "lissa:models=1 scored in 0.25x the time of dattri:lissa:models=1 (10.00 s against 40.00 s; LDS 0.740 against "
        "LDS 0.400)",
        "highest LDS of ours: exact 0.810; of the peers: kronfluence:ekfac:models=1 0.590"]


def test_kronfluence_agrees_in_sign_and_scale_with_ours_on_ridge():
    """On a linear model K-FAC's Kronecker factors are the exact Gauss-Newton, so kronfluence:kfac must reproduce
    `exact` (conversion s/N, damping wd + λ), and kronfluence:identity must reproduce `grad_dot`, relabelled
    points included."""
    pytest.importorskip("kronfluence")
    from predictions import parse_method
    from store import RemovalSetRecord

    study, thetas = _linreg_models()
    relabel = [RemovalSetRecord(study.study_hash, "user", "relabel", (3, 7), new_labels=(2.5, -1.0))]
    exact = parse_method("exact", study).scores(study, thetas)
    kfac = parse_method("kronfluence:kfac", study).scores(study, thetas)
    ekfac = parse_method("kronfluence:ekfac", study).scores(study, thetas)
    assert torch.corrcoef(torch.stack([kfac.flatten(), exact.flatten()]))[0, 1] > 0.999
    assert _slope(kfac.flatten(), exact.flatten()) == pytest.approx(1.0, abs=0.01)
    assert torch.corrcoef(torch.stack([ekfac.flatten(), exact.flatten()]))[0, 1] > 0.99
    grad_dot = parse_method("grad_dot", study).scores(study, thetas, relabel)
    identity = parse_method("kronfluence:identity", study).scores(study, thetas, relabel)
    assert identity.shape == grad_dot.shape == (len(study.measurement_ids), study.n_train + 2)
    torch.testing.assert_close(identity, grad_dot, rtol=1e-6, atol=1e-12)


def test_dattri_agrees_in_sign_and_scale_with_ours_on_ridge():
    """On ridge the Hessian is the Gauss-Newton matrix, so dattri's CG and Arnoldi (rank 11 = P: exact) must
    reproduce `exact` after the conversion s/N with regularisation wd + λ (in float32: to 1e-3)."""
    pytest.importorskip("dattri")
    from predictions import parse_method

    study, thetas = _linreg_models()
    exact = parse_method("exact", study).scores(study, thetas)
    for spec in ("dattri:cg", "dattri:arnoldi"):
        peer = parse_method(spec, study).scores(study, thetas)
        assert torch.corrcoef(torch.stack([peer.flatten(), exact.flatten()]))[0, 1] > 0.999, spec
        assert _slope(peer.flatten(), exact.flatten()) == pytest.approx(1.0, abs=0.01), spec


def test_dattri_tracin_is_grad_dot_unprojected_and_a_random_projection_estimate_by_default():
    """dattri's TracIn at the full-data model with weight 1 is ∇L_jᵀ∇m: with projection=0 it must equal `grad_dot`
    after s/N (float32: to 1e-5), relabelled points included. Its default projects the 11 ridge gradients to 512
    random dimensions, a Johnson-Lindenstrauss estimate: close (Pearson > 0.98) but not equal, which is where the
    earlier disagreement of up to 10% came from."""
    pytest.importorskip("dattri")
    from predictions import parse_method
    from store import RemovalSetRecord

    study, thetas = _linreg_models()
    relabel = [RemovalSetRecord(study.study_hash, "user", "relabel", (3, 7), new_labels=(2.5, -1.0))]
    grad_dot = parse_method("grad_dot", study).scores(study, thetas, relabel)
    exact_products = parse_method("dattri:tracin:projection=0", study).scores(study, thetas, relabel)
    torch.testing.assert_close(exact_products, grad_dot, rtol=1e-5, atol=1e-5 * float(grad_dot.abs().max()))
    projected = parse_method("dattri:tracin", study).scores(study, thetas, relabel)
    assert torch.corrcoef(torch.stack([projected.flatten(), grad_dot.flatten()]))[0, 1] > 0.98
    assert float((projected - grad_dot).abs().max()) > 1e-3 * float(grad_dot.abs().max())


def test_trak_of_dattri_and_traker_agree_in_sign_and_scale_with_ours_on_ridge():
    """On ridge TRAK's output function is the prediction, ∂L/∂f the residual and ΦᵀΦ = N·G, so with its damping
    mapped to wd + λ and more projected dimensions than parameters both TRAKs must reproduce `exact` (float32 and a
    random projection: Pearson > 0.999, slope 1 to 0.01). Neither predicts relabel sets (its kernel is the full
    training set's): their scores have no relabelled columns."""
    pytest.importorskip("dattri")
    pytest.importorskip("trak")
    from predictions import parse_method
    from store import RemovalSetRecord

    study, thetas = _linreg_models()
    relabel = [RemovalSetRecord(study.study_hash, "user", "relabel", (3, 7), new_labels=(2.5, -1.0))]
    exact = parse_method("exact", study).scores(study, thetas)
    for spec in ("dattri:trak", "traker", "traker:projection=64"):
        method = parse_method(spec, study)
        assert method.label == spec and not method.relabels
        peer = method.scores(study, thetas, relabel)
        assert peer.shape == exact.shape, spec
        assert torch.corrcoef(torch.stack([peer.flatten(), exact.flatten()]))[0, 1] > 0.999, spec
        assert _slope(peer.flatten(), exact.flatten()) == pytest.approx(1.0, abs=0.01), spec
    with pytest.raises(InputError, match="dattri's TRAK always projects; give projection=K"):
        parse_method("dattri:trak:projection=0", study)
    with pytest.raises(InputError, match="option 'trak' not understood; traker takes models="):
        parse_method("traker:trak", study)


def test_trak_output_function_is_the_margin_for_class_logits_and_refuses_other_outputs():
    """Q ∇f = ∇L per example: for cross-entropy on logits f is the margin and Q = −(1 − p_y); checked against the
    loss's own gradient in the outputs."""
    from predictions.peers import PeerFailure, module_at, trak_output, trak_output_kind
    from retrain import load_study

    study = load_study("digits-mlp")
    theta = 0.1 * torch.randn(study.flat.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model = module_at(study, theta)
    assert trak_output_kind(study, model) == "margin"
    x, y = (t[:6] for t in study.tensors("train"))
    outputs = model(x).detach().requires_grad_()
    f, q = trak_output(study, "margin", outputs, y)
    (df,) = torch.autograd.grad(f.sum(), outputs)
    (dl,) = torch.autograd.grad(study.loss(outputs, y).sum(), outputs)
    torch.testing.assert_close(q[:, None] * df, dl)

    class Wide(torch.nn.Module):
        def forward(self, inputs):
            return inputs[:, :3]

    with pytest.raises(PeerFailure, match="TRAK needs one scalar output per example or class logits"):
        trak_output_kind(load_study("linreg"), Wide().double())


def test_kronfluence_records_library_version_and_options_in_the_config():
    pytest.importorskip("kronfluence")
    from importlib.metadata import version

    from predictions import parse_method
    from retrain import load_study

    method = parse_method("kronfluence:ekfac:models=1,damping=0.01", load_study("linreg"))
    assert method.label == "kronfluence:ekfac:models=1,damping=0.01"
    expected = {"library": "kronfluence", "version": version("kronfluence"), "strategy": "ekfac", "models": 1,
                "damping": 0.01, "fisher": "sampled"}
    assert {k: method.config[k] for k in expected} == expected


def _bench(db, study: str, methods: list[str], reports) -> str:
    from flows.cli import main

    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = main(["--db", str(db), "bench", study, "--methods", *methods, "--sets", "single:n=12",
                     "--sets", "random:alpha=0.5,k=8", "--regimes", "scratch", "--report-dir", str(reports)])
    assert code == 0
    return out.getvalue()


def test_bench_scores_ours_and_a_peer_on_the_same_retrains_and_records_a_failure(prefect_harness, tmp_path):
    """A reduced bench: on linreg kronfluence:kfac matches `exact` metric for metric (the same retrains, the same
    view); on a model without nn.Linear kronfluence refuses, and the failure is a chained row, not numbers."""
    pytest.importorskip("kronfluence")
    import store

    db = tmp_path / "bench.duckdb"
    out = _bench(db, "linreg", ["exact", "kronfluence:kfac", "grad_dot"], tmp_path / "reports")
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    assert [line.split()[0] for line in lines[header + 2 : header + 5]] == ["exact", "grad_dot", "kronfluence:kfac"]
    with store.read_only(db, sandbox=False) as con:
        lds = dict(con.execute("SELECT method, lds FROM calibration WHERE set_kind = 'random'").fetchall())
    assert lds["kronfluence:kfac"] == pytest.approx(lds["exact"], abs=1e-6) and lds["exact"] > lds["grad_dot"]
    assert "exact scored in" in out and "figure:" in out
    study_file = tmp_path / "no_linear.py"
    study_file.write_text(NO_LINEAR)
    out = _bench(db, f"{study_file}:NoLinear", ["exact", "kronfluence:ekfac"], tmp_path / "reports")
    reason = "kronfluence:ekfac raised IllegalTaskConfigurationError: No supported modules found."
    assert f"failed: {reason}" in out
    with store.read_only(db, sandbox=False) as con:
        failures = con.execute("SELECT method, reason FROM prediction_failures").fetchall()
        peer_predictions = con.execute("SELECT count(*) FROM predictions p JOIN studies s USING (study_hash) "
                                       "WHERE s.study = 'no-linear' AND method LIKE 'kronfluence%'").fetchone()[0]
        assert not store.audit(con, store.receipts_path(db))
    assert [(m, r.split(" Kronfluence supports")[0]) for m, r in failures] == [("kronfluence:ekfac", reason)]
    assert peer_predictions == 0


def test_export_model_writes_a_loadable_state_dict_and_refuses_in_one_line(linreg_ledger, tmp_path, capsys):
    import store
    from flows.cli import main
    from retrain import load_study
    from retrain.regimes import load_params

    db, study = linreg_ledger["db"], load_study("linreg")
    before = file_digest(db)
    target = tmp_path / "model.pt"
    assert main(["--db", str(db), "export-model", "linreg", "--seed", "1", "--output", str(target)]) == 0
    with store.read_only(db, sandbox=False) as con:
        theta = load_params(store.load_models(con, study.study_hash)[1])
        set_id, outcome = con.execute(
            "SELECT r.set_id, o.value FROM runs r JOIN outcomes o USING (run_id) JOIN removal_sets s USING (set_id) "
            "WHERE r.seed = 0 AND r.regime = 'scratch' AND r.status = 'done' AND s.kind = 'single' "
            "AND o.measurement_id = 'query_loss/0' LIMIT 1").fetchone()
    module = study.model().to(torch.float64)
    module.load_state_dict(torch.load(target, weights_only=True))
    x = study.tensors("query")[0]
    assert torch.equal(module(x), study.flat(theta, x))
    for argv, message in ((["--seed", "1", "--output", str(target)], "exists; add --force"),
                          (["--seed", "1", "--output", str(db), "--force"], "is the ledger"),
                          (["--seed", "9", "--output", str(tmp_path / "m9.pt")], "no full-data model of seed 9"),
                          (["--seed", "0", "--regime", "scratch", "--output", str(tmp_path / "x.pt")],
                           "--set and --regime go together")):
        assert main(["--db", str(db), "export-model", "linreg", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert file_digest(db) == before
    retrained = tmp_path / "retrained.pt"
    assert main(["--db", str(db), "export-model", "linreg", "--seed", "0", "--set", set_id, "--regime", "scratch",
                 "--output", str(retrained)]) == 0
    module.load_state_dict(torch.load(retrained, weights_only=True))
    with torch.no_grad():
        value = float(study.measurement_vector(module)[study.measurement_ids.index("query_loss/0")])
    assert math.isclose(value, outcome, rel_tol=1e-9, abs_tol=1e-12)


CONTRAST = '''
from retrain.studies.linreg import LinReg


class Contrast(LinReg):
    """Measurements that read two query rows each: kronfluence must score them one at a time."""

    name = "contrast"

    def measurements(self):
        return {f"contrast/{i}": f"loss on query {i} minus loss on query {i + 1}" for i in range(5)}

    def measure(self, forward):
        x, y = self.tensors(self.query_split)
        losses = self.loss(forward(x), y)
        return {f"contrast/{i}": losses[i] - losses[i + 1] for i in range(5)}
'''


def test_kronfluence_scores_measurements_that_read_several_rows_through_its_measurement_hook(tmp_path):
    """A contrast of two query losses is not a per-row loss: each is scored with kronfluence's aggregated query
    gradient, and kronfluence:identity must still equal grad_dot."""
    pytest.importorskip("kronfluence")
    from predictions import parse_method
    from predictions.peers import module_at
    from predictions.peers.kronfluence import measurement_rows
    from retrain import load_study
    from retrain.regimes import train_full

    (tmp_path / "contrast.py").write_text(CONTRAST)
    study = load_study(f"{tmp_path / 'contrast.py'}:Contrast")
    params, _ = train_full(study, [0], "full")
    thetas = params[0][None]
    assert measurement_rows(study, module_at(study, thetas[0]), torch.arange(5)) is None
    digits = load_study("digits-mlp")
    theta = torch.zeros(digits.flat.n_params, dtype=torch.float64)
    inputs, rows = measurement_rows(digits, module_at(digits, theta), torch.arange(len(digits.measurement_ids)))
    assert torch.equal(rows, torch.arange(len(digits.measurement_ids))) and len(inputs) == len(rows)
    method = parse_method("kronfluence:identity:models=1", study)
    torch.testing.assert_close(method.scores(study, thetas), parse_method("grad_dot:models=1", study).scores(
        study, thetas), rtol=1e-6, atol=1e-12)
    assert method.config["query_batches"] == "one measurement at a time"


def test_top_k_sets_ranked_by_a_failed_peer_are_not_built_and_the_failure_is_recorded(prefect_harness, tmp_path,
                                                                                       monkeypatch, capsys):
    """`top_k:method=PEER` with a peer that fails: the other methods register, the failure is a chained row, and the
    sets it would have ranked are not built (said in one line), instead of the registration stopping."""
    import sys
    import types

    import predictions.peers as peers
    import store
    from flows.cli import main

    module = types.ModuleType("broken_peer")
    module.ADAPTER = _broken_peer()
    monkeypatch.setitem(sys.modules, "broken_peer", module)
    monkeypatch.setitem(peers.LIBRARIES, "broken", "broken_peer")
    monkeypatch.setattr(peers, "installed", lambda library: True)
    db = tmp_path / "topk.duckdb"
    ranked_by_peer, ranked_by_all = "top_k:k=3,method=broken:crash,random=0", "top_k:k=4,random=0"
    assert main(["--db", str(db), "register", "linreg", "--methods", "exact", "broken:crash", "--sets", "single:n=5",
                 "--sets", ranked_by_peer, "--sets", ranked_by_all]) == 0
    out = capsys.readouterr().out
    assert "broken:crash failed, no predictions registered (see prediction_failures): broken:crash raised " \
           "ValueError: negative Ritz values" in out
    assert f"{ranked_by_peer}: not built, its ranking method failed" in out
    with store.read_only(db, sandbox=False) as con:
        failures = con.execute("SELECT method FROM prediction_failures").fetchall()
        rankers = con.execute("SELECT DISTINCT ranked_by FROM removal_sets WHERE kind = 'top_k'").fetchall()
        sizes = con.execute("SELECT DISTINCT len(indices) FROM removal_sets WHERE kind = 'top_k'").fetchall()
        methods = con.execute("SELECT DISTINCT method FROM predictions").fetchall()
        assert not store.audit(con, store.receipts_path(db))
    assert failures == [("broken:crash",)] and rankers == [("exact",)] and sizes == [(4,)]
    assert methods == [("exact",)]


def test_each_method_s_scoring_cost_is_measured_cold(prefect_harness, tmp_path, monkeypatch):
    """The explicit inverse is kept per model for later solves; `exact:models=1` after `exact` must still invert seed
    0's curvature itself, or its measured seconds would be the cost of a lookup (found on the digits bench: 2.9 s
    against ~20 s cold). Counted by the inversions made: seeds 0 and 1 for `exact`, seed 0 again for the other."""
    import retrain.curvature as curvature
    from flows.cli import main

    made = []
    original = curvature.damped_gauss_newton
    monkeypatch.setattr(curvature, "damped_gauss_newton", lambda *a, **k: made.append(1) or original(*a, **k))
    assert main(["--db", str(tmp_path / "cold.duckdb"), "register", "linreg", "--methods", "exact", "exact:models=1",
                 "--sets", "single:n=3"]) == 0
    assert len(made) == 3
    kept = list(curvature._INVERSES)
    with curvature.cold_inverses():
        assert not curvature._INVERSES
    assert list(curvature._INVERSES) == kept  # what was kept before is kept again after
@pytest.mark.full
def test_kronfluence_tracks_gpt2_conv1d_layers_through_a_linear_copy_and_agrees_with_our_ekfac_on_a_scope():
    """GPT-2's attention and MLP are transformers' Conv1D, which kronfluence does not track: the adapter runs on a copy
    with each Conv1D an nn.Linear of the transposed weight (the same outputs), so on the transformer blocks its
    EK-FAC scores agree with our `ekfac` restricted to them (a tiny untrained reversal model; both sample the
    output-space Gauss-Newton, so agreement, not equality)."""
    pytest.importorskip("kronfluence")
    from predictions import parse_method
    from predictions.peers import module_at
    from predictions.peers.kronfluence import linear_copy
    from retrain.studies.reversal import Reversal

    class Tiny(Reversal):
        entities_per_group, n_embd, n_head = 3, 16, 2

    study = Tiny()
    theta = study.init_params(0)
    model, x = module_at(study, theta), study.tensors("train")[0]
    copied, converted = linear_copy(model)
    blocks = [f"gpt.transformer.h.{k}.{layer}" for k in range(2) for layer in
              ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert converted == blocks
    with torch.no_grad():
        torch.testing.assert_close(copied(x), model(x), rtol=1e-6, atol=1e-6)
    scope = r"scope=transformer\.h\."
    method = parse_method(f"kronfluence:ekfac:models=1,{scope}", study)
    theirs = method.scores(study, theta[None])
    assert method.config["tracked_modules"] == blocks and method.config["conv1d_as_linear"] == blocks
    ours = parse_method(f"ekfac:samples=4,models=1,{scope}", study).scores(study, theta[None])
    rows = torch.tensor(study.differentiable)
    assert torch.corrcoef(torch.stack([theirs[rows].flatten(), ours[rows].flatten()]))[0, 1] > 0.99
    with pytest.raises(InputError, match="holds no layer kronfluence tracks"):
        parse_method("kronfluence:ekfac:scope=ln_f", study).scores(study, theta[None])
