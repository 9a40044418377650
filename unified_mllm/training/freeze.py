"""What trains in a stage: applied from outside the model (model files hold architecture only).

WinTok is frozen in every stage. The LLM is frozen, fully trained, or adapted with LoRA (peft); under
``frozen`` and ``lora`` the rows of the special tokens the project added still train fully (a gradient mask
on the embedding matrix, or peft's ``trainable_token_indices``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from unified_mllm.config.stage import TrainablesConfig


@dataclass
class TrainableSummary:
    trainable: int
    total: int
    groups: dict[str, int]

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in self.groups.items() if v)
        return f"trainable {self.trainable / 1e6:.2f}M of {self.total / 1e6:.2f}M parameters ({parts})"


def _set(module: nn.Module | None, flag: bool) -> None:
    if module is not None:
        for p in module.parameters():
            p.requires_grad_(flag)


def _mask_embedding_rows(embedding: nn.Embedding, row_ids: list[int]) -> None:
    """Train only ``row_ids`` of ``embedding``: the other rows get zero gradient (and no weight decay)."""
    weight = embedding.weight
    weight.requires_grad_(True)
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    mask[row_ids] = 1.0
    weight.register_hook(lambda grad: grad * mask.to(grad.dtype))
    weight._umllm_row_masked = True  # type: ignore[attr-defined]


def apply_trainables(model: nn.Module, train: TrainablesConfig, new_token_ids: list[int]) -> TrainableSummary:
    """Set requires_grad per ``train``; wrap the LLM with LoRA when asked. Returns a summary for the log."""
    _set(model, False)
    if train.llm == "full":
        _set(model.llm, True)
    elif train.llm == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=train.lora_rank, lora_alpha=train.lora_alpha, lora_dropout=train.lora_dropout,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            trainable_token_indices=sorted(new_token_ids) or None, task_type="CAUSAL_LM")
        model.llm = get_peft_model(model.llm, lora)
    elif new_token_ids:
        _mask_embedding_rows(model.llm.get_input_embeddings(), sorted(new_token_ids))
    _set(getattr(model, "projector", None), train.projector)
    _set(getattr(model, "gen_embedding", None), train.generation)
    _set(getattr(model, "gen_head", None), train.generation)
    _set(getattr(model, "semantic_align", None), train.generation)
    if getattr(model, "wintok", None) is not None:
        model.wintok.requires_grad_(False)
        model.wintok.eval()
    groups = {
        "llm": sum(p.numel() for p in model.llm.parameters() if p.requires_grad),
        "projector": sum(p.numel() for p in getattr(model, "projector", nn.Module()).parameters() if p.requires_grad),
        "generation": sum(p.numel() for m in ("gen_embedding", "gen_head", "semantic_align")
                          if getattr(model, m, None) is not None
                          for p in getattr(model, m).parameters() if p.requires_grad),
    }
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise ValueError("train: nothing to train in this stage (projector, llm and generation are all frozen)")
    return TrainableSummary(trainable, total, groups)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay for biases, norms, embeddings (so masked embedding rows never move)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "norm" in name.lower() or "embed" in name.lower() or getattr(p, "_umllm_row_masked", False):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
