"""Self-describing save/load of the unified model: a directory that loads with no other file.

    DIR/model.safetensors      LLM + projector + generation modules
    DIR/unified_config.json    UnifiedConfig (LLM config, special ids, vision sizes, heads, CFG settings, WinTok hash)
    DIR/tokenizer*.json ...    the text tokenizer (with its special tokens and chat template)
    DIR/wintok/                the frozen WinTok (save_pretrained form)
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file

from unified_mllm.model.config import UnifiedConfig
from unified_mllm.model.unified import UnifiedMLLM

WEIGHTS = "model.safetensors"
CONFIG = "unified_config.json"


NOT_EXPORTED = ("wintok.", "semantic_align.")
"""WinTok is saved beside the weights; the semantic-alignment MLP is a training-time loss module."""


def trainable_state_dict(model: UnifiedMLLM) -> dict:
    return {k: v for k, v in model.state_dict().items() if not k.startswith(NOT_EXPORTED)}


def save_pretrained(model: UnifiedMLLM, tokenizer, directory: str | Path, state_dict: dict | None = None) -> Path:
    """Write ``directory``; ``state_dict`` (e.g. gathered from ZeRO-3) replaces the model's own if given."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else trainable_state_dict(model)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items() if not k.startswith(NOT_EXPORTED)}
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt", "model_type": "unified_mllm"})
    model.config.save(directory / CONFIG)
    tokenizer.save_pretrained(str(directory))
    if model.wintok is not None:
        model.wintok.save_pretrained(directory / "wintok")
    return directory


def load_pretrained(directory: str | Path):
    """→ (UnifiedMLLM in eval mode, text tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tokenizer import WinTok
    from unified_mllm.model.build import select_attn_implementation

    directory = Path(directory)
    if not (directory / CONFIG).is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG}; this is not a unified-mllm export (the end of every "
                                f"stage writes one to <output_dir>/export)")
    config = UnifiedConfig.load(directory / CONFIG)
    llm_cfg = dict(config.llm_config)
    hf_config = AutoConfig.for_model(llm_cfg.pop("model_type"), **llm_cfg)
    llm = AutoModelForCausalLM.from_config(hf_config, attn_implementation=select_attn_implementation("auto"))
    wintok = WinTok.from_pretrained(directory / "wintok").freeze() if (directory / "wintok").is_dir() else None
    model = UnifiedMLLM(config, llm, wintok)
    missing, unexpected = model.load_state_dict(load_file(str(directory / WEIGHTS)), strict=False)
    missing = [k for k in missing if not k.startswith("wintok.")]
    if missing or unexpected:
        raise ValueError(f"{directory / WEIGHTS}: does not match {CONFIG} (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    return model.eval(), AutoTokenizer.from_pretrained(str(directory))
