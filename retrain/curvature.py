"""Curvature of the training objective at a trained model, shared by estimators and the PBRF solver."""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.func import grad, jacrev, jvp, vmap

from retrain.study import Study, tensor_bytes
from store.records import InputError

EXPLICIT_MAX_PARAMS = 20_000  # above this, P×P matrices are not formed


def scope_mask(study: Study, pattern: str) -> Tensor:
    """The parameters a scope lets move, as a mask over the flat θ [P]: the pieces of every parameter whose
    `named_parameters` name `pattern` matches (`re.search`; the empty pattern matches every name). A parameter
    shared by several modules (tied weights) is named once, by its first name. Refuses (InputError) a pattern that
    is not a regular expression or matches no name, in one line that lists the names."""
    flat = study.flat
    try:
        regex = re.compile(pattern)
    except re.error as error:
        raise InputError(f"scope={pattern}: not a regular expression ({error})") from None
    chosen = [regex.search(name) is not None for name in flat.names]
    if not any(chosen):
        raise InputError(f"scope={pattern} matches none of {study.name}'s parameters; give a regular expression "
                         f"searched in their names: {', '.join(flat.names)}")
    return torch.cat([torch.full((size,), keep) for keep, size in zip(chosen, flat.sizes)])


def embed(vectors: Tensor, scope: Tensor | None, size: int) -> Tensor:
    """V [|S|, K] on the scope's coordinates (indices into θ; None: all) as [size, K], zero outside the scope."""
    if scope is None:
        return vectors
    return vectors.new_zeros(size, *vectors.shape[1:]).index_copy_(0, scope.to(vectors.device), vectors)


def gauss_newton(study: Study, theta: Tensor, chunk: int = 256) -> Tensor:
    """G = (1/N) Σ_i J_iᵀ ∇²_f L(f_i, y_i) J_i, J_i = ∂f(x_i)/∂θ, [P, P] (PSD for losses convex in f): from the
    Kronecker structure of a module made of Linear layers (`linear_gauss_newton`), else from the per-example
    Jacobians (`jacobian_gauss_newton`). The two agree to rounding."""
    if theta.numel() > EXPLICIT_MAX_PARAMS:
        raise ValueError(f"{theta.numel()} parameters is too many for an explicit P×P curvature")
    structured = linear_gauss_newton(study, theta)
    return jacobian_gauss_newton(study, theta, chunk) if structured is None else structured


def jacobian_gauss_newton(study: Study, theta: Tensor, chunk: int = 256) -> Tensor:
    """G from each chunk's per-example Jacobians J [b, C, P]: Σ_i J_iᵀ H_i J_i, N·C·P² multiply-adds."""
    x, y = study.tensors("train")
    out = lambda th, xi: study.flat(th, xi[None])[0].reshape(-1)  # noqa: E731
    g = theta.new_zeros(theta.numel(), theta.numel())
    for s in range(0, len(y), chunk):
        xc, yc = x[s : s + chunk], y[s : s + chunk]
        jac = vmap(jacrev(out), (None, 0))(theta, xc)  # [b, C, P]
        h_out = output_hessians(study, study.flat(theta, xc), yc)  # [b, C, C]
        g += torch.einsum("bcp,bcd,bdq->pq", jac, h_out, jac)
    return g / len(y)


KRONECKER_BUDGET = 2**24  # entries of the per-example outer products a chunk of `linear_gauss_newton` holds


def linear_gauss_newton(study: Study, theta: Tensor) -> Tensor | None:
    """G from the Kronecker structure of Linear layers, or None unless every parameter of the module is the weight
    or bias of an `nn.Linear` called once per forward on [b, in] inputs, no other module holds parameters or
    buffers (no batch norm: examples must not interact), and the structure gives autograd's gradient of a random
    weighting of the outputs (a weight also used outside its layer's call would not). For a layer s = W a + b,
    ∂f_n/∂W[o, k] = B_n[:, o] ã_n[k] with B_n = ∂f_n/∂s_n [C, out] and ã_n = (a_n, 1) (the 1 for the bias), so
    the block of layers i, j is G_ij[(o,k), (p,q)] = (1/N) Σ_n (B_inᵀ H_n B_jn)[o, p] · ã_in[k] ã_jn[q]: one GEMM
    over the examples, N·P_i·P_j multiply-adds against the Jacobians' N·C·P_i·P_j."""
    module = study.flat.module
    layers = [m for m in module.modules() if isinstance(m, nn.Linear)]
    shared = len(list(module.parameters())) != len(list(module.named_parameters(remove_duplicate=False)))
    owned = {id(p) for m in layers for p in m.parameters(recurse=False)}
    if (not layers or shared or any(id(p) not in owned for p in module.parameters())
            or any(list(m.parameters(recurse=False)) or list(m.buffers(recurse=False))
                   for m in module.modules() if not isinstance(m, nn.Linear))):
        return None
    start = dict(zip((id(p) for p in module.parameters()),
                     torch.tensor([0, *study.flat.sizes[:-1]]).cumsum(0).tolist()))

    def indices(layer: nn.Linear) -> Tensor:
        """[out · (in (+1))]: where W[o, k] (and b[o], as k = in) sit in θ."""
        out, fan_in = layer.weight.shape
        weight = start[id(layer.weight)] + torch.arange(out * fan_in).reshape(out, fan_in)
        if layer.bias is not None:
            weight = torch.cat([weight, (start[id(layer.bias)] + torch.arange(out))[:, None]], 1)
        return weight.reshape(-1).to(theta.device)

    where = [indices(layer) for layer in layers]
    widths = [layer.in_features + (layer.bias is not None) for layer in layers]
    pairs = [(i, j) for i in range(len(layers)) for j in range(i, len(layers))]
    largest = max(widths[i] * widths[j] + layers[i].out_features * layers[j].out_features for i, j in pairs)
    x, y = study.tensors("train")
    rows = max(1, min(len(y), KRONECKER_BUDGET // largest))
    g = theta.new_zeros(theta.numel(), theta.numel())
    for s in range(0, len(y), rows):
        captured = _linear_factors(study, theta, layers, where, x[s : s + rows])
        if captured is None:
            return None
        inputs, jacobians, outputs = captured  # ã_i [b, in (+1)], B_i [b, C, out], f [b, C]
        h_out = output_hessians(study, outputs, y[s : s + rows])
        for i, j in pairs:
            inner = torch.einsum("bco,bcd,bdp->bop", jacobians[i], h_out, jacobians[j]).flatten(1)  # [b, o·p]
            outer = torch.einsum("bk,bq->bkq", inputs[i], inputs[j]).flatten(1)  # [b, k·q]
            block = (inner.T @ outer).reshape(layers[i].out_features, layers[j].out_features, widths[i], widths[j])
            block = block.permute(0, 2, 1, 3).reshape(len(where[i]), len(where[j]))
            g[where[i][:, None], where[j][None, :]] += block
            if i != j:
                g[where[j][:, None], where[i][None, :]] += block.T
    return g / len(y)


def _linear_factors(study: Study, theta: Tensor, layers: list[nn.Linear], where: list[Tensor], x: Tensor
                    ) -> tuple[list[Tensor], list[Tensor], Tensor] | None:
    """For a chunk x: each layer's input, with a column of ones when it has a bias, ã [b, in (+1)]; the Jacobian of
    the flattened outputs in the layer's output, B [b, C, out] (the output is shifted by a zero leaf, whose
    gradient it is); and the outputs f [b, C]. None if a layer ran other than once on a [b, in] input, or if
    Σ_n ∂(rᵀf_n)/∂θ rebuilt from ã and B (`where`: each layer's θ indices) is not autograd's for a random r."""
    inputs: dict[nn.Linear, list[Tensor]] = {layer: [] for layer in layers}
    shifts: dict[nn.Linear, Tensor] = {}

    def hook(layer: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        inputs[layer].append(args[0].detach())
        shifts[layer] = output.new_zeros(output.shape).requires_grad_()
        return output + shifts[layer]

    handles = [layer.register_forward_hook(hook) for layer in layers]
    leaf = theta.detach().requires_grad_()
    try:
        with torch.enable_grad():
            outputs = study.flat(leaf, x).reshape(len(x), -1)
    finally:
        for handle in handles:
            handle.remove()
    if any(len(a) != 1 or a[0].shape != (len(x), layer.in_features) for layer, a in inputs.items()):
        return None
    c = outputs.shape[1]
    grads = torch.autograd.grad(outputs, [shifts[layer] for layer in layers], output_basis(outputs),
                                is_grads_batched=True, retain_graph=True, allow_unused=True)
    jacobians = [(outputs.new_zeros(c, len(x), layer.out_features) if g is None else g).transpose(0, 1)
                 for g, layer in zip(grads, layers)]  # [C, b, out] -> [b, C, out]
    augmented = [torch.cat([a[0], a[0].new_ones(len(x), 1)], 1) if layer.bias is not None else a[0]
                 for layer, a in inputs.items()]
    weighting = torch.randn(outputs.shape, dtype=outputs.dtype, device=outputs.device,
                            generator=torch.Generator(outputs.device).manual_seed(0))
    expected = torch.autograd.grad(outputs, leaf, weighting, allow_unused=True)[0]
    rebuilt = torch.zeros_like(leaf)
    for layer_inputs, jacobian, indices in zip(augmented, jacobians, where):
        rebuilt[indices] = torch.einsum("bc,bco,bk->ok", weighting, jacobian, layer_inputs).reshape(-1)
    if expected is None or (rebuilt - expected).norm() > torch.finfo(leaf.dtype).eps ** 0.5 * expected.norm():
        return None
    return augmented, jacobians, outputs.detach()


def output_hessians(study: Study, outputs: Tensor, targets: Tensor) -> Tensor:
    """∇²_f L(f_i, y_i) per example, [b, C, C], C = the number of outputs of one example (flattened). An example's
    loss depends on its own outputs only, so ∇²_f Σ_i L(f_i, y_i) is block diagonal and its product with e_c in
    every example's block gives column c of every H_i at once: C forward-over-reverse products of the batch's
    summed loss (one per output, not one Hessian per example)."""
    flat = outputs.reshape(len(outputs), -1)
    summed = lambda f: study.loss(f.reshape(outputs.shape), targets).sum()  # noqa: E731
    column = lambda e: jvp(grad(summed), (flat,), (e,))[1]  # noqa: E731
    return vmap(column)(output_basis(flat)).permute(1, 2, 0)  # [c, i] is H_i e_c: [C, b, C] -> [b, C, C]


def output_basis(outputs: Tensor) -> Tensor:
    """[C, b, C]: e_c in every example's outputs (`outputs` [b, C]), one direction per output, batched."""
    eye = torch.eye(outputs.shape[1], dtype=outputs.dtype, device=outputs.device)
    return eye[:, None, :].expand(-1, len(outputs), -1)


def damped_gauss_newton(study: Study, theta: Tensor, damping: float) -> Tensor:
    """G + (wd + λ)·I: the curvature of the training objective, damped by λ."""
    eye = torch.eye(theta.numel(), dtype=theta.dtype, device=theta.device)
    return gauss_newton(study, theta) + (study.recipe.weight_decay + damping) * eye


Solve = Callable[[Tensor], Tensor]  # V [P, K] ↦ A⁻¹ V
_INVERSES: OrderedDict[tuple[str, str, float, str], Solve] = OrderedDict()
INVERSES_KEPT = 8


@contextlib.contextmanager
def cold_inverses() -> Iterator[None]:
    """Within it, no factorised curvature kept from before is reused (a method's measured cost is then its own:
    `exact:models=1` after `exact` factorises again); afterwards the ones from before are kept again beside the
    new ones."""
    before = _INVERSES.copy()
    _INVERSES.clear()
    try:
        yield
    finally:
        made = _INVERSES.copy()
        _INVERSES.clear()
        _INVERSES.update(before)
        _INVERSES.update(made)  # the newest last
        while len(_INVERSES) > INVERSES_KEPT:
            _INVERSES.popitem(last=False)


def curvature_solver(study: Study, theta: Tensor, damping: float, scope: Tensor | None = None,
                     keep: int = INVERSES_KEPT) -> Solve:
    """V ↦ (G + (wd + λ)I)⁻¹ V at θ, or with `scope` (indices into θ) V ↦ (G_SS + (wd + λ)I)⁻¹ V on its block, from
    one factorisation kept for the last `keep` (study, θ, λ, scope): estimators and the PBRF solver of the same seed
    model share it. Refused (InputError) in bfloat16, which torch cannot factorise."""
    if theta.dtype == torch.bfloat16:
        raise InputError(f"{study.name}: the explicit curvature inverse needs float32 or float64, the study is "
                         "bfloat16; use a matrix-free method (cg, lissa, arnoldi, ekfac, grad_dot)")
    digest = lambda t: hashlib.sha1(tensor_bytes(t)).hexdigest()  # noqa: E731
    key = (study.study_hash, digest(theta), float(damping), "" if scope is None else digest(scope))
    if key not in _INVERSES:
        curvature = damped_gauss_newton(study, theta, damping)
        _INVERSES[key] = factorised(curvature if scope is None else curvature[scope][:, scope])
        while len(_INVERSES) > keep:
            _INVERSES.popitem(last=False)
    _INVERSES.move_to_end(key)
    return _INVERSES[key]


def factorised(matrix: Tensor) -> Solve:
    """V ↦ matrix⁻¹ V by its Cholesky factor (a third of an inversion's work; the solve of K columns is 2·P²·K), or
    by its LU factors when it is not positive definite (a loss not convex in f, or no damping on a singular G);
    a singular matrix is refused by torch, as an inversion is."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if info.item() == 0:
        return lambda vectors: torch.cholesky_solve(vectors, factor)
    lu, pivots = torch.linalg.lu_factor(matrix)
    return lambda vectors: torch.linalg.lu_solve(lu, pivots, vectors)
