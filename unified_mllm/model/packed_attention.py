"""``sdpa_packed``: PyTorch sdpa for packed rows without the dense (row × row) block-diagonal mask.

With plain ``sdpa``, transformers turns restarting ``position_ids`` into a boolean (B, 1, L, L) mask, and sdpa then
computes every score of the row — at L = 512 and ~70-token samples, 90 % of the attention work is masked away. Here
the documents of the batch (a new one wherever the position does not continue by +1, the rule transformers uses)
are gathered into groups of similar length, each group runs one causal sdpa call (no mask, so the kernel skips the
blocks above the diagonal), and the outputs are scattered back. Padding at the end of a packed row continues the
last document's positions, as with the dense mask, so results equal plain ``sdpa`` on the same inputs.

Inputs with a padding mask, a KV cache or a query shorter than the keys go to the plain sdpa path unchanged, so the
same model also generates. flash-attention's varlen kernel does the same job on CUDA (``flash_attention_2``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

NAME = "sdpa_packed"
GROUP_RATIO = 1.3
"""A length group holds documents up to this many times as long as its shortest one."""

_plan_cache: list = [None, None]  # (position_ids tensor, plan): all layers of one forward share their position ids


def _plan(position_ids: torch.Tensor, batch: int, length: int) -> dict:
    """Where each document's tokens sit in the (B, L) batch, grouped by length, and how to put them back."""
    if _plan_cache[0] is position_ids:
        return _plan_cache[1]
    device = position_ids.device
    pos = position_ids.expand(batch, length)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = (pos[:, 1:] - pos[:, :-1]) != 1
    first = torch.nonzero(starts.reshape(-1)).squeeze(1)  # flat index of each document's first token
    lengths = torch.diff(first, append=torch.tensor([batch * length], device=device))
    order = torch.argsort(lengths, stable=True)
    lens_sorted = lengths[order].tolist()
    slot_of_token = torch.empty(batch * length, dtype=torch.long, device=device)
    shapes, rows, cols, begin, filled = [], [], [], 0, 0
    for i in range(1, len(lens_sorted) + 1):
        if i == len(lens_sorted) or lens_sorted[i] > GROUP_RATIO * lens_sorted[begin]:
            docs, width = order[begin:i], lens_sorted[i - 1]
            offsets = torch.arange(width, device=device)
            flat = first[docs, None] + offsets  # (n, width) flat token index
            valid = offsets < lengths[docs, None]
            flat = torch.where(valid, flat, first[docs, None])  # padding slots repeat the first token: never attended
            rows.append((flat // length).reshape(-1))
            cols.append((flat % length).reshape(-1))
            slot_of_token[flat[valid]] = filled + torch.nonzero(valid.reshape(-1)).squeeze(1)
            shapes.append((len(docs), width))
            filled += len(docs) * width
            begin = i
    plan = {"rows": torch.cat(rows), "cols": torch.cat(cols), "shapes": shapes, "slot_of_token": slot_of_token}
    _plan_cache[0], _plan_cache[1] = position_ids, plan
    return plan


def packed_sdpa_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          position_ids: torch.Tensor | None = None, sliding_window: int | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """query (B, Hq, L, D), key/value (B, Hkv, L, D) → (B, L, Hq, D), like transformers' attention functions."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    if attention_mask is not None or position_ids is None or key.shape[2] != length:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    if sliding_window is not None:
        raise ValueError(f"{NAME} does not implement sliding-window attention; set model.llm.attn_implementation "
                         f"to sdpa for this model")
    plan = _plan(position_ids, batch, length)
    sizes = [n * w for n, w in plan["shapes"]]
    # one gather per tensor: (slots, H, D), split into the length groups
    q, k, v = (t.transpose(1, 2)[plan["rows"], plan["cols"]].split(sizes) for t in (query, key, value))
    outs = []
    # On CPU the attention runs in fp32 even under bf16 (autocast, or a bf16 model): the CPU flash kernel is 2-4x
    # slower in bf16 than in fp32 at these shapes, forward and backward (NOTES.md, session 24).
    upcast = query.device.type == "cpu" and (query.dtype != torch.float32 or torch.is_autocast_enabled("cpu"))
    with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
        for (n, width), qg, kg, vg in zip(plan["shapes"], q, k, v):
            qg, kg, vg = (t.view(n, width, t.shape[1], dim).transpose(1, 2) for t in (qg, kg, vg))  # (n, H, width, D)
            if upcast:
                qg, kg, vg = qg.float(), kg.float(), vg.float()
            og = F.scaled_dot_product_attention(qg, kg, vg, dropout_p=dropout if module.training else 0.0,
                                                is_causal=True, scale=scaling, enable_gqa=kg.shape[1] != heads)
            outs.append(og.transpose(1, 2).reshape(n * width, heads, dim))
    out = torch.cat(outs)[plan["slot_of_token"]].to(query.dtype)
    return out.view(batch, length, heads, dim), None


def packed_sdpa_mask(*args, attention_mask: torch.Tensor | None = None, q_length: int = 0, kv_length: int = 0,
                     **kwargs):
    """No mask when there is no padding mask and queries and keys line up (the attention function reads documents
    from the position ids); the usual sdpa mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length and not kwargs.get("q_offset") and not kwargs.get("kv_offset"):
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, q_length=q_length, kv_length=kv_length, **kwargs)


def register() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_sdpa_attention)
    AttentionMaskInterface.register(NAME, packed_sdpa_mask)
    return NAME
