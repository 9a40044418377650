"""The unified MLLM: a Hugging Face causal LM with WinTok features in <image> slots and a pixel-code generation
head. Architecture only: precision, freezing, LoRA and DeepSpeed are applied from outside."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unified_mllm.model.config import UnifiedConfig
from unified_mllm.model.gen_embedding import build_gen_embedding
from unified_mllm.model.gen_head import build_gen_head
from unified_mllm.model.projector import UnderstandingProjector


@dataclass
class UnifiedOutput:
    loss: torch.Tensor
    """text_loss_weight · text_loss + image_loss_weight · image_loss."""
    text_loss: torch.Tensor
    """Mean next-token cross-entropy over labelled text tokens (0 when none)."""
    image_loss: torch.Tensor
    """Mean cross-entropy over the sub-codes of every generation slot (0 when none)."""
    num_text_tokens: int
    num_image_tokens: int
    logits: torch.Tensor | None = None
    """(B, L, V) text logits: without labels, or with return_logits (training computes them at labelled positions
    only)."""
    per_token_text_loss: torch.Tensor | None = None
    """(B, L−1) loss of predicting token t+1 at t (0 where unlabelled), with return_per_token."""
    per_slot_image_loss: torch.Tensor | None = None
    """(S,) mean sub-code loss of each generation slot in order, with return_per_token."""
    align_loss: torch.Tensor | None = None
    """1 − cos of the semantic alignment (None unless a SemanticAlign is attached and the batch draws images); the
    loss includes it times ``semantic_align_weight``."""


class UnifiedMLLM(nn.Module):
    def __init__(self, config: UnifiedConfig, llm: nn.Module, wintok: nn.Module | None = None,
                 text_loss_weight: float = 1.0, image_loss_weight: float = 1.0):
        super().__init__()
        self.config = config
        self.llm = llm
        # WinTok is held, not registered: it is frozen, so it stays out of parameters(), the optimizer, the state dict
        # and ZeRO-3's partitioning (online tokenization would otherwise see partitioned weights); it is saved beside
        # the model (export.py) and moved with it by the inference pipeline.
        self.__dict__["wintok"] = wintok
        hidden = llm.config.hidden_size
        self.projector = UnderstandingProjector(config, hidden)
        self.gen_embedding = build_gen_embedding(config, hidden)
        self.gen_head = build_gen_head(config, hidden)
        self.text_loss_weight, self.image_loss_weight = text_loss_weight, image_loss_weight
        # a training-time loss module (semantic_align.py), attached by the stage that asks for it; never exported
        self.semantic_align: nn.Module | None = None
        self.semantic_align_weight = 0.0
        ids = config.special_ids
        self.image_token_id, self.image_gen_token_id = ids["image_token_id"], ids["image_gen_token_id"]

    # ------------------------------------------------------------------------------------------ inputs
    def embed_inputs(self, input_ids: torch.Tensor, und_semantic: torch.Tensor | None = None,
                     und_pixel_codes: torch.Tensor | None = None,
                     gen_codes: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image features in the <image> slots and code embeddings in the <image_gen> slots."""
        embeds = self.llm.get_input_embeddings()(input_ids)  # (B, L, H)
        und_mask = input_ids == self.image_token_id  # (B, L)
        num_und = int(und_mask.sum())
        if num_und or und_semantic is not None or und_pixel_codes is not None:
            feats = self.projector(und_semantic, und_pixel_codes) if (und_semantic is not None or und_pixel_codes
                                                                      is not None) else embeds.new_zeros(0, 1, 1)
            if feats.shape[0] * feats.shape[1] != num_und:
                raise ValueError(f"image features and <image> slots do not match: {num_und} slots in the batch, "
                                 f"{feats.shape[0]} images × {feats.shape[1]} tokens = {feats.shape[0] * feats.shape[1]}")
            embeds = embeds.masked_scatter(und_mask[..., None], feats.reshape(-1, feats.shape[-1]).to(embeds.dtype))
        gen_mask = input_ids == self.image_gen_token_id  # (B, L)
        num_gen = int(gen_mask.sum())
        if num_gen or gen_codes is not None:
            n_codes = 0 if gen_codes is None else gen_codes.shape[0] * gen_codes.shape[2]
            if n_codes != num_gen:
                raise ValueError(f"generation codes and <image_gen> slots do not match: {num_gen} slots in the "
                                 f"batch, {n_codes} code positions")
            g = self.gen_embedding(gen_codes)  # (G, P, H)
            embeds = embeds.masked_scatter(gen_mask[..., None], g.reshape(-1, g.shape[-1]).to(embeds.dtype))
        return embeds

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                und_semantic: torch.Tensor | None = None, und_pixel_codes: torch.Tensor | None = None,
                gen_codes: torch.Tensor | None = None, gen_semantic: torch.Tensor | None = None,
                task: str | None = None, sources: list[str] | None = None,
                touch_unused: bool = False, return_per_token: bool = False,
                return_logits: bool = False) -> UnifiedOutput:
        embeds = self.embed_inputs(input_ids, und_semantic, und_pixel_codes, gen_codes)
        align = self.semantic_align if gen_semantic is not None and gen_codes is not None and gen_codes.numel() \
            else None
        # the decoder and the LM head separately: training needs logits only where a text label is
        decoded = self.llm.get_decoder()(inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask,
                                         use_cache=False, output_hidden_states=align is not None)
        hidden = decoded.last_hidden_state  # (B, L, H)
        lm_head = self.llm.get_output_embeddings()
        logits = lm_head(hidden) if labels is None or return_logits else None  # (B, L, V)
        zero = hidden.sum() * 0.0
        # text: predict token t+1 at t
        text_loss, per_token, n_text = zero, None, 0
        if labels is not None:
            shift_labels = labels[:, 1:]
            keep = shift_labels != -100  # (B, L-1)
            picked = logits[:, :-1][keep] if logits is not None else lm_head(hidden[:, :-1][keep])  # (T, V)
            token_loss = F.cross_entropy(picked.float(), shift_labels[keep], reduction="none")  # (T,)
            n_text = token_loss.shape[0]
            text_loss = token_loss.sum() / n_text if n_text else zero
            per_token = torch.zeros(keep.shape, dtype=token_loss.dtype, device=keep.device).masked_scatter(
                keep, token_loss) if return_per_token else None
        # image: the hidden state before each <image_gen> slot predicts that slot's sub-codes
        image_loss, per_slot, n_slots = zero, None, 0
        if gen_codes is not None and gen_codes.numel():
            before_slot = torch.zeros_like(input_ids, dtype=torch.bool)
            before_slot[:, :-1] = input_ids[:, 1:] == self.image_gen_token_id
            h = hidden[before_slot]  # (S, H)
            targets = gen_codes.permute(0, 2, 1).reshape(-1, gen_codes.shape[1])  # (S, C), slot order
            code_logits = self.gen_head(h, targets)  # (S, C, K)
            slot_loss = F.cross_entropy(code_logits.float().transpose(1, 2), targets, reduction="none").mean(1)  # (S,)
            n_slots = slot_loss.shape[0]
            image_loss, per_slot = slot_loss.mean(), slot_loss
        align_loss = align(decoded.hidden_states[align.layer][before_slot], gen_semantic) if align is not None else None
        loss = self.text_loss_weight * text_loss + self.image_loss_weight * image_loss
        if align_loss is not None:
            loss = loss + self.semantic_align_weight * align_loss
        if touch_unused:
            loss = loss + self._dummy_pass(hidden, used_und=und_semantic is not None or und_pixel_codes is not None,
                                           used_gen=gen_codes is not None and gen_codes.numel() > 0,
                                           used_align=align_loss is not None)
        return UnifiedOutput(loss, text_loss, image_loss, n_text, n_slots * self.config.vision.num_codebooks, logits,
                             per_token if return_per_token else None, per_slot if return_per_token else None,
                             align_loss)

    def _dummy_pass(self, hidden: torch.Tensor, used_und: bool, used_gen: bool, used_align: bool) -> torch.Tensor:
        """A zero-weighted pass through the modules this batch did not use (ZeRO-3 needs every hook to fire)."""
        v = self.config.vision
        total = hidden.sum() * 0.0
        if not used_und:
            sem = hidden.new_zeros(1, 1, v.semantic_dim) if hasattr(self.projector, "semantic") else None
            pix = torch.zeros(1, v.num_codebooks, 1, dtype=torch.long, device=hidden.device) \
                if hasattr(self.projector, "pixel") else None
            total = total + self.projector(sem, pix).sum() * 0.0
        if not used_gen:
            codes = torch.zeros(1, v.num_codebooks, 1, dtype=torch.long, device=hidden.device)
            total = total + self.gen_embedding(codes).sum() * 0.0
            total = total + self.gen_head(hidden[:1, 0], codes[:, :, 0]).sum() * 0.0
        if self.semantic_align is not None and not used_align:
            total = total + self.semantic_align.proj(hidden[:1, 0]).sum() * 0.0
        return total
