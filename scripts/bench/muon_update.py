"""The CPU Muon update (``unified_mllm.training.optimizer.muon_update_fp32``) against DeepSpeed's own, on the weight
matrices Muon trains in the ShapeWorld presets: time for one step's updates, and the largest difference; and ours with
the Newton–Schulz iteration in bf16 (what a stage in bf16 autocast runs on CPU) against ours in fp32.

    python scripts/bench/muon_update.py [--run runs/quickstart] [--repeat 10] [--threads N]

The WinTok's matrices come from the tokenizer preset (built at random, no files needed); the mixed stage's from the
model its preset builds on a quickstart run's WinTok and text tokenizer (``--run``; skipped when they are absent).
Both updates run eagerly in fp32 on the same gradients, alternating, after a warm-up; each row prints the time of
all of a model's matrices (one step's worth) and the ratio DeepSpeed / ours. Then ours iterates in bf16 and in fp32,
alternating: the ratio fp32 / bf16 (>1: bf16 faster; it pays only where the CPU multiplies bf16 in hardware) and the
bf16 update's largest relative difference from the fp32 one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def shapes(model) -> list[tuple[int, ...]]:
    from unified_mllm.training.optimizer import muon_parameter_names

    params = dict(model.named_parameters())
    return [tuple(params[n].shape) for n in sorted(muon_parameter_names(model))]


def model_shapes(run: Path) -> dict[str, list[tuple[int, ...]]]:
    from tokenizer.training import build_wintok
    from unified_mllm.config import load_stage_config

    found = {"tokenizer (WinTok)": shapes(build_wintok(load_stage_config("tokenizer")))}
    if (run / "wintok").exists() and (run / "text_tokenizer").exists():
        from unified_mllm.training import build

        cfg = load_stage_config("mixed", overrides=[f"model.wintok={run / 'wintok'}", "model.init_from=null",
                                                    f"model.llm.text_tokenizer={run / 'text_tokenizer'}"])
        found["mixed (LLM + heads)"] = shapes(build.build_model(cfg, None)[0])
    else:
        print(f"[bench] {run}/wintok or text_tokenizer missing: the mixed stage's matrices are skipped "
              f"(bash scripts/quickstart.sh makes them)", file=sys.stderr)
    return found


def time_updates(update, grads, moms, repeat: int) -> float:
    for g, m in zip(grads, moms):  # warm-up
        update(g.clone(), m)
    start = time.perf_counter()
    for _ in range(repeat):
        for g, m in zip(grads, moms):
            update(g.clone(), m)
    return (time.perf_counter() - start) / repeat


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/quickstart", help="a quickstart run (for the mixed stage's matrices)")
    p.add_argument("--repeat", type=int, default=10, help="steps timed per update and model")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch
    from deepspeed.runtime.zero.muon import original_muon

    from unified_mllm.training.ds_config import cpu_has_native_bf16
    from unified_mllm.training.optimizer import _newton_schulz_for_cpu

    if a.threads:
        torch.set_num_threads(a.threads)
    _newton_schulz_for_cpu()
    ours, deepspeeds = original_muon.muon_update, original_muon.muon_update.reference
    gen = torch.Generator().manual_seed(0)
    for name, dims in model_shapes(Path(a.run)).items():
        grads = [torch.randn(s, generator=gen) for s in dims]
        worst = max(float((ours(g.clone(), torch.zeros_like(g)) - deepspeeds(g.clone(), torch.zeros_like(g)))
                          .abs().max()) for g in grads)
        ds_t, our_t = [], []
        for _ in range(3):  # alternate, so drift on a noisy machine hits both
            ds_t.append(time_updates(deepspeeds, grads, [torch.zeros_like(g) for g in grads], a.repeat))
            our_t.append(time_updates(ours, grads, [torch.zeros_like(g) for g in grads], a.repeat))
        ds_ms, our_ms = 1e3 * min(ds_t), 1e3 * min(our_t)
        print(f"{name}: {len(dims)} matrices; DeepSpeed's update {ds_ms:.1f} ms a step, ours {our_ms:.1f} ms; "
              f"ratio DeepSpeed / ours {ds_ms / our_ms:.2f}x; largest difference {worst:.1e}")
        fp32_t, bf16_t, rel = [], [], 0.0
        for _ in range(3):
            for dtype, times in ((torch.float32, fp32_t), (torch.bfloat16, bf16_t)):
                _newton_schulz_for_cpu(dtype)
                times.append(time_updates(ours, grads, [torch.zeros_like(g) for g in grads], a.repeat))
        for g in grads:
            _newton_schulz_for_cpu(torch.bfloat16)
            low = ours(g.clone(), torch.zeros_like(g))
            _newton_schulz_for_cpu(torch.float32)
            full = ours(g.clone(), torch.zeros_like(g))
            rel = max(rel, float((low - full).norm() / full.norm()))
        f_ms, b_ms = 1e3 * min(fp32_t), 1e3 * min(bf16_t)
        print(f"{name}: ours with the iteration in fp32 {f_ms:.1f} ms, in bf16 {b_ms:.1f} ms; ratio fp32 / bf16 "
              f"{f_ms / b_ms:.2f}x; largest relative difference {rel:.1e} (native bf16 here: {cpu_has_native_bf16()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
