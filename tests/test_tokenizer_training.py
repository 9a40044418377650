"""The tokenizer stage end to end on CPU: train a few steps under DeepSpeed, resume, export, evaluate, probe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokenizer import WinTok, WinTokConfig
from tokenizer.losses import entropy_loss, tokenizer_losses
from unified_mllm.config.tokenizer_stage import TokenizerLossConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapeworld(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sw")
    subprocess.run([sys.executable, "-m", "unified_mllm.shapeworld", "--out", str(out), "--num", "96",
                    "--num-test", "24", "--prompts-per-tag", "2", "--resolution", "32", "--workers", "1"],
                   check=True, capture_output=True, cwd=ROOT, timeout=120)
    return out


def train(out: Path, data: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    overrides = [f"optim.max_steps={steps}", "optim.micro_batch_size=8", "checkpoint.save_every=2",
                 f"checkpoint.output_dir={out}", "logging.log_every=1", "logging.progress_bar=false",
                 "logging.tensorboard=false", f"data.images={data}/images/train",
                 f"data.eval_images={data}/images/test_heldin", "teacher.kind=none",
                 "model.overrides={image_size: 32, patch_size: 8, hidden_size: 32, num_layers: 1, num_heads: 2, "
                 "mlp_dim: 64, decoder_num_layers: 1, decoder_num_heads: 2, decoder_mlp_dim: 64, "
                 "num_semantic_tokens: 4, codebook_size: 32}", *extra]
    cmd = [sys.executable, "train_stage.py", "--stage", "tokenizer"]
    for o in overrides:
        cmd += ["--set", o]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_train_resume_export_evaluate(shapeworld: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = train(out, shapeworld, 3)
    assert first.returncode == 0, first.stderr[-2000:]
    assert (out / "export" / "model.safetensors").is_file() and (out / "eval.json").is_file()
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    again = train(out, shapeworld, 5)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout + again.stderr
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000005"]  # keep_last: 1
    result = json.loads((out / "eval.json").read_text())
    assert result["num_images"] == 24 and 0 < result["codebook_usage"] <= 1 and result["psnr"] > 0
    model = WinTok.from_pretrained(out / "export")
    assert model.config.image_size == 32 and model.config.codebook_size == 32
    ev = subprocess.run([sys.executable, "-m", "tokenizer.eval", "--checkpoint", str(out / "export"), "--images",
                         str(shapeworld / "images" / "test_heldin"), "--grid", str(tmp_path / "g.png"),
                         "--shapeworld-judge"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert ev.returncode == 0, ev.stderr
    assert "shapeworld_judge_agreement" in json.loads(ev.stdout) and (tmp_path / "g.png").is_file()
    probe = subprocess.run([sys.executable, "-m", "tokenizer.probe", "--checkpoint", str(out / "export"), "--data",
                            str(shapeworld), "--num-train", "96", "--num-test", "24"],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert set(json.loads(probe.stdout)) >= {"kind", "colour", "count"}


def test_missing_images_folder_is_one_clear_line(tmp_path: Path) -> None:
    res = train(tmp_path / "run", tmp_path / "nowhere", 1)
    assert res.returncode != 0
    assert "image folder not found" in res.stderr and "Traceback" not in res.stderr


def test_distillation_touches_only_semantic_tokens() -> None:
    torch.manual_seed(0)
    model = WinTok(WinTokConfig.tiny(image_size=32, hidden_size=32, num_layers=1, codebook_size=32, num_heads=2,
                                     decoder_num_heads=2)).train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    only_distill = TokenizerLossConfig(l1=0, l2=0, vq=0, entropy=0, distill=1.0)
    losses = tokenizer_losses(model(x), x, torch.randn(2, model.config.semantic_dim), only_distill)
    losses.total.backward()
    assert model.projection.weight.grad.abs().sum() > 0  # semantic branch learns
    for module in (model.quant_proj, model.quantizer, model.post_quant_proj, model.decoder, model.conv_out):
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in module.parameters())  # pixel branch does not


def test_token_distillation_matches_regions_and_touches_only_semantic_tokens() -> None:
    from tokenizer.losses import pool_tokens, token_distillation

    torch.manual_seed(0)
    teacher_tokens = torch.randn(2, 16, 8)  # a 4×4 teacher grid
    pooled = teacher_tokens.view(2, 2, 2, 2, 2, 8).mean((2, 4)).reshape(2, 4, 8)  # its 2×2 average: the target
    assert torch.allclose(pool_tokens(teacher_tokens, 4), pooled, atol=1e-6)
    assert pool_tokens(teacher_tokens, 16) is teacher_tokens
    assert float(token_distillation(pooled, teacher_tokens)) == pytest.approx(0.0, abs=1e-6)
    assert float(token_distillation(pooled.flip(1), teacher_tokens)) > 0.1  # the right content in the wrong region
    with pytest.raises(ValueError, match="num_semantic_tokens"):
        token_distillation(torch.randn(2, 3, 8), teacher_tokens)
    model = WinTok(WinTokConfig.tiny(image_size=32, hidden_size=32, num_layers=1, codebook_size=32, num_heads=2,
                                     decoder_num_heads=2, num_semantic_tokens=4)).train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    only = TokenizerLossConfig(l1=0, l2=0, vq=0, entropy=0, distill=0, distill_tokens=1.0)
    losses = tokenizer_losses(model(x), x, None, only, teacher_tokens=torch.randn(2, 16, model.config.semantic_dim))
    assert losses.distill_tokens > 0 and "loss/distill_tokens" in losses.scalars()
    losses.total.backward()
    assert model.projection.weight.grad.abs().sum() > 0
    for module in (model.quant_proj, model.quantizer, model.post_quant_proj, model.decoder, model.conv_out):
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in module.parameters())


def test_hf_vision_teacher_gives_pooled_and_patch_tokens(tmp_path: Path) -> None:
    """A local SigLIP vision tower (tiny, random): the embedding is its pooled output, the tokens its patches, both
    from one pass; a WinTok whose semantic width matches distils toward them."""
    import torch.nn.functional as F
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from tokenizer.losses import token_distillation
    from tokenizer.teacher import load_teacher

    cfg = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             image_size=32, patch_size=8)
    SiglipVisionModel(cfg).save_pretrained(tmp_path / "siglip")
    teacher = load_teacher("hf_vision", str(tmp_path / "siglip"))
    x = torch.rand(2, 3, 64, 64) * 2 - 1  # resized to the tower's 32 px
    emb, tokens = teacher.embed_and_tokens(x)
    assert emb.shape == (2, 16) and tokens.shape == (2, 16, 16) and teacher.token_dim == 16
    assert torch.allclose(emb, teacher(x), atol=1e-5)
    # the targets are SigLIP's own outputs on the teacher's preprocessing: pooled output and the 4×4 patch states
    tower = SiglipVisionModel.from_pretrained(tmp_path / "siglip").eval()
    with torch.no_grad():
        ref = tower(pixel_values=(F.interpolate((x + 1) / 2, size=(32, 32), mode="bicubic", align_corners=False)
                                  - 0.5) / 0.5)
    assert torch.allclose(emb, ref.pooler_output, atol=1e-5) and torch.allclose(tokens, ref.last_hidden_state, atol=1e-5)
    assert float(token_distillation(torch.randn(2, 4, 16), tokens)) > 0  # 4×4 patches pooled to 2×2


def test_teacher_feature_loss_reaches_the_pixel_path_only_and_is_zero_on_a_perfect_copy() -> None:
    from tokenizer.teacher import ShapeWorldTeacher

    torch.manual_seed(0)
    model = WinTok(WinTokConfig.tiny(image_size=32, hidden_size=32, num_layers=1, codebook_size=32, num_heads=2,
                                     decoder_num_heads=2)).train()
    teacher = ShapeWorldTeacher(embed_dim=16, width=8).eval().requires_grad_(False)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    only_feats = TokenizerLossConfig(l1=0, l2=0, vq=0, entropy=0, distill=0, teacher_features=1.0)
    losses = tokenizer_losses(model(x), x, None, only_feats, teacher=teacher)
    assert losses.teacher_features > 0
    losses.total.backward()
    assert model.conv_out.weight.grad.abs().sum() > 0  # the decoder learns from it
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.projection.parameters())  # semantic: no
    copy = model(x)
    copy.reconstruction = x.clone()
    assert float(tokenizer_losses(copy, x, None, only_feats, teacher=teacher).teacher_features) < 1e-6


def test_patch_consistency_pulls_identical_patches_to_the_same_codes() -> None:
    from tokenizer.losses import patch_consistency_loss

    images = torch.zeros(2, 3, 16, 16)  # 2 images × 4 patches of 8 px, all identical ...
    images[1, :, 8:, 8:] = 1.0  # ... but one
    same = torch.zeros(2, 1, 4, 5)
    same[..., 0] = 1.0  # every patch confidently on code 0
    assert float(patch_consistency_loss(images, same, 8, 0.1)) == pytest.approx(0.0, abs=1e-7)
    split = same.clone()
    split[0, 0, 0] = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])  # one background patch on another code
    loss = patch_consistency_loss(images, split.requires_grad_(), 8, 0.1)
    assert float(loss.detach()) > 0.05
    loss.backward()
    assert split.grad[1, 0, 3].abs().sum() == 0  # the one different patch has no twin: untouched
    with torch.no_grad():
        assert float(patch_consistency_loss(images, split, 8, 0.1, min_share=0.5)) == pytest.approx(float(loss))
        assert float(patch_consistency_loss(images, split, 8, 0.1, min_share=0.9)) == 0.0  # 7 of 8: too few


def test_patch_consistency_loss_is_its_plain_autograd_form() -> None:
    """The loss's hand-written backward and hashed grouping give autograd's gradient and unique(dim=0)'s groups."""
    from tokenizer.losses import identical_patch_groups, patch_consistency_loss

    gen = torch.Generator().manual_seed(0)
    palette = torch.rand(5, 3, 4, 4, generator=gen) * 2 - 1  # 5 distinct patches; -0.0 and 0.0 are the same pixel
    palette[0] = 0.0
    pick = torch.multinomial(torch.tensor([8.0, 4, 2, 1, 1]), 6 * 16, replacement=True, generator=gen)
    images = palette[pick].view(6, 4, 4, 3, 4, 4).permute(0, 3, 1, 4, 2, 5).reshape(6, 3, 16, 16).clone()
    images[0, :, :4, :4] = -0.0
    group, counts = identical_patch_groups(images, 4)
    patches = torch.nn.functional.unfold(images + 0.0, 4, stride=4).transpose(1, 2).reshape(-1, 48)
    _, ref_group, ref_counts = torch.unique(patches, dim=0, return_inverse=True, return_counts=True)
    assert sorted(counts.tolist()) == sorted(ref_counts.tolist())
    assert torch.equal(group[:, None] == group[None, :], ref_group[:, None] == ref_group[None, :])

    sim = (torch.randn(6, 2, 16, 7, generator=gen) * 0.3).requires_grad_()
    for min_share in (0.0, 0.1, 0.3):  # 0.3: the largest group only
        prob = (2.0 * sim / 0.1).softmax(-1).transpose(1, 2).reshape(96, 14)
        shared = ref_counts[ref_group] > max(1, min_share * 96)
        one_hot = torch.nn.functional.one_hot(ref_group[shared], len(ref_counts)).float()
        mean = (one_hot.T @ prob[shared]) / one_hot.sum(0).clamp(min=1)[:, None]
        ref = (prob[shared] - one_hot @ mean).pow(2).sum(-1).mean() / 2
        (ref_grad,) = torch.autograd.grad(ref, sim)
        loss = patch_consistency_loss(images, sim, 4, 0.1, min_share)
        (grad,) = torch.autograd.grad(loss, sim)
        assert float(loss) == pytest.approx(float(ref), rel=1e-5) and float(ref) > 0.01
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_entropy_loss_prefers_confident_and_diverse_codes() -> None:
    k = 8
    diverse = torch.eye(k).view(1, 1, k, k) * 1.0  # each position its own code, confidently
    collapsed = torch.zeros(1, 1, k, k)
    collapsed[..., 0] = 1.0  # every position the same code
    assert entropy_loss(diverse, 0.01) < entropy_loss(collapsed, 0.01)


def test_teacher_trains_under_bf16_autocast_with_fp32_weights(shapeworld: Path, tmp_path: Path) -> None:
    """The quickstart trains its teacher under bf16 autocast where the CPU multiplies bf16 natively (auto); the saved
    weights stay fp32 and it learns as the fp32 run does (same seed, same steps)."""
    from safetensors.torch import load_file

    from tokenizer.teacher import teacher_precision, train_shapeworld_teacher
    from unified_mllm.training.ds_config import cpu_has_native_bf16

    assert teacher_precision("auto") == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert teacher_precision("fp32") == "fp32" and teacher_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match="--precision 'fp16'"):
        teacher_precision("fp16")
    metas = {p: train_shapeworld_teacher(shapeworld, tmp_path / p, 16, 40, 16, 96, precision=p)
             for p in ("fp32", "bf16")}
    assert metas["bf16"]["precision"] == "bf16" and metas["fp32"]["precision"] == "fp32"
    weights = {p: load_file(str(tmp_path / p / "model.safetensors")) for p in ("fp32", "bf16")}
    assert all(t.dtype == torch.float32 for t in weights["bf16"].values())
    # the forward really ran in bf16: same seed, same batches, different weights (a precision only written to the
    # config would leave them equal to the bit)
    assert any(not torch.equal(weights["bf16"][k], weights["fp32"][k]) for k in weights["fp32"])
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["precision"] == "bf16"
    assert abs(metas["bf16"]["final_loss"] - metas["fp32"]["final_loss"]) < 0.1 * metas["fp32"]["final_loss"]


def test_teacher_cli_trains_and_loads(shapeworld: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from tokenizer.teacher import ShapeWorldTeacher, load_teacher

    res = subprocess.run([sys.executable, "-m", "tokenizer.teacher", "--data", str(shapeworld), "--out",
                          str(tmp_path / "t"), "--steps", "3", "--batch-size", "8", "--embed-dim", "16"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    teacher = load_teacher("shapeworld", str(tmp_path / "t"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert teacher(x).shape == (2, 16)
    tokens = teacher.token_embeddings(x)  # 32 px → a 2×2 grid of tokens whose mean is the embedding
    assert tokens.shape == (2, 4, 16) and torch.allclose(tokens.mean(1), teacher(x), atol=1e-6)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert "val_exact_cells_acc" in json.loads((tmp_path / "t" / "config.json").read_text())
    # the stage distils the semantic tokens one by one toward it; 13 steps × 8 > 96 images: the second epoch reads
    # the teacher's outputs from its cache
    res = train(tmp_path / "run", shapeworld, 13, "teacher.kind=shapeworld", f"teacher.path={tmp_path / 't'}",
                "loss.distill_tokens=1.0", "model.overrides.semantic_dim=16", "checkpoint.save_every=100")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 13 and all(r["loss/distill_tokens"] > 0 for r in rows)
    # a teacher saved before token embeddings existed: one clear error naming the fix
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    (tmp_path / "t" / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "pooling"}))
    old = ShapeWorldTeacher(16, 48, "grid2").state_dict()
    save_file(old, str(tmp_path / "t" / "model.safetensors"))
    res = train(tmp_path / "run2", shapeworld, 1, "teacher.kind=shapeworld", f"teacher.path={tmp_path / 't'}",
                "loss.distill_tokens=1.0", "model.overrides.semantic_dim=16")
    assert res.returncode != 0 and "retrain it with" in res.stderr and "Traceback" not in res.stderr


# ------------------------------------------------------------------------------------------ LPIPS, GAN, EMA, caches
def write_lpips_files(folder: Path) -> tuple[Path, Path]:
    """Random weights in the two published formats: torchvision vgg16 and lpips' weights/v0.1/vgg.pth."""
    from tokenizer.lpips import CHANNELS, _vgg16_features

    torch.manual_seed(0)
    vgg = {f"features.{k}": v for k, v in _vgg16_features().state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(4, 4)  # torchvision files carry the classifier too: ignored
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(CHANNELS)}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(vgg, folder / "vgg16.pth")
    torch.save(lin, folder / "vgg.pth")
    return folder / "vgg16.pth", folder / "vgg.pth"


def test_lpips_loads_local_files_and_measures(tmp_path: Path) -> None:
    from tokenizer.lpips import LPIPSError, lpips_from_paths

    vgg, lin = write_lpips_files(tmp_path)
    assert lpips_from_paths(None, None) is None
    model = lpips_from_paths(str(vgg), str(lin))
    torch.manual_seed(1)
    a = torch.rand(2, 3, 32, 32) * 2 - 1
    b = (a + 0.3 * torch.randn_like(a)).clamp(-1, 1)
    assert torch.equal(model(a, a), torch.zeros(2))
    far, near = model(a, b), model(a, (a + 0.05 * torch.randn_like(a)).clamp(-1, 1))
    assert (far > 0).all() and (far > near).all()
    torch.save({"lin0.model.1.weight": torch.rand(1, 3, 1, 1)}, tmp_path / "bad.pth")
    with pytest.raises(LPIPSError, match=r"bad\.pth.*lin0\.model\.1\.weight"):
        lpips_from_paths(str(vgg), str(tmp_path / "bad.pth"))
    with pytest.raises(LPIPSError, match="both"):
        lpips_from_paths(str(vgg), None)
    with pytest.raises(LPIPSError, match="nowhere.pth.*not found"):
        lpips_from_paths(str(tmp_path / "nowhere.pth"), str(lin))


def test_gan_lpips_ema_train_and_evaluate(shapeworld: Path, tmp_path: Path) -> None:
    """Two steps with LPIPS, the GAN (from step 0) and EMA: the discriminator changes between the step-1 and
    step-2 checkpoints, the export holds the EMA weights, and the eval reports LPIPS."""
    from safetensors.torch import load_file

    vgg, lin = write_lpips_files(tmp_path / "lpips")
    out = tmp_path / "run"
    res = train(out, shapeworld, 2, "checkpoint.save_every=1", "checkpoint.keep_last=2", "loss.gan=0.5",
                "loss.gan_disc_channels=8", "loss.gan_disc_layers=2", f"loss.lpips_vgg16={vgg}",
                f"loss.lpips_linear={lin}", "model.ema_decay=0.9", "model.init=wintok")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "LPIPS-VGG on" in res.stdout + res.stderr and "GAN on" in res.stdout + res.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss/perceptual"] > 0 and "loss/gan_d" in r and r["gan/adaptive_weight"] >= 0 for r in rows)
    states = [torch.load(out / "checkpoints" / f"step_{s:08d}" / "trainer_rank0.pt", weights_only=True)
              for s in (1, 2)]
    assert any(not torch.equal(states[0]["disc"][k], states[1]["disc"][k]) for k in states[1]["disc"])
    exported = load_file(str(out / "export" / "model.safetensors"))
    assert all(torch.equal(exported[k], states[1]["ema"][k]) for k in exported)
    # the average after step 2 is step 1's moved toward step 2's weights at the warmed-up rate; buffers are copied
    engine = torch.load(out / "checkpoints" / "step_00000002" / "ds" / "state" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)
    rate = 1.0 - min(0.9, (1 + 1) / (10 + 1))
    for k, w in engine["module"].items():
        want = w.float() if k in engine["buffer_names"] else states[0]["ema"][k].lerp(w.float(), rate)
        torch.testing.assert_close(states[1]["ema"][k], want, rtol=1e-6, atol=1e-7)
    assert "lpips_vgg" in json.loads((out / "eval.json").read_text())


def test_lpips_off_is_stated_in_the_log(shapeworld: Path, tmp_path: Path) -> None:
    res = train(tmp_path / "run", shapeworld, 1, "data.eval_images=null")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "LPIPS off" in res.stdout + res.stderr and "GAN off" in res.stdout + res.stderr


def test_image_cache_returns_the_same_pixels(shapeworld: Path) -> None:
    from tokenizer.data import ImageStream, list_images

    files = list_images(shapeworld / "images" / "train")[:6]
    plain = ImageStream(files, 32, 6, seed=0)
    cached = ImageStream(files, 32, 6, seed=0, cache=True)
    for _ in range(3):  # epoch 0 fills the cache, epochs 1-2 read it
        assert torch.equal(next(plain), next(cached))
        assert sorted(cached.last_indices) == list(range(6))
    assert len(cached.cache) == 6
    assert ImageStream(files, 32, 6, seed=0, random_crop=True, cache=True).cache is None  # crops differ per epoch


def test_wintok_init_matches_the_released_recipe() -> None:
    from tokenizer.training import apply_wintok_init

    torch.manual_seed(0)
    model = apply_wintok_init(WinTok(WinTokConfig.tiny(num_layers=1, num_semantic_tokens=64)))
    c = model.config
    assert 0.9 < float(model.query_tokens.detach().std()) < 1.1
    assert torch.allclose(model.query_tokens_pos_embed[0, : c.hidden_size // 2], torch.zeros(c.hidden_size // 2))
    bound = c.codebook_dim**-0.5 / 36
    assert all(float(b.codebook.weight.detach().abs().max()) <= bound for b in model.quantizer.codebooks)
    assert float(model.decoder.vision_model.encoder.layers[0].mlp.fc1.weight.detach().std()) < 0.03


def test_bf16_with_every_loss_trains_and_evaluates(shapeworld: Path, tmp_path: Path) -> None:
    """bf16 (the default on CUDA) through the distillation, LPIPS, GAN and EMA paths, whose fp32 networks meet a
    bf16 reconstruction."""
    vgg, lin = write_lpips_files(tmp_path / "lpips")
    out = tmp_path / "run"
    teacher = tmp_path / "teacher"
    made = subprocess.run([sys.executable, "-m", "tokenizer.teacher", "--data", str(shapeworld), "--out", str(teacher),
                           "--steps", "2", "--batch-size", "8", "--embed-dim", "16"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    res = train(out, shapeworld, 2, "deepspeed.precision=bf16", "loss.gan=0.5", "loss.gan_disc_channels=8",
                "loss.gan_disc_layers=2", f"loss.lpips_vgg16={vgg}", f"loss.lpips_linear={lin}", "model.ema_decay=0.9",
                "teacher.kind=shapeworld", f"teacher.path={teacher}", "loss.distill_tokens=0.3",
                "loss.teacher_features=0.1", "model.overrides.semantic_dim=16")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss/total"] == r["loss/total"] for r in rows)
    assert json.loads(next((out / "checkpoints").glob("step_*/meta.json")).read_text())["precision"] == "bf16"
    assert (out / "eval.json").is_file()
    from safetensors.torch import load_file

    exported = load_file(str(out / "export" / "model.safetensors"))  # the export is the fp32 average
    state = torch.load(out / "checkpoints" / "step_00000002" / "trainer_rank0.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in state["ema"].values() if v.is_floating_point())
    assert all(torch.equal(exported[k], state["ema"][k]) for k in exported)


def folder_with_a_broken_image(shapeworld: Path, tmp_path: Path) -> Path:
    """Six ShapeWorld training images and one file that is not an image, ``0000003_broken.png``."""
    import shutil

    from tokenizer.data import list_images

    folder = tmp_path / "images"
    folder.mkdir()
    for f in list_images(shapeworld / "images" / "train")[:6]:
        shutil.copy(f, folder / f.name)
    (folder / "0000003_broken.png").write_bytes(b"not a png")
    return folder


def test_unreadable_images_are_counted_skips_or_one_error_naming_the_file(shapeworld: Path, tmp_path: Path) -> None:
    from tokenizer.data import ImageStream, list_images

    folder = folder_with_a_broken_image(shapeworld, tmp_path)
    files = list_images(folder)
    stream = ImageStream(files, 32, 4, seed=1, cache=True)
    seen = []
    for k in range(3):  # 12 images drawn: two passes over the 6 good files, the broken one skipped in each
        assert next(stream).shape == (4, 3, 32, 32)
        seen += stream.last_indices
        if k == 1:
            saved = stream.state_dict()
    assert files.index(folder / "0000003_broken.png") not in seen
    assert stream.stats() == {"unreadable_image": 2}
    resumed = ImageStream(files, 32, 4, seed=1)
    resumed.load_state_dict(saved)
    assert resumed.stats() == {"unreadable_image": 1} and saved["epoch"] == 1
    assert next(resumed).shape == (4, 3, 32, 32) and resumed.last_indices == seen[8:]

    strict = ImageStream(files, 32, 4, seed=1, on_bad_sample="error")
    with pytest.raises(ValueError, match="0000003_broken.png: unreadable image.*on_bad_sample: skip"):
        for _ in range(2):
            next(strict)


def test_the_stage_logs_and_records_a_skipped_training_image(shapeworld: Path, tmp_path: Path) -> None:
    folder = folder_with_a_broken_image(shapeworld, tmp_path)
    res = train(tmp_path / "run", shapeworld, 2, f"data.images={folder}", "data.eval_images=null")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "0000003_broken.png" in res.stdout + res.stderr  # the skip is logged with the file's name
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped/unreadable_image"] >= 2  # 16 images drawn from 6 good files: every pass skips it


def test_the_linear_probe_is_fit_to_the_optimum_of_its_objective():
    """The probe's figures are those of the L2-regularised logistic regression's optimum, not of an optimiser stopped
    short of it: on correlated features (as the pixel codes are) the fit's objective is no higher than a long Adam
    run's, and its gradient vanishes. 300 Adam steps (the probe before) leave the objective 0.0035 above it."""
    import torch.nn.functional as F

    from tokenizer.probe import fit_linear_probe, probe_objective

    g = torch.Generator().manual_seed(0)
    z = torch.randn(800, 64, generator=g)
    x = z @ torch.randn(64, 1024, generator=g) + 0.1 * torch.randn(800, 1024, generator=g)
    y = (z[:, :4] + 0.5 * torch.randn(800, 4, generator=g)).argmax(1)
    x = (x - x.mean(0)) / x.std(0)
    fit = fit_linear_probe(x, y, 4, weight_decay=1e-3)
    fit.zero_grad()
    objective = probe_objective(fit, x, y, 1e-3)
    objective.backward()
    assert torch.sqrt(sum(p.grad.square().sum() for p in fit.parameters())) < 1e-3
    torch.manual_seed(0)
    reference = torch.nn.Linear(1024, 4)
    opt = torch.optim.Adam(reference.parameters(), lr=1e-3, weight_decay=1e-3)
    for _ in range(2000):
        opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        opt.step()
    with torch.no_grad():
        assert objective.item() <= probe_objective(reference, x, y, 1e-3).item() + 1e-5
