"""Built-in studies."""

from retrain.studies.digits import DigitsMLP
from retrain.studies.linreg import LinReg

BUILTIN = {study.name: study for study in (LinReg, DigitsMLP)}
