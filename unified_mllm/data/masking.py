"""The one masking function: loss on assistant tokens only, for every chat template.

The conversation is rendered with the template; the character span of each assistant turn is found by rendering
prefixes (the turns before it with the generation prompt, and the turns up to and including it), and the tokens
whose characters fall in those spans are labelled. This works for any template whose renderings are prefixes of
one another — the LLM's own templates included.
"""

from __future__ import annotations

IGNORE = -100


def render(tokenizer, messages: list[dict], template: str, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict], template: str) -> tuple[str, list[tuple[int, int]]]:
    text = render(tokenizer, messages, template)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], template, add_generation_prompt=True)) if i else 0
        end = len(render(tokenizer, messages[: i + 1], template))
        if text[:end] != render(tokenizer, messages[: i + 1], template):
            raise ValueError("chat template renders are not prefix-consistent; register an explicit template")
        spans.append((start, end))
    return text, spans


def tokenize_conversation(messages: list[dict], tokenizer, template: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels = input_ids on assistant turns (and their end-of-turn), IGNORE elsewhere."""
    text, spans = assistant_spans(tokenizer, messages, template)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = []
    for tok, (a, b) in zip(ids, offsets):
        inside = any(s <= a and b <= e and b > a for s, e in spans)
        labels.append(tok if inside else IGNORE)
    return list(ids), labels
