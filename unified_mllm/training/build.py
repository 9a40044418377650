"""What the stage trainer builds from its config: the model, the data stream, device batches, the export."""

from __future__ import annotations

from pathlib import Path

import torch

from unified_mllm.config import load_recipe
from unified_mllm.config.stage import StageConfig


def build_model(cfg: StageConfig, ds_config: dict):
    """→ (UnifiedMLLM, text tokenizer, ids of added tokens)."""
    from unified_mllm.model import build_model as build

    return build(cfg.model, cfg.data.cfg, cfg.optim.text_loss_weight, cfg.optim.image_loss_weight)


def build_data(cfg: StageConfig, model, tokenizer, rank: int, world_size: int):
    from unified_mllm.data.image_features import ImageFeatures
    from unified_mllm.data.loader import DataStream, check_task_names
    from unified_mllm.data.pretokenize import cache_dir_for
    from unified_mllm.data.samples import SampleBuilder
    from unified_mllm.data.templates import resolve_template

    recipe = load_recipe(cfg.data.recipe)
    wintok = model.wintok
    # the hash recorded at build time: under ZeRO-3 the live WinTok parameters are partitioned
    # a recipe of text-only sources (task: text) reads no image, so it needs no pretokenize cache
    has_images = any(src.task != "text" for src in recipe.sources)
    cache = (cache_dir_for(cfg.data.recipe, recipe, model.config.wintok_hash)
             if wintok is not None and has_images else None)
    if cache is not None and not cache.is_dir() and not recipe.online_tokenization:
        raise FileNotFoundError(f"{cache}: no pretokenize cache for {cfg.data.recipe} with this WinTok; run "
                                f"`python -m unified_mllm.data.pretokenize --recipe {cfg.data.recipe} --wintok "
                                f"{cfg.model.wintok}` or set online_tokenization: true in the recipe")
    if recipe.online_tokenization and cfg.data.num_workers > 0 and wintok is not None and any(
            t.is_cuda for t in wintok.parameters()):
        raise ValueError(f"{cfg.data.recipe}: online tokenization with WinTok on the GPU runs in the main process; set "
                         f"data.num_workers: 0, or pretokenize the recipe (python -m unified_mllm.data.pretokenize)")
    for name in ("task_lr_scale", "task_min_lr_ratio"):
        check_task_names(name, getattr(cfg.optim, name), {src.task for src in recipe.sources}, cfg.data.recipe)
    features = ImageFeatures(wintok if recipe.online_tokenization else None, cache)
    template = resolve_template(cfg.data.template, tokenizer, cfg.stage)
    if any(src.task in ("understanding", "text") for src in recipe.sources):
        model.config.chat_template = template  # saved with the export; inference renders prompts with it
    builder = SampleBuilder(tokenizer, model.config.special_ids, model.config.num_und_slots,
                            model.config.vision.num_positions, template,
                            cfg.data.cfg.drop_prob, cfg.data.cfg.uncond_prompt)
    return DataStream(cfg.data, recipe, builder, features, cfg.optim.micro_batch_size, rank, world_size,
                      cfg.data.seed, cfg.optim.task_ratio or None, cfg.data.recipe, cfg.optim.task_micro_batch_size,
                      gen_semantic=model.semantic_align is not None)


def model_inputs(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k != "records"}


def export(trainer, out: Path | None = None) -> Path:
    """A ``from_pretrained`` directory (LoRA merged; ZeRO-3 parameters gathered): the final ``<output_dir>/export``
    by default, which merges LoRA into the model itself; with ``out`` an intermediate one, which merges into a copy so
    that training goes on with the adapters."""
    import contextlib
    import copy
    import shutil

    import deepspeed

    from unified_mllm.model import save_pretrained
    from unified_mllm.training.distributed import barrier

    final = out is None
    out = trainer.output_dir / "export" if final else out
    model = trainer.model
    params = list(model.parameters())
    # model.ema_decay: the export holds the weight average (kept by the first process, under ZeRO-2 at most)
    average = trainer.ema.swapped_in() if trainer.ema is not None else contextlib.nullcontext()
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=hasattr(params[0], "ds_id")), average:
        if trainer.rank == 0:
            lora_llm = model.llm if hasattr(model.llm, "merge_and_unload") else None
            if lora_llm is not None:  # LoRA: export merged weights
                model.llm = (lora_llm if final else copy.deepcopy(lora_llm)).merge_and_unload()
            target = out if final else out.with_name(out.name + ".partial")  # intermediate: complete or absent
            try:
                save_pretrained(model, trainer.tokenizer, target)
            finally:
                if lora_llm is not None and not final:
                    model.llm = lora_llm
            if not final:
                if out.exists():
                    shutil.rmtree(out)
                target.rename(out)
    barrier()
    return out
