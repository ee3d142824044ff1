from pbkd_lightning.objectives.base import Objective
from pbkd_lightning.objectives.divergence import DivergenceKD
from pbkd_lightning.objectives.minillm import MiniLLM
from pbkd_lightning.objectives.pbkd import BlackBoxPbKD
from pbkd_lightning.objectives.pbkd_whitebox import WhiteBoxPbKD
from pbkd_lightning.objectives.seqkd import SeqKD
from pbkd_lightning.objectives.xkd import XKD

__all__ = ["BlackBoxPbKD", "DivergenceKD", "MiniLLM", "Objective", "SeqKD", "WhiteBoxPbKD", "XKD"]
