"""lpt_core: Long-tailed Prompt Tuning (LPT) on a frozen timm ViT. torch + timm only; no Ray,
Optuna or MLflow here."""

from .backbones import build_backbone, build_backbone_from_spec
from .checkpoint import load_prompts, save_prompts
from .losses import AsymmetricGCL, branch_weight
from .model import LPT
from .trainer import PhaseConfig, Trainer, evaluate

__all__ = ["LPT", "AsymmetricGCL", "branch_weight", "build_backbone", "build_backbone_from_spec",
           "PhaseConfig", "Trainer", "evaluate", "save_prompts", "load_prompts"]
