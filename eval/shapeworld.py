"""ShapeWorld bench: understanding accuracy per category and GenEval-style generation accuracy per category,
on the held-in and held-out splits, scored exactly and offline.

    python -m eval.shapeworld --checkpoint runs/quickstart/mixed/export --data runs/quickstart/data/shapeworld \\
        [--splits heldin,heldout] [--max-questions 200] [--max-prompts 40] [--out runs/quickstart/eval/shapeworld]

Understanding: the questions of ``vqa_<split>.jsonl`` (presence yes/no, counting, colour, shape, position,
multiple choice) answered greedily in batches, graded by ``unified_mllm.shapeworld.grade.grade_answer``
(normalised short answers; option letter or option text for multiple choice); ``overall`` is the accuracy over
all questions. Generation: the prompts of ``geneval_<split>.jsonl``, ``--num-images`` each, graded by the
ShapeWorld detector (``grade_generation``); ``overall`` is the mean over categories, as GenEval's.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

from PIL import Image

from eval.common import EvalError, balanced_head, load_pipeline, read_jsonl, run_cli, save_png, write_json

SPLITS = ("heldin", "heldout")


def read_questions(data: str | Path, split: str, limit: int | None = None) -> list[dict]:
    data = Path(data)
    path = data / f"vqa_{split}.jsonl"
    if not path.is_file():
        raise EvalError(f"{path}: not found; write ShapeWorld data with `python -m unified_mllm.shapeworld --out {data}`")
    rows = read_jsonl(path, required=("image", "question", "answer", "category"))[:limit]
    for r in rows:
        r["image_path"] = str(data / r["image"])
        if not Path(r["image_path"]).is_file():
            raise EvalError(f"{r['image_path']}: image of question {r.get('id')} not found; regenerate the data")
    return rows


def read_prompts(data: str | Path, split: str, limit: int | None = None) -> list[dict]:
    path = Path(data) / f"geneval_{split}.jsonl"
    if not path.is_file():
        raise EvalError(f"{path}: not found; write ShapeWorld data with `python -m unified_mllm.shapeworld`")
    return balanced_head(read_jsonl(path, required=("prompt", "tag")), limit)



# ------------------------------------------------------------------------------------------- scoring
def score_answers(questions: list[dict], predictions: list[str]) -> tuple[list[bool], dict]:
    """Per-question correctness and {category: accuracy, overall: accuracy over all questions, counts}."""
    from unified_mllm.shapeworld.grade import grade_answer

    if len(predictions) != len(questions):
        raise ValueError(f"{len(predictions)} predictions for {len(questions)} questions")
    correct = [grade_answer(p, q["answer"], (q.get("spec") or {}).get("choices"))
               for q, p in zip(questions, predictions)]
    by_cat: dict[str, list[bool]] = defaultdict(list)
    for q, ok in zip(questions, correct):
        by_cat[q["category"]].append(ok)
    scores = {c: sum(v) / len(v) for c, v in sorted(by_cat.items())}
    scores["overall"] = sum(correct) / len(correct) if correct else 0.0
    return correct, {"scores": scores, "counts": {c: len(v) for c, v in sorted(by_cat.items())},
                     "questions": len(questions)}


def score_images(specs: list[dict], images: list[list[Image.Image]]) -> tuple[list[list[bool]], dict]:
    """Per-image correctness and {tag: accuracy over images, overall: mean over tags (GenEval), counts}."""
    from unified_mllm.shapeworld.grade import grade_generation, summarise

    if len(images) != len(specs):
        raise ValueError(f"{len(images)} image lists for {len(specs)} prompts")
    correct = [[grade_generation(img, spec)[0] for img in imgs] for spec, imgs in zip(specs, images)]
    scores = summarise((s["tag"], ok) for s, oks in zip(specs, correct) for ok in oks)
    counts: dict[str, int] = defaultdict(int)
    for s, oks in zip(specs, correct):
        counts[s["tag"]] += len(oks)
    return correct, {"scores": scores, "counts": dict(counts), "prompts": len(specs),
                     "images": sum(len(c) for c in correct)}


# ------------------------------------------------------------------------------------------ the model
def answer_questions(pipe, questions: list[dict], batch_size: int = 32, max_new_tokens: int = 16) -> list[str]:
    """Greedy answers, batched (questions sorted by prompt length so a batch pads little)."""
    convs = [pipe.question_messages([Image.open(q["image_path"]).convert("RGB")], q["question"]) for q in questions]
    order = sorted(range(len(convs)), key=lambda i: len(convs[i][0]["content"]))
    answers: list[str] = [""] * len(convs)
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        for i, reply in zip(chunk, pipe.generate_text([convs[i] for i in chunk], max_new_tokens=max_new_tokens)):
            answers[i] = reply
    return answers


def run(checkpoint: str | None, data: str | Path, out: str | Path | None = None, splits: tuple[str, ...] = SPLITS,
        max_questions: int | None = None, max_prompts: int | None = None, num_images: int = 1,
        cfg_scale: float = 3.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
        batch_size: int = 16, max_new_tokens: int = 16, understanding: bool = True, generation: bool = True,
        answer_batch_size: int | None = None, pipe=None, device: str = "auto", dtype: str = "auto", log=print) -> dict:
    """Both directions on each split; writes ``OUT/shapeworld.json`` (+ generated samples) when ``out`` is given."""
    for s in splits:
        if s not in SPLITS:
            raise EvalError(f"--splits: unknown split {s!r} (valid: {', '.join(SPLITS)})")
    if pipe is None:
        if checkpoint is None:
            raise EvalError("--checkpoint is required")
        pipe = load_pipeline(checkpoint, device, dtype)
    result: dict = {"benchmark": "shapeworld", "data": str(data), "splits": {}}
    out = Path(out) if out else None
    for split in splits:
        part: dict = {}
        if understanding:
            qs = read_questions(data, split, max_questions)
            t0 = time.perf_counter()
            preds = answer_questions(pipe, qs, answer_batch_size or batch_size, max_new_tokens)
            correct, summary = score_answers(qs, preds)
            summary["seconds"] = round(time.perf_counter() - t0, 1)
            summary["records"] = [{"id": q.get("id"), "category": q["category"], "question": q["question"],
                                   "answer": q["answer"], "prediction": p, "correct": ok}
                                  for q, p, ok in zip(qs, preds, correct)]
            part["understanding"] = summary
            log(f"[shapeworld] {split} understanding: overall {summary['scores']['overall']:.3f} "
                f"on {len(qs)} questions ({summary['seconds']} s)")
        if generation:
            specs = read_prompts(data, split, max_prompts)
            t0 = time.perf_counter()
            images = pipe.generate_images([s["prompt"] for s in specs], num_images=num_images, cfg_scale=cfg_scale,
                                          temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                          batch_size=batch_size)
            correct, summary = score_images(specs, images)
            summary["seconds"] = round(time.perf_counter() - t0, 1)
            summary["records"] = []
            for i, (spec, imgs, oks) in enumerate(zip(specs, images, correct)):
                files = []
                for j, img in enumerate(imgs):
                    if out is not None:
                        path = out / "samples" / split / f"{i:05d}_{j}.png"
                        save_png(img, path)
                        files.append(str(path))
                summary["records"].append({"prompt": spec["prompt"], "tag": spec["tag"], "correct": oks,
                                           "images": files})
            part["generation"] = summary
            log(f"[shapeworld] {split} generation: overall {summary['scores'].get('overall', 0):.3f} "
                f"on {len(specs)} prompts × {num_images} ({summary['seconds']} s)")
        result["splits"][split] = part
    if out is not None:
        write_json(out / "shapeworld.json", result)
    return result


def format_result(result: dict) -> str:
    lines = []
    for split, part in result["splits"].items():
        for direction in ("understanding", "generation"):
            if direction not in part:
                continue
            s = part[direction]
            cells = ", ".join(f"{k} {v:.3f}" for k, v in s["scores"].items())
            n = s.get("questions", s.get("images"))
            lines.append(f"{split:<8} {direction:<13} (n={n}): {cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="export directory of a trained model")
    p.add_argument("--data", required=True, help="ShapeWorld data directory")
    p.add_argument("--out", help="folder for shapeworld.json and generated samples")
    p.add_argument("--splits", default="heldin,heldout")
    p.add_argument("--max-questions", type=int, default=None, help="questions per split (default: all)")
    p.add_argument("--max-prompts", type=int, default=None, help="generation prompts per split (default: all)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--cfg-scale", type=float, default=3.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit")
    p.add_argument("--no-understanding", action="store_true")
    p.add_argument("--no-generation", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    a = p.parse_args(argv)
    result = run(a.checkpoint, a.data, a.out, tuple(a.splits.split(",")), a.max_questions, a.max_prompts,
                 a.num_images, a.cfg_scale, a.temperature, a.top_k, a.top_p, a.seed, a.batch_size, a.max_new_tokens,
                 not a.no_understanding, not a.no_generation, device=a.device, dtype=a.dtype)
    print(format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
