"""Estimators and removal-set builders -> prediction records."""

from predictions.methods import METHODS, Method, parse_method, predict
from predictions.removal_sets import build as build_removal_sets

__all__ = ["METHODS", "Method", "build_removal_sets", "parse_method", "predict"]
