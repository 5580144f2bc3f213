"""The code a study is made of, seen two ways: its module as a function of one flat parameter vector
(`FlatModel`), and its classes' source as a hash (`code_hash`, part of the study hash)."""

from __future__ import annotations

import ast
import inspect
import marshal
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call

from store.records import content_hash


class FlatModel:
    """A module seen as a function of one flat parameter vector θ ∈ R^P (for vmap, Hessians, CG)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.names = [n for n, _ in module.named_parameters()]
        self.shapes = [p.shape for _, p in module.named_parameters()]
        self.sizes = [p.numel() for _, p in module.named_parameters()]
        self.n_params = sum(self.sizes)

    def flatten(self, module: nn.Module) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in module.parameters()])

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        return {n: t.reshape(s) for n, t, s in zip(self.names, theta.split(self.sizes), self.shapes)}

    def __call__(self, theta: Tensor, x: Tensor) -> Tensor:
        return functional_call(self.module, self.unflatten(theta), (x,))


def code_hash(cls: type, base: type) -> str:
    """Hash of the code of `cls` and its bases below `base` (their syntax trees: comments and layout do not
    count, docstrings and class attributes do)."""
    trees = []
    for klass in cls.__mro__:
        if klass is base:
            break
        tree = _class_tree(klass)
        trees.append(ast.dump(tree) if tree else repr([(k, marshal.dumps(v.__code__)) for k, v in vars(klass).items()
                                                       if hasattr(v, "__code__")]))
    return content_hash(trees)


def _class_tree(cls: type) -> ast.ClassDef | None:
    """The syntax tree of a top-level class, read from its file now (not from a cache that an edit outdates);
    None when there is no file (a class made at run time: its functions' bytecode stands in)."""
    try:
        module = ast.parse(Path(inspect.getsourcefile(cls) or "").read_text())
    except (OSError, TypeError, SyntaxError):
        return None
    return next((node for node in module.body if isinstance(node, ast.ClassDef) and node.name == cls.__qualname__),
                None)
