"""Studies, the batched training engine, regimes and measurements -> outcome records."""

from retrain.engine import Trained, measure, train
from retrain.study import FlatModel, Recipe, Study, builtin_studies, load_study

__all__ = ["FlatModel", "Recipe", "Study", "Trained", "builtin_studies", "load_study", "measure", "train"]
