from pbkd_lightning.data.datamodule import PreferenceDataModule
from pbkd_lightning.data.generation import GenerationConfig
from pbkd_lightning.data.labelers import OpenAIJudge
from pbkd_lightning.data.records import DataError
from pbkd_lightning.data.teachers import HFModelTeacher, OpenAITeacher, ResponseFileTeacher, TaskProgramTeacher, Teacher

__all__ = [
    "DataError",
    "GenerationConfig",
    "HFModelTeacher",
    "OpenAIJudge",
    "OpenAITeacher",
    "PreferenceDataModule",
    "ResponseFileTeacher",
    "TaskProgramTeacher",
    "Teacher",
]
