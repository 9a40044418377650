"""Data pipeline: template-driven loss masks, image slots, CFG dropout, bad input, packing, exact resume."""

from __future__ import annotations

import json
import random
import subprocess
import sys
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

ROOT = Path(__file__).resolve().parents[1]
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


def test_a_task_can_have_its_own_micro_batch_size(tmp_path: Path, builder: SampleBuilder) -> None:
    """optim.task_micro_batch_size: generation batches of 1 sequence beside understanding batches of 2 (the stream's
    micro_batch_size); a task the recipe lacks is one error naming the field."""
    cfg = load_config(DataConfig, {"max_seq_len": 64, "packing": False})
    stream = DataStream(cfg, write_sources(tmp_path), builder, FakeFeatures(), micro_batch_size=2, seed=3,
                        task_ratio={"understanding": 0.5, "generation": 0.5},
                        task_micro_batch_size={"generation": 1})
    sizes = {(b["task"], b["input_ids"].shape[0]) for b in (next(stream) for _ in range(20))}
    assert sizes == {("understanding", 2), ("generation", 1)}
    with pytest.raises(ValueError, match=r"optim.task_micro_batch_size: \['text'\] not a task"):
        DataStream(cfg, write_sources(tmp_path), builder, FakeFeatures(), micro_batch_size=2,
                   task_micro_batch_size={"text": 1})
    # a misspelt task in the step shares is the same error, not a share silently dropped
    with pytest.raises(ValueError, match=r"optim.task_ratio: \['generaton'\] not a task"):
        DataStream(cfg, write_sources(tmp_path), builder, FakeFeatures(), micro_batch_size=2,
                   task_ratio={"understanding": 0.5, "generaton": 0.5})


def test_a_task_can_have_its_own_row_length(tmp_path: Path, builder: SampleBuilder) -> None:
    """data.task_max_seq_len: generation rows packed to 24 tokens beside understanding rows of 64 (max_seq_len). The
    understanding batches are the same as without it, a sample longer than its task's length is a counted skip naming
    that field, and a task the recipe lacks is one error naming the field."""
    plain, short = make_stream(tmp_path, builder), make_stream(tmp_path, builder, task_max_seq_len={"generation": 24})
    a, b = [next(plain) for _ in range(30)], [next(short) for _ in range(30)]
    assert [x["task"] for x in a] == [x["task"] for x in b]
    gen_widths = []
    for x, y in zip(a, b):
        if x["task"] == "understanding":
            assert torch.equal(x["input_ids"], y["input_ids"]) and x["records"] == y["records"]
        else:
            assert y["input_ids"].shape[1] <= 24
            gen_widths.append((x["input_ids"].shape[1], y["input_ids"].shape[1]))
    assert gen_widths and all(long > 24 for long, _ in gen_widths)  # the default packs more images a row
    tight = make_stream(tmp_path, builder, task_max_seq_len={"understanding": 16})
    status, reason, message = tight.build({**tight.records["vqa"][0], "_epoch": 0})
    assert (status, reason) == ("bad", "too_long") and "> data.task_max_seq_len.understanding 16" in message
    assert tight.build({**tight.records["t2i"][0], "_epoch": 0})[0] == "ok"  # max_seq_len (64) for generation
    with pytest.raises(ValueError, match=r"task understanding: 10,000 bad samples in a row \(vqa/too_long"):
        for _ in range(30):
            next(tight)
    with pytest.raises(ValueError, match=r"data.task_max_seq_len: \['text'\] not a task"):
        make_stream(tmp_path, builder, task_max_seq_len={"text": 32})


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


# ------------------------------------------------------------------------------------------------ source formats
# Each test writes its own files from a ShapeWorld dataset made by the real generator (conftest) and reads them through
# the recipe → DataStream → SampleBuilder → ImageFeatures path; images are tokenized online by a tiny WinTok.

def word_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer that knows every word of ``texts`` (so decoded samples can be compared word by word)."""
    pre = pre_tokenizers.Whitespace()
    words = dict.fromkeys(["<unk>", "<s>", "</s>"] + [w for t in texts for w, _ in pre.pre_tokenize_str(t)])
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def words(text: str) -> list[str]:
    return [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)]


def sw_rows(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "t2i_train.jsonl").read_text().splitlines()]


def sw_builder(texts: list[str], template: str = "plain") -> SampleBuilder:
    tok = word_tokenizer(texts)
    ids, _ = add_special_tokens(tok, "<unconditional>")
    return SampleBuilder(tok, ids.to_dict(), num_und_slots=4, num_positions=16, template=TEMPLATES[template],
                         drop_prob=0.0, uncond_prompt="<unconditional>")


def encoded(wintok, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    from tokenizer import preprocess

    with torch.inference_mode():
        enc = wintok.encode(preprocess([image.convert("RGB")], wintok.config.image_size))
    return enc.semantic_tokens[0], enc.pixel_codes[0]


def read_all(recipe: RecipeConfig, builder: SampleBuilder, features, want: set, **data) -> tuple[DataStream, dict]:
    """One sample per batch until every record in ``want`` was seen; → (stream, {(source, index): batch})."""
    cfg = load_config(DataConfig, {"max_seq_len": 256, "packing": False, "num_workers": 0, **data})
    stream = DataStream(cfg, recipe, builder, features, micro_batch_size=1, seed=1)
    seen: dict = {}
    for _ in range(20 * len(want)):
        batch = next(stream)
        (key,) = batch["records"]
        assert key in want, f"{key} is a bad record and must have been skipped"
        seen.setdefault(key, batch)
        if len(seen) == len(want):
            break
    assert set(seen) == want
    return stream, seen


def check_generation(batch: dict, caption: str, image: Image.Image, builder: SampleBuilder, wintok) -> None:
    s, tok = builder.special_ids, builder.tokenizer
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    boi = ids.index(s["boi_id"])
    assert tok.convert_ids_to_tokens(ids[1:boi]) == words(caption) and ids[0] == tok.bos_token_id
    assert ids[boi + 1:] == [s["image_gen_token_id"]] * 16 + [s["eoi_id"]]
    assert [lab for lab in labels if lab != IGNORE] == [s["eoi_id"]]  # text loss on <eoi> only; codes have their own
    assert torch.equal(batch["gen_codes"][0], encoded(wintok, image)[1])


def check_caption_understanding(batch: dict, caption: str, image: Image.Image, builder: SampleBuilder, wintok) -> None:
    s, tok = builder.special_ids, builder.tokenizer
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert ids.count(s["image_token_id"]) == 4 and ids[0] == s["img_start_id"]
    learned = tok.convert_ids_to_tokens([t for t, lab in zip(ids, labels) if lab != IGNORE])
    assert learned == words(caption) + ["</s>"]  # plain template: the caption and its end, nothing of the image
    assert torch.equal(batch["und_semantic"][0], encoded(wintok, image)[0])


def test_parquet_pairs_become_samples_and_bad_records_are_skipped(tmp_path: Path, shapeworld_tiny: Path,
                                                                  tiny_wintok) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from unified_mllm.data.image_features import ImageFeatures

    rows = sw_rows(shapeworld_tiny)[:12]
    folder = tmp_path / "pairs"
    folder.mkdir()
    # part 0: images embedded as {"bytes", "path"} structs (what `datasets` writes); one corrupt
    part0 = [{"caption": r["caption"], "image": {"bytes": (shapeworld_tiny / r["image"]).read_bytes(), "path": None}}
             for r in rows[:6]]
    part0[2]["image"] = {"bytes": b"\x89PNG but not really", "path": None}
    # part 1: image paths relative to image_root; one missing file, one record without a caption
    part1 = [{"caption": r["caption"], "image": r["image"]} for r in rows[6:]]
    part1[1]["image"] = "images/train/missing.png"
    part1[3]["caption"] = None
    pq.write_table(pa.Table.from_pylist(part0), folder / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(part1), folder / "part-1.parquet")
    recipe = load_config(RecipeConfig, {"sources": [
        {"name": "gen", "format": "t2i_parquet", "path": str(folder), "image_root": str(shapeworld_tiny),
         "task": "generation"},
        {"name": "cap", "format": "t2i_parquet", "path": str(folder), "image_root": str(shapeworld_tiny),
         "task": "understanding"}]})
    builder = sw_builder([r["caption"] for r in rows])
    bad = {2: "corrupt_image", 7: "missing_image", 9: "malformed"}
    want = {(name, i) for name in ("gen", "cap") for i in range(12) if i not in bad}
    stream, seen = read_all(recipe, builder, ImageFeatures(tiny_wintok), want)
    for (name, i), batch in seen.items():
        image = Image.open(shapeworld_tiny / rows[i]["image"])
        check = check_generation if name == "gen" else check_caption_understanding
        check(batch, rows[i]["caption"], image, builder, tiny_wintok)
    stats = stream.stats()
    for name, malformed in (("gen", "malformed_record"), ("cap", "malformed_conversation")):
        assert stats[f"{name}/corrupt_image"] >= 1 and stats[f"{name}/missing_image"] >= 1
        assert stats[f"{name}/{malformed}"] >= 1
    assert set(stats) == {f"{n}/{r}" for n in ("gen", "cap") for r in ("corrupt_image", "missing_image")} | {
        "gen/malformed_record", "cap/malformed_conversation"}


def test_hf_disk_dataset_with_image_feature_and_conversations(tmp_path: Path, shapeworld_tiny: Path,
                                                              tiny_wintok) -> None:
    import datasets

    from unified_mllm.data.image_features import ImageFeatures
    from unified_mllm.shapeworld.dataset import load_hf_dataset

    # LLaVA-style conversations with image paths relative to image_root, as a DatasetDict; one image file is missing,
    # one conversation has no answer
    rows = json.loads((shapeworld_tiny / "llava_train.json").read_text())[:10]
    bad_conv = [dict(r) for r in rows]
    bad_conv[3]["image"] = "images/train/gone.png"
    bad_conv[5]["conversations"] = [{"from": "human", "value": "<image>\nno answer here"}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(bad_conv)}).save_to_disk(str(tmp_path / "conv_disk"))
    # caption pairs in an Image column (save_to_disk embeds the files' bytes); one is not an image
    t2i = load_hf_dataset(shapeworld_tiny, "t2i").select(range(8)).cast_column("image", datasets.Image(decode=False))
    pairs = [{"caption": r["caption"], "image": {"bytes": Path(r["image"]["path"]).read_bytes(), "path": None}}
             for r in t2i.to_list()]
    pairs[4]["image"] = {"bytes": b"garbage", "path": None}
    datasets.Dataset.from_list(pairs, features=datasets.Features(
        {"caption": datasets.Value("string"), "image": datasets.Image()})).save_to_disk(str(tmp_path / "pairs_disk"))
    recipe = load_config(RecipeConfig, {"sources": [
        {"name": "vqa", "format": "hf_disk", "path": str(tmp_path / "conv_disk"), "image_root": str(shapeworld_tiny),
         "task": "understanding"},
        {"name": "gen", "format": "hf_disk", "path": str(tmp_path / "pairs_disk"), "task": "generation"}]})
    texts = [t["value"].replace("<image>", "") for r in rows for t in r["conversations"]] + [p["caption"] for p in pairs]
    builder = sw_builder(texts, template="chatml")
    builder.tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    want = {("vqa", i) for i in range(10) if i not in (3, 5)} | {("gen", i) for i in range(8) if i != 4}
    stream, seen = read_all(recipe, builder, ImageFeatures(tiny_wintok), want, template="chatml")
    tok, s = builder.tokenizer, builder.special_ids
    for (name, i), batch in seen.items():
        if name == "gen":
            check_generation(batch, pairs[i]["caption"], Image.open(t2i[i]["image"]["path"]), builder, tiny_wintok)
            continue
        ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
        answers = [w for t in rows[i]["conversations"] if t["from"] == "gpt" for w in words(t["value"]) + ["<|im_end|>"]]
        assert tok.convert_ids_to_tokens([t for t, lab in zip(ids, labels) if lab != IGNORE]) == answers
        assert ids.count(s["image_token_id"]) == 4
        assert torch.equal(batch["und_semantic"][0], encoded(tiny_wintok, Image.open(shapeworld_tiny / rows[i]["image"]))[0])
    stats = stream.stats()
    assert set(stats) == {"vqa/missing_image", "vqa/no_answer", "gen/corrupt_image"}


def test_streamed_dataset_from_local_files(tmp_path: Path, shapeworld_tiny: Path, tiny_wintok) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from unified_mllm.data.image_features import ImageFeatures

    rows = sw_rows(shapeworld_tiny)[:12]
    # a folder of JSON-lines files with image paths; one record lacks its image, one has no caption
    folder = tmp_path / "stream"
    folder.mkdir()
    lines = [{"caption": r["caption"], "image": r["image"]} for r in rows]
    lines[4]["image"] = "images/train/not_there.png"
    lines[8]["caption"] = None
    for k in range(2):
        (folder / f"shard-{k}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines[6 * k:6 * k + 6]))
    # one parquet file with image bytes under another column name
    pq.write_table(pa.Table.from_pylist([{"text": r["caption"], "png": (shapeworld_tiny / r["image"]).read_bytes()}
                                         for r in rows[:5]]), tmp_path / "one.parquet")
    recipe = load_config(RecipeConfig, {"sources": [
        {"name": "jsonl", "format": "hf_stream", "path": str(folder), "image_root": str(shapeworld_tiny),
         "task": "generation"},
        {"name": "pq", "format": "hf_stream", "path": str(tmp_path / "one.parquet"), "caption_field": "text",
         "image_field": "png", "task": "generation", "max_samples": 4}]})
    builder = sw_builder([r["caption"] for r in rows])
    want = {("jsonl", i) for i in range(12) if i not in (4, 8)} | {("pq", i) for i in range(4)}
    stream, seen = read_all(recipe, builder, ImageFeatures(tiny_wintok), want)
    for (_source, i), batch in seen.items():
        check_generation(batch, rows[i]["caption"], Image.open(shapeworld_tiny / rows[i]["image"]), builder,
                         tiny_wintok)
    assert set(stream.stats()) == {"jsonl/missing_image", "jsonl/malformed_record"}
    assert len(stream.records["pq"]) == 4  # max_samples stops the stream


@pytest.mark.parametrize("case", ["missing_column", "damaged_parquet", "stream_not_on_disk", "stream_unknown_files",
                                  "stream_broken_json"])
def test_reader_errors_name_the_file_and_the_fix(tmp_path: Path, builder: SampleBuilder, case: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = {"name": "x", "task": "generation", "format": "hf_stream"}
    if case == "missing_column":
        pq.write_table(pa.Table.from_pylist([{"prompt": "a red circle", "image": "0.png"}]), tmp_path / "p.parquet")
        src |= {"format": "t2i_parquet", "path": str(tmp_path / "p.parquet")}
        match = r"p.parquet: no column 'caption' .*set sources.x.caption_field"
    elif case == "damaged_parquet":
        (tmp_path / "p.parquet").write_bytes(b"PAR1 not really")
        src |= {"format": "t2i_parquet", "path": str(tmp_path / "p.parquet")}
        match = "p.parquet: not a readable parquet file"
    elif case == "stream_not_on_disk":
        src |= {"path": str(tmp_path / "user/dataset-on-the-hub")}
        match = "dataset-on-the-hub: not found"
    elif case == "stream_unknown_files":
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "a.txt").write_text("a red circle")
        src |= {"path": str(tmp_path / "d")}
        match = "hf_stream reads one kind of local data file"
    else:
        (tmp_path / "b.jsonl").write_text('{"caption": "a", "image": "0.png"}\n{not json\n')
        src |= {"path": str(tmp_path / "b.jsonl")}
        match = r"b.jsonl: cannot read the dataset .*fix or remove the damaged file"
    recipe = load_config(RecipeConfig, {"sources": [src]})
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        DataStream(load_config(DataConfig, {}), recipe, builder, FakeFeatures(), 2)


# ------------------------------------------------------------------------------------------------ worker processes
@pytest.fixture
def pretokenized_mixture(tmp_path: Path, shapeworld_tiny: Path, tiny_wintok) -> tuple[RecipeConfig, SampleBuilder, object]:
    """Three ShapeWorld sources (conversations, caption understanding, parquet pairs with image bytes) with bad
    records, pretokenized by the real command into a cache → (recipe, builder, ImageFeatures of the cache)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from unified_mllm.config import load_recipe
    from unified_mllm.data.image_features import ImageFeatures
    from unified_mllm.data.pretokenize import cache_dir_for

    llava = json.loads((shapeworld_tiny / "llava_train.json").read_text())
    llava[4]["image"] = "images/train/missing.png"
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    rows = sw_rows(shapeworld_tiny)
    pairs = [{"caption": r["caption"], "image": (shapeworld_tiny / r["image"]).read_bytes()} for r in rows]
    pairs[7]["image"] = b"not an image"
    pq.write_table(pa.Table.from_pylist(pairs), tmp_path / "pairs.parquet")
    recipe_path = tmp_path / "mix.yaml"
    recipe_path.write_text(yaml.safe_dump({"sources": [
        {"name": "vqa", "format": "llava_json", "path": str(tmp_path / "llava.json"), "image_root": str(shapeworld_tiny),
         "task": "understanding", "weight": 2.0},
        {"name": "cap", "format": "t2i_jsonl", "path": str(shapeworld_tiny / "t2i_train.jsonl"),
         "task": "understanding"},
        {"name": "gen", "format": "t2i_parquet", "path": str(tmp_path / "pairs.parquet"), "task": "generation"}]}))
    tiny_wintok.save_pretrained(tmp_path / "wt")
    res = subprocess.run([sys.executable, "-m", "unified_mllm.data.pretokenize", "--recipe", str(recipe_path),
                          "--wintok", str(tmp_path / "wt"), "--out", str(tmp_path / "pretok")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    recipe = load_recipe(str(recipe_path))
    recipe.pretokenize_dir = str(tmp_path / "pretok")
    cache = cache_dir_for(str(recipe_path), recipe, tiny_wintok.identity_hash())
    assert cache.is_dir()
    features = ImageFeatures(None, cache)
    texts = [t["value"].replace("<image>", "") for r in llava for t in r["conversations"]] + [r["caption"] for r in rows]
    builder = sw_builder(texts, template="chatml")
    builder.tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    builder.drop_prob = 0.3  # caption dropout must not depend on who builds the sample
    return recipe, builder, features


def mixture_stream(mix, num_workers: int) -> DataStream:
    recipe, builder, features = mix
    cfg = load_config(DataConfig, {"max_seq_len": 160, "packing": True, "num_workers": num_workers})
    return DataStream(cfg, recipe, builder, features, micro_batch_size=2, seed=5)


def assert_same_batch(got: dict, want: dict) -> None:
    assert got["records"] == want["records"] and got["task"] == want["task"]
    assert got.keys() == want.keys()
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(got[k], v), k


def test_workers_give_the_same_batches_and_resume_exactly(pretokenized_mixture) -> None:
    ref_stream = mixture_stream(pretokenized_mixture, 0)
    reference = [next(ref_stream) for _ in range(30)]
    assert {t for b in reference for t in [b["task"]]} == {"understanding", "generation"}
    assert any(len(b["records"]) > 2 for b in reference)  # packed rows, so samples are put back and replayed
    assert set(ref_stream.stats()) == {"vqa/not_pretokenized", "gen/not_pretokenized"}  # the missing/corrupt images
    assert not any(src == "gen" and i == 7 for b in reference for src, i in b["records"])

    workers = mixture_stream(pretokenized_mixture, 2)
    try:
        for i, want in enumerate(reference[:12]):
            assert_same_batch(next(workers), want)
            if i == 0:
                pids = [p.pid for p in workers._pool.procs]
                assert len(pids) == 2 and all(p.is_alive() for p in workers._pool.procs)
        state = json.loads(json.dumps(workers.state_dict()))
        for want in reference[12:]:
            assert_same_batch(next(workers), want)
        assert workers.state_dict() == ref_stream.state_dict() | {"rng": workers.state_dict()["rng"]}
        assert workers.rng.getstate() == ref_stream.rng.getstate() and workers.stats() == ref_stream.stats()
    finally:
        procs = workers._pool.procs
        workers.close()
    assert not any(p.is_alive() for p in procs)

    resumed = mixture_stream(pretokenized_mixture, 2)
    resumed.load_state_dict(state)
    try:
        for want in reference[12:24]:
            assert_same_batch(next(resumed), want)
    finally:
        resumed.close()


def test_pretokenized_images_are_found_by_relative_paths_and_misses_are_named(pretokenized_mixture, shapeworld_tiny,
                                                                               monkeypatch) -> None:
    """The cache is written from absolute paths; a run whose data root is relative (SHAPEWORLD_DIR=runs/...) must find
    the same entries, and a stream that finds none says why instead of only counting."""
    import os

    from unified_mllm.data.samples import BadSample

    recipe, builder, features = pretokenized_mixture
    image = shapeworld_tiny / "images" / "train" / "0000000.png"
    monkeypatch.chdir(shapeworld_tiny)
    rel = os.path.relpath(image)
    assert not Path(rel).is_absolute()
    semantic, codes = features.get(rel)
    assert torch.equal(codes, features.get(str(image))[1])
    with pytest.raises(BadSample, match="not in the pretokenize cache .* pretokenize this recipe"):
        features.get("images/train/not_there.png")
    empty = type(features)(None, None)  # no cache at all: every sample is skipped, and the error says why
    stream = mixture_stream((recipe, builder, empty), 0)
    with pytest.raises(ValueError, match=r"10,000 bad samples in a row \((vqa|cap|gen)/not_pretokenized .*the last: "
                                         r".*not in the pretokenize cache"):
        next(stream)


def test_text_tokenizer_round_trips_characters_it_never_saw(tmp_path: Path) -> None:
    """The ShapeWorld vocabulary is trained on lower-case scene text; a user's capitals, accents and emoji must reach
    the model as bytes, never vanish (SentencePiece without byte fallback drops them silently in the HF tokenizer)."""
    from unified_mllm.data.text_tokenizer import train_text_tokenizer

    texts = ["a red circle left of a blue square", "how many circles are in the image?", "yes", "no"] * 50
    tok = train_text_tokenizer(texts, tmp_path / "tok", vocab_size=64)  # below the minimum: raised, not an error
    for text in ("Name ShapeWorld! é 🙂", "how many red circles are in the image?"):
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text
        assert tok.unk_token_id not in ids
    assert len(tok) >= 256 + 3 + 2


def test_text_tokenizer_learns_the_words_after_a_newline_as_it_encodes_them(tmp_path: Path) -> None:
    """Multiple-choice turns span lines. Trained line by line, the vocabulary knew "Answer" only as a line's first word
    (with the word-start mark), so inside a turn "\\nAnswer" became "A" + "nswer" — the option letter's own token —
    and the ChatML role names after <|im_start|> were split in pieces."""
    from unified_mllm.data.masking import tokenize_conversation
    from unified_mllm.data.templates import CHATML
    from unified_mllm.data.text_tokenizer import train_text_tokenizer

    mc = "What color is the circle?\nA. red\nB. green\nC. blue\nD. cyan\nAnswer with the option's letter directly."
    texts = [mc, "How many circles are there?\nAnswer the question using a single word or phrase.", "A", "2"] * 100
    tok = train_text_tokenizer(texts, tmp_path / "tok", vocab_size=400)
    ids, labels = tokenize_conversation([{"role": "user", "content": mc}, {"role": "assistant", "content": "B"}], tok,
                                        CHATML)
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces.count("Answer") == 1 and pieces.count("A") == 1, pieces  # the instruction's word, option A's letter
    assert pieces.count("\n") == 9 and "<0x0A>" not in pieces, pieces  # 5 in the question, 4 of ChatML
    assert {"user", "assistant"} <= set(pieces), pieces
    assert tok.decode(ids) == tok.apply_chat_template([{"role": "user", "content": mc}, {"role": "assistant",
                                                                                        "content": "B"}], tokenize=False)
    assert tok.convert_ids_to_tokens([i for i, lab in zip(ids, labels) if lab != -100])[0] == "B"


def test_every_rank_draws_the_same_task_sequence(pretokenized_mixture) -> None:
    """Ranks read different records (so packing fits different numbers of samples) but must agree on each
    micro-batch's task: ranks on different tasks run different modules, and under ZeRO-3 their parameter
    all-gathers stop matching — the two-process align and mixed stages hung at step 2 before this."""
    recipe, builder, features = pretokenized_mixture
    cfg = load_config(DataConfig, {"max_seq_len": 160, "packing": True, "num_workers": 0})
    ranks = [DataStream(cfg, recipe, builder, features, micro_batch_size=2, seed=5, rank=r, world_size=2)
             for r in range(2)]
    batches = [[next(s) for _ in range(20)] for s in ranks]
    assert [b["records"] for b in batches[0]] != [b["records"] for b in batches[1]]
    assert [b["task"] for b in batches[0]] == [b["task"] for b in batches[1]]
    assert {b["task"] for b in batches[0]} == {"understanding", "generation"}


@pytest.mark.parametrize("workers", [0, 1])
def test_generation_batches_carry_semantic_tokens_only_when_asked(tmp_path: Path, builder: SampleBuilder,
                                                                   workers: int) -> None:
    """The semantic alignment reads the drawn images' semantic tokens; without it they are not batched at all."""
    cfg = load_config(DataConfig, {"max_seq_len": 64, "packing": True, "num_workers": workers})
    for asked in (False, True):
        stream = DataStream(cfg, write_sources(tmp_path), builder, FakeFeatures(), micro_batch_size=2, seed=3,
                            task_ratio={"understanding": 0.0, "generation": 1.0}, gen_semantic=asked)
        try:
            batch = next(stream)
        finally:
            stream.close()
        assert ("gen_semantic" in batch) == asked
        if asked:
            assert batch["gen_semantic"].shape == (batch["gen_codes"].shape[0], 3, 8)
