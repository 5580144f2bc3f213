"""Peer libraries as scoring methods, named `LIBRARY:STRATEGY[:key=value,...]` (`kronfluence:ekfac`,
`kronfluence:kfac:models=1`). Each adapter runs the library on the study's own full-data models (θ loaded into a fresh
`study.model()`), converts its scores to ours, Δ̂_mj = predicted m(without z_j) − m(full), and returns scores like a
curvature method's, so that set predictions, relabelling and registration are shared. A library is imported only
when one of its methods is built; a missing one is one line saying how to install it (`make peers`). A library that
fails (an exception, a non-finite score, an unsupported layer) raises `PeerFailure`, which the flows record as a
failed prediction batch (`prediction_failures`), never as numbers."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from predictions.methods import Method, Progress, relabelled_points
from retrain.options import label, option, parse_options, split_spec
from retrain.study import Study
from store.records import InputError, RemovalSetRecord

INSTALL = ("make peers (pip install --no-deps kronfluence dattri traker and their pure-Python dependencies; "
           "see README)")
LIBRARIES = {"kronfluence": "predictions.peers.kronfluence", "dattri": "predictions.peers.dattri",
             "traker": "predictions.peers.traker"}


class PeerFailure(RuntimeError):
    """A peer library ran and failed: its reason is recorded instead of predictions."""


def trak_output_kind(study: Study, model: nn.Module) -> str:
    """Which model output function TRAK (Park et al. 2023) takes for `study`, checked on a few training examples:
    `scalar` (one output per example: f is it), or `margin` (class logits under cross-entropy: f = log p_y −
    log(1 − p_y), the paper's). Anything else raises `PeerFailure`: TRAK needs a scalar f_j with ∇L_j = Q_j ∇f_j."""
    x, y = (t[:8] for t in study.tensors("train"))
    dtype = next((p.dtype for p in model.parameters()), x.dtype)
    with torch.no_grad():
        outputs = model(x.to(dtype) if x.is_floating_point() else x)
    y = y.to(dtype) if y.is_floating_point() else y
    if outputs.numel() == len(x):
        return "scalar"
    if outputs.dim() == 2 and not y.is_floating_point() and torch.allclose(
            study.loss(outputs, y), nn.functional.cross_entropy(outputs, y, reduction="none")):
        return "margin"
    raise PeerFailure(f"TRAK needs one scalar output per example or class logits under cross-entropy; {study.name}'s "
                      f"model gives outputs of shape {tuple(outputs.shape[1:])} per example")


def trak_output(study: Study, kind: str, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """TRAK's output function f [B] of outputs [B, ...] and its out-to-loss weight Q = ∂L/∂f [B] (detached), so that
    ∇L_j = Q_j ∇f_j: for `margin`, Q = −(1 − p_y); for `scalar`, the loss's derivative in the output. vmap-able."""
    if kind == "scalar":
        value = outputs.reshape(len(outputs))
        weight = torch.func.grad(lambda o: study.loss(o.reshape(outputs.shape), targets).sum())(value.detach())
        return value, weight
    chosen = torch.arange(outputs.shape[-1]) == targets[..., None]  # one-hot, vmap-able
    correct = (outputs * chosen).sum(-1)
    others = outputs.masked_fill(chosen, -torch.inf).logsumexp(-1)
    return correct - others, -(1 - torch.softmax(outputs.detach(), -1).mul(chosen).sum(-1))


@dataclass(frozen=True)
class PeerOptions:
    models: int | None = option("how many seed models the scores are averaged over", minimum=1,
                                default_text="all the study's seeds")
    damping: float | None = option("λ: the library's damping is wd + λ, so that it solves with G + (wd + λ)I as ours",
                                   minimum=0, default_text="the study's recipe damping")


class PeerMethod(Method):
    """A scoring method run by another library: `strategies` its names, `distribution` its package. Subclasses
    implement `library_scores`; `scores` averages them over seed models and checks them; set predictions are their
    sums (the base's)."""

    library: ClassVar[str] = ""
    distribution: ClassVar[str] = ""  # its package on PyPI
    module: ClassVar[str] = ""  # its import name
    strategies: ClassVar[tuple[str, ...]] = ()
    Options = PeerOptions

    def __init__(self, strategy: str, options: Any, study: Study):
        self.strategy = strategy
        self.name = peer_name(self.library, strategy)  # type: ignore[misc]  (one class serves every strategy)
        super().__init__(options, study)
        self.label = label(self.name, self.options, self._for_study(self.Options(), study))
        self.config = {**self.config, "library": self.library, "version": library_version(self.distribution),
                       "strategy": strategy}

    def scores(self, study: Study, thetas: Tensor, sets: Sequence[RemovalSetRecord] = (),
               progress: Progress | None = None) -> Tensor:
        """Scores [M, N + R] in our convention (see `Method.scores`), averaged over the first `models` full-data
        models; a library error or a non-finite score raises `PeerFailure`."""
        relabelled = relabelled_points(sets) if self.relabels else []
        x, y = study.tensors("train")
        if relabelled:
            rows = torch.tensor([j for j, _ in relabelled])
            x = torch.cat([x, x[rows]])
            y = torch.cat([y, torch.tensor([v for _, v in relabelled], dtype=torch.float64).to(y.dtype)])
        total, used = None, thetas[: self.options.models]
        for theta in used:
            try:
                scores = self.library_scores(study, module_at(study, theta), x, y)
            except (InputError, PeerFailure):
                raise
            except Exception as e:
                raise PeerFailure(f"{self.label} raised {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
            bad = (~torch.isfinite(scores)).sum().item()
            if bad:
                raise PeerFailure(f"{self.label} returned {bad:,} non-finite scores of {scores.numel():,}")
            total = scores if total is None else total + scores
            if progress is not None:
                progress(1.0)
        return total / len(used)

    @abstractmethod
    def library_scores(self, study: Study, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Scores [M, len(y)] of the training examples (x, y) (the train split, then relabelled copies) on one
        full-data `model`, in our convention."""


def library_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def module_at(study: Study, theta: Tensor) -> nn.Module:
    """A fresh `study.model()` in the recipe's dtype holding the flat parameters θ (its state_dict loaded)."""
    module = study.model().to(getattr(torch, study.recipe.dtype))
    module.load_state_dict(study.flat.state_dict(theta))
    return module.eval()


def peer_name(library: str, strategy: str) -> str:
    """`library:strategy`, or the library's name alone for a library with one unnamed strategy (`traker`)."""
    return f"{library}:{strategy}" if strategy else library


def is_peer(spec: str) -> bool:
    return spec.partition(":")[0] in LIBRARIES


def adapter(library: str) -> type[PeerMethod]:
    """The adapter class of `library` (its module imports the library itself only when scoring)."""
    return importlib.import_module(LIBRARIES[library]).ADAPTER


def installed(library: str) -> bool:
    return importlib.util.find_spec(adapter(library).module) is not None


def parse_peer(spec: str, study: Study) -> PeerMethod:
    """`kronfluence:ekfac`, `kronfluence:kfac:damping=1e-3,models=1` -> the configured method for `study`; InputError
    (exit 2) for an unknown strategy, a bad option, or a library that is not installed (saying how to install it)."""
    library, _, rest = spec.partition(":")
    cls = adapter(library)
    strategy, options = ("", rest) if cls.strategies == ("",) else split_spec(rest)
    if strategy not in cls.strategies:
        raise InputError(f"method {spec!r}: {library} has no strategy {strategy!r}; use one of "
                         f"{', '.join(peer_name(library, s) for s in cls.strategies)}")
    if not installed(library):
        raise InputError(f"method {spec!r}: {library} is not installed; install the peers with {INSTALL}")
    return cls(strategy, parse_options(cls.Options, options, peer_name(library, strategy), f"method {spec!r}"), study)


def peer_methods(only_installed: bool = False) -> list[str]:
    """Every peer method name (`kronfluence:ekfac`, ...), or those whose library is installed."""
    return [peer_name(lib, s) for lib in LIBRARIES if not only_installed or installed(lib)
            for s in adapter(lib).strategies]
