"""Training DynamicViT predictors: losses, distributed fine-tuning and fast calibration."""
from .calibrate import CalibrateConfig, calibrate_dynamicvit
from .config import LearningConfig
from .finetune import TrainConfig, finetune_dynamicvit, load_checkpoint, save_checkpoint
from .losses import DynamicViTLoss, Teacher

__all__ = ["CalibrateConfig", "DynamicViTLoss", "LearningConfig", "Teacher", "TrainConfig", "calibrate_dynamicvit",
           "finetune_dynamicvit", "load_checkpoint", "save_checkpoint"]
