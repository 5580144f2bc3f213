"""`ekfac`: eigenvalue-corrected Kronecker-factored Gauss-Newton (George et al. 2018; Grosse et al. 2023).

For each `nn.Linear` and transformers' `Conv1D` (weight stored [in, out], used transposed) the layer's block of
G is approximated in the eigenbasis of two Kronecker factors,

    A = Σ_{i,t} a_it a_itᵀ  (layer inputs, a 1 appended for the bias),   S = Σ_{i,t,c} g_itc g_itcᵀ,

g_itc = ∂(f_i · l_ic)/∂(layer output at position t), where the columns l_ic of L_i, L_i L_iᵀ = ∇²_f L(f_i, y_i),
make the output-space Gauss-Newton factor exact (`samples=0`: every column of L_i), or exact in expectation
(`samples=k`: k Gaussian combinations L_i z / √k, fewer backward passes for outputs as wide as a language model's
[T, V] logits). Either way L_i comes from an eigendecomposition of the full per-example output Hessian [C, C]
(`output_hessians`), so `samples` saves backward passes, not the C×C Hessians. With
A = Q_A diag·Q_Aᵀ and S = Q_S diag·Q_Sᵀ, the eigenvalues are then corrected to the diagonal of G in that basis,

    Λ = (1/N) Σ_{i,c} (Q_Sᵀ DW_ic Q_A)²,   DW_ic = the layer block of J_iᵀ l_ic  ([out, in+1]),

and (G + sI)⁻¹ V is applied layer by layer as Q_S [(Q_Sᵀ V Q_A) / (Λ + s)] Q_Aᵀ, s = wd + λ. Cross-layer blocks
are dropped. Parameters outside a supported layer (embeddings, layer norms) get the diagonal of G estimated from
the same pseudo-gradients, (1/N) Σ_{i,c} (J_iᵀ l_ic)², plus s: no cross-parameter curvature there.

With a scope, the layers whose parameters all lie in it keep their Kronecker blocks and the scope's other
parameters their diagonal: the approximation is block-diagonal, so this is its block on the scope."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap
from transformers.pytorch_utils import Conv1D

from predictions.influence import Operator, Progress, rows_within_budget
from retrain.curvature import embed, output_hessians
from retrain.study import Study


@dataclass
class _Layer:
    """A supported layer's place in θ; `transposed` for Conv1D, whose weight is stored [in, out]."""

    module: nn.Module
    weight: slice
    bias: slice | None
    shape: tuple[int, int]  # (out, in) of the weight as a matrix
    transposed: bool

    def block(self, v: Tensor) -> Tensor:
        """[..., P] -> [..., out, in (+1 for the bias)]."""
        out, inp = self.shape
        w = v[..., self.weight]
        w = w.unflatten(-1, (inp, out)).transpose(-1, -2) if self.transposed else w.unflatten(-1, (out, inp))
        return w if self.bias is None else torch.cat([w, v[..., self.bias, None]], -1)

    def unblock(self, block: Tensor, into: Tensor) -> None:
        """Write block [..., out, in (+1)] back into `into` [..., P] (the inverse of `block`)."""
        out, inp = self.shape
        w = block[..., :inp]
        into[..., self.weight] = (w.transpose(-1, -2) if self.transposed else w).flatten(-2)
        if self.bias is not None:
            into[..., self.bias] = block[..., inp]


def supported_layers(study: Study) -> list[_Layer]:
    """The study's `nn.Linear` and `Conv1D` layers, with the slices of θ that hold their parameters."""
    flat = study.flat
    offsets = dict(zip(flat.names, torch.tensor([0, *flat.sizes]).cumsum(0).tolist()))
    where = lambda name: slice(offsets[name], offsets[name] + flat.sizes[flat.names.index(name)])  # noqa: E731
    layers = []
    for name, module in flat.module.named_modules():
        if isinstance(module, nn.Linear | Conv1D):
            prefix = f"{name}." if name else ""
            bias = where(prefix + "bias") if getattr(module, "bias", None) is not None else None
            rows, columns = module.weight.shape
            transposed = isinstance(module, Conv1D)
            shape = (columns, rows) if transposed else (rows, columns)
            layers.append(_Layer(module, where(prefix + "weight"), bias, shape, transposed))
    return layers


def at_least_float32(t: Tensor) -> torch.dtype:
    """`t`'s dtype, or float32 where that is narrower: torch has no bfloat16 eigendecomposition."""
    return torch.promote_types(t.dtype, torch.float32)


def output_factors(study: Study, outputs: Tensor, targets: Tensor, samples: int, generator: torch.Generator
                   ) -> Tensor:
    """L_i [b, C, R] with E[L_i L_iᵀ] = ∇²_f L(f_i, y_i): all C scaled eigenvectors (`samples=0`, exact) or
    `samples` Gaussian combinations of them, each / √samples."""
    hessians = output_hessians(study, outputs.detach(), targets)
    values, vectors = (t.to(hessians.dtype) for t in torch.linalg.eigh(hessians.to(at_least_float32(hessians))))
    factor = vectors * values.clamp(min=0).sqrt()[:, None, :]
    if samples == 0:
        return factor
    z = torch.randn(factor.shape[0], factor.shape[2], samples, dtype=factor.dtype, generator=generator)
    z = z.to(factor.device)  # drawn on the CPU: the same draws on any device
    return factor @ z / math.sqrt(samples)


def _kronecker_factors(study: Study, theta: Tensor, layers: list[_Layer], x: Tensor, y: Tensor, samples: int,
                       generator: torch.Generator) -> list[tuple[Tensor, Tensor]]:
    """Σ a aᵀ and Σ g gᵀ of every layer over the examples (x, y), from module hooks under plain autograd."""
    if not layers:
        return []
    captured: dict[int, tuple[Tensor, Tensor]] = {}
    hook = lambda k: lambda module, inputs, output: captured.__setitem__(k, (inputs[0].detach(), output))  # noqa: E731
    handles = [layer.module.register_forward_hook(hook(k)) for k, layer in enumerate(layers)]
    try:
        with torch.enable_grad():
            outputs = study.flat(theta.detach().requires_grad_(), x)
            factors = output_factors(study, outputs, y, samples, generator)  # [b, C, R]
            layer_outputs = [captured[k][1] for k in range(len(layers))]
            flat_outputs = outputs.reshape(len(x), -1)
            columns = [torch.autograd.grad((flat_outputs * factors[:, :, c]).sum(), layer_outputs,
                                           retain_graph=True) for c in range(factors.shape[2])]
    finally:
        for handle in handles:
            handle.remove()
    result = []
    for k, layer in enumerate(layers):
        a = captured[k][0].reshape(-1, layer.shape[1])
        if layer.bias is not None:
            a = torch.cat([a, a.new_ones(len(a), 1)], 1)
        g = torch.cat([column[k].reshape(-1, layer.shape[0]) for column in columns])
        result.append((a.T @ a, g.T @ g))
    return result


def _pseudo_gradients(study: Study, theta: Tensor, x: Tensor, factors: Tensor) -> Tensor:
    """J_iᵀ l_ic for every example and factor column, [b, R, P]."""
    model = study.flat

    def one(xi: Tensor, li: Tensor) -> Tensor:
        _, pull_back = vjp(lambda th: model(th, xi[None])[0].reshape(-1), theta)
        return vmap(lambda column: pull_back(column)[0], in_dims=1)(li)

    return vmap(one)(x, factors)


def eigenvectors(symmetric: Tensor) -> Tensor:
    """The eigenvectors of a symmetric matrix, taken in float32 at least, returned in its dtype."""
    return torch.linalg.eigh(symmetric.to(at_least_float32(symmetric)))[1].to(symmetric.dtype)


def ekfac_inverse(study: Study, theta: Tensor, damping: float, samples: int = 0, seed: int = 0, chunk: int = 128,
                  scope: Tensor | None = None, progress: Progress | None = None) -> Operator:
    """V [P, K] ↦ (G_ekfac + sI)⁻¹ V (module docstring), s = wd + λ; `samples` and `seed` choose the output
    factor (0 = exact), `chunk` examples are processed at a time (fewer when their pseudo-gradients [chunk, R, P]
    would pass `GRADIENT_BUDGET` entries, R = `samples` or the outputs per example). With `scope` (indices into θ):
    V [|S|, K] ↦ the same on the scope's block, from the layers that lie wholly in the scope. Each chunk of each of
    the two passes over the examples is reported to `progress` as its share."""
    shift = study.recipe.weight_decay + damping
    x, y = study.tensors("train")
    with torch.no_grad():
        width = samples or study.flat(theta, x[:1]).numel()
    chunk = rows_within_budget(width * theta.numel(), chunk)  # both passes alike: the same output-factor draws
    layers = supported_layers(study)
    if scope is not None:
        inside = torch.zeros(theta.numel(), dtype=torch.bool).index_fill_(0, scope, True)
        layers = [layer for layer in layers if all(inside[part].all() for part in (layer.weight, layer.bias) if part)]
    generator = torch.Generator().manual_seed(seed)
    sums = [(0.0, 0.0)] * len(layers)
    for s in range(0, len(y), chunk):
        part = _kronecker_factors(study, theta, layers, x[s : s + chunk], y[s : s + chunk], samples, generator)
        sums = [(a + pa, g + pg) for (a, g), (pa, pg) in zip(sums, part)]
        if progress is not None:
            progress(min(chunk, len(y) - s) / (2 * len(y)))
    bases = [(eigenvectors(a), eigenvectors(g)) for a, g in sums]  # (Q_A, Q_S) per layer
    corrected = [theta.new_zeros(layer.shape[0], layer.shape[1] + (layer.bias is not None)) for layer in layers]
    diagonal = torch.zeros_like(theta)
    generator = torch.Generator().manual_seed(seed)  # the same output-factor draws as the factor pass
    for s in range(0, len(y), chunk):
        xs, ys = x[s : s + chunk], y[s : s + chunk]
        with torch.no_grad():
            factors = output_factors(study, study.flat(theta, xs), ys, samples, generator)
        pseudo = _pseudo_gradients(study, theta, xs, factors)  # [b, R, P]
        diagonal += (pseudo**2).sum((0, 1))
        for k, (layer, (q_a, q_s)) in enumerate(zip(layers, bases)):
            corrected[k] += ((q_s.T @ layer.block(pseudo) @ q_a) ** 2).sum((0, 1))
        if progress is not None:
            progress(len(ys) / (2 * len(y)))
    diagonal /= len(y)

    def solve(v: Tensor) -> Tensor:
        columns = embed(v, scope, theta.numel()).T  # [K, P]
        solved = columns / (diagonal + shift)  # parameters outside a supported layer; layers overwritten below
        for layer, (q_a, q_s), eigenvalues in zip(layers, bases, corrected):
            rotated = q_s.T @ layer.block(columns) @ q_a
            layer.unblock(q_s @ (rotated / (eigenvalues / len(y) + shift)) @ q_a.T, solved)
        return solved.T if scope is None else solved.T[scope]

    return solve
