"""The sampler of image generation (``unified_mllm.inference.sampling.sample``: each row's exponential draws from its
own generator, one division and argmax for the batch) against its plain form (``torch.multinomial`` row by row, each
call with its own generator), at the eval's batch: 96 conditional rows × 256 codebook entries. Prints the time a call
of each, the ratio plain / ours, and whether every draw was the same (it must be: a seed's images do not depend on
the sampler's implementation).

    python scripts/bench/sampling.py [--rows 96] [--entries 256] [--calls 400] [--threads 2]

A generated image draws 64 positions × 4 sub-codes: 256 calls per batch of images.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def plain_form(logits: torch.Tensor, params, generators: list[torch.Generator]) -> torch.Tensor:
    from unified_mllm.inference.sampling import filter_logits

    probs = filter_logits(logits, params).softmax(-1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


def main() -> int:
    from unified_mllm.inference.sampling import SamplingParams, make_generators, sample

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=96)
    p.add_argument("--entries", type=int, default=256)
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    params = SamplingParams()
    logits = torch.randn(a.calls, a.rows, a.entries, generator=torch.Generator().manual_seed(0)) * 3
    forms = {"plain": plain_form, "ours": sample}
    draws, seconds = {}, {}
    for fn in forms.values():  # one warm-up call each, then every call with fresh generators
        fn(logits[0], params, make_generators(1, a.rows))
    for name, fn in list(forms.items()) * 2:  # twice, alternating, against drift
        gens = make_generators(0, a.rows)
        start = time.perf_counter()
        out = [fn(x, params, gens) for x in logits]
        seconds[name] = min(seconds.get(name, float("inf")), time.perf_counter() - start)
        draws[name] = torch.stack(out)
    same = torch.equal(draws["plain"], draws["ours"])
    for name in forms:
        print(f"{name:6s} {1e3 * seconds[name] / a.calls:.3f} ms a call")
    print(f"ratio plain / ours: {seconds['plain'] / seconds['ours']:.2f}x; every draw the same: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
