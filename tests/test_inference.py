"""Inference: KV-cached CFG generation equals the uncached reference, seeds, answers, log-likelihoods, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from test_model import assets, build  # noqa: F401  (the module-scoped tiny-asset fixture)

from unified_mllm.inference import SamplingParams, UnifiedPipeline
from unified_mllm.inference.naive import naive_answer_ids, naive_generate_codes
from unified_mllm.inference.sampling import filter_logits, make_generators, sample
from unified_mllm.model import save_pretrained
from unified_mllm.shapeworld.render import render
from unified_mllm.shapeworld.scene import place, random_specs


@pytest.fixture(scope="module", params=[("depth", "sum", True), ("parallel", "causal_proj", False)])
def pipe(request, assets: Path, tmp_path_factory) -> UnifiedPipeline:  # noqa: F811
    head, embedding, positions = request.param
    model, tok, _ = build(assets, generation={"head": head, "embedding": embedding, "position_embedding": positions})
    out = save_pretrained(model, tok, tmp_path_factory.mktemp("export") / "export")
    return UnifiedPipeline.from_pretrained(out, device="cpu")


def shape_image(seed: int, size: int = 32) -> Image.Image:
    import random

    rng = random.Random(seed)
    return render(place(rng, random_specs(rng, 2)), size)


def test_cached_batched_cfg_generation_equals_the_naive_loop(pipe: UnifiedPipeline) -> None:
    prompts = ["a red circle", "a blue square is there"]  # different lengths: left padding in the batch
    codes, logits = pipe.generate_codes(prompts, num_images=1, cfg_scale=3.0, seed=3, return_logits=True)
    for i, prompt in enumerate(prompts):
        ref, ref_logits = naive_generate_codes(pipe, prompt, 3.0, SamplingParams(), seed=3 + i, return_logits=True)
        torch.testing.assert_close(logits[i: i + 1], ref_logits, atol=2e-4, rtol=1e-4)
        assert torch.equal(codes[i: i + 1], ref), f"cached codes differ from the uncached loop for {prompt!r}"
    # guidance moves the logits: scale 1 (no unconditional pass) differs from scale 3
    _, plain = pipe.generate_codes(prompts[:1], cfg_scale=1.0, seed=3, return_logits=True)
    assert not torch.allclose(plain[:, 0, 0], logits[:1, 0, 0])


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(0.7, top_k=5), SamplingParams(1.3, top_p=0.6)])
def test_sampling_draws_what_torch_multinomial_draws_row_by_row(params: SamplingParams) -> None:
    # a seed's images must not change with the sampler's implementation: each row draws, step after step, what
    # torch.multinomial draws from its probabilities with its own generator (ties included)
    torch.manual_seed(0)
    for rows, size, scale in [(1, 2, 1.0), (5, 7, 0.1), (96, 256, 5.0), (3, 1000, 20.0)]:
        logits = torch.randn(rows, size) * scale
        logits[:, : size // 2] = logits[:, :1]
        ours, reference = make_generators(11, rows), make_generators(11, rows)
        for _ in range(6):
            probs = filter_logits(logits, params).softmax(-1)
            expected = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(reference)])
            assert torch.equal(sample(logits, params, ours), expected)
    with pytest.raises(ValueError, match="no valid distribution"):
        sample(torch.full((2, 4), float("nan")), params, make_generators(0, 2))


def test_generation_is_seeded_and_images_come_out(pipe: UnifiedPipeline) -> None:
    a = pipe.generate_codes(["a red circle"], num_images=3, seed=1)
    b = pipe.generate_codes(["a red circle"], num_images=3, seed=1)
    c = pipe.generate_codes(["a red circle"], num_images=3, seed=2)
    v = pipe.config.vision
    assert a.shape == (3, v.num_codebooks, v.num_positions)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < v.codebook_size  # only image codes are ever sampled
    # a prompt's images do not depend on the other prompts of the call (seed + i·num_images + j per image)
    pair = pipe.generate_codes(["a blue square", "a red circle"], num_images=3, seed=1 - 3)
    assert torch.equal(pair[3:], a)
    images = pipe.generate_images(["a red circle", "a blue square"], num_images=2, seed=0, batch_size=2)
    assert [len(x) for x in images] == [2, 2]
    assert images[0][0].size == (pipe.wintok.config.image_size,) * 2
    assert pipe.last_stats.images == 4 and pipe.last_stats.image_tokens == 4 * v.num_positions * v.num_codebooks


def test_answers_match_the_uncached_greedy_loop(pipe: UnifiedPipeline) -> None:
    img = shape_image(0)
    questions = [([img], "how many circles ?"), (None, "is there a red square ?")]  # one with, one without image
    replies, scores = pipe.generate_text([pipe.question_messages(i, q) for i, q in questions], max_new_tokens=4,
                                         return_scores=True)
    for row, (reply, (images, q)) in enumerate(zip(replies, questions)):
        ids, imgs = pipe.prompt_ids(pipe.question_messages(images, q))
        sem, pix = pipe.encode_images(imgs)
        ref = naive_answer_ids(pipe, ids, sem, pix, 4)
        assert reply == pipe.tokenizer.decode(ref, skip_special_tokens=True).strip()
        # the cached step logits equal a full uncached forward over the same tokens
        seq = torch.tensor([ids + ref], device=pipe.device)
        sem = sem.clone() if sem is not None else None
        with torch.no_grad():
            full = pipe.model.llm(inputs_embeds=pipe.model.embed_inputs(seq, sem, pix), use_cache=False).logits[0]
        for step in range(len(ref) + (len(ref) < 4)):
            torch.testing.assert_close(scores[step][row], full[len(ids) - 1 + step].float(), atol=2e-4, rtol=1e-4)


def test_loglikelihood_is_a_log_probability_and_flags_greedy(pipe: UnifiedPipeline) -> None:
    img = shape_image(1)
    reply_ids, imgs = pipe.prompt_ids(pipe.question_messages([img], "is there a red circle ?"))
    sem, pix = pipe.encode_images(imgs)
    greedy = pipe.tokenizer.decode(naive_answer_ids(pipe, reply_ids, sem, pix, 3))
    ll_yes, _ = pipe.loglikelihood([img], "is there a red circle ?", "yes")
    ll_no, _ = pipe.loglikelihood([img], "is there a red circle ?", "no")
    assert ll_yes < 0 and ll_no < 0
    assert abs(torch.tensor([ll_yes, ll_no]).exp().sum().item()) <= 1.0 + 1e-5
    if greedy.strip():
        assert pipe.loglikelihood([img], "is there a red circle ?", greedy)[1] is True


def test_batched_loglikelihood_equals_one_at_a_time(pipe: UnifiedPipeline) -> None:
    """lmms-eval's option requests run as one left-padded batch: each request's figures are those of the unbatched
    forward over its own tokens (the reference computed here), whatever its neighbours' lengths and images."""
    requests = [([shape_image(4)], "how many circles ?", "2"), (None, "is there a red square ?", "no"),
                ([shape_image(5)], "what colour is the square ? answer with one word .", "red square"),
                ([shape_image(4)], "how many circles ?", "")]
    got = pipe.loglikelihood_batch(requests)
    assert got[3] == (0.0, True)  # an empty continuation: nothing to score
    for (images, context, continuation), (ll, greedy) in zip(requests[:3], got):
        ctx_ids, imgs = pipe.prompt_ids(pipe.question_messages(images, context))
        whole = pipe.tokenizer(pipe.prompt_text(pipe.question_messages(images, context))[0] + continuation,
                               add_special_tokens=False)["input_ids"]
        assert whole[:len(ctx_ids)] == ctx_ids
        cont = whole[len(ctx_ids):]
        sem, pix = pipe.encode_images(imgs)
        seq = torch.tensor([ctx_ids + cont], device=pipe.device)
        with torch.no_grad():
            logits = pipe.model.llm(inputs_embeds=pipe.model.embed_inputs(seq, sem, pix), use_cache=False).logits[0]
        pred = logits[len(ctx_ids) - 1:-1].float().log_softmax(-1)
        target = torch.tensor(cont, device=pipe.device)
        assert ll == pytest.approx(pred.gather(1, target[:, None]).sum().item(), abs=1e-4)
        assert greedy is bool((pred.argmax(-1) == target).all())
    assert pipe.loglikelihood(*requests[1]) == pytest.approx(got[1], abs=1e-4)


def test_an_option_is_scored_as_the_tokens_training_taught_after_the_prompt(tmp_path: Path) -> None:
    """lmms-eval's log-likelihood multiple choice scores each option letter as the assistant's reply. Training
    tokenizes the reply in the conversation's text, where a SentencePiece vocabulary spells "B" after the template's
    newline without the word-start mark; scored alone it is "▁B", which the model never learnt to put there, and
    every option scored ~e^-18 (chance, 0.175 on 40 questions the model answers at 0.85: NOTES.md, session 28)."""
    from unified_mllm.data.masking import tokenize_conversation
    from unified_mllm.data.templates import CHATML
    from unified_mllm.data.text_tokenizer import train_text_tokenizer
    from unified_mllm.inference.pipeline import continuation_ids

    mc = "What color is the circle?\nA. red\nB. green\nC. blue\nD. cyan\nAnswer with the option's letter directly."
    tok = train_text_tokenizer([mc, "How many circles?\nAnswer with one word.", "A", "2", "B"] * 100, tmp_path / "tok",
                               vocab_size=400)
    for answer in ("B", "2", "green circle"):
        ids, labels = tokenize_conversation([{"role": "user", "content": mc}, {"role": "assistant", "content": answer}],
                                            tok, CHATML)
        labelled = [i for i, lab in zip(ids, labels) if lab != -100]
        taught = labelled[:labelled.index(tok.convert_tokens_to_ids("<|im_end|>"))]  # the reply, not its turn's end
        prompt = tok.apply_chat_template([{"role": "user", "content": mc}], tokenize=False, add_generation_prompt=True)
        whole, n = continuation_ids(tok, prompt, answer)
        assert whole[-n:] == taught and n == len(taught), (tok.convert_ids_to_tokens(whole[-n:]), answer)
    assert tok.convert_ids_to_tokens(continuation_ids(tok, prompt, "B")[0][-1:]) == ["B"]
    assert tok.convert_ids_to_tokens(tok("B", add_special_tokens=False)["input_ids"]) == ["▁B"]  # the old, wrong form
    assert continuation_ids(tok, prompt, "") == (tok(prompt, add_special_tokens=False)["input_ids"], 0)


def test_multi_turn_chat_with_images_anywhere(pipe: UnifiedPipeline) -> None:
    a, b = shape_image(2), shape_image(3)
    messages = [{"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "how many ?"}]},
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": "and here <image> ?", "images": [b]}]
    ids, images = pipe.prompt_ids(messages)
    assert len(images) == 2 and ids.count(pipe.ids["image_token_id"]) == 2 * pipe.config.num_und_slots
    assert isinstance(pipe.chat(messages, max_new_tokens=3), str)
    with pytest.raises(ValueError, match="1 <image> tags for 0 images"):
        pipe.prompt_ids([{"role": "user", "content": "<image> ?"}])


def test_bad_image_path_names_the_file(pipe: UnifiedPipeline, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nope.png: image file not found"):
        pipe.answer([tmp_path / "nope.png"], "how many ?")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png: unreadable image"):
        pipe.answer([tmp_path / "bad.png"], "how many ?")
