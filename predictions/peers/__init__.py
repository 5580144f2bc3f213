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

INSTALL = "make peers (pip install --no-deps kronfluence dattri and their pure-Python dependencies; see README)"
LIBRARIES = {"kronfluence": "predictions.peers.kronfluence", "dattri": "predictions.peers.dattri"}


class PeerFailure(RuntimeError):
    """A peer library ran and failed: its reason is recorded instead of predictions."""


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
        self.name = f"{self.library}:{strategy}"  # type: ignore[misc]  (one class serves every strategy)
        super().__init__(options, study)
        self.label = label(self.name, self.options, self._for_study(self.Options(), study))
        self.config = {**self.config, "library": self.library, "version": library_version(self.distribution),
                       "strategy": strategy}

    def scores(self, study: Study, thetas: Tensor, sets: Sequence[RemovalSetRecord] = (),
               progress: Progress | None = None) -> Tensor:
        """Scores [M, N + R] in our convention (see `Method.scores`), averaged over the first `models` full-data
        models; a library error or a non-finite score raises `PeerFailure`."""
        relabelled = relabelled_points(sets)
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
    strategy, options = split_spec(rest)
    cls = adapter(library)
    if strategy not in cls.strategies:
        raise InputError(f"method {spec!r}: {library} has no strategy {strategy!r}; use one of "
                         f"{', '.join(f'{library}:{s}' for s in cls.strategies)}")
    if not installed(library):
        raise InputError(f"method {spec!r}: {library} is not installed; install the peers with {INSTALL}")
    return cls(strategy, parse_options(cls.Options, options, f"{library}:{strategy}", f"method {spec!r}"), study)


def peer_methods(only_installed: bool = False) -> list[str]:
    """Every peer method name (`kronfluence:ekfac`, ...), or those whose library is installed."""
    return [f"{lib}:{s}" for lib in LIBRARIES if not only_installed or installed(lib) for s in adapter(lib).strategies]
