"""Special tokens of the unified model, added through the tokenizer API (never by editing tokenizer files)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

IMAGE = "<image>"
IMG_START = "<img_start>"
IMG_END = "<img_end>"
BOI = "<boi>"
EOI = "<eoi>"
IMAGE_GEN = "<image_gen>"
PAD = "<pad>"
SPECIAL_TOKENS = (IMAGE, IMG_START, IMG_END, BOI, EOI, IMAGE_GEN)


@dataclass
class SpecialTokenIds:
    image_token_id: int
    """Understanding slot: replaced by projected image features."""
    img_start_id: int
    """Opens an understanding image."""
    img_end_id: int
    """Closes an understanding image."""
    boi_id: int
    """Begins a generated image."""
    eoi_id: int
    """Ends a generated image (a text target)."""
    image_gen_token_id: int
    """Generation slot: its input is the embedding of the slot's pixel codes."""
    uncond_ids: list[int]
    """Token ids of the unconditional (CFG) prompt."""
    pad_id: int
    """Padding id."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SpecialTokenIds:
        return cls(**d)


def add_special_tokens(tokenizer, uncond_prompt: str) -> tuple[SpecialTokenIds, list[int]]:
    """Add the project's special tokens (and the unconditional prompt, when it looks like a token) to ``tokenizer``.

    Returns the ids and the ids that are new to the tokenizer (their embedding rows must train even under LoRA).
    """
    before = len(tokenizer)
    extra = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    is_token = uncond_prompt.startswith("<") and uncond_prompt.endswith(">") and " " not in uncond_prompt
    if is_token and uncond_prompt not in tokenizer.get_vocab():
        extra.append(uncond_prompt)
    if extra:
        tokenizer.add_special_tokens({"additional_special_tokens": extra}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    uncond_ids = tokenizer(uncond_prompt, add_special_tokens=False)["input_ids"]
    new_ids = list(range(before, len(tokenizer)))
    return SpecialTokenIds(ids[IMAGE], ids[IMG_START], ids[IMG_END], ids[BOI], ids[EOI], ids[IMAGE_GEN],
                           list(uncond_ids), tokenizer.pad_token_id), new_ids
