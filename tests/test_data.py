"""Data pipeline: template-driven loss masks, image slots, CFG dropout, bad input, packing, exact resume."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from unified_mllm.config import load_config
from unified_mllm.config.recipe import RecipeConfig
from unified_mllm.config.stage import DataConfig
from unified_mllm.data.loader import DataStream
from unified_mllm.data.masking import IGNORE, tokenize_conversation
from unified_mllm.data.samples import BadSample, SampleBuilder
from unified_mllm.data.templates import TEMPLATES
from unified_mllm.tokens import add_special_tokens

WORDS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "user", "assistant", "a", "red", "circle", "is",
         "there", "yes", "no", "how", "many", "two", "USER", "ASSISTANT", ":", "?"]
OWN_TEMPLATE = ("{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] + ' [end] ' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}")


def make_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(WORDS + ["[user]", "[assistant]", "[end]", "[", "]"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = chat_template
    return tok


CONV = [{"role": "user", "content": "is there a red circle ?"}, {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "how many ?"}, {"role": "assistant", "content": "two"}]


@pytest.mark.parametrize("name", ["plain", "chatml", "vicuna_v1", "own"])
def test_loss_mask_covers_exactly_the_assistant_turns(name: str) -> None:
    tok = make_tokenizer(OWN_TEMPLATE if name == "own" else None)
    template = OWN_TEMPLATE if name == "own" else TEMPLATES[name]
    ids, labels = tokenize_conversation(CONV, tok, template)
    learned = tok.convert_ids_to_tokens([t for t, lab in zip(ids, labels) if lab != IGNORE])
    answers = {"yes", "two"}
    assert answers <= set(learned)
    assert not ({"is", "there", "red", "circle", "how", "many", "user", "USER", "[user]"} & set(learned))
    if name in ("plain", "vicuna_v1"):
        assert "</s>" in learned  # the end of turn is learned too
    if name == "chatml":
        assert "<|im_end|>" in learned and "<|im_start|>" not in learned


@pytest.fixture
def builder() -> SampleBuilder:
    tok = make_tokenizer()
    ids, _ = add_special_tokens(tok, "<unconditional>")
    return SampleBuilder(tok, ids.to_dict(), num_und_slots=3, num_positions=4, template=TEMPLATES["chatml"],
                         drop_prob=0.25, uncond_prompt="<unconditional>")


def test_image_slots_are_expanded_and_unlabelled(builder: SampleBuilder) -> None:
    rec = {"source": "s", "task": "understanding", "index": 0, "image": "x.png",
           "conversations": [{"from": "human", "value": "<image>\nis there a red circle ?"}, {"from": "gpt", "value": "yes"}]}
    sample = builder.build(rec, random.Random(0))
    image_id = builder.special_ids["image_token_id"]
    assert sample.input_ids.count(image_id) == 3 and sample.und_images == ["x.png"]
    i = sample.input_ids.index(image_id)
    assert sample.input_ids[i - 1] == builder.special_ids["img_start_id"]
    assert all(lab == IGNORE for t, lab in zip(sample.input_ids, sample.labels) if t == image_id)


@pytest.mark.parametrize(("rec", "reason"), [
    ({"image": "x.png", "conversations": [{"from": "human", "value": "no tag"}, {"from": "gpt", "value": "yes"}]},
     "image_count_mismatch"),
    ({"image": None, "conversations": [{"from": "human", "value": "<image> a"}, {"from": "gpt", "value": "yes"}]},
     "image_count_mismatch"),
    ({"image": "x.png", "conversations": "oops"}, "malformed_conversation"),
    ({"image": "x.png", "conversations": [{"from": "human", "value": "<image>"}]}, "no_answer"),
])
def test_bad_records_raise_with_a_reason(builder: SampleBuilder, rec: dict, reason: str) -> None:
    with pytest.raises(BadSample) as err:
        builder.build({"source": "s", "task": "understanding", "index": 7, **rec}, random.Random(0))
    assert err.value.reason == reason and "record 7 of s" in str(err.value)


def test_generation_sample_and_cfg_dropout(builder: SampleBuilder) -> None:
    s = builder.special_ids
    rec = {"source": "t", "task": "generation", "index": 0, "image": "x.png", "caption": "a red circle"}
    sample = builder.build(rec, random.Random(0))
    assert sample.input_ids[-6:] == [s["boi_id"]] + [s["image_gen_token_id"]] * 4 + [s["eoi_id"]]
    assert [lab for lab in sample.labels if lab != IGNORE] == [s["eoi_id"]]
    dropped = sum(s["uncond_ids"][0] in builder.build(rec, random.Random(i)).input_ids for i in range(2000))
    assert 0.21 < dropped / 2000 < 0.29  # drop_prob 0.25


class FakeFeatures:
    """Stands in only for the image → features lookup (ImageFeatures itself is tested with WinTok elsewhere)."""

    def get(self, ref):
        if "corrupt" in str(ref):
            raise BadSample("corrupt_image", f"{ref}: unreadable image")
        return torch.zeros(3, 8), torch.zeros(4, 4, dtype=torch.long)


def write_sources(tmp: Path, n: int = 30) -> RecipeConfig:
    llava = [{"id": i, "image": "corrupt.png" if i == 5 else f"{i}.png",
              "conversations": [{"from": "human", "value": "<image>\nis there a red circle ?"},
                                {"from": "gpt", "value": "yes" if i % 2 else "no"}]} for i in range(n)]
    (tmp / "llava.json").write_text(json.dumps(llava))
    with open(tmp / "t2i.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"caption": "a red circle", "image": f"{i}.png"}) + "\n")
        f.write("{not json\n")
    return load_config(RecipeConfig, {"sources": [
        {"name": "vqa", "format": "llava_json", "path": str(tmp / "llava.json"), "task": "understanding"},
        {"name": "t2i", "format": "t2i_jsonl", "path": str(tmp / "t2i.jsonl"), "task": "generation"}]})


def make_stream(tmp: Path, builder: SampleBuilder, **data) -> DataStream:
    cfg = load_config(DataConfig, {"max_seq_len": 64, "packing": True, **data})
    return DataStream(cfg, write_sources(tmp), builder, FakeFeatures(), micro_batch_size=2, seed=3,
                      task_ratio={"understanding": 0.5, "generation": 0.5})


def test_packed_batches_restart_positions_and_count_skips(tmp_path: Path, builder: SampleBuilder) -> None:
    stream = make_stream(tmp_path, builder)
    batches = [next(stream) for _ in range(40)]
    for b in batches:
        pos = b["position_ids"]
        assert b["attention_mask"] is None and pos.shape == b["input_ids"].shape and pos.shape[1] <= 64
        restarts = int((pos[:, 1:] == 0).sum())
        assert restarts == len(b["sources"]) - pos.shape[0]  # one restart per extra sample in a row
        if b["task"] == "understanding":
            assert b["und_semantic"].shape[0] * 3 == int((b["input_ids"] == builder.special_ids["image_token_id"]).sum())
        else:
            assert b["gen_codes"].shape[0] * 4 == int((b["input_ids"] == builder.special_ids["image_gen_token_id"]).sum())
    stats = stream.stats()
    assert stats.get("vqa/corrupt_image", 0) >= 1 and stats.get("t2i/malformed_record", 0) >= 1


def test_bad_sample_policy_error_names_the_fix(tmp_path: Path, builder: SampleBuilder) -> None:
    stream = make_stream(tmp_path, builder, on_bad_sample="error")
    with pytest.raises(ValueError, match="on_bad_sample: skip"):
        for _ in range(100):
            next(stream)


def test_resume_from_state_dict_gives_the_same_batches(tmp_path: Path, builder: SampleBuilder) -> None:
    a = make_stream(tmp_path, builder)
    for _ in range(7):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # survives serialisation
    expected = [next(a) for _ in range(5)]
    b = make_stream(tmp_path, builder)
    b.load_state_dict(state)
    for want in expected:
        got = next(b)
        assert torch.equal(got["input_ids"], want["input_ids"]) and got["sources"] == want["sources"]


def test_padding_mode_pads_and_masks(tmp_path: Path, builder: SampleBuilder) -> None:
    b = next(make_stream(tmp_path, builder, packing=False))
    assert b["attention_mask"] is not None and b["input_ids"].shape[0] == 2
    assert (b["labels"][b["attention_mask"] == 0] == IGNORE).all()


def test_missing_source_file_is_one_clear_error(tmp_path: Path, builder: SampleBuilder) -> None:
    recipe = load_config(RecipeConfig, {"sources": [
        {"name": "x", "format": "llava_json", "path": str(tmp_path / "nope.json"), "task": "understanding"}]})
    with pytest.raises(FileNotFoundError, match="nope.json: not found"):
        DataStream(load_config(DataConfig, {}), recipe, builder, FakeFeatures(), 2)


def test_unset_environment_variable_is_named(tmp_path: Path, builder: SampleBuilder, monkeypatch) -> None:
    monkeypatch.delenv("UMLLM_TEST_ROOT", raising=False)
    recipe = load_config(RecipeConfig, {"sources": [
        {"name": "x", "format": "llava_json", "path": "${UMLLM_TEST_ROOT}/a.json", "task": "understanding"}]})
    with pytest.raises(ValueError, match="UMLLM_TEST_ROOT is not set"):
        DataStream(load_config(DataConfig, {}), recipe, builder, FakeFeatures(), 2)


def test_image_features_report_missing_and_corrupt_images(tmp_path: Path) -> None:
    from unified_mllm.data.image_features import open_image

    (tmp_path / "bad.png").write_bytes(b"not a png")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    assert open_image(str(tmp_path / "ok.png")).size == (8, 8)
    with pytest.raises(BadSample) as err:
        open_image(str(tmp_path / "bad.png"))
    assert err.value.reason == "corrupt_image"
    with pytest.raises(BadSample) as err:
        open_image(str(tmp_path / "gone.png"))
    assert err.value.reason == "missing_image"
