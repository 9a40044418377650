"""WinTok encode/decode throughput (images/s) over a batch-size sweep, tiny and released size.

    python scripts/bench/tokenizer.py [--quick] [--sizes tiny,released] [--batch-sizes 1,4,16]

CPU runs fp32; on CUDA it runs bf16 autocast. Weights are random (throughput does not depend on them). The
ratio column compares each batch size's images/s with batch size 1 measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tokenizer import WinTok, WinTokConfig  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats; released size at batch 1 only")
    p.add_argument("--sizes", default="tiny,released")
    p.add_argument("--batch-sizes", default="1,4,16,64")
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else None
    print(f"device {device}, {'bf16 autocast' if dtype else 'fp32'}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"{'size':<9}{'batch':>6}{'encode img/s':>14}{'decode img/s':>14}{'enc ratio':>11}{'dec ratio':>11}")
    for size in a.sizes.split(","):
        cfg = WinTokConfig.tiny() if size == "tiny" else WinTokConfig.released()
        model = WinTok(cfg).to(device).freeze()
        batches = [int(b) for b in a.batch_sizes.split(",")]
        if size == "released" and device == "cpu":
            batches = [1] if a.quick else [1, 2]
        repeats = 2 if (a.quick or size == "released") else 5
        base = None
        for bs in batches:
            x = torch.rand(bs, 3, cfg.image_size, cfg.image_size, device=device) * 2 - 1
            with torch.inference_mode(), torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
                codes = model.encode(x).pixel_codes
                t_enc = timed(lambda m=model, x=x: m.encode(x), repeats)
                t_dec = timed(lambda m=model, c=codes: m.decode_codes(c), repeats)
            enc, dec = bs / t_enc, bs / t_dec
            base = base or (enc, dec)
            print(f"{size:<9}{bs:>6}{enc:>14.1f}{dec:>14.1f}{enc / base[0]:>11.2f}{dec / base[1]:>11.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
