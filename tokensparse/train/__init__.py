"""Training DynamicViT predictors: losses, distributed fine-tuning and fast calibration."""
from .losses import DynamicViTLoss, Teacher
from .finetune import TrainConfig, finetune, load_checkpoint, save_checkpoint
from .calibrate import CalibrateConfig, calibrate

__all__ = ["DynamicViTLoss", "Teacher", "TrainConfig", "finetune", "load_checkpoint", "save_checkpoint",
           "CalibrateConfig", "calibrate"]
