"""pbkd_lightning: reward-guided distillation of language models with PyTorch Lightning."""

__version__ = "0.1.0"
