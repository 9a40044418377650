"""WinTok as released: SigLIP encoder + N semantic queries, multi-codebook cosine VQ between two attention
projections, and a SigLIP2-trunk pixel decoder. Architecture only (loading lives in checkpoint.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange
from torch import nn
from transformers.models.siglip.configuration_siglip import SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import SiglipEncoder, SiglipVisionEmbeddings
from transformers.models.siglip2.configuration_siglip2 import Siglip2VisionConfig
from transformers.models.siglip2.modeling_siglip2 import Siglip2Encoder

from tokenizer.attn_projection import AttnProjection
from tokenizer.config import WinTokConfig
from tokenizer.quantizer import MultiCodebookQuantizer, QuantizerOutput


@dataclass
class WinTokEncoding:
    pixel_codes: torch.Tensor
    """(B, num_codebooks, num_positions) long — the generation tokens."""
    semantic_tokens: torch.Tensor
    """(B, N, semantic_dim) — continuous understanding tokens."""
    pooled: torch.Tensor
    """(B, semantic_dim) — mean of the semantic tokens."""
    quant: torch.Tensor
    """(B, num_positions, num_codebooks · codebook_dim) — normalised code vectors."""


@dataclass
class WinTokForwardOutput:
    reconstruction: torch.Tensor
    """(B, 3, H, W), not clamped."""
    quantizer: QuantizerOutput
    """Codes, quantised vectors, VQ losses and similarity logits."""
    semantic_tokens: torch.Tensor
    """(B, N, semantic_dim)."""
    pooled: torch.Tensor
    """(B, semantic_dim)."""


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (MAE style), (grid², dim), row-major."""
    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gh, gw = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    emb = np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)
    return torch.from_numpy(emb).float()


class _SiglipVision(nn.Module):
    """`vision_model` of a SigLIP vision tower without its pooling head."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class _Siglip2Trunk(nn.Module):
    """`vision_model` of a SigLIP2 tower without embeddings and head (the decoder trunk)."""

    def __init__(self, config: Siglip2VisionConfig):
        super().__init__()
        self.encoder = Siglip2Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class _Tower(nn.Module):
    def __init__(self, vision_model: nn.Module):
        super().__init__()
        self.vision_model = vision_model


class ScalingLayer(nn.Module):
    """As released: [-1, 1] → [0, 255] clamp → [0, 1] → (· − 0.5) / 0.5, i.e. a clamp to [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.full((1, 3, 1, 1), 0.5))
        self.register_buffer("scale", torch.full((1, 3, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x01 = ((x + 1.0) * 127.5).clamp(0.0, 255.0) / 255.0
        return (x01 - self.shift) / self.scale


class PixelRefine(nn.Module):
    """Optional (not released): three 3×3 convs on the pixel-shuffled image, added back as a residual. The last
    conv starts at zero, so a fresh refinement is the identity; it lets neighbouring patches agree at their seams
    and sharpens edges that the per-patch linear head leaves soft."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.GELU(),
                                 nn.Conv2d(channels, channels, 3, padding=1), nn.GELU(),
                                 nn.Conv2d(channels, 3, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return img + self.net(img)


class WinTok(nn.Module):
    def __init__(self, config: WinTokConfig):
        super().__init__()
        self.config = c = config
        enc_cfg = SiglipVisionConfig(
            hidden_size=c.hidden_size, intermediate_size=c.mlp_dim, num_hidden_layers=c.num_layers,
            num_attention_heads=c.num_heads, image_size=c.image_size, patch_size=c.patch_size,
            hidden_act=c.hidden_act, layer_norm_eps=c.layer_norm_eps, vision_use_head=False)
        dec_cfg = Siglip2VisionConfig(
            hidden_size=c.decoder_hidden_size, intermediate_size=c.decoder_mlp_dim,
            num_hidden_layers=c.decoder_num_layers, num_attention_heads=c.decoder_num_heads, patch_size=1,
            num_patches=c.num_positions, hidden_act=c.hidden_act, layer_norm_eps=c.layer_norm_eps,
            vision_use_head=False)
        for cfg in (enc_cfg, dec_cfg):
            cfg._attn_implementation = "sdpa"
        self.scaling_layer = ScalingLayer()
        self.encoder = _Tower(_SiglipVision(enc_cfg))
        self.query_tokens = nn.Parameter(torch.randn(c.num_semantic_tokens, c.hidden_size) * 0.02)
        self.query_tokens_pos_embed = nn.Parameter(torch.randn(c.num_semantic_tokens, c.hidden_size) * 0.02)
        # pixel branch
        self.quant_proj = AttnProjection(c.hidden_size, c.quant_dim, c.proj_heads)
        self.quantizer = MultiCodebookQuantizer(c.num_codebooks, c.codebook_size, c.codebook_dim)
        self.post_quant_proj = AttnProjection(c.quant_dim, c.hidden_size, c.proj_heads)
        # semantic branch
        self.fc_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.projection = nn.Linear(c.hidden_size, c.semantic_dim)
        # decoder
        self.decode_task_layer_1 = nn.Sequential(
            nn.Linear(c.hidden_size, c.decoder_hidden_size), nn.Tanh(),
            nn.Linear(c.decoder_hidden_size, c.decoder_hidden_size))
        self.decoder_rec_pos_embed = nn.Parameter(sincos_2d(c.decoder_hidden_size, c.grid_size),
                                                  requires_grad=False)
        self.decoder = _Tower(_Siglip2Trunk(dec_cfg))
        self.decode_task_layer_2 = nn.Sequential(
            nn.Conv2d(c.decoder_hidden_size, 3 * c.patch_size * c.patch_size, kernel_size=1))
        self.conv_out = nn.Conv2d(3, 3, kernel_size=3, padding=1)
        if c.refine_channels:  # optional, off in the released layout (no keys then)
            self.refine = PixelRefine(c.refine_channels)

    # ------------------------------------------------------------------------------------ encoder
    def _encode_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images → (patch outputs (B, P, D), query outputs (B, N, D)) after post_layernorm."""
        vm = self.encoder.vision_model
        patches = vm.embeddings(self.scaling_layer(x))  # (B, P, D), row-major, with position embedding
        queries = (self.query_tokens + self.query_tokens_pos_embed).unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, N, D)
        h = vm.encoder(inputs_embeds=torch.cat([patches, queries], dim=1)).last_hidden_state  # (B, P+N, D)
        h = vm.post_layernorm(h)
        P = self.config.num_positions
        return h[:, :P], h[:, P:]

    def _semantic(self, query_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sem = self.projection(self.fc_norm(query_out))  # (B, N, semantic_dim)
        return sem, sem.mean(dim=1)

    def _quantize(self, patch_out: torch.Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=patch_out.device.type, enabled=False):
            z = self.quant_proj(patch_out.float())  # (B, P, C·d), fp32 as released
            return self.quantizer(z)

    def encode(self, x: torch.Tensor) -> WinTokEncoding:
        """Images in [-1, 1], (B, 3, H, W) → pixel codes, semantic tokens, pooled, quant."""
        patch_out, query_out = self._encode_tokens(x)
        q = self._quantize(patch_out)
        sem, pooled = self._semantic(query_out)
        return WinTokEncoding(q.codes, sem, pooled, q.quant)

    # ------------------------------------------------------------------------------------ decoder
    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """(B, P, C·d) normalised code vectors → images (B, 3, H, W), clamped to [-1, 1]."""
        return self._decode(quant).clamp(-1.0, 1.0)

    def _decode(self, quant: torch.Tensor) -> torch.Tensor:
        c = self.config
        h = self.post_quant_proj(quant)  # (B, P, D)
        h = self.decode_task_layer_1(h) + self.decoder_rec_pos_embed  # (B, P, Dd)
        vm = self.decoder.vision_model
        h = vm.post_layernorm(vm.encoder(inputs_embeds=h).last_hidden_state)  # (B, P, Dd)
        h = rearrange(h, "b (gh gw) d -> b d gh gw", gh=c.grid_size)  # (B, Dd, g, g)
        h = self.decode_task_layer_2(h)  # (B, p·p·3, g, g)
        img = rearrange(h, "b (p1 p2 c) h w -> b c (h p1) (w p2)", p1=c.patch_size, p2=c.patch_size)
        if c.refine_channels:
            img = self.refine(img)
        return self.conv_out(img)  # (B, 3, H, W)

    def codes_to_quant(self, codes: torch.Tensor) -> torch.Tensor:
        return self.quantizer.codes_to_quant(codes)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, num_codebooks, num_positions) codes → images in [-1, 1]."""
        return self.decode(self.codes_to_quant(codes))

    # ------------------------------------------------------------------------------------ training
    def forward(self, x: torch.Tensor) -> WinTokForwardOutput:
        patch_out, query_out = self._encode_tokens(x)
        q = self._quantize(patch_out)
        sem, pooled = self._semantic(query_out)
        return WinTokForwardOutput(self._decode(q.quant), q, sem, pooled)

    # ------------------------------------------------------------------------------------ I/O (see checkpoint.py)
    @classmethod
    def from_checkpoint(cls, path, **overrides) -> WinTok:
        """Load a released .pth container, a bare state-dict .pth, a .safetensors file or a save_pretrained dir."""
        from tokenizer.checkpoint import load_checkpoint

        return load_checkpoint(path, **overrides)

    @classmethod
    def from_pretrained(cls, directory) -> WinTok:
        from tokenizer.checkpoint import load_pretrained

        return load_pretrained(directory)

    def save_pretrained(self, directory) -> None:
        from tokenizer.checkpoint import save_pretrained

        save_pretrained(self, directory)

    def identity_hash(self) -> str:
        """A short stable hash of the config and weights (keys the pretokenize cache)."""
        from tokenizer.checkpoint import identity_hash

        return identity_hash(self)

    def freeze(self) -> WinTok:
        """Eval mode and no gradients: how the MLLM holds it."""
        self.eval()
        self.requires_grad_(False)
        return self
