"""The plain alternative, kept as a reference for tests and benchmarks: one image at a time, no KV cache, the
conditional and unconditional sequences as separate full forward passes at every position."""

from __future__ import annotations

import torch

from unified_mllm.inference.sampling import SamplingParams, make_generators, sample


@torch.inference_mode()
def naive_generate_codes(pipe, prompt: str, cfg_scale: float = 3.0, sampling: SamplingParams | None = None,
                         seed: int = 0, return_logits: bool = False):
    """Codes (1, C, P) for one image of ``prompt``, sampled with the same rule and seed as the pipeline's row 0
    (with ``return_logits``, also the guided logits (1, C, P, K))."""
    sampling = sampling or SamplingParams()
    model, v = pipe.model, pipe.config.vision
    gen_id = pipe.ids["image_gen_token_id"]
    cond = pipe._generation_prefix(prompt)
    uncond = pipe._generation_prefix(pipe.config.uncond_prompt)
    gen = make_generators(seed, 1, pipe.device)
    codes = torch.zeros(1, v.num_codebooks, 0, dtype=torch.long, device=pipe.device)
    record = []

    def last_hidden(prefix: list[int]) -> torch.Tensor:
        ids = torch.tensor([prefix + [gen_id] * codes.shape[2]], device=pipe.device)
        embeds = model.embed_inputs(ids, gen_codes=codes if codes.shape[2] else None)
        out = model.llm(inputs_embeds=embeds, use_cache=False, output_hidden_states=True)
        return out.hidden_states[-1][:, -1]  # (1, H)

    for _ in range(v.num_positions):
        h_cond = last_hidden(cond)
        h_uncond = last_hidden(uncond) if cfg_scale != 1.0 else None
        chosen = torch.zeros(1, 0, dtype=torch.long, device=pipe.device)
        for _ in range(v.num_codebooks):
            logits = model.gen_head.next_logits(h_cond, chosen).float()
            if h_uncond is not None:
                u = model.gen_head.next_logits(h_uncond, chosen).float()
                logits = u + cfg_scale * (logits - u)
            record.append(logits.cpu())
            chosen = torch.cat([chosen, sample(logits, sampling, gen)[:, None]], dim=1)
        codes = torch.cat([codes, chosen[:, :, None]], dim=2)
    if return_logits:  # record is position-major, sub-code-minor
        return codes, torch.stack(record, 1).reshape(1, v.num_positions, v.num_codebooks, -1).transpose(1, 2)
    return codes


@torch.inference_mode()
def naive_answer_ids(pipe, question_ids: list[int], und_semantic, und_pixel, max_new_tokens: int) -> list[int]:
    """Greedy reply ids without a cache (the whole sequence re-run for every token)."""
    ids = list(question_ids)
    produced = []
    for _ in range(max_new_tokens):
        x = torch.tensor([ids], device=pipe.device)
        logits = pipe.model.llm(inputs_embeds=pipe.model.embed_inputs(x, und_semantic, und_pixel), use_cache=False).logits
        t = int(logits[0, -1].argmax())
        if t in pipe.stop_ids:
            break
        produced.append(t)
        ids.append(t)
    return produced
