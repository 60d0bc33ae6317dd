"""epkit: expert-parallel Mixtral for fine-tuning and batched inference."""
from .args import PRESETS, ModelArgs
from .build import build_model
from .checkpoint import CheckpointError, load_pretrained, save_pretrained
from .model import Mixtral
from .moe import MoE, load_balancing_loss
from .parallel import apply_expert_parallel, init_distributed, setup_expert_parallel
from .plan import ShardingPlan

__all__ = ["ModelArgs", "PRESETS", "Mixtral", "MoE", "load_balancing_loss", "ShardingPlan", "apply_expert_parallel",
           "init_distributed", "setup_expert_parallel", "build_model", "load_pretrained", "save_pretrained",
           "CheckpointError"]
__version__ = "0.1.0"
