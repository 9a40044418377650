"""Muon's Newton–Schulz work per ZeRO-1/2 rank: the order ``balanced_muon_order`` gives the Muon group against
DeepSpeed's own (by size), on a stage preset's model. Each rank orthogonalises every Muon matrix its contiguous slice
of the group's elements touches, and a step waits for the busiest rank: the script times ``newton_schulz`` on each
matrix (one thread, the stage's dtype on this CPU), sums the time of each rank's matrices under both orders, and prints
the busiest rank's time for each and the ratio by-size / balanced.

    python scripts/bench/muon_partition.py --stage mixed [--run runs/quickstart] [--ranks 2] [--repeat 20]
    python scripts/bench/muon_partition.py --stage tokenizer

The mixed stage's model reads its WinTok and text tokenizer from a quickstart run (``--run``); the tokenizer stage's
WinTok is built from its preset. The stages' own step times, both orders alternated, are in NOTES.md (session 31).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def muon_matrices(stage: str, run: Path) -> tuple[list[torch.Tensor], torch.dtype]:
    """The stage's Muon matrices in DeepSpeed's order (by size), and the dtype its Newton–Schulz runs in here."""
    from unified_mllm.config import load_stage_config
    from unified_mllm.training.ds_config import build_ds_config, computes_in_bf16, resolve_precision
    from unified_mllm.training.optimizer import muon_parameter_names

    if stage == "tokenizer":
        from tokenizer.training import build_wintok

        cfg = load_stage_config("tokenizer")
        model = build_wintok(cfg)
    else:
        from unified_mllm.training.build import build_model

        cfg = load_stage_config(stage, None, [f"model.wintok={run / 'wintok'}", "model.init_from=null",
                                              f"model.llm.text_tokenizer={run / 'text_tokenizer'}"])
        model = build_model(cfg, {})[0]
    names = muon_parameter_names(model)
    params = [p for n, p in model.named_parameters() if n in names]
    precision = resolve_precision(cfg.deepspeed, cpu_autocast=stage != "tokenizer")  # as each trainer resolves it
    bf16 = computes_in_bf16(build_ds_config(cfg.deepspeed, cfg.optim, 1, precision))
    return sorted(params, key=lambda p: p.size(), reverse=True), torch.bfloat16 if bf16 else torch.float32


def busiest(order: list[torch.Tensor], seconds: dict[int, float], ranks: int) -> float:
    """The largest sum of Newton–Schulz time over the matrices each rank's equal, contiguous slice touches."""
    part = -(-sum(p.numel() for p in order) // ranks)
    work, start = [0.0] * ranks, 0
    for p in order:
        for r in range(start // part, (start + p.numel() - 1) // part + 1):
            work[r] += seconds[id(p)]
        start += p.numel()
    return max(work)


def main() -> int:
    from unified_mllm.training.optimizer import balanced_muon_order, newton_schulz

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["mixed", "align", "sft", "t2i", "tokenizer"], default="mixed")
    p.add_argument("--run", type=Path, default=Path("runs/quickstart"), help="a quickstart run (MLLM stages)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeat", type=int, default=20)
    a = p.parse_args()
    if a.stage != "tokenizer" and not (a.run / "wintok").exists():
        print(f"error: {a.run / 'wintok'} is missing; run `bash scripts/quickstart.sh` first (or --run DIR)")
        return 2
    torch.set_num_threads(1)
    by_size, dtype = muon_matrices(a.stage, a.run)
    seconds = {}
    for m in by_size:
        x = torch.randn(m.shape[0], m[0].numel()).to(dtype)
        newton_schulz(x)
        start = time.perf_counter()
        for _ in range(a.repeat):
            newton_schulz(x)
        seconds[id(m)] = (time.perf_counter() - start) / a.repeat
    balanced = balanced_muon_order(by_size)
    total = sum(seconds.values())
    plain, ours = busiest(by_size, seconds, a.ranks), busiest(balanced, seconds, a.ranks)
    print(f"{a.stage}: {len(by_size)} Muon matrices, Newton–Schulz {1e3 * total:.1f} ms a step in {dtype} "
          f"(an even share of {a.ranks} ranks: {1e3 * total / a.ranks:.1f} ms)")
    print(f"busiest rank: by size {1e3 * plain:.1f} ms, balanced {1e3 * ours:.1f} ms; ratio {plain / ours:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
