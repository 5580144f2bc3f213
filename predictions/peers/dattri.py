"""dattri (Deng et al. 2024) as a scoring method: `dattri:cg`, `:lissa`, `:arnoldi`, its inverse-Hessian influence
attributors, run in float32 (its LiSSA and Arnoldi draw float32 vectors and refuse a float64 model). Its TracIn is
left out: on ridge its TracInAttributor disagreed with its own per-example gradients' dot products by up to 10%.

dattri's score of a training example j for a target m is s_mj = ∇L_jᵀ T(∇m), with T the attributor's transform:
(H + rI)⁻¹ by CG, LiSSA or Arnoldi for the influence attributors, H the Hessian of the loss function it is given
(here the mean training loss, so H is the true Hessian of our mean loss, not Gauss-Newton). Removing z_j is
up-weighting it by −1/N, so our prediction is Δ̂_mj = s_mj / N, with r = wd + λ to damp as ours do (LiSSA: its
`damping`). The Hessian is taken over the whole training set in one batch (dattri sums per-batch inverse products
otherwise). Every measurement is a dattri target function (`target_func`): each target example is a unit vector
picking one measurement, and the target is that measurement of the model, so margins and log-odds are scored as
losses are."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from predictions.peers import PeerMethod, PeerOptions
from retrain.options import option
from retrain.study import Study


@dataclass(frozen=True)
class DattriOptions(PeerOptions):
    iterations: int = option("cg: max_iter; lissa: recursion_depth; arnoldi: max_iter (dattri's defaults: 10, "
                             "5000, 100)", 0, minimum=0, default_text="dattri's")
    rank: int = option("arnoldi: proj_dim, the eigenpairs kept", 100, minimum=1)
    scaling: float = option("lissa: its scaling (the Hessian is divided by it)", 50.0, minimum=0)
    batch_size: int = option("training examples per batch of per-example gradients", 256, minimum=1)


class Dattri(PeerMethod):
    """dattri's influence attributors on the full-data models (true Hessian, damping wd + λ, float32, s/N)."""

    library, distribution, module = "dattri", "dattri", "dattri"
    strategies = ("cg", "lissa", "arnoldi")
    Options = DattriOptions

    def _attributor(self, task, study: Study):  # noqa: ANN001 (dattri's AttributionTask, imported lazily)
        from dattri.algorithm.influence_function import IFAttributorArnoldi, IFAttributorCG, IFAttributorLiSSA
        o, damping = self.options, study.recipe.weight_decay + self.options.damping
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

        def loss(params: dict[str, Tensor], data: tuple[Tensor, Tensor]) -> Tensor:
            """The mean training loss of a batch, or one example's loss (dattri calls it both ways)."""
            inputs, targets = data[0], data[1].to(train_y.dtype)  # its LiSSA hands labels over as floats
            if inputs.dim() == example_dims:
                inputs, targets = inputs[None], targets[None]
            return study.loss(functional_call(model, params, (inputs,)), targets).mean().float()

        def target(params: dict[str, Tensor], data: tuple[Tensor]) -> Tensor:
            """Measurement gradient_ids[k] of the model, the target example the k-th unit vector (vmap-able)."""
            values = study.measurement_vector(lambda inputs: functional_call(model, params, (inputs.float(),)))
            return (data[0] @ values[gradient_ids].float()).sum()  # the unit vector comes with or without a batch dim

        state = {k: v.detach() for k, v in model.state_dict().items()}
        task = AttributionTask(loss_func=loss, model=model, checkpoints=state, target_func=target)
        attributor = self._attributor(task, study)
        full = DataLoader(TensorDataset(train_x, train_y), batch_size=study.n_train)  # one batch: the mean Hessian
        train = DataLoader(TensorDataset(x, y), batch_size=self.options.batch_size)
        units = torch.eye(len(gradient_ids))
        targets = DataLoader(TensorDataset(units), batch_size=len(gradient_ids))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            attributor.cache(full)
            attributed = attributor.attribute(train, targets)  # [len(y), targets]
        scores = torch.zeros(len(study.measurement_ids), len(y), dtype=torch.float64)
        scores[gradient_ids] = attributed.T.detach().to(torch.float64) / study.n_train
        return scores


ADAPTER = Dattri
