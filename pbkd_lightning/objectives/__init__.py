from pbkd_lightning.objectives.base import Objective
from pbkd_lightning.objectives.pbkd import BlackBoxPbKD
from pbkd_lightning.objectives.seqkd import SeqKD

__all__ = ["BlackBoxPbKD", "Objective", "SeqKD"]
