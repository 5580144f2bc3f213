"""`linreg`: ridge regression on scikit-learn's diabetes data, where influence is exact to first order."""

from __future__ import annotations

import numpy as np
from datasets import Dataset, DatasetDict
from sklearn.datasets import load_diabetes
from torch import Tensor, nn

from retrain.study import Recipe, Study


class LinReg(Study):
    """Standardised diabetes features and target; 342 train, 100 query; loss ½(f(x) − y)²;
    solved to the optimum by Newton's method (one step is exact for a quadratic)."""

    name = "linreg"
    recipe = Recipe(optimizer="newton", epochs=2, weight_decay=1e-2, damping=0.0, seeds=2)
    n_query = 100

    def dataset(self) -> DatasetDict:
        x, y = load_diabetes(return_X_y=True)
        x = (x - x.mean(0)) / x.std(0)
        y = (y - y.mean()) / y.std()
        order = np.random.default_rng(0).permutation(len(y))
        q, t = order[: self.n_query], order[self.n_query :]
        split = lambda i: Dataset.from_dict({"x": x[i].tolist(), "y": y[i].tolist()})  # noqa: E731
        return DatasetDict(train=split(t), query=split(q))

    def model(self) -> nn.Module:
        return nn.Linear(10, 1)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return 0.5 * (outputs.squeeze(-1) - targets) ** 2
