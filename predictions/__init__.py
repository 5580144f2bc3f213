"""Estimators and removal-set builders -> prediction records."""

from predictions.methods import METHODS, CurvatureMethod, Method, parse_method, predict
from predictions.removal_sets import KINDS, ModificationKind, build, from_models, parse, top_k

__all__ = ["KINDS", "METHODS", "CurvatureMethod", "Method", "ModificationKind", "build", "from_models", "parse",
           "parse_method", "predict", "top_k"]
