"""dattri (Deng et al. 2024) as a scoring method: `dattri:cg`, `:lissa`, `:arnoldi`, its inverse-Hessian influence
attributors, and `:tracin`, `:trak`, run in float32 (its LiSSA and Arnoldi draw float32 vectors and refuse a float64
model).

dattri's score of a training example j for a target m is s_mj = ∇L_jᵀ T(∇m), with T the attributor's transform:
(H + rI)⁻¹ by CG, LiSSA or Arnoldi for the influence attributors, H the Hessian of the loss function it is given
(here the mean training loss, so H is the true Hessian of our mean loss, not Gauss-Newton). Removing z_j is
up-weighting it by −1/N, so our prediction is Δ̂_mj = s_mj / N, with r = wd + λ to damp as ours do (LiSSA: its
`damping`). The Hessian is taken over the whole training set in one batch (dattri sums per-batch inverse products
otherwise). Every measurement is a dattri target function (`target_func`): each target example is a unit vector
picking one measurement, and the target is that measurement of the model, so margins and log-odds are scored as
losses are.

Its Arnoldi (0.3.0) keeps the `rank` eigenpairs of largest |eigenvalue| of that Hessian and scales by 1/√eigenvalue;
at a trained network the Hessian is indefinite, so a kept negative eigenvalue (its warning lowers `proj_dim` but keeps
the pairs) turns every score into NaN: recorded as its failure, never as numbers.

`tracin` is its TracInAttributor at the one checkpoint it is given, the full-data model, with weight 1:
s_mj = ∇L_jᵀ∇m, so Δ̂ = s/N is our `grad_dot`. dattri projects both gradients to `proj_dim` = 512 random
dimensions by default, even when there are fewer parameters (ridge has 11): its dot products are then a
Johnson-Lindenstrauss estimate, which is why they differed from the exact ones by up to 10% on ridge. `projection=0`
takes the exact dot products (the projector is switched off); the default keeps dattri's 512.

`trak` is its TRAKAttributor: s_mj = ∇mᵀ(ΦᵀΦ + rI)⁻¹φ_j Q_j on random projections (`projection` dimensions) of
the gradients, φ_j = ∇f_j of the model output function (`trak_output`: the margin for class logits, the output
for a scalar one) and Q_j = ∂L_j/∂f_j (passed as 1 − its `correct_probability_func`), so ∇L_j = Q_j φ_j and
ΦᵀΦ = N·Ĝ: s = (1/N)∇mᵀĜ⁻¹∇L_j is already our Δ̂, with Ĝ the Gauss-Newton matrix of f (TRAK drops the loss's
curvature in f). dattri divides every gradient by √P and its projection by √k; r = (wd + λ)·N/min(k, P) makes
the damping ours for a Gaussian projection of k dimensions (exactly so for k ≥ P). It cannot score relabelled copies
against the full-data kernel, so it predicts no relabel sets."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from predictions.peers import PeerMethod, PeerOptions, trak_output, trak_output_kind
from retrain.options import option
from retrain.study import Study
from store.records import InputError


@dataclass(frozen=True)
class DattriOptions(PeerOptions):
    iterations: int = option("cg: max_iter; lissa: recursion_depth; arnoldi: max_iter (dattri's defaults: 10, "
                             "5000, 100)", 0, minimum=0, default_text="dattri's")
    rank: int = option("arnoldi: proj_dim, the eigenpairs kept", 100, minimum=1)
    scaling: float = option("lissa: its scaling (the Hessian is divided by it)", 50.0, minimum=0)
    batch_size: int = option("training examples per batch of per-example gradients", 256, minimum=1)
    projection: int = option("tracin, trak: random projection dimension of the gradients (dattri's proj_dim); "
                             "tracin: 0 takes their exact dot products", 512, minimum=0)
    seed: int = option("tracin, trak: seed of the random projection", 0)


class Dattri(PeerMethod):
    """dattri's influence attributors on the full-data models (true Hessian, damping wd + λ, float32, s/N)."""

    library, distribution, module = "dattri", "dattri", "dattri"
    strategies = ("cg", "lissa", "arnoldi", "tracin", "trak")
    Options = DattriOptions

    def __init__(self, strategy: str, options: DattriOptions, study: Study):
        super().__init__(strategy, options, study)
        self.relabels = strategy != "trak"  # type: ignore[misc]  (its kernel is the full training set's)
        if strategy == "trak" and not options.projection:
            raise InputError(f"method {self.label!r}: dattri's TRAK always projects; give projection=K with K >= 1")

    def _attributor(self, task, study: Study, correct_probability):  # noqa: ANN001 (dattri's task, lazily)
        from dattri.algorithm.influence_function import IFAttributorArnoldi, IFAttributorCG, IFAttributorLiSSA
        from dattri.algorithm.tracin import TracInAttributor
        from dattri.algorithm.trak import TRAKAttributor

        o, damping = self.options, study.recipe.weight_decay + self.options.damping
        projector = {"proj_dim": o.projection, "proj_max_batch_size": 32, "proj_seed": o.seed, "device": "cpu"}
        if self.strategy == "tracin":
            attributor = TracInAttributor(task, weight_list=torch.ones(1), normalized_grad=False,
                                          projector_kwargs=projector)
            if not o.projection:
                attributor.projector_kwargs = None  # its attribute() then takes the gradients unprojected
            return attributor
        if self.strategy == "trak":
            n_params = sum(p.numel() for p in task.get_model().parameters())
            return TRAKAttributor(task, correct_probability_func=correct_probability, projector_kwargs=projector,
                                  regularization=damping * study.n_train / min(o.projection, n_params))
        steps = "recursion_depth" if self.strategy == "lissa" else "max_iter"
        depth = {steps: o.iterations} if o.iterations else {}
        if self.strategy == "cg":
            return IFAttributorCG(task, regularization=damping, **depth)
        if self.strategy == "lissa":
            return IFAttributorLiSSA(task, damping=damping, scaling=o.scaling, **depth)
        return IFAttributorArnoldi(task, regularization=damping, proj_dim=o.rank, **depth)

    def library_scores(self, study: Study, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        from dattri.task import AttributionTask

        self.config["dtype"] = "float32"
        model = model.float()  # dattri draws its random vectors in float32 (LiSSA, Arnoldi refuse float64 models)
        train_x, train_y, x, y = (t.float() if t.is_floating_point() else t for t in (*study.tensors("train"), x, y))
        gradient_ids = torch.tensor([i for i, d in enumerate(study.differentiable) if d])
        example_dims = train_x.dim() - 1

        kind = trak_output_kind(study, model) if self.strategy == "trak" else None

        def batch(data: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            inputs, targets = data[0], data[1].to(train_y.dtype)  # its LiSSA hands labels over as floats
            return (inputs[None], targets[None]) if inputs.dim() == example_dims else (inputs, targets)

        def loss(params: dict[str, Tensor], data: tuple[Tensor, Tensor]) -> Tensor:
            """The mean training loss of a batch, or one example's loss (dattri calls it both ways); for TRAK the
            model output function f instead."""
            inputs, targets = batch(data)
            outputs = functional_call(model, params, (inputs,))
            if kind is not None:
                return trak_output(study, kind, outputs, targets)[0].sum().float()
            return study.loss(outputs, targets).mean().float()

        def correct_probability(params: dict[str, Tensor], data: tuple[Tensor, Tensor]) -> Tensor:
            """1 − Q of one example, Q = ∂L/∂f: dattri's TRAK weighs each training example by 1 − this."""
            inputs, targets = batch(data)
            return 1 - trak_output(study, kind, functional_call(model, params, (inputs,)), targets)[1].sum()

        def target(params: dict[str, Tensor], data: tuple[Tensor]) -> Tensor:
            """Measurement gradient_ids[k] of the model, the target example the k-th unit vector (vmap-able)."""
            values = study.measurement_vector(lambda inputs: functional_call(model, params, (inputs.float(),)))
            return (data[0] @ values[gradient_ids].float()).sum()  # the unit vector comes with or without a batch dim

        state = {k: v.detach() for k, v in model.state_dict().items()}
        task = AttributionTask(loss_func=loss, model=model, checkpoints=state, target_func=target)
        attributor = self._attributor(task, study, correct_probability)
        full = DataLoader(TensorDataset(train_x, train_y), batch_size=study.n_train)  # one batch: the mean Hessian
        train = DataLoader(TensorDataset(x, y), batch_size=self.options.batch_size)
        units = torch.eye(len(gradient_ids))
        targets = DataLoader(TensorDataset(units), batch_size=len(gradient_ids))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.strategy == "trak":  # its scores of the cached training set, against that set's kernel
                attributor.cache(full)
                attributed = attributor.attribute(targets)  # [len(y), targets]: s, already Δ̂ (see above)
            else:
                if self.strategy != "tracin":
                    attributor.cache(full)
                attributed = attributor.attribute(train, targets) / study.n_train  # [len(y), targets]
        scores = torch.zeros(len(study.measurement_ids), len(y), dtype=torch.float64)
        scores[gradient_ids] = attributed.T.detach().to(torch.float64)
        return scores


ADAPTER = Dattri
