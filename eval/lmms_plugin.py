"""lmms-eval model plugin: ``--model unified_mllm``.

    python -m lmms_eval --model unified_mllm --model_args pretrained=runs/x/export,batch_size=8 \\
        --tasks mmbench_en_dev,mmvet,textvqa_val,gqa,pope --output_path runs/x/lmms_eval

Registered through the entry-point group ``lmms_eval.models`` (see pyproject.toml) as a ``ModelManifest`` with
two classes: :class:`UnifiedMLLMChat` (the default: lmms-eval hands it the task's chat messages) and
:class:`UnifiedMLLM` (``--force_simple``: context string + ``doc_to_visual``). Only the simple class receives
``loglikelihood`` requests: in lmms-eval 0.7 a chat model's tasks build generation requests only, so
``output_type: multiple_choice`` tasks need ``--force_simple``.

Model args: ``pretrained`` (an export directory), ``batch_size``, ``device`` (auto/cpu/cuda[:N]), ``dtype``
(auto/float32/bfloat16/float16), ``max_new_tokens`` (a cap on the tasks' own limits; none by default), ``seed``.

Two behaviours of lmms-eval 0.7.3 are handled here:

- its evaluator passes every response through ``unwrap_generation_output``, which turns anything but a string
  (or a ``GenerationResult``) into ``str(x)`` — a ``(loglikelihood, is_greedy)`` tuple would reach the task as
  the text ``"(-1.2, True)"``. Log-likelihood answers are therefore returned inside a ``GenerationResult``,
  whose ``text`` the evaluator hands back untouched (checked once at import, so a fixed release gets tuples);
- its command line catches every ``Exception`` raised during an evaluation, prints it and exits 0. A failure in
  this plugin (a checkpoint that does not load, an error while answering) raises :class:`EvaluationFailed`, a
  ``SystemExit``, so the command exits non-zero with the reason on stderr.

lmms-eval's ``multiple_choice`` scoring takes ``argmin`` over the returned values (its models return a loss),
so ``loglikelihood`` returns the negative log-likelihood of the continuation (a sum over its tokens, >= 0).
"""

from __future__ import annotations


def manifest():
    """The entry-point payload (a callable, so importing this module first does not race lmms-eval's registry)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="unified_mllm", simple_class_path="eval.lmms_plugin.UnifiedMLLM",
                         chat_class_path="eval.lmms_plugin.UnifiedMLLMChat")


import json  # noqa: E402
import os  # noqa: E402
from collections import defaultdict  # noqa: E402

import torch  # noqa: E402
from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402
from loguru import logger  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

try:  # lmms-eval >= 0.7 wraps every response; older releases keep tuples as they are
    from lmms_eval.api.instance import GenerationResult, unwrap_generation_output

    _PROBE = (-1.5, True)
    WRAP_LOGLIKELIHOOD = unwrap_generation_output(_PROBE)[0] != _PROBE
except ImportError:  # pragma: no cover - older lmms-eval
    GenerationResult = None
    WRAP_LOGLIKELIHOOD = False


class EvaluationFailed(SystemExit):
    """A failure inside the plugin. lmms-eval's CLI swallows ``Exception``; a ``SystemExit`` makes it exit 1."""

    def __init__(self, message: str):
        super().__init__(f"[unified_mllm] {message}")


def _as_int(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise EvaluationFailed(f"model_args {name}={value!r}: expected an integer") from None


def loglikelihood_response(nll: float, greedy: bool):
    """A ``(nll, is_greedy)`` answer in the form the installed lmms-eval hands to the task unchanged."""
    pair = (float(nll), bool(greedy))
    return GenerationResult(text=pair) if WRAP_LOGLIKELIHOOD else pair  # type: ignore[arg-type]


class UnifiedMLLM(lmms):
    """A unified-mllm export under lmms-eval (simple interface: context string + ``doc_to_visual``)."""

    is_simple = True

    def __init__(self, pretrained: str, batch_size: int | str = 1, device: str | None = "auto",
                 dtype: str = "auto", max_new_tokens: int | str | None = None, seed: int | str = 0,
                 **kwargs) -> None:
        super().__init__()
        if kwargs:
            logger.warning(f"unified_mllm ignores unknown model_args: {sorted(kwargs)}")
        self.batch_size_per_gpu = max(1, _as_int(batch_size, "batch_size"))
        self.max_new_tokens_cap = None if max_new_tokens in (None, "", "none", "None") else \
            _as_int(max_new_tokens, "max_new_tokens")
        self.seed = _as_int(seed, "seed")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:  # data parallel under accelerate / torchrun: lmms-eval shards the requests by rank
            from accelerate import Accelerator

            self.accelerator = Accelerator()
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
            device = f"cuda:{self.accelerator.local_process_index}"
        self.pipe = self._load(pretrained, device or "auto", dtype)
        threads = f", {torch.get_num_threads()} threads" if self.pipe.device.type == "cpu" else ""
        logger.info(f"unified_mllm: loaded {pretrained} on {self.pipe.device} ({self.pipe.dtype}), "
                    f"batch size {self.batch_size_per_gpu}{threads}")

    @staticmethod
    def _load(pretrained: str, device: str, dtype: str):
        from unified_mllm.inference import UnifiedPipeline

        if not pretrained or not os.path.isdir(pretrained):
            raise EvaluationFailed(f"pretrained={pretrained!r} is not a directory; pass the export directory of a "
                                   "trained stage (it holds unified_config.json), e.g. "
                                   "--model_args pretrained=runs/quickstart/sft/export")
        try:
            return UnifiedPipeline.from_pretrained(pretrained, device=device, dtype=dtype)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise EvaluationFailed(f"cannot load pretrained={pretrained}: {type(e).__name__}: {e}") from e

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """``--model_args`` win over the CLI's ``--batch_size``/``--device`` (lmms-eval would pass both and fail)."""
        from lmms_eval import utils

        args = utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k in ("batch_size", "device")}
        return cls(**{**extra, **args})

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # ------------------------------------------------------------------------------------------ requests
    def _doc(self, task: str, split: str, doc_id: int):
        return self.task_dict[task][split][doc_id]

    @staticmethod
    def _images(visuals) -> list[Image.Image]:
        out = []
        for v in visuals or []:
            if isinstance(v, Image.Image):
                out.append(v.convert("RGB"))
            elif isinstance(v, str) and os.path.splitext(v)[1].lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
                out.append(Image.open(v).convert("RGB"))
            else:
                raise EvaluationFailed(f"unified_mllm reads images only; the task passed a {type(v).__name__} "
                                       f"({str(v)[:80]!r})")
        return out

    def _question(self, images: list[Image.Image], context: str) -> list[dict]:
        """Images first, then the context (an ``<image>`` tag in the context places them when the counts agree)."""
        from unified_mllm.tokens import IMAGE

        if IMAGE in context and context.count(IMAGE) != len(images):
            context = context.replace(IMAGE, "").strip()
        return self.pipe.question_messages(images, context)

    def _conversation(self, request: Instance) -> list[dict]:
        context, _, doc_to_visual, doc_id, task, split = request.args
        return self._question(self._images(doc_to_visual(self._doc(task, split, doc_id))), context)

    def _gen_kwargs(self, request: Instance) -> dict:
        return request.args[1]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Batched, KV-cached replies; requests with equal generation settings share a batch (longest first)."""
        try:
            return self._generate(requests)
        except EvaluationFailed:
            raise
        except Exception as e:
            logger.exception("unified_mllm: generate_until failed")
            raise EvaluationFailed(f"generate_until failed: {type(e).__name__}: {e}") from e

    def _generate(self, requests: list[Instance]) -> list[str]:
        from unified_mllm.inference import SamplingParams

        groups: dict[str, list[int]] = defaultdict(list)
        settings: dict[str, dict] = {}
        for i, req in enumerate(requests):
            kw = dict(self._gen_kwargs(req) or {})
            key = json.dumps(kw, sort_keys=True, default=str)
            groups[key].append(i)
            settings[key] = kw
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="unified_mllm answering")
        for key, idx in groups.items():
            kw = settings[key]
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else [u for u in until if u]
            max_new = int(kw.get("max_new_tokens") or 128)
            if self.max_new_tokens_cap is not None:
                max_new = min(max_new, self.max_new_tokens_cap)
            temperature = float(kw.get("temperature") or 0.0)
            if kw.get("do_sample") is False:
                temperature = 0.0
            sampling = SamplingParams(temperature, int(kw.get("top_k") or 0),
                                      float(kw.get("top_p") or 1.0) if temperature > 0 else 1.0)
            convs = {i: self._conversation(requests[i]) for i in idx}
            lengths = {i: len(self.pipe.prompt_ids(c)[0]) for i, c in convs.items()}
            order = sorted(idx, key=lambda i: -lengths[i])
            for start in range(0, len(order), self.batch_size):
                chunk = order[start: start + self.batch_size]
                replies = self.pipe.generate_text([convs[i] for i in chunk], max_new, sampling, stop=until,
                                                  seed=self.seed + start)
                for i, reply in zip(chunk, replies):
                    out[i] = reply
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], kw), reply)
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]

    def loglikelihood(self, requests: list[Instance]) -> list:
        """``(negative log-likelihood of the continuation, whether greedy decoding produces it)`` per request."""
        try:
            res = []
            size = self.batch_size_per_gpu  # one forward a batch (the options of a question share its image)
            for start in tqdm(range(0, len(requests), size), disable=self.rank != 0, desc="unified_mllm loglikelihood"):
                items = []
                for req in requests[start:start + size]:
                    if len(req.args) >= 6:
                        context, continuation, doc_to_visual, doc_id, task, split = req.args[:6]
                        images = self._images(doc_to_visual(self._doc(task, split, doc_id))) if doc_to_visual else []
                    else:  # unconditional requests of acc_mutual_info: (context, continuation) only
                        (context, continuation), images = req.args[:2], []
                    msgs = self._question(images, context)
                    items.append((msgs[0]["images"], msgs[0]["content"], continuation))
                res += [loglikelihood_response(-ll, greedy) for ll, greedy in self.pipe.loglikelihood_batch(items)]
            return res
        except EvaluationFailed:
            raise
        except Exception as e:
            logger.exception("unified_mllm: loglikelihood failed")
            raise EvaluationFailed(f"loglikelihood failed: {type(e).__name__}: {e}") from e

    def generate_until_multi_round(self, requests) -> list[str]:
        raise EvaluationFailed("multi-round tasks are not supported by unified_mllm; use the chat class "
                               "(the default) with single-round tasks")


class UnifiedMLLMChat(UnifiedMLLM):
    """The chat interface: lmms-eval passes ``doc_to_messages``; images may sit anywhere in the turns."""

    is_simple = False

    def _gen_kwargs(self, request: Instance) -> dict:
        return request.args[2]

    def _conversation(self, request: Instance) -> list[dict]:
        from unified_mllm.tokens import IMAGE

        _, doc_to_messages, _, doc_id, task, split = request.args
        messages = doc_to_messages(self._doc(task, split, doc_id))
        conv = []
        for m in messages:
            m = m.model_dump() if hasattr(m, "model_dump") else m
            content, images = m["content"], []
            if isinstance(content, list):
                text, prev_image = "", False
                for part in content:
                    kind = part.get("type")
                    if kind == "image":
                        images += self._images([part.get("url", part.get("image"))])
                        text, prev_image = text + IMAGE, True
                    elif kind == "text":
                        text += ("\n" if prev_image else "") + part["text"]
                        prev_image = False
                    else:
                        raise EvaluationFailed(f"unified_mllm reads text and images only; task {task} sent a "
                                               f"{kind!r} part")
                content = text
            conv.append({"role": m["role"], "content": content, "images": images})
        return conv
