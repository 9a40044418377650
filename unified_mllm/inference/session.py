"""A chat session shared by the CLI and the web demo: multi-turn history with images anywhere, and drawing."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from unified_mllm.tokens import IMAGE

HELP = """Commands:
  /image PATH [question]   attach an image (to your next message, or ask about it at once)
  /draw PROMPT             draw images of PROMPT (saved as PNG; their paths are printed)
  /reset                   forget the conversation
  /help                    this text
  /quit                    leave (or Ctrl-D)
Anything else is a message to the model, about the images attached so far."""


@dataclass
class DrawSettings:
    num_images: int = 4
    """Images per /draw."""
    cfg_scale: float = 3.0
    """Classifier-free guidance scale (1 = no guidance)."""
    temperature: float = 1.0
    """Sampling temperature of the image codes."""
    top_k: int = 0
    """Top-k of the image codes (0 = all)."""
    top_p: float = 1.0
    """Top-p of the image codes."""
    seed: int = 0
    """Seed of the first drawing; each /draw uses the next one."""


@dataclass
class ChatSession:
    pipe: object
    """A UnifiedPipeline."""
    out_dir: Path = Path("chat_images")
    """Where drawings are saved."""
    draw: DrawSettings = field(default_factory=DrawSettings)
    max_new_tokens: int = 128
    messages: list[dict] = field(default_factory=list)
    pending: list[Image.Image] = field(default_factory=list)
    draws: int = 0

    def reset(self) -> None:
        self.messages, self.pending = [], []

    def attach(self, image: Image.Image | str | Path) -> Image.Image:
        """Queue an image for the next user message; a bad path or file raises ValueError naming it."""
        img = self.pipe._load_image(image)
        self.pending.append(img)
        return img

    def ask(self, text: str) -> str:
        images, self.pending = self.pending, []
        content = IMAGE * len(images) + ("\n" if images else "") + text.replace(IMAGE, "")
        self.messages.append({"role": "user", "content": content, "images": images})
        reply = self.pipe.chat(self.messages, max_new_tokens=self.max_new_tokens)
        self.messages.append({"role": "assistant", "content": reply})
        return reply

    def draw_images(self, prompt: str, **overrides) -> tuple[list[Image.Image], list[Path]]:
        """Draw ``prompt``; returns the images and the PNG paths they were saved to."""
        s = DrawSettings(**{**self.draw.__dict__, **overrides})
        images = self.pipe.generate_images([prompt], num_images=s.num_images, cfg_scale=s.cfg_scale,
                                           temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                           seed=s.seed + self.draws * s.num_images)[0]
        self.draws += 1
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = time.strftime("%Y%m%d-%H%M%S")
        slug = "".join(c if c.isalnum() else "_" for c in prompt)[:40].strip("_") or "image"
        paths = []
        for i, img in enumerate(images):
            path = self.out_dir / f"{stem}-{self.draws:03d}-{slug}-{i}.png"
            img.save(path)
            paths.append(path)
        return images, paths
