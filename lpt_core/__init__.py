"""lpt_core: Long-tailed Prompt Tuning (LPT) on a frozen timm ViT. torch + timm (and pydantic for
the configuration models) only; no Ray, Optuna or MLflow here. See docs/design.md."""

from .backbones import build_backbone, build_backbone_from_spec, input_config
from .checkpoint import load_prompts, save_prompts
from .config import LPTConfig, PhaseConfig
from .losses import AsymmetricGCL, branch_weight
from .model import LPT
from .trainer import Trainer, evaluate

__all__ = [
    "LPT",
    "LPTConfig",
    "AsymmetricGCL",
    "branch_weight",
    "build_backbone",
    "build_backbone_from_spec",
    "input_config",
    "PhaseConfig",
    "Trainer",
    "evaluate",
    "save_prompts",
    "load_prompts",
]
