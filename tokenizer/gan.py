"""The optional adversarial loss of tokenizer training: a PatchGAN discriminator, hinge losses, and the VQGAN
adaptive weight (the released WinTok uses a frozen-DINOv2 discriminator; this small one is trained from scratch
and is what fits a CPU run)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming NLayerDiscriminator): strided 4×4 convs → one logit per patch."""

    def __init__(self, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, num_layers + 1):
            c_out = channels * min(2**i, 8)
            stride = 2 if i < num_layers else 1
            layers += [nn.Conv2d(c, c_out, 4, stride=stride, padding=1, bias=False), nn.GroupNorm(8, c_out),
                       nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, 1, h, w) logits."""
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """‖∇ rec‖ / ‖∇ g‖ at the decoder's last layer (VQGAN): the GAN gradient is scaled to the reconstruction's."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()
