"""The unified MLLM: LLM + understanding projector + pixel-code generation embedding and head."""

from unified_mllm.model.build import build_model
from unified_mllm.model.config import UnifiedConfig, VisionSizes
from unified_mllm.model.export import load_pretrained, save_pretrained
from unified_mllm.model.unified import UnifiedMLLM, UnifiedOutput

__all__ = ["UnifiedMLLM", "UnifiedOutput", "UnifiedConfig", "VisionSizes", "build_model", "load_pretrained",
           "save_pretrained"]
