"""Distillation teachers: any frozen module mapping images in [-1, 1] to one embedding per image.

- ``hf_vision``: a Hugging Face SigLIP/CLIP vision model from a local directory (real runs; SigLIP2 as released).
- ``shapeworld``: a small CNN trained on ShapeWorld labels (which colour–shape pairs are present, how many of each
  shape, and which object is centred in each cell of its 4×4 token grid) standing in for SigLIP in the ShapeWorld
  preset:

    python -m tokenizer.teacher --data runs/quickstart/data/shapeworld --out runs/quickstart/teacher
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

NUM_SHAPES, NUM_COLORS, MAX_COUNT = 4, 6, 4


POOLINGS = ("tokens", "grid2")


class ShapeWorldTeacher(nn.Module):
    """Conv net → embedding; heads predict colour–shape presence (multi-label) and per-shape counts.

    ``pooling="tokens"``: a 1×1 conv turns each cell of the last feature map (4×4 at 64 px) into an ``embed_dim``
    token and the embedding is their mean — the same relation as WinTok's pooled output to its semantic tokens, so
    the tokens can be distilled one by one (``loss.distill_tokens``). ``"grid2"``: the embedding is a linear map of
    the 2×2-pooled map (teachers saved before tokens existed)."""

    def __init__(self, embed_dim: int = 128, width: int = 48, pooling: str = "tokens"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"teacher pooling {pooling!r} is not one of {POOLINGS}")
        self.embed_dim, self.pooling = embed_dim, pooling
        layers, c_in = [], 3
        for c_out in (width, width * 2, width * 2, width * 4):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.GELU()]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        if pooling == "tokens":
            self.token_embed = nn.Conv2d(c_in, embed_dim, 1)
            self.cells = nn.Linear(embed_dim, NUM_SHAPES * NUM_COLORS + 1)  # the object centred in a cell, or none
        else:
            self.embed = nn.Linear(c_in * 4, embed_dim)  # 2×2 adaptive pooling keeps coarse layout
        self.presence = nn.Linear(embed_dim, NUM_SHAPES * NUM_COLORS)
        self.counts = nn.Linear(embed_dim, NUM_SHAPES * (MAX_COUNT + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] → embeddings (B, embed_dim)."""
        if self.pooling == "tokens":
            return self.token_embeddings(x).mean(1)
        h = F.adaptive_avg_pool2d(self.features(x), 2).flatten(1)  # (B, 4·C)
        return self.embed(h)

    def token_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """Images → one embedding per cell of the last feature map, row-major (B, h·w, embed_dim)."""
        if self.pooling != "tokens":
            raise ValueError("this ShapeWorld teacher was saved without token embeddings (pooling grid2); retrain it "
                             "with `python -m tokenizer.teacher --data DIR --out PATH`")
        return self.token_embed(self.features(x)).flatten(2).transpose(1, 2)

    @property
    def token_dim(self) -> int:
        return self.embed_dim

    def embed_and_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The embedding and the token embeddings from one pass."""
        tokens = self.token_embeddings(x)
        return tokens.mean(1), tokens

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The activation after each of the four conv stages (32², 16², 8², 4² for 64 px input)."""
        maps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i % 3 == 2:
                maps.append(x)
        return maps

    def heads(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.presence(F.gelu(emb)), self.counts(F.gelu(emb)).view(-1, NUM_SHAPES, MAX_COUNT + 1)


class HFVisionTeacher(nn.Module):
    """A local Hugging Face vision tower (SigLIP, SigLIP2, CLIP): its pooled output is the embedding."""

    def __init__(self, path: str):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        cfg = AutoConfig.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path)
        vision_cfg = getattr(cfg, "vision_config", cfg)
        self.image_size = int(vision_cfg.image_size)
        self.embed_dim = int(getattr(vision_cfg, "projection_dim", None) or vision_cfg.hidden_size)
        mean, std = [0.5] * 3, [0.5] * 3
        proc = Path(path) / "preprocessor_config.json"
        if proc.is_file():
            p = json.loads(proc.read_text())
            mean, std = p.get("image_mean", mean), p.get("image_std", std)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def _pixels(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate((x + 1) / 2, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled embedding: the tower's pooled output (SigLIP), projected where the model projects it (CLIP's
        ``get_image_features``)."""
        return self.embed_and_tokens(x)[0]

    def token_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """The vision tower's last hidden state at the patch positions (B, P, hidden), a CLS token dropped."""
        return self.embed_and_tokens(x)[1]

    def embed_and_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled embedding and the patch tokens from one pass of the tower."""
        tower = getattr(self.model, "vision_model", self.model)
        out = tower(pixel_values=self._pixels(x))
        pooled = out.pooler_output
        if hasattr(self.model, "visual_projection"):  # CLIP: get_image_features projects the pooled output
            pooled = self.model.visual_projection(pooled)
        hidden = out.last_hidden_state
        side = self.image_size // int(getattr(tower.config, "patch_size", 1) or 1)
        return pooled, (hidden[:, -side * side:] if hidden.shape[1] == side * side + 1 else hidden)

    @property
    def token_dim(self) -> int:
        tower = getattr(self.model, "vision_model", self.model)
        return int(tower.config.hidden_size)


def save_shapeworld_teacher(model: ShapeWorldTeacher, out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"kind": "shapeworld", "embed_dim": model.embed_dim,
                                                 "pooling": model.pooling, **meta}, indent=2) + "\n")


def load_teacher(kind: str, path: str | None) -> nn.Module | None:
    """The frozen teacher for ``kind`` (``none`` → None). Errors name the path and how to make it."""
    if kind == "none":
        return None
    if path is None or not Path(path).is_dir():
        how = ("train it with `python -m tokenizer.teacher --data DIR --out PATH`" if kind == "shapeworld"
               else "point teacher.path at a local SigLIP/CLIP directory")
        raise FileNotFoundError(f"teacher.path: {path} is not a directory; {how}")
    if kind == "shapeworld":
        cfg = json.loads((Path(path) / "config.json").read_text())
        model = ShapeWorldTeacher(cfg["embed_dim"], cfg.get("width", 48), cfg.get("pooling", "grid2"))
        model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
    else:
        model = HFVisionTeacher(path)
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------ training
def _cell_labels(scene: dict, side: int) -> torch.Tensor:
    """For each cell of a side × side grid (row-major), the colour–shape class of the largest object whose centre
    lies in it, or NUM_SHAPES · NUM_COLORS (none)."""
    from unified_mllm.shapeworld.scene import COLORS, SHAPES

    labels = torch.full((side * side,), NUM_SHAPES * NUM_COLORS, dtype=torch.long)
    for o in sorted(scene["objects"], key=lambda o: o["size"]):
        cell = min(int(o["cy"] * side), side - 1) * side + min(int(o["cx"] * side), side - 1)
        labels[cell] = SHAPES.index(o["shape"]) * NUM_COLORS + list(COLORS).index(o["color"])
    return labels


def _labels(scene: dict) -> tuple[torch.Tensor, torch.Tensor]:
    from unified_mllm.shapeworld.scene import COLORS, SHAPES

    colors = list(COLORS)
    presence = torch.zeros(NUM_SHAPES * NUM_COLORS)
    counts = torch.zeros(NUM_SHAPES, dtype=torch.long)
    for o in scene["objects"]:
        s = SHAPES.index(o["shape"])
        presence[s * NUM_COLORS + colors.index(o["color"])] = 1.0
        counts[s] += 1
    return presence, counts.clamp(max=MAX_COUNT)


def teacher_precision(precision: str) -> str:
    """'bf16' or 'fp32' for training the ShapeWorld teacher (on the CPU). ``auto``: bf16 autocast on a CPU that
    multiplies bf16 natively (AVX512-BF16 or AMX), where its convolutions' step is ~2x fp32's (NOTES.md, session 28);
    fp32 elsewhere."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"--precision {precision!r}: use auto, bf16 or fp32")
    if precision != "auto":
        return precision
    from unified_mllm.training.ds_config import cpu_has_native_bf16

    return "bf16" if cpu_has_native_bf16() else "fp32"


def train_shapeworld_teacher(data: Path, out: Path, embed_dim: int, steps: int, batch_size: int,
                             max_images: int, seed: int = 0, precision: str = "fp32") -> dict:
    """Train the ShapeWorld teacher on the first ``max_images`` training scenes (a tenth held out for the accuracies
    in its config). ``precision``: fp32, bf16 (the forward under bf16 autocast; weights, optimizer and the saved
    model stay fp32) or auto (:func:`teacher_precision`)."""
    from PIL import Image

    from tokenizer.preprocess import preprocess

    torch.manual_seed(seed)
    scenes = [json.loads(x) for x in (data / "scenes_train.jsonl").read_text().splitlines()][:max_images]
    images = preprocess([Image.open(data / "images" / "train" / f"{s['id'].split('-')[1]}.png") for s in scenes],
                        size=Image.open(data / "images" / "train" / f"{scenes[0]['id'].split('-')[1]}.png").width)
    labels = [_labels(s) for s in scenes]
    presence = torch.stack([p for p, _ in labels])
    counts = torch.stack([c for _, c in labels])
    n_val = max(1, len(scenes) // 10)
    model = ShapeWorldTeacher(embed_dim)
    with torch.no_grad():
        side = round(model.token_embeddings(images[:1]).shape[1] ** 0.5)
    cells = torch.stack([_cell_labels(s, side) for s in scenes])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    precision = teacher_precision(precision)
    t0 = time.time()
    for _ in range(steps):
        idx = torch.randint(n_val, len(scenes), (batch_size,), generator=g)
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            tokens = model.token_embeddings(images[idx])
            pres_logits, count_logits = model.heads(tokens.mean(1))
            cell_logits = model.cells(F.gelu(tokens))
        loss = F.binary_cross_entropy_with_logits(pres_logits.float(), presence[idx]) + F.cross_entropy(
            count_logits.float().reshape(-1, MAX_COUNT + 1), counts[idx].reshape(-1)) + F.cross_entropy(
            cell_logits.float().flatten(0, 1), cells[idx].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        tokens = model.token_embeddings(images[:n_val])
        pres_logits, count_logits = model.heads(tokens.mean(1))
        presence_acc = ((pres_logits > 0).float() == presence[:n_val]).all(1).float().mean().item()
        count_acc = (count_logits.argmax(-1) == counts[:n_val]).all(1).float().mean().item()
        cell_acc = (model.cells(F.gelu(tokens)).argmax(-1) == cells[:n_val]).all(1).float().mean().item()
    meta = {"width": 48, "steps": steps, "precision": precision, "train_images": len(scenes) - n_val, "val_images": n_val,
            "val_exact_presence_acc": round(presence_acc, 4), "val_exact_counts_acc": round(count_acc, 4),
            "val_exact_cells_acc": round(cell_acc, 4),
            "train_seconds": round(time.time() - t0, 1), "final_loss": round(loss.item(), 4)}
    save_shapeworld_teacher(model, out, meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a ShapeWorld dataset directory (python -m unified_mllm.shapeworld)")
    p.add_argument("--out", required=True, help="output directory for the teacher")
    p.add_argument("--embed-dim", type=int, default=128, help="embedding width (= the tokenizer's semantic_dim)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-images", type=int, default=8000)
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto: bf16 autocast on a CPU with native bf16 (AVX512-BF16 or AMX), else fp32")
    a = p.parse_args(argv)
    data = Path(a.data)
    if not (data / "scenes_train.jsonl").is_file():
        print(f"error: {data}/scenes_train.jsonl not found; generate ShapeWorld with "
              f"`python -m unified_mllm.shapeworld --out {data}`", file=sys.stderr)
        return 2
    meta = train_shapeworld_teacher(data, Path(a.out), a.embed_dim, a.steps, a.batch_size, a.max_images,
                                    precision=a.precision)
    print(f"teacher saved to {a.out}: {json.dumps(meta)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
