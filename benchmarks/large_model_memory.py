"""Peak memory of registering predictions about a model of more than 10M parameters, with a matrix-free method.

A GPT-2 built from a `GPT2Config` (6 layers, width 384, vocabulary 2048, float32: 11.4M parameters) and 2,000
training sequences of 16 tokens (seeded random walks over the vocabulary, no downloads); the measurements are the
losses of 4 query sequences, the removal sets 20 random sets of 1% of the data (`--sets`). The model is the seed-0
initialisation: what is measured is the estimators' memory and time, which do not depend on how far the model was
trained (training it first would take hours on 2 cores). The predictions are registered in a fresh ledger, as the
register flow does (`predict`, then the sets and the records appended to the hash chain).

Forming the per-example gradients [N, P] whole would take 2,000 × 11.4M × 4 bytes = 85 GiB; the streaming
estimators hold at most `GRADIENT_BUDGET` entries of gradient rows at once (5 rows of P here). Prints the
parameters, the seconds and the process's peak resident memory (`ru_maxrss`, which counts torch's allocations, unlike
tracemalloc), before and after the predictions. A benchmark, not a test:

    PYTHONPATH=. .venv/bin/python benchmarks/large_model_memory.py --method grad_dot
    PYTHONPATH=. .venv/bin/python benchmarks/large_model_memory.py --method grad_dot:side=sets \
        --sets random:alpha=0.5,k=5

(the second: every set's summed gradient by vector-Jacobian products over half the data each). Exits non-zero if the
peak reaches 8 GiB.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel

import store
from predictions import build, parse, parse_method, predict
from predictions.influence import GRADIENT_BUDGET, rows_within_budget
from retrain.study import Forward, Recipe, Study, indexed

VOCAB, LENGTH, QUERIES = 2048, 16, 4


class Logits(nn.Module):
    """GPT2LMHeadModel returning next-token logits [B, T, V] for token ids [B, T]."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.gpt = GPT2LMHeadModel._from_config(config, attn_implementation="eager")

    def forward(self, x: Tensor) -> Tensor:
        return self.gpt(input_ids=x).logits


class RandomWalks(Study):
    """Sequences of token ids, each the previous plus a step in [-8, 8] (mod the vocabulary): a little structure to
    learn, none to download."""

    name = "large-model-memory"
    sequences = 2000  # training sequences
    recipe = Recipe(optimizer="adamw", lr=1e-3, batch_size=32, epochs=1, seeds=1, dtype="float32")

    def dataset(self) -> DatasetDict:
        generator = torch.Generator().manual_seed(0)

        def walks(n: int) -> dict[str, list]:
            steps = torch.randint(-8, 9, (n, LENGTH + 1), generator=generator)
            steps[:, 0] = torch.randint(0, VOCAB, (n,), generator=generator)
            tokens = steps.cumsum(1) % VOCAB
            return {"x": tokens[:, :-1].tolist(), "y": tokens[:, 1:].tolist()}

        return DatasetDict(train=Dataset.from_dict(walks(self.sequences)), query=Dataset.from_dict(walks(QUERIES)))

    def model(self) -> nn.Module:
        return Logits(GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=384, n_layer=6, n_head=6,
                                 n_inner=4 * 384, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                 eos_token_id=0, pad_token_id=None))  # a pad id makes GPT-2 inspect ids: vmap refuses

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The summed next-token negative log-likelihood of each sequence."""
        return nn.functional.cross_entropy(outputs.transpose(1, 2), targets, reduction="none").sum(1)

    def measure(self, forward: Forward) -> dict[str, Tensor]:
        x, y = self.tensors(self.query_split)
        return indexed("query_loss", self.loss(forward(x), y))


def peak_rss_gib() -> float:
    """The process's peak resident set size so far, GiB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="grad_dot", help="a matrix-free method spec (default grad_dot)")
    parser.add_argument("--sets", default="random:alpha=0.01,k=20", help="removal sets spec")
    parser.add_argument("--train", type=int, default=2000, help="training sequences (default 2000)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    study = RandomWalks()
    study.sequences = args.train
    theta = study.init_params(0)
    method = parse_method(args.method, study)
    sets = build(parse(args.sets), study)
    p = theta.numel()
    print(f"model: GPT-2, {p:,} parameters, {study.recipe.dtype}; {study.n_train:,} training sequences of {LENGTH} "
          f"tokens; {len(study.measurement_ids)} measurements; {len(sets)} sets ({args.sets}); method {method.label}")
    print(f"[N, P] per-example gradients would be {study.n_train * p * theta.element_size() / 2**30:.1f} GiB; "
          f"GRADIENT_BUDGET {GRADIENT_BUDGET:,} entries = {rows_within_budget(p, study.n_train)} rows of P")
    print(f"peak RSS before predicting: {peak_rss_gib():.2f} GiB", flush=True)
    start = time.perf_counter()
    records = predict(study, method, theta[None], sets)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder, store.connect(Path(folder) / "ledger.duckdb") as con:
        store.register_study(con, study.record())
        store.register_removal_sets(con, sets)
        added = store.register_predictions(con, records, "benchmark", None)
    print(f"registered {added} predictions in {seconds:.0f} s (predicting); peak RSS {peak_rss_gib():.2f} GiB; "
          f"torch threads {torch.get_num_threads()}")
    if peak_rss_gib() >= 8:
        sys.exit("peak RSS is not below 8 GiB")


if __name__ == "__main__":
    main()
