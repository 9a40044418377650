"""Inference: answers, chat, log-likelihoods and CFG image generation on a saved unified model."""

from unified_mllm.inference.pipeline import UnifiedPipeline, pick_device, pick_dtype
from unified_mllm.inference.sampling import SamplingParams

__all__ = ["UnifiedPipeline", "SamplingParams", "pick_device", "pick_dtype"]
