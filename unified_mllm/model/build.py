"""Build the unified model from the ``model`` section of a stage config (and the CFG settings of ``data.cfg``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from unified_mllm.config.stage import CFGDropConfig, ModelConfig, SemanticAlignConfig
from unified_mllm.model.config import UnifiedConfig, VisionSizes
from unified_mllm.model.unified import UnifiedMLLM
from unified_mllm.tokens import add_special_tokens


def select_attn_implementation(requested: str) -> str:
    """auto: flash_attention_2 on CUDA when flash-attn is installed, else sdpa_packed (sdpa without the dense
    packed-sequence mask, see packed_attention.py)."""
    from unified_mllm.model.packed_attention import register

    register()
    if requested != "auto":
        if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ValueError("model.llm.attn_implementation: flash_attention_2 needs the flash-attn package "
                             "(pip install '.[gpu]'); use auto or sdpa")
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa_packed"


def load_text_tokenizer(model_cfg: ModelConfig):
    from transformers import AutoTokenizer

    source = model_cfg.llm.text_tokenizer or model_cfg.llm.path
    if source is None or not Path(source).exists():
        raise FileNotFoundError(f"model.llm.text_tokenizer: {source} not found; point it at a tokenizer directory "
                                f"(the quickstart trains one with `python -m unified_mllm.data.text_tokenizer`)")
    return AutoTokenizer.from_pretrained(source)


def vision_sizes(wintok) -> VisionSizes:
    c = wintok.config
    return VisionSizes(c.num_codebooks, c.codebook_size, c.codebook_dim, c.num_positions, c.num_semantic_tokens,
                       c.semantic_dim, c.hidden_size)


def _architecture(model_cfg: ModelConfig) -> dict[str, object]:
    """The stage config's architecture fields, named as in the YAML, with the UnifiedConfig attribute they set."""
    gen, proj = model_cfg.generation, model_cfg.projector
    return {"understanding_input": ("understanding_input", model_cfg.understanding_input),
            "projector.type": ("projector_type", proj.type),
            "projector.slot_embedding": ("projector_slot_embedding", proj.slot_embedding),
            "generation.embedding": ("gen_embedding", gen.embedding),
            "generation.position_embedding": ("gen_position_embedding", gen.position_embedding),
            "generation.head": ("gen_head", gen.head),
            "generation.depth_layers": ("depth_layers", gen.depth_layers),
            "generation.depth_hidden_size": ("depth_hidden_size", gen.depth_hidden_size)}


def check_init_from(model_cfg: ModelConfig, config: UnifiedConfig) -> None:
    """An export's architecture is fixed: a stage config that asks for a different one (an override that would
    otherwise do nothing) is an error naming each field."""
    diffs = [f"model.{name}: {want!r} here, {getattr(config, attr)!r} in the export"
             for name, (attr, want) in _architecture(model_cfg).items() if getattr(config, attr) != want]
    if model_cfg.llm.path is None:  # keys the HF config stores elsewhere (rope_theta → rope_parameters) are skipped
        llm = config.llm_config
        diffs += [f"model.llm.arch.{k}: {v!r} here, {llm[k]!r} in the export"
                  for k, v in model_cfg.llm.arch.items() if k in llm and llm[k] != v]
    if diffs:
        raise ValueError(f"model.init_from: {model_cfg.init_from} was built with a different architecture than this "
                         f"stage config asks for — {'; '.join(diffs)}. The export's architecture is kept from stage "
                         f"to stage: set these in the stage that starts from scratch, or start this one fresh with "
                         f"model.init_from=null")


def build_model(model_cfg: ModelConfig, cfg_drop: CFGDropConfig, text_loss_weight: float = 1.0,
                image_loss_weight: float = 1.0):
    """→ (UnifiedMLLM, text tokenizer, ids of the tokens this project added)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tokenizer import WinTok
    from unified_mllm.model.export import load_pretrained

    if model_cfg.init_from:
        model, tok = load_pretrained(model_cfg.init_from)
        check_init_from(model_cfg, model.config)
        model.text_loss_weight, model.image_loss_weight = text_loss_weight, image_loss_weight
        attach_semantic_align(model, model_cfg.generation.semantic_align)
        return model, tok, list(model.config.new_token_ids)
    if model_cfg.wintok is None:
        raise ValueError("model.wintok: the unified model needs a WinTok checkpoint (its sizes shape the heads)")
    wintok = WinTok.from_checkpoint(model_cfg.wintok).freeze()
    tokenizer = load_text_tokenizer(model_cfg)
    ids, new_ids = add_special_tokens(tokenizer, cfg_drop.uncond_prompt)
    attn = select_attn_implementation(model_cfg.llm.attn_implementation)
    if model_cfg.llm.path:
        llm = AutoModelForCausalLM.from_pretrained(model_cfg.llm.path, attn_implementation=attn, dtype=torch.float32)
    else:
        arch = dict(model_cfg.llm.arch)
        llm_cfg = AutoConfig.for_model(arch.pop("model_type"), vocab_size=len(tokenizer), **arch)
        llm = AutoModelForCausalLM.from_config(llm_cfg, attn_implementation=attn)
    if llm.get_input_embeddings().weight.shape[0] < len(tokenizer):
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    config = UnifiedConfig(
        llm_config=llm.config.to_dict(), special_ids=ids.to_dict(), vision=vision_sizes(wintok),
        **{attr: value for attr, value in _architecture(model_cfg).values()}, cfg_drop_prob=cfg_drop.drop_prob,
        uncond_prompt=cfg_drop.uncond_prompt, new_token_ids=new_ids, wintok_hash=wintok.identity_hash())
    model = UnifiedMLLM(config, llm, wintok, text_loss_weight, image_loss_weight)
    if config.gen_embedding == "causal_proj":
        model.gen_embedding.init_from_wintok(wintok)
    attach_semantic_align(model, model_cfg.generation.semantic_align)
    return model, tokenizer, new_ids


def attach_semantic_align(model: UnifiedMLLM, cfg: SemanticAlignConfig) -> None:
    """Give the model the semantic-alignment loss module when ``cfg.weight`` > 0 (a fresh MLP: it is never exported)."""
    from unified_mllm.model.semantic_align import SemanticAlign

    if cfg.weight <= 0:
        return
    llm, v = model.config.llm_config, model.config.vision
    layers = int(llm["num_hidden_layers"])
    layer = cfg.layer or max(1, layers // 2)
    if layer > layers:
        raise ValueError(f"model.generation.semantic_align.layer: {cfg.layer}, but the LLM has {layers} layers "
                         f"(1 … {layers}; 0: the middle one)")
    model.semantic_align = SemanticAlign(int(llm["hidden_size"]), v.semantic_dim, cfg.target, layer, v.num_positions,
                                         v.num_semantic_tokens, cfg.center)
    model.semantic_align_weight = cfg.weight
