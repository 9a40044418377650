"""WinTok: released keys and shapes, encode/decode contract, save/load round trips, safe and strict loading."""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tokenizer import WinTok, WinTokConfig, WinTokLoadError, preprocess
from tokenizer.checkpoint import infer_config

ROOT = Path(__file__).resolve().parents[1]
KEYS = ROOT / "tests" / "fixtures" / "wintok" / "wintok_state_dict_keys_N256.txt"


def reference_shapes(num_semantic_tokens: int = 256) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in KEYS.read_text().splitlines():
        key, rest = line.split(" ", 1)
        dims = rest[rest.index("(") + 1: rest.index(")")]
        shape = tuple(int(d) for d in dims.split(",") if d.strip())
        if key.startswith("query_tokens"):
            shape = (num_semantic_tokens, shape[1])
        out[key] = shape
    return out


@pytest.mark.parametrize("n", [256, 32])
def test_released_size_has_exactly_the_released_keys_and_shapes(n: int) -> None:
    with torch.device("meta"):
        model = WinTok(WinTokConfig.released(num_semantic_tokens=n))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ref = reference_shapes(n)
    assert len(ref) == 940
    assert sorted(set(ours) - set(ref)) == [] and sorted(set(ref) - set(ours)) == []
    assert {k: v for k, v in ours.items() if ref[k] != v} == {}


@pytest.fixture(scope="module")
def tiny() -> WinTok:
    torch.manual_seed(0)
    return WinTok(WinTokConfig.tiny(num_layers=2)).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(2, 3, 64, 64) * 2 - 1


def test_encode_contract(tiny: WinTok, images: torch.Tensor) -> None:
    c = tiny.config
    with torch.inference_mode():
        enc = tiny.encode(images)
        recon = tiny.decode_codes(enc.pixel_codes)
    assert enc.pixel_codes.dtype == torch.long and enc.pixel_codes.shape == (2, c.num_codebooks, c.num_positions)
    assert int(enc.pixel_codes.max()) < c.codebook_size and int(enc.pixel_codes.min()) >= 0
    assert enc.semantic_tokens.shape == (2, c.num_semantic_tokens, c.semantic_dim)
    assert torch.allclose(enc.pooled, enc.semantic_tokens.mean(1))
    assert enc.quant.shape == (2, c.num_positions, c.quant_dim)
    assert recon.shape == images.shape and recon.abs().max() <= 1.0


def test_decode_codes_equals_decoding_quant(tiny: WinTok, images: torch.Tensor) -> None:
    with torch.inference_mode():
        enc = tiny.encode(images)
        assert torch.equal(tiny.decode_codes(enc.pixel_codes), tiny.decode(enc.quant))


def test_bfloat16_copy_encodes_and_decodes(tiny: WinTok, images: torch.Tensor) -> None:
    """A bf16 copy takes fp32 images: the fp32 quantizer path casts into the bf16 projections and back."""
    half = copy.deepcopy(tiny).to(torch.bfloat16)
    with torch.inference_mode():
        enc, ref = half.encode(images), tiny.encode(images)
        recon = half.decode_codes(enc.pixel_codes)
    assert enc.pixel_codes.shape == ref.pixel_codes.shape and enc.semantic_tokens.dtype == torch.bfloat16
    assert (enc.pixel_codes == ref.pixel_codes).float().mean() > 0.8  # bf16 rounding flips only near-ties
    assert recon.shape == images.shape and recon.dtype == torch.bfloat16 and torch.isfinite(recon).all()


def test_save_pretrained_round_trip(tiny: WinTok, images: torch.Tensor, tmp_path: Path) -> None:
    tiny.save_pretrained(tmp_path / "wt")
    again = WinTok.from_pretrained(tmp_path / "wt")
    assert again.config == tiny.config and again.identity_hash() == tiny.identity_hash()
    with torch.inference_mode():
        a, b = tiny.encode(images), again.encode(images)
        assert torch.equal(a.pixel_codes, b.pixel_codes) and torch.equal(a.semantic_tokens, b.semantic_tokens)
        assert torch.equal(tiny.decode_codes(a.pixel_codes), again.decode_codes(b.pixel_codes))


def test_released_container_and_bare_state_dict_load(tiny: WinTok, images: torch.Tensor, tmp_path: Path) -> None:
    sd = tiny.state_dict()
    container = {"args": argparse.Namespace(lr=2e-4, num_codebooks=4), "epoch": 3, "iter": 10,
                 "trainer": {"config": {}, "unitok": sd, "disc": {}, "unitok_optim": {}, "disc_optim": {}}}
    torch.save(container, tmp_path / "ckpt-last.pth")
    torch.save(sd, tmp_path / "bare.pth")
    overrides = {"num_heads": 4, "decoder_num_heads": 4}
    for name in ("ckpt-last.pth", "bare.pth"):
        loaded = WinTok.from_checkpoint(tmp_path / name, **overrides)
        assert loaded.config == tiny.config
        with torch.inference_mode():
            assert torch.equal(loaded.encode(images).pixel_codes, tiny.encode(images).pixel_codes)


def test_sizes_are_inferred_from_shapes(tiny: WinTok) -> None:
    cfg = infer_config(tiny.state_dict(), num_heads=4, decoder_num_heads=4)
    assert cfg == tiny.config


def test_truncated_file_gives_clear_error(tiny: WinTok, tmp_path: Path) -> None:
    torch.save(tiny.state_dict(), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(WinTokLoadError, match="cut.pth.*(unreadable|truncated)"):
        WinTok.from_checkpoint(tmp_path / "cut.pth")
    tiny.save_pretrained(tmp_path / "d")
    st = (tmp_path / "d" / "model.safetensors").read_bytes()
    (tmp_path / "d" / "model.safetensors").write_bytes(st[:100])
    with pytest.raises(WinTokLoadError, match="safetensors"):
        WinTok.from_pretrained(tmp_path / "d")


def test_wrong_keys_and_shapes_are_listed(tiny: WinTok, tmp_path: Path) -> None:
    sd = dict(tiny.state_dict())
    sd["extra.weight"] = torch.zeros(1)
    del sd["conv_out.bias"]
    torch.save(sd, tmp_path / "keys.pth")
    with pytest.raises(WinTokLoadError) as err:
        WinTok.from_checkpoint(tmp_path / "keys.pth", num_heads=4, decoder_num_heads=4)
    assert "missing 1 keys: conv_out.bias" in str(err.value) and "unexpected 1 keys: extra.weight" in str(err.value)
    sd = dict(tiny.state_dict())
    sd["fc_norm.weight"] = torch.zeros(7)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(WinTokLoadError, match="fc_norm.weight \\(7,\\)"):
        WinTok.from_checkpoint(tmp_path / "shape.pth", num_heads=4, decoder_num_heads=4)


class _Evil:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_pickle_with_foreign_globals_is_refused_never_run(tmp_path: Path) -> None:
    sentinel = tmp_path / "PWNED"
    torch.save({"trainer": {"unitok": {}}, "payload": _Evil(str(sentinel))}, tmp_path / "evil.pth")
    with pytest.raises(WinTokLoadError, match="refused"):
        WinTok.from_checkpoint(tmp_path / "evil.pth")
    assert not sentinel.exists()


def test_freeze_leaves_nothing_trainable(tiny: WinTok) -> None:
    frozen = WinTok(tiny.config).freeze()
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


def test_training_forward_gives_losses_and_gradients(tiny: WinTok, images: torch.Tensor) -> None:
    model = WinTok(tiny.config).train()
    out = model(images)
    loss = (out.reconstruction - images).abs().mean() + out.quantizer.commitment_loss + out.quantizer.codebook_loss
    loss.backward()
    assert model.encoder.vision_model.embeddings.patch_embedding.weight.grad is not None
    assert model.quantizer.codebooks[0].codebook.weight.grad is not None
    assert out.quantizer.logits.shape[:3] == (2, 4, 64)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK"])
def test_preprocess_any_mode_resize_and_centre_crop(mode: str) -> None:
    img = Image.new("RGB", (120, 80), (255, 0, 0)).convert(mode)
    x = preprocess(img, 64)
    assert x.shape == (1, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    wide = Image.new("RGB", (200, 100), (0, 0, 0))
    wide.paste((255, 255, 255), (0, 0, 40, 100))  # white at the far left: cropped away by the centre crop
    assert preprocess(wide, 50)[0].max() == -1.0


def test_convert_cli(tiny: WinTok, tmp_path: Path) -> None:
    torch.save(tiny.state_dict(), tmp_path / "in.pth")
    ok = subprocess.run([sys.executable, "-m", "tokenizer.convert", str(tmp_path / "in.pth"), str(tmp_path / "out"),
                         "--num-heads", "4", "--decoder-num-heads", "4"], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert WinTok.from_pretrained(tmp_path / "out").identity_hash() == tiny.identity_hash()
    bad = subprocess.run([sys.executable, "-m", "tokenizer.convert", str(tmp_path / "missing.pth"), str(tmp_path / "o2")],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "missing.pth" in bad.stderr


def test_parity_with_the_original_code() -> None:
    """Weights and outputs recorded from the original WinTok implementation (see tests/fixtures/wintok/README.md)."""
    from safetensors.torch import load_file

    from tokenizer.checkpoint import load_state_strict

    data = load_file(str(KEYS.parent / "wintok_original_tiny.safetensors"))
    sd = {k[len("weight."):]: v for k, v in data.items() if k.startswith("weight.")}
    cfg = WinTokConfig.tiny(image_size=32, patch_size=8, hidden_size=64, num_layers=2, num_semantic_tokens=6,
                            codebook_size=64, mlp_dim=128, decoder_mlp_dim=128)
    model = load_state_strict(WinTok(cfg), sd, "fixture").eval()
    with torch.inference_mode():
        enc = model.encode(data["input"])
        assert torch.equal(enc.pixel_codes, data["indices"])
        torch.testing.assert_close(enc.semantic_tokens, data["query_tokens"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(enc.pooled, data["pooler_out"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.post_quant_proj(enc.quant), data["post_quant"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model._decode(enc.quant), data["recon"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model._decode(model.codes_to_quant(data["indices"])), data["recon_from_indices"],
                                   atol=1e-5, rtol=1e-5)


def test_optional_refinement_adds_keys_only_when_on(images: torch.Tensor, tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain = WinTok(WinTokConfig.tiny(num_layers=1)).eval()
    refined = WinTok(WinTokConfig.tiny(num_layers=1, refine_channels=8)).eval()
    extra = sorted(set(refined.state_dict()) - set(plain.state_dict()))
    assert extra and all(k.startswith("refine.") for k in extra) and not set(plain.state_dict()) - set(refined.state_dict())
    refined.load_state_dict(plain.state_dict(), strict=False)
    with torch.inference_mode():  # a fresh refinement is the identity (its last conv starts at zero)
        codes = plain.encode(images).pixel_codes
        assert torch.equal(plain.decode_codes(codes), refined.decode_codes(codes))
        refined.refine.net[-1].bias.fill_(0.1)
        assert not torch.equal(plain.decode_codes(codes), refined.decode_codes(codes))
    refined.save_pretrained(tmp_path / "r")
    assert WinTok.from_pretrained(tmp_path / "r").identity_hash() == refined.identity_hash()
    torch.save(refined.state_dict(), tmp_path / "bare.pth")
    assert infer_config(refined.state_dict(), num_heads=4, decoder_num_heads=4).refine_channels == 8
    assert WinTok.from_checkpoint(tmp_path / "bare.pth", num_heads=4, decoder_num_heads=4).config == refined.config


def test_identity_hash_ignores_defaults_and_notes_but_not_what_changes_encoding() -> None:
    """A pretokenize cache is keyed by this hash: a new optional config field at its default, or a note in `extra`,
    must not orphan it; a setting that changes what the model computes must."""
    import dataclasses

    from tokenizer.checkpoint import identity_hash

    torch.manual_seed(0)
    model = WinTok(WinTokConfig.tiny(num_layers=1)).eval()
    base = identity_hash(model)

    @dataclasses.dataclass
    class Newer(WinTokConfig):
        some_new_option: int = 0  # what a later version might add, off by default

    model.config = Newer(**model.config.to_dict())
    assert identity_hash(model) == base
    model.config = dataclasses.replace(model.config, extra={"source": "converted from x.pth"})
    assert identity_hash(model) == base
    model.config = dataclasses.replace(model.config, layer_norm_eps=1e-5)  # no weight changes, the outputs do
    assert identity_hash(model) != base
