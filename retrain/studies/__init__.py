"""Built-in studies."""

from retrain.studies.digits import DigitsMLP
from retrain.studies.linreg import LinReg
from retrain.studies.mislabel import DigitsMislabel, DigitsMislabelMemorise
from retrain.studies.reversal import Reversal

BUILTIN = {study.name: study for study in (LinReg, DigitsMLP, DigitsMislabel, DigitsMislabelMemorise, Reversal)}
