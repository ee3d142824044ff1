from pbkd_lightning.models.critic import ImplicitReward, ScalarReward
from pbkd_lightning.models.loading import ModelSpec, load_causal_lm
from pbkd_lightning.models.teacher import TeacherModel, load_teacher

__all__ = ["ImplicitReward", "ModelSpec", "ScalarReward", "TeacherModel", "load_causal_lm", "load_teacher"]
