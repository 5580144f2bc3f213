"""traker (`trak`, Park et al. 2023) as a scoring method, `traker`: its TRAKer on the study's full-data models, on the
CPU with its BasicProjector (a Gaussian projection; the fast_jl CUDA kernel is not needed), in float32 (its float16
default is switched off).

TRAK scores a training example j for a target as s = φ_targetᵀ(ΦᵀΦ + λI)⁻¹φ_j Q_j, on random projections of the
gradients: φ_j = ∇f_j of the model output function and Q_j its out-to-loss weight (`trak_output`: the margin and
−(1 − p_y) for class logits, the output and ∂L/∂f for a scalar one, so that Q_j φ_j = ∇L_j), and the target's φ the
gradient of our measurement (the adapter's output function returns the measurement while targets are scored).
ΦᵀΦ = N·Ĝ, so s = (1/N)∇mᵀĜ⁻¹∇L_j is already our Δ̂. traker divides every gradient by √P and its projection is
unnormalised; λ = (wd + λ_ours)·N·max(k, P)/P makes its damping ours for k projected dimensions (exactly so for
k ≥ P). Its score computer divides (ΦᵀΦ + λI)⁻¹ by the mean of its absolute entries before scoring (numerics for
float16); the adapter multiplies that factor back, from the same stored projected gradients. It scores against the
full training set's kernel, so it predicts no relabel sets."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from predictions.peers import PeerMethod, PeerOptions, trak_output, trak_output_kind
from retrain.options import option
from retrain.study import Study


@dataclass(frozen=True)
class TrakerOptions(PeerOptions):
    projection: int = option("dimension of the random projection of the gradients (traker's proj_dim)", 2048,
                             minimum=1)
    seed: int = option("seed of the random projection", 0)
    batch_size: int = option("examples per batch of per-example gradients", 256, minimum=1)


class Traker(PeerMethod):
    """traker's TRAKer on one full-data model at a time (float32, CPU projector, damping wd + λ)."""

    library, distribution, module = "traker", "traker", "trak"
    strategies = ("",)  # one method, named `traker`
    relabels = False
    Options = TrakerOptions

    def library_scores(self, study: Study, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        from trak import TRAKer
        from trak.modelout_functions import AbstractModelOutput
        from trak.projectors import BasicProjector, ProjectionType

        o = self.options
        self.config["dtype"] = "float32"
        model = model.float()
        x, y = (t.float() if t.is_floating_point() else t for t in (x, y))
        kind = trak_output_kind(study, model)
        gradient_ids = torch.tensor([i for i, d in enumerate(study.differentiable) if d])

        class StudyOutput(AbstractModelOutput):
            """f_j of a training example, or, while `measuring`, the measurement a unit vector picks."""

            def __init__(self) -> None:
                super().__init__()
                self.measuring = False

            def get_output(self, model: nn.Module, weights, buffers, *batch: Tensor) -> Tensor:  # noqa: ANN001
                def forward(inputs: Tensor) -> Tensor:
                    return functional_call(model, (weights, buffers), (inputs.float(),))

                if self.measuring:
                    return batch[0] @ study.measurement_vector(forward)[gradient_ids].float()
                inputs, targets = batch
                return trak_output(study, kind, forward(inputs[None]), targets[None])[0].sum()

            def get_out_to_loss_grad(self, model: nn.Module, weights, buffers, batch) -> Tensor:  # noqa: ANN001
                inputs, targets = batch
                outputs = functional_call(model, (weights, buffers), (inputs,))
                return trak_output(study, kind, outputs, targets)[1].detach()[:, None]

        n_params = sum(p.numel() for p in model.parameters())
        damping = (study.recipe.weight_decay + o.damping) * study.n_train * max(o.projection, n_params) / n_params
        output = StudyOutput()
        with tempfile.TemporaryDirectory(prefix="ifledger-traker-") as folder:  # fresh: its saver needs True below
            projector = BasicProjector(grad_dim=n_params, proj_dim=o.projection, seed=o.seed,
                                       proj_type=ProjectionType.normal, device="cpu", dtype=torch.float32)
            projector.free_memory = lambda: None  # it frees a one-block matrix before scoring, then cannot rebuild it
            traker = TRAKer(model=model, task=output, train_set_size=len(y), save_dir=folder,
                            load_from_save_dir=True, device="cpu", projector=projector, use_half_precision=False,
                            lambda_reg=damping, logging_level=logging.ERROR)
            traker.load_checkpoint(model.state_dict(), model_id=0)
            for start in range(0, len(y), o.batch_size):
                batch = (x[start : start + o.batch_size], y[start : start + o.batch_size])
                traker.featurize(batch=batch, num_samples=len(batch[0]))
            traker.finalize_features()
            grads = torch.as_tensor(traker.saver.current_store["grads"]).float()
            kernel = grads.T @ grads + damping * torch.eye(grads.shape[1])
            centring = torch.linalg.inv(kernel).abs().mean()  # what its score computer divided the inverse by
            output.measuring = True
            units = torch.eye(len(gradient_ids))
            traker.start_scoring_checkpoint("measurements", model.state_dict(), model_id=0,
                                            num_targets=len(units))
            traker.score(batch=(units,), num_samples=len(units))
            scores = torch.as_tensor(traker.finalize_scores("measurements")).to(torch.float64)  # [len(y), targets]
        result = torch.zeros(len(study.measurement_ids), len(y), dtype=torch.float64)
        result[gradient_ids] = scores.T * float(centring)
        return result


ADAPTER = Traker
