"""`digits-mlp`: an MLP 64→32→10 on scikit-learn's digits, where influence tracks PBRF, not LOO."""

from __future__ import annotations

import numpy as np
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from retrain.study import Recipe, Study, indexed


class DigitsMLP(Study):
    """MLP 64→32→10 (ReLU) on scikit-learn digits (pixels/16), 1,437 train / 360 query (stratified),
    cross-entropy, SGD with momentum and weight decay; measurements: loss on `n_measurements` query
    examples."""

    name = "digits-mlp"
    recipe = Recipe(optimizer="sgd", epochs=40, lr=0.05, momentum=0.9, batch_size=64, weight_decay=1e-3,
                    seeds=5, damping=2e-3, warm_epochs=10, pbrf_steps=100)
    n_measurements = 20
    default_methods = ("exact", "cg", "lissa", "grad_dot")
    default_sets = ("single:n=100", "random:alpha=0.5,k=50")
    default_regimes = ("scratch", "warm", "pbrf")

    def dataset(self) -> DatasetDict:
        x, y = load_digits(return_X_y=True)
        x_train, x_query, y_train, y_query = train_test_split(x / 16.0, y, test_size=360, stratify=y,
                                                              random_state=0)
        split = lambda a, b: Dataset.from_dict({"x": a.tolist(), "y": b.astype(np.int64).tolist()})  # noqa: E731
        return DatasetDict(train=split(x_train, y_train), query=split(x_query, y_query))

    def model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets, reduction="none")

    def measurements(self) -> dict[str, str]:
        return {f"query_loss/{i}": f"cross-entropy on query example {i}" for i in range(self.n_measurements)}

    def measure(self, forward) -> dict[str, Tensor]:
        x, y = self.tensors(self.query_split)
        return indexed("query_loss", self.loss(forward(x[: self.n_measurements]), y[: self.n_measurements]))
