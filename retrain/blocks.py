"""Parameter blocks: named groups of a study's parameters (`Study.parameter_blocks`, default one block per named
parameter), and how a weight change of one block is stored: its norm, and the block's vector itself or, above
`SKETCH_SIZE` coordinates, its count sketch (each coordinate added, with a seeded random sign, into one of
`SKETCH_SIZE` seeded buckets). The sketch of a block is the same linear map for every vector of that block, so the
dot product of two sketches is an unbiased estimate of the vectors' dot product (relative error about
1/√SKETCH_SIZE ≈ 2% of ‖a‖‖b‖), and the stored rows stay small for a transformer's large blocks."""

from __future__ import annotations

import re

import torch
from torch import Tensor

from retrain.study import Study
from store.records import content_hash

SKETCH_SIZE = 2048  # blocks up to this many parameters are stored whole

BlockChanges = dict[str, tuple[float, tuple[float, ...]]]  # block -> (norm, vector or its sketch)


def parameter_blocks(study: Study) -> dict[str, Tensor]:
    """Block name -> the flat-θ indices of its parameters. A study's `parameter_blocks` maps block names to regexes
    over `named_parameters` names (`re.search`): each parameter joins the first block whose regex matches it, and a
    parameter no regex matches is a block of its own; with no map, every named parameter is its own block."""
    flat = study.flat
    starts = torch.tensor([0, *flat.sizes]).cumsum(0).tolist()
    members: dict[str, list[Tensor]] = {}
    for i, name in enumerate(flat.names):
        block = next((b for b, pattern in study.parameter_blocks.items() if re.search(pattern, name)), name)
        members.setdefault(block, []).append(torch.arange(starts[i], starts[i + 1]))
    return {b: torch.cat(parts) for b, parts in members.items()}


def sketch(block: str, vectors: Tensor) -> Tensor:
    """The stored form of vectors [K, n] of one block: themselves when n ≤ SKETCH_SIZE, else their count sketch
    [K, SKETCH_SIZE] (the buckets and signs seeded by the block's name and size)."""
    n = vectors.shape[1]
    if n <= SKETCH_SIZE:
        return vectors
    generator = torch.Generator().manual_seed(int(content_hash("sketch", block, n, length=15), 16))
    buckets = torch.randint(0, SKETCH_SIZE, (n,), generator=generator)
    signs = torch.randint(0, 2, (n,), generator=generator).to(vectors.dtype) * 2 - 1
    return torch.zeros(len(vectors), SKETCH_SIZE, dtype=vectors.dtype).index_add_(1, buckets, vectors * signs)


def block_changes(study: Study, deltas: Tensor) -> list[BlockChanges]:
    """Per row of weight changes Δθ [K, P]: block -> (‖Δθ_B‖, Δθ_B or its sketch), from a CPU copy."""
    deltas = deltas.detach().cpu()
    rows: list[BlockChanges] = [{} for _ in range(len(deltas))]
    for block, index in parameter_blocks(study).items():
        part = deltas[:, index]
        norms, stored = part.norm(dim=1).tolist(), sketch(block, part).tolist()
        for k in range(len(deltas)):
            rows[k][block] = (norms[k], tuple(stored[k]))
    return rows
