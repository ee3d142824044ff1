from pbkd_lightning.models.critic import ImplicitReward, ScalarReward
from pbkd_lightning.models.loading import ModelSpec, load_causal_lm

__all__ = ["ImplicitReward", "ModelSpec", "ScalarReward", "load_causal_lm"]
