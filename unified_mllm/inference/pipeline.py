"""Inference on a saved unified model: answers (batched, KV-cached), multi-turn chat, log-likelihoods, and
classifier-free-guided image generation.

    from unified_mllm.inference import UnifiedPipeline
    pipe = UnifiedPipeline.from_pretrained("runs/quickstart/sft/export")
    pipe.answer([Image.open("x.png")], "How many circles are there?")
    pipe.generate_images(["a red circle"], num_images=4, cfg_scale=3.0, seed=0)
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from unified_mllm.data.image_features import open_image
from unified_mllm.data.masking import render
from unified_mllm.data.samples import BadSample
from unified_mllm.data.templates import CHATML, format_generation_prompt
from unified_mllm.inference.sampling import SamplingParams, make_generators, sample
from unified_mllm.tokens import IMAGE, IMG_END, IMG_START

ImageLike = Image.Image | str | Path


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype: expected auto or one of {', '.join(table)}, got {dtype!r}")
    return table[dtype]


@dataclass
class GenerationStats:
    images: int = 0
    image_tokens: int = 0
    seconds: float = 0.0


def continuation_ids(tokenizer, prompt: str, continuation: str) -> tuple[list[int], int]:
    """(ids of ``prompt + continuation``, how many of them are the continuation's), tokenized as one text, as
    training tokenizes a conversation: after the chat template's newline a SentencePiece vocabulary spells the answer
    "A" as ``A``, alone as ``▁A`` — a token the model never learnt to put there (lm-eval splits the same way)."""
    whole = tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]
    n = len(whole) - len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if continuation else 0
    return whole, max(0, n)


class UnifiedPipeline:
    """A loaded unified model with its text tokenizer and WinTok, ready for inference."""

    def __init__(self, model, tokenizer, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(self.device).eval()
        self.model.llm.to(dtype)
        self.model.projector.to(dtype)
        self.model.gen_embedding.to(dtype)
        self.model.gen_head.to(dtype)
        self.tokenizer = tokenizer
        self.config = model.config
        if model.wintok is None:
            raise ValueError("this export has no wintok/ directory; images can be neither read nor drawn")
        self.wintok = model.wintok.to(self.device).eval()
        # transformers ≥ 5.2x names the KV cache `cache` (`past_key_values` is deprecated there); older ones do not
        self._cache_arg = "cache" if "cache" in inspect.signature(model.llm.forward).parameters else "past_key_values"
        self.ids = self.config.special_ids
        self.template = self.config.chat_template or tokenizer.chat_template or CHATML
        self.stop_ids = self._end_of_turn_ids()
        self.last_stats = GenerationStats()

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str = "auto", dtype: str = "auto") -> UnifiedPipeline:
        from unified_mllm.model.export import load_pretrained

        dev = pick_device(device)
        model, tokenizer = load_pretrained(directory)
        return cls(model, tokenizer, dev, pick_dtype(dtype, dev))

    # --------------------------------------------------------------------------------------------- prompts
    def _end_of_turn_ids(self) -> set[int]:
        """Tokens that end an assistant turn: eos, plus the first token the template writes after the answer."""
        stop = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        marker = "§answer§"
        msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}]
        text = render(self.tokenizer, msgs, self.template)
        tail = text[text.index(marker) + len(marker):]
        if tail.strip():
            tail_ids = self.tokenizer(tail.lstrip("\n "), add_special_tokens=False)["input_ids"]
            if tail_ids and tail_ids[0] != self.tokenizer.unk_token_id:
                stop.add(tail_ids[0])
        return stop

    def _load_image(self, image: ImageLike) -> Image.Image:
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        try:
            return open_image(str(image))
        except BadSample as e:
            raise ValueError(str(e)) from None

    def encode_images(self, images: list[ImageLike]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Images → (semantic tokens (M, N, D), pixel codes (M, C, P)) for the understanding slots."""
        if not images:
            return None, None
        from tokenizer import preprocess

        x = preprocess([self._load_image(i) for i in images], self.wintok.config.image_size).to(self.device)
        with torch.inference_mode():
            enc = self.wintok.encode(x.to(next(self.wintok.parameters()).dtype))
        return enc.semantic_tokens.to(self.dtype), enc.pixel_codes

    def _slots(self) -> str:
        return IMG_START + IMAGE * self.config.num_und_slots + IMG_END

    def prompt_ids(self, messages: list[dict]) -> tuple[list[int], list[ImageLike]]:
        """Chat messages → (input ids ending with the assistant prompt, images in slot order); see
        :meth:`prompt_text`."""
        text, images = self.prompt_text(messages)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"], images

    def prompt_text(self, messages: list[dict]) -> tuple[str, list[ImageLike]]:
        """Chat messages → (the rendered text ending with the assistant prompt, images in slot order).

        A message is {"role": "user"|"assistant"|"system", "content": str | list of parts}; a part is
        {"type": "text", "text": ...} or {"type": "image", "image": PIL image or path}. In a string content, each
        ``<image>`` tag takes the next image of the message's ``images`` list.
        """
        rendered, images = [], []
        for m in messages:
            content, msg_images = m["content"], list(m.get("images") or [])
            if isinstance(content, list):
                text = ""
                for part in content:
                    if part.get("type") == "image":
                        text += IMAGE
                        msg_images.append(part["image"])
                    else:
                        text += part.get("text", "")
                content = text
            if content.count(IMAGE) != len(msg_images):
                raise ValueError(f"a {m['role']} message has {content.count(IMAGE)} {IMAGE} tags for "
                                 f"{len(msg_images)} images")
            images += msg_images
            rendered.append({"role": m["role"], "content": content.replace(IMAGE, self._slots())})
        return render(self.tokenizer, rendered, self.template, add_generation_prompt=True), images

    def question_messages(self, images: list[ImageLike] | None, question: str) -> list[dict]:
        images = list(images or [])
        if IMAGE not in question:
            question = IMAGE * len(images) + ("\n" if images else "") + question
        return [{"role": "user", "content": question, "images": images}]

    # -------------------------------------------------------------------------------------- model calls
    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        length = max(len(s) for s in seqs)
        pad = self.ids["pad_id"]
        ids = torch.tensor([[pad] * (length - len(s)) + s for s in seqs], device=self.device)
        mask = torch.tensor([[0] * (length - len(s)) + [1] * len(s) for s in seqs], device=self.device)
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        return ids, mask, pos

    def _llm(self, embeds, mask, pos, cache=None, logits_to_keep: int = 1):
        """One LLM call with the KV cache; the output's ``.kv`` is the updated cache."""
        out = self.model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True,
                             output_hidden_states=True, logits_to_keep=logits_to_keep, **{self._cache_arg: cache})
        out.kv = getattr(out, self._cache_arg)
        return out

    # ------------------------------------------------------------------------------------------ answers
    @torch.inference_mode()
    def generate_text(self, conversations: list[list[dict]], max_new_tokens: int = 128,
                      sampling: SamplingParams | None = None, stop: list[str] | None = None, seed: int = 0,
                      return_scores: bool = False) -> list[str] | tuple[list[str], list[torch.Tensor]]:
        """Batched, KV-cached replies to several conversations (each a message list); with ``return_scores``, also
        the next-token logits (B, V) of every step."""
        sampling = (sampling or SamplingParams(temperature=0.0)).validate()
        prompts, all_images = [], []
        for conv in conversations:
            ids, images = self.prompt_ids(conv)
            prompts.append(ids)
            all_images += images
        sem, pix = self.encode_images(all_images)
        ids, mask, pos = self._left_pad(prompts)
        embeds = self.model.embed_inputs(ids, sem, pix)
        out = self._llm(embeds, mask, pos)
        cache = out.kv
        gens = make_generators(seed, len(prompts), self.device)
        done = [False] * len(prompts)
        produced: list[list[int]] = [[] for _ in prompts]
        stop = [s for s in (stop or []) if s]
        embed = self.model.llm.get_input_embeddings()
        scores = []
        for _ in range(max_new_tokens):
            if return_scores:
                scores.append(out.logits[:, -1].float().cpu())
            nxt = sample(out.logits[:, -1], sampling, gens)  # (B,)
            for i, t in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                if t in self.stop_ids:
                    done[i] = True
                    continue
                produced[i].append(t)
                if stop and any(s in self.tokenizer.decode(produced[i]) for s in stop):
                    done[i] = True
            if all(done):
                break
            mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
            pos = pos[:, -1:] + 1
            out = self._llm(embed(nxt[:, None]), mask, pos, cache)
            cache = out.kv
        replies = []
        for toks in produced:
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            for s in stop:
                text = text.split(s)[0]
            replies.append(text.strip())
        return (replies, scores) if return_scores else replies

    def answer(self, images: list[ImageLike] | None, question: str, max_new_tokens: int = 128,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> str:
        """One answer about ``images`` (tags ``<image>`` in the question place them; else they go first)."""
        return self.generate_text([self.question_messages(images, question)], max_new_tokens,
                                  SamplingParams(temperature, top_k, top_p), seed=seed)[0]

    def chat(self, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0) -> str:
        """The next assistant turn of a multi-turn conversation with images anywhere (see ``prompt_ids``)."""
        return self.generate_text([messages], max_new_tokens, SamplingParams(temperature, top_k, top_p), seed=seed)[0]

    def loglikelihood(self, images: list[ImageLike] | None, context: str, continuation: str) -> tuple[float, bool]:
        """(sum of log p(continuation | images, context), whether greedy decoding would produce it).

        The context is the user turn; the continuation is scored as the start of the assistant's reply.
        """
        return self.loglikelihood_batch([(images, context, continuation)])[0]

    @torch.inference_mode()
    def loglikelihood_batch(self, requests: list[tuple[list[ImageLike] | None, str, str]]) -> list[tuple[float, bool]]:
        """:meth:`loglikelihood` of several ``(images, context, continuation)`` requests in one left-padded forward
        (lmms-eval's multiple-choice tasks ask one per option); an empty continuation is ``(0.0, True)``."""
        seqs, lengths, images = [], [], []
        for imgs, context, continuation in requests:
            prompt, ctx_images = self.prompt_text(self.question_messages(imgs, context))
            seq, n = continuation_ids(self.tokenizer, prompt, continuation)
            seqs.append(seq)
            lengths.append(n)
            if n:
                images += ctx_images  # in row order: embed_inputs fills the batch's image slots in order
        results = [(0.0, True)] * len(requests)
        live = [i for i, n in enumerate(lengths) if n]
        if not live:
            return results
        ids, mask, pos = self._left_pad([seqs[i] for i in live])
        sem, pix = self.encode_images(images)
        logits = self.model.llm(inputs_embeds=self.model.embed_inputs(ids, sem, pix), attention_mask=mask,
                                position_ids=pos, use_cache=False).logits.float()  # (B, L, V)
        end = ids.shape[1]
        for row, i in enumerate(live):
            n = lengths[i]
            pred = logits[row, end - n - 1: end - 1].log_softmax(-1)  # (n, V): the predictions of the continuation
            target = torch.tensor(seqs[i][-n:], device=self.device)
            results[i] = (pred.gather(1, target[:, None]).sum().item(), bool((pred.argmax(-1) == target).all()))
        return results

    # -------------------------------------------------------------------------------- image generation
    def _generation_prefix(self, caption: str) -> list[int]:
        tok = self.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        return bos + tok(format_generation_prompt(caption), add_special_tokens=False)["input_ids"] + [self.ids["boi_id"]]

    @torch.inference_mode()
    def generate_codes(self, prompts: list[str], num_images: int = 1, cfg_scale: float = 3.0,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                       return_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Pixel codes (len(prompts)·num_images, C, P), images of a prompt adjacent (with ``return_logits``, also the
        guided logits (n, C, P, K) each sub-code was drawn from).

        Conditional and unconditional sequences run in one batch with a KV cache; at each position the head reads
        the last hidden state and samples the C sub-codes (guided logits u + s·(c − u)); the chosen codes feed
        both branches. Image j of prompt i is sampled with seed + i·num_images + j.
        """
        sampling = SamplingParams(temperature, top_k, top_p).validate()
        v = self.config.vision
        n = len(prompts) * num_images
        cond = [self._generation_prefix(p) for p in prompts for _ in range(num_images)]
        guided = cfg_scale != 1.0
        seqs = cond + [self._generation_prefix(self.config.uncond_prompt)] * n if guided else cond
        ids, mask, pos = self._left_pad(seqs)
        out = self._llm(self.model.embed_inputs(ids), mask, pos)
        cache, hidden = out.kv, out.hidden_states[-1][:, -1]  # (B, H)
        gens = make_generators(seed, n, self.device)
        codes = torch.zeros(n, v.num_codebooks, v.num_positions, dtype=torch.long, device=self.device)
        record = torch.zeros(n, v.num_codebooks, v.num_positions, v.codebook_size) if return_logits else None
        head, embedding = self.model.gen_head, self.model.gen_embedding
        for p in range(v.num_positions):
            chosen = torch.zeros(hidden.shape[0], 0, dtype=torch.long, device=self.device)
            head_cache: list = []  # the depth head's keys and values of this position's sub-codes
            for _ in range(v.num_codebooks):
                logits = head.next_logits(hidden, chosen, head_cache).float()  # (B, K)
                if guided:
                    logits = logits[n:] + cfg_scale * (logits[:n] - logits[n:])
                if record is not None:
                    record[:, chosen.shape[1], p] = logits.cpu()
                k = sample(logits, sampling, gens)  # (n,)
                chosen = torch.cat([chosen, (torch.cat([k, k]) if guided else k)[:, None]], dim=1)
            codes[:, :, p] = chosen[:n]
            if p == v.num_positions - 1:
                break
            emb = embedding.last(codes[:, :, : p + 1])  # (n, 1, H): the embedding of the position just drawn
            if guided:  # the unconditional rows drew the same codes
                emb = torch.cat([emb, emb])
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            pos = pos[:, -1:] + 1
            out = self._llm(emb.to(self.dtype), mask, pos, cache)
            cache, hidden = out.kv, out.hidden_states[-1][:, -1]
        return (codes, record) if return_logits else codes

    def decode_codes(self, codes: torch.Tensor) -> list[Image.Image]:
        from tokenizer import to_pil

        with torch.inference_mode():
            return to_pil(self.wintok.decode_codes(codes.to(self.device)))

    def generate_images(self, prompts: list[str] | str, num_images: int = 1, cfg_scale: float = 3.0,
                        temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                        batch_size: int = 16) -> list[list[Image.Image]]:
        """``num_images`` PIL images per prompt (a list per prompt), deterministic for a seed."""
        if isinstance(prompts, str):
            prompts = [prompts]
        start = time.perf_counter()
        per_call = max(1, batch_size // num_images)
        result = []
        for i in range(0, len(prompts), per_call):
            chunk = prompts[i: i + per_call]
            codes = self.generate_codes(chunk, num_images, cfg_scale, temperature, top_k, top_p,
                                        seed + i * num_images)
            images = self.decode_codes(codes)
            result += [images[j * num_images: (j + 1) * num_images] for j in range(len(chunk))]
        v = self.config.vision
        n = len(prompts) * num_images
        self.last_stats = GenerationStats(n, n * v.num_positions * v.num_codebooks, time.perf_counter() - start)
        return result
