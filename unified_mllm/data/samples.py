"""Records → tokenized samples (input ids, labels, image references), with bad-input checks."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from unified_mllm.data.masking import IGNORE, tokenize_conversation
from unified_mllm.data.templates import format_generation_prompt
from unified_mllm.tokens import IMAGE, IMG_END, IMG_START


class BadSample(ValueError):
    """A record that cannot become a sample; ``reason`` is a short key used for skip counts."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    source: str
    task: str
    und_images: list = field(default_factory=list)
    """Image references for the <image> slots, in order."""
    gen_images: list = field(default_factory=list)
    """Image references whose codes fill the <image_gen> slots, in order."""
    record: int | None = None
    """Index of the record in its source (set by ``SampleBuilder.build``)."""


ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class SampleBuilder:
    tokenizer: object
    special_ids: dict
    num_und_slots: int
    num_positions: int
    template: str
    drop_prob: float
    uncond_prompt: str

    def understanding(self, rec: dict, rng: random.Random) -> Sample:
        conv = rec.get("conversations")
        if conv is None and rec.get("caption") is not None:  # caption-style understanding (align): image → caption
            conv = [{"from": "human", "value": IMAGE}, {"from": "gpt", "value": str(rec["caption"])}]
        if not isinstance(conv, list) or not conv or not all(
                isinstance(t, dict) and t.get("from") in ROLE and isinstance(t.get("value"), str) for t in conv):
            raise BadSample("malformed_conversation", f"record {rec.get('index')} of {rec['source']}: conversations must "
                                                      f"be a list of {{from, value}} turns")
        if not any(ROLE[t["from"]] == "assistant" for t in conv):
            raise BadSample("no_answer", f"record {rec.get('index')} of {rec['source']}: no assistant turn")
        n_tags = sum(t["value"].count(IMAGE) for t in conv)
        n_images = 0 if rec.get("image") is None else 1
        if n_tags != n_images:
            raise BadSample("image_count_mismatch", f"record {rec.get('index')} of {rec['source']}: {n_tags} {IMAGE} "
                                                    f"tags for {n_images} images")
        slots = IMG_START + IMAGE * self.num_und_slots + IMG_END
        messages = [{"role": ROLE[t["from"]], "content": t["value"].replace(IMAGE, slots)} for t in conv]
        ids, labels = tokenize_conversation(messages, self.tokenizer, self.template)
        image_id = self.special_ids["image_token_id"]
        labels = [IGNORE if t == image_id else lab for t, lab in zip(ids, labels)]
        if ids.count(image_id) != self.num_und_slots * n_images:
            raise BadSample("image_count_mismatch", f"record {rec.get('index')} of {rec['source']}: image slots were "
                                                    f"split by the template")
        return Sample(ids, labels, rec["source"], rec["task"], [rec["image"]] if n_images else [])

    def generation(self, rec: dict, rng: random.Random) -> Sample:
        caption = rec.get("caption")
        if not isinstance(caption, str) or not caption.strip() or rec.get("image") is None:
            raise BadSample("malformed_record", f"record {rec.get('index')} of {rec['source']}: needs a caption and an image")
        if rng.random() < self.drop_prob:
            caption = self.uncond_prompt
        tok = self.tokenizer
        ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + tok(
            format_generation_prompt(caption), add_special_tokens=False)["input_ids"]
        s = self.special_ids
        image = [s["boi_id"]] + [s["image_gen_token_id"]] * self.num_positions + [s["eoi_id"]]
        labels = [IGNORE] * (len(ids) + len(image) - 1) + [s["eoi_id"]]
        return Sample(ids + image, labels, rec["source"], rec["task"], gen_images=[rec["image"]])

    def text(self, rec: dict, rng: random.Random) -> Sample:
        return self.understanding({**rec, "image": None}, rng)

    def build(self, rec: dict, rng: random.Random) -> Sample:
        if rec.get("__malformed__"):
            raise BadSample("malformed_record", str(rec["__malformed__"]))
        sample = {"understanding": self.understanding, "generation": self.generation, "text": self.text}[rec["task"]](
            rec, rng)
        sample.record = rec.get("index")
        return sample
