"""Built-in studies by name. A class is imported only when its study is loaded; its docstring is read from
the source, so listing the studies imports no torch."""

from __future__ import annotations

import ast
from importlib import import_module
from pathlib import Path

BUILTIN = {"linreg": "retrain.studies.linreg:LinReg", "digits-mlp": "retrain.studies.digits:DigitsMLP",
           "digits-mislabel": "retrain.studies.mislabel:DigitsMislabel",
           "digits-mislabel-memorise": "retrain.studies.mislabel:DigitsMislabelMemorise",
           "reversal": "retrain.studies.reversal:Reversal",
           "reversal-pooled-names": "retrain.studies.reversal:PooledNames",
           "finetune": "retrain.studies.finetune:Finetune"}


def builtin_class(name: str) -> type:
    """The Study subclass registered as `name` (imports its module, and torch)."""
    module, _, cls = BUILTIN[name].partition(":")
    return getattr(import_module(module), cls)


def builtin_docstring(name: str) -> str:
    """The full docstring of the study class registered as `name`, read from its source without importing it."""
    module, _, cls = BUILTIN[name].partition(":")
    tree = ast.parse((Path(__file__).parent / f"{module.rsplit('.', 1)[1]}.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    return ast.get_docstring(node) or ""
