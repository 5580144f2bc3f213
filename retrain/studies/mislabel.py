"""`digits-mislabel`: `digits-mlp` with a seeded 10% of its training labels flipped to another class. The flips are
ground truth for mislabel detection: the study reports them (`true_labels`) for the ledger, and the estimators,
which read only the `x` and `y` columns, never see them. Besides the loss on 20 query examples it measures what a
cleaning should improve, over the whole (clean) query split: the mean query loss and the query accuracy (a count
of correct argmaxes has no gradient, so every influence method predicts 0 for it; retraining measures it)."""

from __future__ import annotations

import numpy as np
from datasets import DatasetDict
from torch import Tensor

from retrain.studies.digits import DigitsMLP
from retrain.study import Forward, Recipe, indexed


class DigitsMislabel(DigitsMLP):
    """digits-mlp with 10% of the training labels flipped uniformly to one of the 9 other classes (seeded); the
    true labels are in the train split's `true_y` column and in the ledger's `flipped_labels` table."""

    name = "digits-mislabel"
    flip_fraction = 0.1
    flip_seed = 11

    def dataset(self) -> DatasetDict:
        data = super().dataset()
        y = np.asarray(data["train"]["y"])
        rng = np.random.default_rng(self.flip_seed)
        flipped = rng.choice(len(y), size=round(self.flip_fraction * len(y)), replace=False)
        noisy = y.copy()
        noisy[flipped] = (y[flipped] + rng.integers(1, 10, size=len(flipped))) % 10
        train = data["train"].remove_columns("y").add_column("y", noisy.tolist()).add_column("true_y", y.tolist())
        return DatasetDict(train=train, query=data["query"])

    def measurements(self) -> dict[str, str]:
        return super().measurements() | {
            "query_loss/mean": "mean cross-entropy over the query split",
            "query_accuracy": "fraction of the query split classified correctly (no gradient: predicted 0)"}

    def measure(self, forward: Forward) -> dict[str, Tensor]:
        x, y = self.tensors(self.query_split)
        outputs = forward(x)
        losses = self.loss(outputs, y)
        return {**indexed("query_loss", losses[: self.n_measurements]), "query_loss/mean": losses.mean(),
                "query_accuracy": (outputs.argmax(1) == y).to(losses.dtype).mean()}

    def true_labels(self) -> dict[int, int]:
        """Training index -> true label, for the points whose given label `y` is wrong."""
        train = self.data["train"]
        return {i: t for i, (y, t) in enumerate(zip(train["y"], train["true_y"])) if y != t}


class DigitsMislabelMemorise(DigitsMislabel):
    """digits-mislabel without weight decay, trained 200 epochs: the model memorises most flipped labels, so
    final-model scores (training loss, self-influence) lose them."""

    name = "digits-mislabel-memorise"
    recipe = Recipe(optimizer="sgd", epochs=200, lr=0.05, momentum=0.9, batch_size=64, weight_decay=0.0,
                    seeds=5, damping=2e-3, warm_epochs=10, pbrf_steps=100)
