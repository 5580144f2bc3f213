"""The code a study is made of, seen two ways: its module as a function of one flat parameter vector
(`FlatModel`), and its classes' source as a hash (`code_hash`, part of the study hash)."""

from __future__ import annotations

import ast
import inspect
import marshal
from pathlib import Path

import torch
from torch import Tensor, nn

from store.records import content_hash


class FlatModel:
    """A module seen as a function of one flat parameter vector θ ∈ R^P (for vmap, Hessians, CG).

    A call puts θ's pieces in the module's parameter slots, runs the module and puts the parameters back (what
    `torch.func.functional_call` does, without its per-call search of the module tree: the training engine calls
    this once per optimizer step). A parameter shared by several modules (tied weights, as GPT-2's embedding and
    output layer) is one piece of θ, put in every slot that holds it. Not thread-safe, as functional_call."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.names = [n for n, _ in module.named_parameters()]
        self.shapes = [p.shape for _, p in module.named_parameters()]
        self.sizes = [p.numel() for _, p in module.named_parameters()]
        self.n_params = sum(self.sizes)
        index = {id(p): i for i, p in enumerate(module.parameters())}
        self._slots: list[tuple[nn.Module, str, int]] = []  # (owning module, attribute, piece of θ)
        for name, p in module.named_parameters(remove_duplicate=False):
            owner, _, attr = name.rpartition(".")
            self._slots.append((module.get_submodule(owner), attr, index[id(p)]))

    def flatten(self, module: nn.Module) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in module.parameters()])

    def state_dict(self, theta: Tensor) -> dict[str, Tensor]:
        """The module's `state_dict` with θ's pieces as its parameters (copies; buffers as the module holds them):
        what `module.load_state_dict` of a fresh module, or any other library, loads."""
        pieces = {n: t.reshape(s).clone() for n, t, s in zip(self.names, theta.detach().split(self.sizes), self.shapes)}
        index = {id(p): n for n, p in self.module.named_parameters()}
        state = {}
        for name, value in self.module.state_dict(keep_vars=True).items():
            state[name] = pieces[index[id(value)]] if id(value) in index else value.detach().clone()
        return state

    def __call__(self, theta: Tensor, x: Tensor) -> Tensor:
        pieces = [t.reshape(s) for t, s in zip(theta.split(self.sizes), self.shapes)]
        kept = [owner._parameters[attr] for owner, attr, _ in self._slots]
        try:
            for owner, attr, i in self._slots:
                owner._parameters[attr] = pieces[i]
            return self.module(x)
        finally:
            for (owner, attr, _), p in zip(self._slots, kept):
                owner._parameters[attr] = p


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
