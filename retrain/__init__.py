"""Studies, the batched training engine, regimes and measurements -> outcome records.

Names are imported on first use (PEP 562), so that naming or describing the built-in studies
(`ifledger studies`, `ifledger --help`) does not import torch."""

from importlib import import_module
from typing import Any

_HOME = {"Trained": "retrain.engine", "measure": "retrain.engine", "train": "retrain.engine",
         "FlatModel": "retrain.study", "Recipe": "retrain.study", "Study": "retrain.study",
         "TrainingJob": "retrain.trainer", "builtin_studies": "retrain.study", "load_study": "retrain.study"}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'retrain' has no attribute {name!r}")
    return getattr(import_module(_HOME[name]), name)
