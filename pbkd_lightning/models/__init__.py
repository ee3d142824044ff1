from pbkd_lightning.models.critic import ImplicitReward, ScalarReward
from pbkd_lightning.models.loading import ModelSpec, load_causal_lm
from pbkd_lightning.models.teacher import TeacherModel, load_teacher
from pbkd_lightning.models.warmup import WarmupConfig

__all__ = ["ImplicitReward", "ModelSpec", "ScalarReward", "TeacherModel", "WarmupConfig", "load_causal_lm", "load_teacher"]
