"""`ifledger export-model`: a study's model as a `state_dict` file that `study.model().load_state_dict`, or any
other library, loads: the full-data model of a seed from the ledger, or the model of a removal set under a regime,
retrained for the purpose (deterministic: the same model that `verify` trained for that set and seed)."""

from __future__ import annotations

from pathlib import Path

import torch

import store
from retrain import Study, load_study
from retrain.regimes import Job, Regime, load_params, masks_for, parse_regime, targets_for
from store import InputError


def export_model(db: str, study_spec: str, seed: int, output: str, set_id: str | None = None,
                 regime: str | None = None, force: bool = False) -> str:
    """Write the state_dict of `seed`'s full-data model (or of `set_id` retrained under `regime`) to `output`;
    returns a one-line description. Refuses (InputError) an existing file without `force`, the ledger itself, its
    receipts or its model files' folder, a study or seed without a full-data model in the ledger, an unknown set,
    and `regime` without `set_id`."""
    path = Path(output)
    if path.resolve() in (Path(db).resolve(), store.receipts_path(db).resolve()) or \
            path.resolve().parent == store.models_folder(db):
        raise InputError(f"--output {output} is the ledger, its receipts or in its model files' folder; give another "
                         "file")
    if path.is_dir() or not path.parent.is_dir():
        raise InputError(f"--output {output}: give a file in an existing folder")
    if path.exists() and not force:
        raise InputError(f"--output {output} exists; add --force to overwrite it")
    if (set_id is None) != (regime is None):
        raise InputError("--set and --regime go together: the model retrained without SET under REGIME")
    if not Path(db).exists():
        raise InputError(f"no ledger at {db}; run `ifledger register {study_spec}` first")
    study = load_study(study_spec)
    with store.read_only(db, sandbox=False) as con:
        models = store.load_models(con, study.study_hash)
        indices = store.removal_set_indices(con, [set_id]) if set_id else {}
    if seed not in models:
        raise InputError(f"{study.name} ({study.study_hash}) has no full-data model of seed {seed} in {db}"
                         + (f"; seeds stored: {', '.join(map(str, sorted(models)))}" if models else
                            f"; run `ifledger register {study_spec}` first"))
    theta = load_params(models[seed])
    what = f"the full-data model of seed {seed}"
    if set_id:
        if set_id not in indices:
            raise InputError(f"no removal set {set_id!r} in {db}")
        chosen = parse_regime(regime)
        job = Job(set_id, seed, *indices[set_id])
        theta = _retrain(study, chosen, job, {seed: theta})
        what = f"seed {seed} retrained without set {set_id} under {chosen.label}"
    torch.save(study.flat.state_dict(theta), path)
    return f"wrote {what} of {study.name} ({study.study_hash}) to {output}: load it with study.model().load_state_dict"


def _retrain(study: Study, regime: Regime, job: Job, full: dict[int, torch.Tensor]) -> torch.Tensor:
    """The parameters of `job` trained under `regime` (as `verify` trains them)."""
    targets = targets_for(study, [job])
    if targets is not None and not regime.relabels:
        raise InputError(f"regime {regime.label} cannot retrain relabel sets")
    trained = regime.train(study, masks_for(study, [job]), [job.seed], full,
                           **({} if targets is None else {"targets": targets}))
    if trained.failures[0] is not None:
        raise InputError(f"retraining failed: {trained.failures[0]}")
    return trained.params[0]
