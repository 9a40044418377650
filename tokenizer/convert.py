"""Convert a WinTok checkpoint once to the save_pretrained form (config.json + model.safetensors).

    python -m tokenizer.convert IN.pth OUT_DIR [--num-heads 16 ...]
"""

from __future__ import annotations

import argparse
import sys

from tokenizer.checkpoint import WinTokLoadError, load_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="released .pth container, bare state-dict .pth, or .safetensors")
    p.add_argument("out_dir", help="output directory")
    p.add_argument("--num-heads", type=int, default=None, help="encoder heads (not stored in the weights)")
    p.add_argument("--decoder-num-heads", type=int, default=None, help="decoder heads")
    p.add_argument("--proj-heads", type=int, default=None, help="attention-projection heads (default: num codebooks)")
    a = p.parse_args(argv)
    overrides = {k: v for k, v in (("num_heads", a.num_heads), ("decoder_num_heads", a.decoder_num_heads),
                                   ("proj_heads", a.proj_heads)) if v is not None}
    try:
        model = load_checkpoint(a.src, **overrides)
    except WinTokLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.save_pretrained(a.out_dir)
    n = sum(p.numel() for p in model.parameters())
    print(f"converted {a.src} → {a.out_dir} ({n / 1e6:.1f}M parameters, hash {model.identity_hash()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
