"""LPIPS-VGG (Zhang et al. 2018, v0.1) in our own code, with weights only from local files.

Two files make the metric, both in the formats their projects publish:

- ``vgg_path``: a torchvision ``vgg16`` state dict (``features.{i}.weight/bias``; ``classifier.*`` is ignored),
- ``lin_path``: the lpips package's ``weights/v0.1/vgg.pth`` (``lin{0..4}.model.1.weight``, shapes (1, C, 1, 1)).

Inputs are images in [-1, 1]; the distance is per image, (B,). Nothing is downloaded: a missing file is one error
naming the path and what to give instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

VGG16_CONVS = ((3, 64), (64, 64), "M", (64, 128), (128, 128), "M", (128, 256), (256, 256), (256, 256), "M",
               (256, 512), (512, 512), (512, 512), "M", (512, 512), (512, 512), (512, 512))
"""torchvision vgg16 ``features`` up to relu5_3: (in, out) for a 3×3 conv + ReLU, "M" for a 2×2 max-pool."""
TAPS = (3, 8, 15, 22, 29)
"""``features`` indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 — the layers LPIPS compares."""
CHANNELS = (64, 128, 256, 512, 512)


class LPIPSError(ValueError):
    """An LPIPS weight file is missing or not in the expected format."""


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    for item in VGG16_CONVS:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(item[0], item[1], 3, padding=1), nn.ReLU(inplace=False)]
    return nn.Sequential(*layers)  # indices match torchvision's vgg16().features[:30]


def _load(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise LPIPSError(f"{path}: {what} not found; give a local file (nothing is downloaded) or leave the LPIPS "
                         f"paths unset to train without the perceptual loss")
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle globals, …
        raise LPIPSError(f"{path}: unreadable {what} ({str(e).splitlines()[0][:200]})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise LPIPSError(f"{path}: {what} is not a state dict of tensors")
    return sd


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG: ``forward(a, b)`` → (B,) distances; 0 for identical images."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.features = _vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS)

    @classmethod
    def from_files(cls, vgg_path: str | Path, lin_path: str | Path) -> LPIPS:
        model = cls()
        vgg = _load(vgg_path, "torchvision vgg16 state dict")
        feats = {k[len("features."):]: v for k, v in vgg.items() if k.startswith("features.")}
        own = model.features.state_dict()
        missing = sorted(set(own) - set(feats), key=lambda k: int(k.split(".")[0]))
        bad = [f"{k} {tuple(feats[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in feats
               and feats[k].shape != own[k].shape]
        if missing or bad:
            raise LPIPSError(f"{vgg_path}: not a torchvision vgg16 state dict (missing features.{missing[:4]}, "
                             f"mismatched {bad[:3]})")
        model.features.load_state_dict({k: feats[k] for k in own})
        lin = _load(lin_path, "lpips linear weights (weights/v0.1/vgg.pth)")
        for i, c in enumerate(CHANNELS):
            key = f"lin{i}.model.1.weight"
            if key not in lin or tuple(lin[key].shape) != (1, c, 1, 1):
                got = tuple(lin[key].shape) if key in lin else "missing"
                raise LPIPSError(f"{lin_path}: expected {key} of shape (1, {c}, 1, 1) as in lpips' "
                                 f"weights/v0.1/vgg.pth, got {got}")
            model.lins[i].weight.data.copy_(lin[key])
        return model.eval().requires_grad_(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        h = (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAPS:
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))  # unit length over channels
                if i == TAPS[-1]:
                    break
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] → (B,) distances."""
        dtype = self.shift.dtype
        fa, fb = self._taps(a.to(dtype)), self._taps(b.to(dtype))
        return sum(lin((x - y).pow(2)).mean(dim=(1, 2, 3)) for lin, x, y in zip(self.lins, fa, fb))


def lpips_from_paths(vgg_path: str | None, lin_path: str | None) -> LPIPS | None:
    """LPIPS when both paths are given, None when neither is; one without the other is an error."""
    if not vgg_path and not lin_path:
        return None
    if not (vgg_path and lin_path):
        raise LPIPSError("LPIPS needs both a torchvision vgg16 state dict and the lpips linear weights (vgg.pth); "
                         f"got vgg={vgg_path!r}, lin={lin_path!r}")
    return LPIPS.from_files(vgg_path, lin_path)
