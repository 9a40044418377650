"""ShapeWorld: the embedded synthetic world — scenes, renderer, text, held-out splits, judge and graders."""

from unified_mllm.shapeworld.judge import Detection, detect
from unified_mllm.shapeworld.render import render
from unified_mllm.shapeworld.scene import COLORS, SHAPES, Scene, ShapeObject

__all__ = ["COLORS", "SHAPES", "Scene", "ShapeObject", "render", "detect", "Detection"]
