"""Multiple-choice scoring speed: ``UnifiedPipeline.loglikelihood_batch`` against one request at a time, in one run.

    python scripts/bench/loglikelihood.py [--checkpoint DIR] [--questions 50] [--batch-size 32] [--repeats 3]

lmms-eval scores a multiple-choice question by asking the log-likelihood of each option after the question and
its image (the ``mc`` kind of the ShapeWorld tasks, MMBench-style log-likelihood tasks): 4 requests a question.
Ours: the requests in left-padded batches of ``--batch-size``, one forward each (what the lmms-eval plugin does).
Plain: one forward per request. Both over the same requests (ShapeWorld scenes drawn here, each question with the
options A–D); prints requests/s of both, their ratio, and the largest difference between the two paths' figures.
Without ``--checkpoint`` the ShapeWorld-tiny architecture is built with random weights (speed does not depend on
them).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import add_pipeline_args, load_pipeline, timed  # noqa: E402  (the same pipeline and timer)


def requests(n: int, seed: int = 0) -> list[tuple[list, str, str]]:
    """``n`` ShapeWorld multiple-choice questions × the 4 option letters, as (images, context, continuation)."""
    from unified_mllm.shapeworld.dataset import sample_scene
    from unified_mllm.shapeworld.render import render
    from unified_mllm.shapeworld.text import question

    rng, out = random.Random(seed), []
    for _ in range(n):
        scene = sample_scene(rng, heldout=False)
        q, _, _ = question(scene, rng, "multiple_choice")
        image = render(scene, 64)
        out += [([image], q, f" {letter}") for letter in "ABCD"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pipeline_args(p)
    p.add_argument("--questions", type=int, default=50, help="multiple-choice questions (4 requests each)")
    p.add_argument("--batch-size", type=int, default=32, help="requests a forward (the lmms-eval plugin's batch_size)")
    a = p.parse_args()

    pipe, label = load_pipeline(a)
    reqs = requests(a.questions)
    print(f"{len(reqs)} requests ({a.questions} questions × 4 options), device {pipe.device}, {pipe.dtype}, "
          f"{torch.get_num_threads()} threads, {label}")

    def batched() -> list:
        return [r for s in range(0, len(reqs), a.batch_size) for r in pipe.loglikelihood_batch(reqs[s:s + a.batch_size])]

    def plain() -> list:
        return [pipe.loglikelihood(*r) for r in reqs]

    got, ref = batched(), plain()  # warm-up, and the figures to compare
    diff = max(abs(x[0] - y[0]) for x, y in zip(got, ref))
    greedy_same = sum(x[1] == y[1] for x, y in zip(got, ref))
    ours_s, plain_s = timed(batched, a.repeats), timed(plain, a.repeats)
    res = {"requests": len(reqs), "batch_size": a.batch_size, "ours_requests_per_s": len(reqs) / ours_s,
           "plain_requests_per_s": len(reqs) / plain_s, "ratio": plain_s / ours_s, "max_abs_diff": diff,
           "greedy_flags_equal": greedy_same}
    print(f"batched (batch {a.batch_size}): {res['ours_requests_per_s']:.0f} requests/s; one at a time: "
          f"{res['plain_requests_per_s']:.0f} requests/s; ratio {res['ratio']:.2f}×")
    print(f"largest difference in log-likelihood {diff:.2e}; greedy flags equal on {greedy_same} of {len(reqs)}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
