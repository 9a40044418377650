"""The unified model: LLM parity with vision off, packing isolation, slot checks, heads, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tokenizer import WinTok, WinTokConfig
from unified_mllm.config import load_config
from unified_mllm.config.stage import CFGDropConfig, ModelConfig
from unified_mllm.model import build_model, load_pretrained, save_pretrained

WORDS = ["<unk>", "<s>", "</s>", "a", "red", "blue", "circle", "square", "is", "there", "yes", "no", "how", "many", "?"]
ARCHS = {
    "qwen2": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256},
    "llama": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256},
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return make_assets(tmp_path_factory.mktemp("assets"))


def make_assets(root: Path) -> Path:
    """A word-level text tokenizer (root/tok) and a tiny random WinTok (root/wt)."""
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        str(root / "tok"))
    torch.manual_seed(0)
    WinTok(WinTokConfig.tiny(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                             decoder_num_heads=2, num_semantic_tokens=3, codebook_size=16)).save_pretrained(root / "wt")
    return root


def build(assets: Path, arch: str = "qwen2", attn: str = "sdpa", **model_overrides):
    torch.manual_seed(0)
    section = {"llm": {"arch": ARCHS[arch], "text_tokenizer": str(assets / "tok"), "attn_implementation": attn},
               "wintok": str(assets / "wt"), **model_overrides}
    model, tok, new_ids = build_model(load_config(ModelConfig, section), CFGDropConfig())
    return model.eval(), tok, new_ids


def understanding_sample(model, tok):
    ids = model.config.special_ids
    k = model.config.num_und_slots
    prompt = tok("is there a red circle ?", add_special_tokens=False)["input_ids"]
    answer = tok("yes", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    input_ids = [tok.bos_token_id, ids["img_start_id"]] + [ids["image_token_id"]] * k + [ids["img_end_id"]] + prompt + answer
    labels = [-100] * (len(input_ids) - len(answer)) + answer
    return torch.tensor([input_ids]), torch.tensor([labels])


def generation_sample(model, tok):
    ids = model.config.special_ids
    p = model.config.vision.num_positions
    caption = tok("a blue square", add_special_tokens=False)["input_ids"]
    input_ids = [tok.bos_token_id] + caption + [ids["boi_id"]] + [ids["image_gen_token_id"]] * p + [ids["eoi_id"]]
    labels = [-100] * (len(input_ids) - 1) + [ids["eoi_id"]]
    return torch.tensor([input_ids]), torch.tensor([labels])


def vision_inputs(model, n_und: int, n_gen: int):
    v = model.config.vision
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n_und, v.num_semantic_tokens, v.semantic_dim, generator=g),
            torch.randint(0, v.codebook_size, (n_gen, v.num_codebooks, v.num_positions), generator=g))


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_vision_off_logits_equal_the_bare_llm(assets: Path, arch: str) -> None:
    model, tok, _ = build(assets, arch)
    ids = torch.tensor([tok("<s> how many circle ? yes")["input_ids"]])
    with torch.no_grad():
        ours = model(ids).logits
        bare = model.llm(input_ids=ids).logits
    assert torch.equal(ours, bare)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("head", ["depth", "parallel"])
@pytest.mark.parametrize("attn", ["sdpa", "sdpa_packed"])
def test_packed_losses_equal_samples_alone(assets: Path, arch: str, head: str, attn: str) -> None:
    model, tok, _ = build(assets, arch, attn, generation={"head": head, "embedding": "sum", "depth_layers": 1})
    (ua, la), (ga, lg) = understanding_sample(model, tok), generation_sample(model, tok)
    sem, codes = vision_inputs(model, 1, 1)
    with torch.no_grad():
        alone_u = model(ua, la, position_ids=torch.arange(ua.shape[1])[None], und_semantic=sem, return_per_token=True)
        alone_g = model(ga, lg, position_ids=torch.arange(ga.shape[1])[None], gen_codes=codes, return_per_token=True)
        packed_ids = torch.cat([ua, ga], 1)
        packed_labels = torch.cat([la, lg], 1)
        pos = torch.cat([torch.arange(ua.shape[1]), torch.arange(ga.shape[1])])[None]
        packed = model(packed_ids, packed_labels, position_ids=pos, und_semantic=sem, gen_codes=codes,
                       return_per_token=True)
    n = ua.shape[1]
    torch.testing.assert_close(packed.per_token_text_loss[0, : n - 1], alone_u.per_token_text_loss[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.per_token_text_loss[0, n:], alone_g.per_token_text_loss[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.per_slot_image_loss, alone_g.per_slot_image_loss, atol=1e-5, rtol=0)
    assert packed.num_image_tokens == alone_g.num_image_tokens > 0


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_sdpa_packed_equals_sdpa(assets: Path, arch: str) -> None:
    """Packed rows of many lengths (several length groups, padding at the row ends): same losses and gradients as
    plain sdpa with its dense mask; padded batches and cached generation take the plain path and agree too."""
    plain, tok, _ = build(assets, arch, "sdpa")
    packed, _, _ = build(assets, arch, "sdpa_packed")
    assert packed.llm.config._attn_implementation == "sdpa_packed"
    g = torch.Generator().manual_seed(3)
    vocab, pad = 12, plain.config.special_ids["pad_id"]
    rows = [[5, 17, 9, 30], [41, 3, 12], [8, 8, 22, 16, 2]]  # document lengths per row (3..41 tokens: 5 groups)
    width = max(sum(r) for r in rows)
    ids = torch.full((3, width), pad)
    pos = torch.zeros(3, width, dtype=torch.long)
    for i, lens in enumerate(rows):
        pos[i] = torch.cat([torch.arange(n) for n in lens] + [torch.arange(lens[-1], lens[-1] + width - sum(lens))])
        ids[i, : sum(lens)] = torch.randint(3, vocab, (sum(lens),), generator=g)
    labels = torch.where(ids == pad, -100, ids)
    losses, grads = [], []
    for model in (plain, packed):
        model.train()
        out = model(ids, labels, position_ids=pos, return_per_token=True)
        out.loss.backward()
        losses.append(out.per_token_text_loss)
        grads.append([p.grad for p in model.llm.parameters()])
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    mask = (torch.arange(width)[None] < torch.tensor([[20], [width], [9]])).long()  # padded batch: the plain path
    with torch.no_grad():
        a = plain.eval()(ids, labels, attention_mask=mask, return_logits=True)
        b = packed.eval()(ids, labels, attention_mask=mask, return_logits=True)
    torch.testing.assert_close(a.logits * mask[..., None], b.logits * mask[..., None], atol=1e-5, rtol=1e-5)
    prompt = ids[:1, :7]
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": pad}
    assert torch.equal(plain.llm.generate(prompt, **kw), packed.llm.generate(prompt, **kw))


def test_sdpa_packed_attends_in_fp32_on_cpu_under_bf16() -> None:
    """Under CPU autocast (the bf16_autocast precision) the packed attention still computes in fp32: the same output
    as without autocast, to the bit, where autocast's own bf16 attention differs by ~1e-2. Fed bf16 tensors (a bf16
    model) it computes in fp32 and returns bf16."""
    from types import SimpleNamespace

    from unified_mllm.model.packed_attention import packed_sdpa_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 40, 16, generator=g) for h in (4, 2, 2))
    pos = torch.cat([torch.arange(13), torch.arange(27)]).repeat(2, 1)
    module = SimpleNamespace(training=False)
    fp32, _ = packed_sdpa_attention(module, q, k, v, None, position_ids=pos)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, _ = packed_sdpa_attention(module, q, k, v, None, position_ids=pos)
        lossy = torch.nn.functional.scaled_dot_product_attention(q[:, :, :13], k[:, :, :13].repeat(1, 2, 1, 1),
                                                                 v[:, :, :13].repeat(1, 2, 1, 1), is_causal=True)
    assert auto.dtype == torch.float32 and torch.equal(auto, fp32)
    assert lossy.dtype == torch.bfloat16  # what the kernel would otherwise have done
    half, _ = packed_sdpa_attention(module, q.bfloat16(), k.bfloat16(), v.bfloat16(), None, position_ids=pos)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), fp32, atol=3e-2, rtol=3e-2)


def test_depth_head_under_cpu_autocast_matches_fp32(assets: Path) -> None:
    """The depth head under CPU autocast (its 4-position attention on the math kernel there) gives the fp32 logits
    within bf16's precision, teacher-forced and step by step."""
    model, _, _ = build(assets)
    head = model.gen_head.eval()
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, 32, generator=g)
    codes = torch.randint(0, head.codebook_size, (6, head.num_codebooks), generator=g)
    with torch.no_grad():
        ref = head(hidden, codes)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = head(hidden, codes)
            step = head.next_logits(hidden, codes[:, :2])
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(step.float(), ref[:, 2], atol=5e-2, rtol=5e-2)


def test_image_slot_mismatch_raises(assets: Path) -> None:
    model, tok, _ = build(assets)
    ua, la = understanding_sample(model, tok)
    sem, codes = vision_inputs(model, 2, 1)
    with pytest.raises(ValueError, match="do not match"):
        model(ua, la, und_semantic=sem)  # two images for one image's slots
    ga, lg = generation_sample(model, tok)
    with pytest.raises(ValueError, match="<image_gen> slots"):
        model(ga, lg)  # generation slots without codes


@pytest.mark.parametrize("width", [0, 24])
def test_depth_head_stepwise_equals_teacher_forced(assets: Path, width: int) -> None:
    model, _, _ = build(assets, generation={"depth_hidden_size": width})
    head = model.gen_head
    assert head.out.in_features == (width or model.llm.config.hidden_size)
    v = model.config.vision
    h = torch.randn(5, model.llm.config.hidden_size)
    codes = torch.randint(0, v.codebook_size, (5, v.num_codebooks))
    cache: list = []  # sampling's path: each sub-code's keys and values kept for the next
    with torch.no_grad():
        full = head(h, codes)
        for k in range(v.num_codebooks):
            torch.testing.assert_close(head.next_logits(h, codes[:, :k]), full[:, k], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(head.next_logits(h, codes[:, :k], cache), full[:, k], atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="cache holds 4 sub-codes, asked for sub-code 1"):
            head.next_logits(h, codes[:, :1], cache)  # a cache of another position is not reused


def test_special_tokens_added_through_the_api(assets: Path) -> None:
    model, tok, new_ids = build(assets)
    assert len(new_ids) >= 6 and model.llm.get_input_embeddings().weight.shape[0] == len(tok)
    assert tok.convert_ids_to_tokens(model.config.special_ids["boi_id"]) == "<boi>"
    assert model.config.special_ids["uncond_ids"] == [tok.convert_tokens_to_ids("<unconditional>")]
    assert not any(p.requires_grad for p in model.wintok.parameters())


@pytest.mark.parametrize("embedding", ["sum", "causal_proj"])
def test_save_load_identical_outputs(assets: Path, tmp_path: Path, embedding: str) -> None:
    model, tok, _ = build(assets, understanding_input="both", projector={"slot_embedding": embedding == "sum"},
                          generation={"embedding": embedding, "head": "depth", "depth_layers": 1,
                                      "position_embedding": embedding == "causal_proj",
                                      "depth_hidden_size": 24 if embedding == "sum" else 0})
    assert (model.projector.slot_embed is not None) == (embedding == "sum")
    assert (model.gen_embedding.grid is not None) == (embedding == "causal_proj")
    save_pretrained(model, tok, tmp_path / "export")
    again, tok2 = load_pretrained(tmp_path / "export")
    assert len(tok2) == len(tok)
    a_cfg, b_cfg = model.config.to_dict(), again.config.to_dict()
    assert a_cfg.pop("llm_config")["hidden_size"] == b_cfg.pop("llm_config")["hidden_size"] and a_cfg == b_cfg
    ids = torch.cat([understanding_sample(model, tok)[0], generation_sample(model, tok)[0]], 1)
    labels = ids.clone()
    v = model.config.vision
    sem, codes = vision_inputs(model, 1, 1)
    pix = torch.randint(0, v.codebook_size, (1, v.num_codebooks, v.num_positions))
    with torch.no_grad():
        a = model(ids, labels, und_semantic=sem, und_pixel_codes=pix, gen_codes=codes, return_logits=True)
        b = again(ids, labels, und_semantic=sem, und_pixel_codes=pix, gen_codes=codes, return_logits=True)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)


def test_slot_embedding_tells_identical_tokens_apart(assets: Path) -> None:
    """The same feature in every slot: without slot embeddings every projected token is the same; with them each
    slot differs, so the LLM can tell which region a token stands for."""
    for flag in (False, True):
        model, _, _ = build(assets, projector={"slot_embedding": flag})
        sem = torch.randn(1, 1, model.config.vision.semantic_dim).expand(1, model.config.num_und_slots, -1)
        out = model.projector(sem, None)[0]
        assert torch.allclose(out, out[:1].expand_as(out)) != flag


@pytest.mark.parametrize("embedding", ["sum", "causal_proj"])
def test_generation_position_embedding_gives_each_slot_its_row_and_column(assets: Path, embedding: str) -> None:
    """The same code in every slot: without grid positions every slot's summed input is the same; with them each slot
    differs, and a prefix of the slots (what cached generation embeds) gets the same vectors as the full image, and the
    last slot of a prefix alone (``last``, what sampling embeds) the same as with the prefix.
    (The causal projection tells slots apart by itself; there only the positions' part is checked.)"""
    for flag in (False, True):
        model, _, _ = build(assets, generation={"embedding": embedding, "position_embedding": flag})
        v = model.config.vision
        codes = torch.full((1, v.num_codebooks, v.num_positions), 3)
        with torch.no_grad():
            out = model.gen_embedding(codes)[0]  # (P, H)
            prefix = model.gen_embedding(codes[:, :, :5])[0]
            drawn = torch.randint(0, v.codebook_size, (2, v.num_codebooks, 7))
            torch.testing.assert_close(model.gen_embedding.last(drawn), model.gen_embedding(drawn)[:, -1:])
        distinct = len({tuple(row.tolist()) for row in out})
        if flag or embedding == "sum":
            assert distinct == (v.num_positions if flag else 1)
        torch.testing.assert_close(prefix, out[:5])


def test_init_from_refuses_an_architecture_the_export_does_not_have(assets: Path, tmp_path: Path) -> None:
    """A later stage starts from the export's architecture; asking for another one there would silently do nothing."""
    model, tok, _ = build(assets)
    out = save_pretrained(model, tok, tmp_path / "export")
    same = {"llm": {"arch": ARCHS["qwen2"], "text_tokenizer": str(assets / "tok")}, "wintok": str(assets / "wt"),
            "init_from": str(out)}
    again, _, _ = build_model(load_config(ModelConfig, same), CFGDropConfig())
    a_cfg, b_cfg = model.config.to_dict(), again.config.to_dict()
    assert a_cfg.pop("llm_config")["num_hidden_layers"] == b_cfg.pop("llm_config")["num_hidden_layers"]
    assert a_cfg == b_cfg
    other = {**same, "generation": {"position_embedding": True},
             "llm": {**same["llm"], "arch": {**ARCHS["qwen2"], "num_hidden_layers": 3}}}
    with pytest.raises(ValueError, match=r"generation\.position_embedding: True here, False in the export.*"
                                         r"arch\.num_hidden_layers: 3 here, 2 in the export.*init_from=null"):
        build_model(load_config(ModelConfig, other), CFGDropConfig())


def test_touch_unused_reaches_every_trainable_module(assets: Path) -> None:
    model, tok, _ = build(assets)
    model.train()
    ids = torch.tensor([tok("<s> how many circle ? yes")["input_ids"]])
    out = model(ids, ids.clone(), touch_unused=True)
    out.loss.backward()
    for name in ("projector", "gen_embedding", "gen_head"):
        params = list(getattr(model, name).parameters())
        assert all(p.grad is not None for p in params if p.requires_grad), name


def test_wintok_is_held_outside_the_trainable_module_tree(assets: Path, tmp_path: Path) -> None:
    """WinTok must not reach the optimizer, the state dict or ZeRO-3's partitioning; it is saved beside the model."""
    model, tok, _ = build(assets)
    wintok_params = {id(p) for p in model.wintok.parameters()}
    assert not wintok_params & {id(p) for p in model.parameters()}
    assert not any(k.startswith("wintok") for k in model.state_dict())
    out = save_pretrained(model, tok, tmp_path / "export")
    loaded, _ = load_pretrained(out)
    assert loaded.wintok.identity_hash() == model.wintok.identity_hash()


def test_semantic_align_adds_its_weighted_loss_from_the_chosen_layer(assets: Path, tmp_path: Path) -> None:
    """The loss is the image + text loss plus weight × (1 − cos) between the MLP of the hidden state before each slot
    at the chosen layer and the image's pooled semantic tokens; the MLP trains with generation and is not exported."""
    plain, tok, _ = build(assets)
    model, _, _ = build(assets, generation={"semantic_align": {"weight": 0.5, "layer": 1}})
    assert plain.semantic_align is None and model.semantic_align.layer == 1
    ids, labels = generation_sample(model, tok)
    _, codes = vision_inputs(model, 0, 1)
    v = model.config.vision
    sem = torch.randn(1, v.num_semantic_tokens, v.semantic_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(ids, labels, gen_codes=codes, gen_semantic=sem)
        no_sem = model(ids, labels, gen_codes=codes)  # inference and eval pass no semantic tokens: no alignment
        embeds = model.embed_inputs(ids, gen_codes=codes)
        hidden = model.llm.get_decoder()(inputs_embeds=embeds, output_hidden_states=True).hidden_states[1]
    slots = (ids[0] == model.config.special_ids["image_gen_token_id"]).nonzero()[:, 0] - 1  # the positions before
    want = 1 - torch.nn.functional.cosine_similarity(model.semantic_align.proj(hidden[0, slots]), sem.mean(1)).mean()
    torch.testing.assert_close(out.align_loss, want)
    torch.testing.assert_close(out.loss, no_sem.loss + 0.5 * want)
    assert no_sem.align_loss is None
    assert build_model(load_config(ModelConfig, {"llm": {"arch": ARCHS["qwen2"], "text_tokenizer": str(assets / "tok")},
                                                 "wintok": str(assets / "wt"),
                                                 "generation": {"semantic_align": {"weight": 0.5}}}),
                       CFGDropConfig())[0].semantic_align.layer == 1  # 0: the middle of 2 layers
    # trains with generation (touch_unused reaches it on a text-only batch), is not saved, and init_from gets a fresh one
    from unified_mllm.config.stage import TrainablesConfig
    from unified_mllm.training.freeze import apply_trainables
    apply_trainables(model, TrainablesConfig(generation=True), [])
    model.train()
    text = torch.tensor([tok("<s> how many circle ? yes")["input_ids"]])
    model(text, text.clone(), touch_unused=True).loss.backward()
    assert all(p.grad is not None for p in model.semantic_align.parameters())
    export = save_pretrained(model, tok, tmp_path / "export")
    assert load_pretrained(export)[0].semantic_align is None
    section = {"llm": {"arch": ARCHS["qwen2"], "text_tokenizer": str(assets / "tok")}, "wintok": str(assets / "wt"),
               "init_from": str(export), "generation": {"semantic_align": {"weight": 0.2, "layer": 2}}}
    again = build_model(load_config(ModelConfig, section), CFGDropConfig())[0]
    assert again.semantic_align.layer == 2 and again.semantic_align_weight == 0.2
    with pytest.raises(ValueError, match=r"semantic_align\.layer: 3, but the LLM has 2 layers"):
        build(assets, generation={"semantic_align": {"weight": 0.5, "layer": 3}})
    with pytest.raises(ValueError, match=r"semantic_align\.target: grid needs square grids.*3 semantic tokens"):
        build(assets, generation={"semantic_align": {"weight": 0.5, "target": "grid"}})


def test_semantic_align_grid_pairs_each_slot_with_the_token_of_its_region() -> None:
    """8 × 8 positions over 4 × 4 semantic tokens (the ShapeWorld preset): position (row, col) lies in region
    (row // 2, col // 2); with one-hot tokens and an identity MLP the loss is 0 only for that pairing."""
    from unified_mllm.model.semantic_align import SemanticAlign

    align = SemanticAlign(16, 16, "grid", 1, 64, 16)
    rows, cols = torch.arange(64) // 8, torch.arange(64) % 8
    assert align.cell.tolist() == ((rows // 2) * 4 + cols // 2).tolist()
    align.proj = torch.nn.Identity()
    sem = torch.eye(16)[None].repeat(2, 1, 1)  # two images
    region = torch.nn.functional.one_hot(align.cell, 16).float()
    assert float(align(region.repeat(2, 1), sem)) == pytest.approx(0.0, abs=1e-6)
    assert float(align(region.flip(0).repeat(2, 1), sem)) > 0.5
    with pytest.raises(ValueError, match="9 generation slots for 2 images"):
        align(region[:9], sem)


def test_semantic_align_center_subtracts_the_running_mean_of_the_targets() -> None:
    """center: the targets minus a running mean (the first batch's mean, then momentum), updated in training only."""
    from unified_mllm.model.semantic_align import SemanticAlign

    align = SemanticAlign(3, 3, "pooled", 1, 4, 2, center=True, momentum=0.5)
    align.proj = torch.nn.Identity()
    sem = torch.tensor([[[1.0, 0.0, 2.0], [1.0, 2.0, 2.0]], [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])  # pooled: 1,1,2 / 1,0,0
    hidden = torch.tensor([[0.0, 0.5, 1.0]] * 4 + [[0.0, -0.5, -1.0]] * 4)  # 4 slots per image
    align.train()
    assert float(align(hidden, sem)) == pytest.approx(0.0, abs=1e-6)  # mean (1, .5, 1): targets ±(0, .5, 1)
    torch.testing.assert_close(align.target_mean, torch.tensor([1.0, 0.5, 1.0]))
    align(hidden, sem[:1])  # another batch moves the mean halfway toward (1, 1, 2)
    torch.testing.assert_close(align.target_mean, torch.tensor([1.0, 0.75, 1.5]))
    align.eval()
    align(hidden, sem)
    torch.testing.assert_close(align.target_mean, torch.tensor([1.0, 0.75, 1.5]))
