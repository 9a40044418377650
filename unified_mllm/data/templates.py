"""Chat templates (a plain-dict registry of Jinja strings) and the one generation-prompt format."""

from __future__ import annotations

PLAIN = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
    "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
)
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VICUNA_V1 = (
    "{{ bos_token }}A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. {% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ 'USER: ' + m['content'] + ' ' }}{% else %}{{ 'ASSISTANT: ' + m['content'] + eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
TEMPLATES: dict[str, str] = {"plain": PLAIN, "chatml": CHATML, "vicuna_v1": VICUNA_V1}


def resolve_template(name: str, tokenizer, stage: str | None = None) -> str:
    """The Jinja template for ``name``: auto → plain for align, else the tokenizer's own, else chatml."""
    if name == "auto":
        if stage == "align":
            return PLAIN
        return tokenizer.chat_template or CHATML
    if name not in TEMPLATES:
        raise ValueError(f"data.template: unknown template {name!r} (valid: auto, {', '.join(TEMPLATES)})")
    return TEMPLATES[name]


def format_generation_prompt(caption: str) -> str:
    """The text before <boi> of a text-to-image sample; training and inference (both CFG branches) use it."""
    return caption.strip()
