"""Influence estimators. The predicted effect on measurement m of removing training point j is
Δ̂_mj = (1/N) ∇m(θ*)ᵀ A⁻¹ ∇L(z_j, θ*), A = G + (wd + λ)I with G the Gauss-Newton matrix of the mean training loss
(sign: effect = m(without) − m(full)); a set's first-order prediction is (1/N) ∇mᵀ A⁻¹ Σ_{j∈S} w_j ∇L_j.

Each curvature method is a solve V ↦ A⁻¹V (`*_inverse_product`); this module holds the solves and the gradient
products both sides of the scoring share: on the measurements side `influence_scores` solves A⁻¹∇m and takes its
product with every per-example gradient (in chunks of examples); on the sets side `weighted_gradients` builds
Σ_j w_j ∇L_j by one vector-Jacobian product per chunk of examples and `measurement_products` takes ∇mᵀ of the
solved vectors by forward-mode products, so neither [N, P] nor [M, P] is formed there. Every loop over gradient
rows (per-example gradients, measurement gradients and their solves, sets' summed gradients and their solves) holds
at most `GRADIENT_BUDGET` entries of them at once (`rows_within_budget`): chunk × P, never N × P or M × P, whatever
the model's size; below the budget (every built-in study) a loop runs in the chunks it always did. With a scope
(indices S into θ) every vector lives on the scope's coordinates and A is the block G_SS + (wd + λ)I: the
prediction of a retraining in which only those parameters move."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.func import grad, jacrev, jvp, vjp, vmap

from retrain.curvature import curvature_solver, embed
from retrain.study import Study

Operator = Callable[[Tensor], Tensor]  # V [P, K] -> A V [P, K]
Progress = Callable[[float], None]  # called with the fraction of a piece of work just done

GRADIENT_BUDGET = 2**26  # gradient entries (rows × P) a streaming loop holds at once: 256 MiB in float32


def part(progress: Progress | None, share: float) -> Progress | None:
    """`progress` for a part of the work that is `share` of the whole."""
    return None if progress is None else (lambda fraction: progress(share * fraction))


def rows_within_budget(n_params: int, most: int) -> int:
    """Rows of P = `n_params` entries a streaming loop holds at once: `most`, fewer when `most` × P would pass
    `GRADIENT_BUDGET`, at least 1."""
    return max(1, min(most, GRADIENT_BUDGET // max(n_params, 1)))


def solve_chunks(n_params: int, columns: int, per_solve: int | None = None) -> list[slice]:
    """The columns (measurements' gradients, or sets' right-hand sides) solved together, one solve per slice:
    `per_solve` at a time, by default as many [P, k] columns as `GRADIENT_BUDGET` holds (all below it)."""
    step = per_solve or rows_within_budget(n_params, columns)
    return [slice(s, s + step) for s in range(0, columns, step)]


def train_gradients(study: Study, theta: Tensor) -> Tensor:
    """Per-example training-loss gradients ∇L(z_j, θ), [N, P], whole: a reference for tests and small-model
    analyses; the estimators stream them (`example_gradient_chunks`)."""
    return example_gradients(study, theta, *study.tensors("train"))


def example_gradient_chunks(study: Study, theta: Tensor, x: Tensor, y: Tensor, chunk: int = 256
                            ) -> Iterator[Tensor]:
    """`example_gradients` of (x, y) in order, [c, P] at a time, c = `rows_within_budget(P, chunk)`."""
    rows = rows_within_budget(theta.numel(), chunk)
    for s in range(0, len(y), rows):
        yield example_gradients(study, theta, x[s : s + rows], y[s : s + rows])


def example_gradients(study: Study, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Loss gradients ∇L((x_i, y_i), θ) of the examples (x, y), [len(y), P]."""
    model = study.flat  # built outside the transforms (it converts parameters in place)
    one = lambda th, xi, yi: study.loss(model(th, xi[None]), yi[None])[0]  # noqa: E731
    return vmap(jacrev(one), (None, 0, 0))(theta, x, y)


def measurement_gradients(study: Study, theta: Tensor, rows: slice = slice(None)) -> Tensor:
    """∇m(θ) for the measurements `rows` (default every one), [M, P]."""
    model = study.flat  # built outside the transforms (it converts parameters in place)
    return jacrev(lambda th: study.measurement_vector(lambda x: model(th, x))[rows], chunk_size=32)(theta)  # memory


EXAMPLE_COLUMNS = 768  # examples × columns of V per vmapped pass of the Gauss-Newton product, at least
TANGENT_BUDGET = 2**21  # examples × columns × leaf-module outputs of one example per pass, where that allows more


def leaf_outputs(study: Study, theta: Tensor) -> int:
    """Elements output by the module's leaf modules for one training example: what a vmapped jvp carries per
    example and column."""
    total = 0

    def count(module: torch.nn.Module, inputs: object, output: object) -> None:
        nonlocal total
        total += sum(t.numel() for t in (output if isinstance(output, tuple) else (output,)) if torch.is_tensor(t))

    leaves = [m for m in study.flat.module.modules() if next(m.children(), None) is None]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            study.flat(theta, study.tensors("train")[0][:1])
    finally:
        for hook in hooks:
            hook.remove()
    return max(1, total)


def gauss_newton_vector_product(study: Study, theta: Tensor, vectors: Tensor, indices: Tensor | None = None,
                                chunk: int | None = None) -> Tensor:
    """G V = (1/n) Σ_i J_iᵀ ∇²_f L(f_i, y_i) J_i V for V [P, K], without forming G: J_i V by `jvp`, the
    output-space Hessian product by `vjp` of the loss gradient in f (∇²_f L is symmetric), J_iᵀ(·) by `vjp`, each
    vmapped over the K columns. The mean runs over the training examples `indices` (default: all n = N), `chunk`
    at a time (default: the larger of `EXAMPLE_COLUMNS` // K and `TANGENT_BUDGET` // (K × `leaf_outputs`), at
    least 1), so the batched tangents stay bounded whatever K: on the reversal GPT-2 a chunk of 512 examples with
    23 columns took ~1.5× the time per column of 32 to 128 (tangents out of cache), and 64 columns ~1.5× that of
    16; small models (digits, ridge) want far larger chunks, the passes' overhead dominating (digits, K = 100:
    0.086 s a product in chunks of 256 against 0.62 s in chunks of 7)."""
    x, y = study.tensors("train")
    if indices is not None:
        x, y = x[indices], y[indices]
    k = vectors.shape[1]
    chunk = chunk or max(1, EXAMPLE_COLUMNS // k, TANGENT_BUDGET // (k * leaf_outputs(study, theta)))
    product = torch.zeros_like(vectors)
    for s in range(0, len(y), chunk):
        product += _chunk_gauss_newton_product(study, theta, x[s : s + chunk], y[s : s + chunk], vectors)
    return product / len(y)


def _chunk_gauss_newton_product(study: Study, theta: Tensor, x: Tensor, y: Tensor, vectors: Tensor) -> Tensor:
    """Σ_i J_iᵀ ∇²_f L(f_i, y_i) J_i V over the examples (x, y), for V [P, K]."""
    model = study.flat  # built outside the transforms (it converts parameters in place)

    def outputs_of(th: Tensor) -> Tensor:
        return model(th, x)

    def loss_sum(f: Tensor) -> Tensor:  # per-example losses: its Hessian in f is block-diagonal
        return study.loss(f, y).sum()

    outputs, pull_back = vjp(outputs_of, theta)
    _, output_hessian_product = vjp(grad(loss_sum), outputs)  # the vjp of a symmetric Jacobian is its product

    def column(v: Tensor) -> Tensor:
        jv = jvp(outputs_of, (theta,), (v,))[1]
        return pull_back(output_hessian_product(jv)[0])[0]

    return vmap(column, in_dims=1, out_dims=1)(vectors)


def damped_product(study: Study, theta: Tensor, damping: float, indices: Tensor | None = None,
                   scope: Tensor | None = None) -> Operator:
    """V ↦ (G + (wd + λ)I) V, with G over `indices` (default: all training examples); with `scope`, V [|S|, K] ↦
    (G_SS + (wd + λ)I) V."""
    shift = study.recipe.weight_decay + damping

    def product(v: Tensor) -> Tensor:
        gv = gauss_newton_vector_product(study, theta, embed(v, scope, theta.numel()), indices)
        return (gv if scope is None else gv[scope]) + shift * v

    return product


def influence_scores(study: Study, theta: Tensor, inverse_product: Operator,
                     relabelled: tuple[Tensor, Tensor] | None = None, scope: Tensor | None = None, chunk: int = 256,
                     measurement_chunk: int | None = None, progress: Progress | None = None) -> Tensor:
    """Scores [M, N] = (1/N) ∇L_jᵀ A⁻¹ ∇m (the measurements side), with `inverse_product` V ↦ A⁻¹ V the method's
    curvature solve on the `scope`'s coordinates (None: all of θ). With `relabelled` = (indices [R], new labels
    [R]): [M, N + R], column N + r the same score of the training point indices[r] under its new label, so that
    relabelling j to y' is predicted as column j − column N + r.

    Streamed: the measurements' gradients are taken and solved `measurement_chunk` at a time (None: every one
    at once when M × P is within `GRADIENT_BUDGET`, else as many as fit), and each chunk's scores from the
    per-example gradients `chunk` examples at a time (fewer when `chunk` × P would pass the budget). When the
    measurements take several chunks the per-example gradients are computed once per chunk: memory is bounded
    by the chunks, at the price of that recomputation. The products' rows are reported to `progress` as fractions
    of all of them."""
    restrict = (lambda v: v) if scope is None else (lambda v: v[..., scope])  # noqa: E731
    x, y = study.tensors("train")
    if relabelled is not None:
        x, y = torch.cat([x, x[relabelled[0]]]), torch.cat([y, relabelled[1]])
    chunks = solve_chunks(theta.numel(), len(study.measurement_ids), measurement_chunk)
    scores, rows = [], len(y) * len(chunks)
    for measurements in chunks:
        solved = inverse_product(restrict(measurement_gradients(study, theta, measurements)).T)  # [|S|, c]
        products = []
        for g in example_gradient_chunks(study, theta, x, y, chunk):
            products.append(restrict(g) @ solved)
            if progress is not None:
                progress(len(g) / rows)
        scores.append(torch.cat(products))
    return torch.cat(scores, 1).T / study.n_train


def weighted_gradients(study: Study, theta: Tensor, x: Tensor, y: Tensor, weights: Tensor, chunk: int = 256
                       ) -> Tensor:
    """Σ_i w_ik ∇L((x_i, y_i), θ) for every column k of `weights` [n, K], [P, K]: per chunk of examples one
    vector-Jacobian product of the per-example losses, vmapped over the K columns; the per-example gradients are
    never formed."""
    model = study.flat  # built outside the transforms (it converts parameters in place)

    def pulled_back(xs: Tensor, ys: Tensor, w: Tensor) -> Tensor:
        _, pull_back = vjp(lambda th: study.loss(model(th, xs), ys), theta)
        return vmap(lambda column: pull_back(column)[0], in_dims=1, out_dims=1)(w)

    total = theta.new_zeros(theta.numel(), weights.shape[1])
    for s in range(0, len(y), chunk):
        total += pulled_back(x[s : s + chunk], y[s : s + chunk], weights[s : s + chunk])
    return total


def measurement_products(study: Study, theta: Tensor, vectors: Tensor, chunk: int = 16) -> Tensor:
    """∇m(θ)ᵀ V for every measurement, [M, K] for V [P, K]: forward-mode products (jvp) of the measurement vector,
    `chunk` columns at a time; ∇m [M, P] is never formed."""
    model = study.flat  # built outside the transforms (it converts parameters in place)
    measure = lambda th: study.measurement_vector(lambda x: model(th, x))  # noqa: E731
    column = lambda v: jvp(measure, (theta,), (v,))[1]  # noqa: E731
    return torch.cat([vmap(column, in_dims=1, out_dims=1)(vectors[:, s : s + chunk])
                      for s in range(0, vectors.shape[1], chunk)], 1)


def exact_inverse_product(study: Study, theta: Tensor, vectors: Tensor, damping: float,
                          scope: Tensor | None = None) -> Tensor:
    """(G + (wd + λ)I)⁻¹ V from the factorised explicit P×P curvature (with `scope`: its block's)."""
    return curvature_solver(study, theta, damping, scope)(vectors)


def self_influence(study: Study, theta: Tensor, damping: float) -> Tensor:
    """(1/N) ∇L_jᵀ (G + (wd + λ)I)⁻¹ ∇L_j for every training point j, [N], from the explicit curvature: the
    predicted rise of z_j's own loss when z_j is removed (≥ 0; large for atypical or mislabelled points). The
    per-example gradients are streamed (`example_gradient_chunks`)."""
    solve = curvature_solver(study, theta, damping)
    return torch.cat([(g * solve(g.T).T).sum(1) for g in example_gradient_chunks(study, theta,
                                                                                     *study.tensors("train"))]
                     ) / study.n_train


def squared_gradient_norms(study: Study, theta: Tensor) -> Tensor:
    """‖∇L_j(θ)‖² for every training point j, [N], the per-example gradients streamed."""
    return torch.cat([g.pow(2).sum(1) for g in example_gradient_chunks(study, theta, *study.tensors("train"))])


def conjugate_gradient(apply: Operator, rhs: Tensor, iterations: int, tol: float,
                       precondition: Operator | None = None, progress: Progress | None = None) -> Tensor:
    """Solve A X = B column by column (A symmetric positive definite, B [P, K]) with batched CG, preconditioned by
    `precondition` (V ↦ M⁻¹V, M symmetric positive definite; None: plain CG); a column stops updating once
    ‖B − A X‖ ≤ tol·‖B‖, and all stop after `iterations` products (each reported to `progress` as 1/iterations)."""
    precondition = precondition or (lambda v: v.clone())  # a copy: the residual is updated in place
    solution = torch.zeros_like(rhs)
    residual = rhs.clone()
    direction = precondition(residual)
    rz = (residual * direction).sum(0)
    target = tol**2 * (rhs * rhs).sum(0)
    for _ in range(iterations):
        active = (residual * residual).sum(0) > target
        if not active.any():
            break
        a_direction = apply(direction)
        alpha = torch.where(active, rz / (direction * a_direction).sum(0), 0.0)
        solution += alpha * direction
        residual -= alpha * a_direction
        z = precondition(residual)
        rz_new = (residual * z).sum(0)
        direction = z + torch.where(active, rz_new / rz, 0.0) * direction
        rz = rz_new
        if progress is not None:
            progress(1 / iterations)
    return solution


def cg_inverse_product(study: Study, theta: Tensor, vectors: Tensor, damping: float, iterations: int = 100,
                       tol: float = 1e-6, scope: Tensor | None = None, precondition: Operator | None = None,
                       progress: Progress | None = None) -> Tensor:
    """(G + (wd + λ)I)⁻¹ V by matrix-free conjugate gradient (with `scope`: (G_SS + (wd + λ)I)⁻¹ V), preconditioned
    by `precondition` (V ↦ M⁻¹V; None: plain CG)."""
    return conjugate_gradient(damped_product(study, theta, damping, scope=scope), vectors, iterations, tol,
                              precondition, progress)


def top_eigenvalue(apply: Operator, size: int, like: Tensor, iterations: int, generator: torch.Generator) -> float:
    """Largest eigenvalue of a symmetric PSD operator on R^size by power iteration (a lower bound); vectors of
    `like`'s dtype and device, drawn on the CPU."""
    v = torch.randn(size, 1, dtype=like.dtype, generator=generator).to(like.device)
    value = 0.0
    for _ in range(iterations):
        v = v / v.norm()
        av = apply(v)
        value = (v * av).sum().item()
        v = av
    return value


def lissa_inverse_product(study: Study, theta: Tensor, vectors: Tensor, damping: float, iterations: int = 1000,
                          scale: float = 0.0, batch_size: int = 512, seed: int = 0, scope: Tensor | None = None,
                          progress: Progress | None = None) -> Tensor:
    """A⁻¹ V, A = G + (wd + λ)I (with `scope`: G_SS + (wd + λ)I), from LiSSA (Agarwal et al. 2017): X₀ = V,
    X_t = V + (I − A_t/scale) X_{t−1} with A_t the damped Gauss-Newton of a random minibatch, A⁻¹V ≈ X_T / scale.
    scale = 0 picks 1.1× the top eigenvalue of A (power iteration), so that A/scale has spectral norm < 1.
    Deterministic given `seed`; each term is reported to `progress` as 1/iterations."""
    generator = torch.Generator().manual_seed(seed)
    if scale <= 0:
        scale = 1.1 * top_eigenvalue(damped_product(study, theta, damping, scope=scope), len(vectors), theta, 20,
                                     generator)
    estimate = vectors.clone()
    for _ in range(iterations):
        batch = torch.randperm(study.n_train, generator=generator)[:batch_size]
        estimate = vectors + estimate - damped_product(study, theta, damping, batch, scope)(estimate) / scale
        if progress is not None:
            progress(1 / iterations)
    if not torch.isfinite(estimate).all():
        raise ValueError(f"LiSSA diverged with scale={scale:g}; use a larger scale (0 = automatic)")
    return estimate / scale
