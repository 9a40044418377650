"""GenEval: write the official image layout, resume, and score with the official detector or the ShapeWorld judge.

    python -m eval.geneval --checkpoint runs/x/export --metadata PATH/evaluation_metadata.jsonl --out runs/x/geneval
    python -m eval.geneval ... --geneval-repo ~/geneval --detector-path ~/geneval/models   # official scorer
    python -m eval.geneval --score-only --out runs/x/geneval --scorer shapeworld            # ShapeWorld prompts

Layout (that of GenEval's generation scripts, which name samples ``00000.png``; ``evaluation/evaluate_images.py``
reads any ``<digits>.png``)::

    OUT/00000/metadata.jsonl     the prompt's metadata record (one JSON object)
    OUT/00000/samples/0000.png   image j of prompt i, sampled with seed + i·num_images + j
    OUT/summary.json             scores per category (or "images written, not scored") and where they came from

A prompt whose directory already holds all its images is skipped, so an interrupted run continues where it
stopped. Scorers: ``official`` runs ``evaluation/evaluate_images.py`` then ``evaluation/summary_scores.py`` of a
GenEval checkout (they need its own environment: mmdet, open_clip, CUDA — ``--scorer-python``); ``shapeworld``
grades each image against its metadata with the ShapeWorld detector (for ShapeWorld prompts, offline); ``auto``
takes the official one when a checkout is given, else the ShapeWorld judge when every prompt names only
ShapeWorld shapes and colours, else none.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from eval.common import EvalError, balanced_head, load_pipeline, read_jsonl, run_cli, save_png, write_json

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
SCORERS = ("auto", "official", "shapeworld", "none")


def prompt_dir(out: Path, index: int) -> Path:
    return out / f"{index:05d}"


def sample_path(out: Path, index: int, j: int) -> Path:
    return prompt_dir(out, index) / "samples" / f"{j:04d}.png"


def is_finished(out: Path, index: int, record: dict, num_images: int) -> bool:
    meta = prompt_dir(out, index) / "metadata.jsonl"
    if not meta.is_file() or not all(sample_path(out, index, j).is_file() for j in range(num_images)):
        return False
    try:
        return json.loads(meta.read_text()) == record
    except json.JSONDecodeError:
        return False


def read_metadata(path: str | Path, max_prompts: int | None = None) -> list[dict]:
    return balanced_head(read_jsonl(path, required=("prompt", "tag")), max_prompts)


def _consecutive_runs(indices: list[int], size: int) -> list[list[int]]:
    """Chunks of at most ``size`` consecutive indices (a chunk's seeds are then seed + i·num_images + j)."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1 and len(runs[-1]) < size:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def generate_layout(pipe, records: list[dict], out: str | Path, num_images: int = 4, cfg_scale: float = 3.0,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                    batch_size: int = 16, log=print) -> dict:
    """Write the images of every unfinished prompt; returns counts of prompts generated and skipped."""
    out = Path(out)
    todo = [i for i, r in enumerate(records) if not is_finished(out, i, r, num_images)]
    skipped = len(records) - len(todo)
    if skipped:
        log(f"[geneval] {skipped} of {len(records)} prompts already have their {num_images} images: skipped")
    per_call = max(1, batch_size // num_images)
    start = time.perf_counter()
    done = 0
    for run in _consecutive_runs(todo, per_call):
        images = pipe.generate_images([records[i]["prompt"] for i in run], num_images=num_images,
                                      cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                                      seed=seed + run[0] * num_images, batch_size=batch_size)
        for i, imgs in zip(run, images):
            d = prompt_dir(out, i)
            (d / "samples").mkdir(parents=True, exist_ok=True)
            (d / "metadata.jsonl").write_text(json.dumps(records[i]) + "\n")
            for j, img in enumerate(imgs):
                save_png(img, sample_path(out, i, j))
        done += len(run)
        log(f"[geneval] {done}/{len(todo)} prompts ({time.perf_counter() - start:.0f} s)")
    return {"generated": len(todo), "skipped": skipped}


def layout_prompts(out: str | Path) -> list[tuple[int, dict, list[Path]]]:
    """(index, metadata, sample paths) of every prompt directory in a GenEval layout."""
    out = Path(out)
    items = []
    for d in sorted(p for p in out.iterdir() if p.is_dir() and p.name.isdigit()):
        meta = d / "metadata.jsonl"
        if not meta.is_file():
            raise EvalError(f"{meta}: missing; this directory is not a GenEval layout prompt")
        try:
            record = json.loads(meta.read_text())
        except json.JSONDecodeError as e:
            raise EvalError(f"{meta}: not a JSON object ({e.msg})") from None
        samples = sorted(p for p in (d / "samples").glob("*.png") if re.fullmatch(r"\d+\.png", p.name))
        items.append((int(d.name), record, samples))
    if not items:
        raise EvalError(f"{out}: no NNNNN/ prompt directories; generate the images first")
    return items


def summarise_results(rows: list[dict]) -> dict:
    """GenEval's summary from per-image results (``tag``, ``correct``, ``metadata``): as summary_scores.py."""
    by_tag: dict[str, list[bool]] = {}
    by_prompt: dict[str, list[bool]] = {}
    for r in rows:
        by_tag.setdefault(r["tag"], []).append(bool(r["correct"]))
        by_prompt.setdefault(r["metadata"], []).append(bool(r["correct"]))
    scores = {tag: sum(v) / len(v) for tag, v in by_tag.items()}
    return {
        "scores": {**scores, "overall": sum(scores.values()) / len(scores)} if scores else {},
        "counts": {tag: len(v) for tag, v in by_tag.items()},
        "images": len(rows),
        "prompts": len({r["filename"].rsplit("/samples/", 1)[0] for r in rows if "filename" in r}) or len(by_prompt),
        "distinct_prompts": len(by_prompt),
        "correct_images": sum(bool(r["correct"]) for r in rows) / max(1, len(rows)),
        "correct_prompts": sum(any(v) for v in by_prompt.values()) / max(1, len(by_prompt)),
    }


def shapeworld_applicable(records: list[dict]) -> bool:
    """Whether every object and colour the prompts name is one the ShapeWorld detector knows."""
    from unified_mllm.shapeworld.scene import COLORS, SHAPES

    for r in records:
        for req in r.get("include", []) + r.get("exclude", []):
            if req.get("class") not in SHAPES or req.get("color", next(iter(COLORS))) not in COLORS:
                return False
    return True


def score_shapeworld(out: str | Path) -> dict:
    """Grade every image of a layout with the ShapeWorld judge; writes ``results_shapeworld.jsonl`` (official fields)."""
    from unified_mllm.shapeworld.grade import grade_generation

    out = Path(out)
    rows = []
    for _, record, samples in layout_prompts(out):
        for path in samples:
            ok, reason = grade_generation(Image.open(path).convert("RGB"), record)
            rows.append({"filename": str(path), "tag": record["tag"], "prompt": record["prompt"], "correct": ok,
                         "reason": "" if ok else reason, "metadata": json.dumps(record)})
    with open(out / "results_shapeworld.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return {**summarise_results(rows), "scorer": "shapeworld judge (unified_mllm.shapeworld.grade)",
            "official": False, "results_file": str(out / "results_shapeworld.jsonl")}


def score_official(out: str | Path, geneval_repo: str | Path, detector_path: str | Path,
                   python: str | None = None, log=print) -> dict:
    """Run GenEval's evaluate_images.py and summary_scores.py; the six categories are read from results.jsonl."""
    out, repo = Path(out).resolve(), Path(geneval_repo).resolve()
    evaluate, summary = repo / "evaluation" / "evaluate_images.py", repo / "evaluation" / "summary_scores.py"
    for f in (evaluate, summary):
        if not f.is_file():
            raise EvalError(f"{f}: not found; --geneval-repo must be a checkout of djghosh13/geneval")
    results = out / "results.jsonl"
    py = python or sys.executable
    cmd = [py, str(evaluate), str(out), "--outfile", str(results), "--model-path", str(Path(detector_path).resolve())]
    log(f"[geneval] official scorer: {' '.join(cmd)}")
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0 or not results.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise EvalError(f"evaluate_images.py failed (exit {proc.returncode}): {' | '.join(tail)}")
    summ = subprocess.run([py, str(summary), str(results)], cwd=summary.parent, capture_output=True, text=True)
    if summ.returncode != 0:
        raise EvalError(f"summary_scores.py failed (exit {summ.returncode}): {summ.stderr.strip()[-300:]}")
    (out / "summary_scores.txt").write_text(summ.stdout)
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    result = summarise_results(rows)
    m = re.search(r"Overall score \(avg\. over tasks\): ([0-9.]+)", summ.stdout)
    if m and abs(float(m.group(1)) - result["scores"]["overall"]) > 1e-4:
        raise EvalError(f"summary_scores.py says overall {m.group(1)}, results.jsonl gives "
                        f"{result['scores']['overall']:.5f}; {results} may be stale")
    return {**result, "scorer": "GenEval evaluate_images.py + summary_scores.py", "official": True,
            "results_file": str(results)}


def score(out: str | Path, scorer: str = "auto", records: list[dict] | None = None,
          geneval_repo: str | None = None, detector_path: str | None = None, python: str | None = None,
          log=print) -> dict:
    if scorer not in SCORERS:
        raise EvalError(f"--scorer {scorer}: expected one of {', '.join(SCORERS)}")
    if records is None:
        records = [r for _, r, _ in layout_prompts(out)]
    if scorer == "auto":
        scorer = "official" if geneval_repo else "shapeworld" if shapeworld_applicable(records) else "none"
    if scorer == "official":
        if not geneval_repo or not detector_path:
            raise EvalError("the official scorer needs --geneval-repo (a djghosh13/geneval checkout) and "
                            "--detector-path (the folder holding the Mask2Former checkpoint)")
        return score_official(out, geneval_repo, detector_path, python, log)
    if scorer == "shapeworld":
        if not shapeworld_applicable(records):
            raise EvalError("--scorer shapeworld: the prompts name objects or colours outside ShapeWorld; use "
                            "--scorer official with a GenEval checkout")
        return score_shapeworld(out)
    return {"scorer": None, "official": False, "status": "images written, not scored",
            "prompts": len(records)}


def run(checkpoint: str | None, metadata: str | None, out: str | Path, num_images: int = 4,
        cfg_scale: float = 3.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
        batch_size: int = 16, max_prompts: int | None = None, scorer: str = "auto",
        geneval_repo: str | None = None, detector_path: str | None = None, scorer_python: str | None = None,
        pipe=None, device: str = "auto", dtype: str = "auto", log=print) -> dict:
    """Generate (unless only scoring), score, and write ``OUT/summary.json``; returns the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict = {}
    records = None
    if metadata is not None:
        records = read_metadata(metadata, max_prompts)
        if pipe is None:
            if checkpoint is None:
                raise EvalError("--checkpoint is required to generate images (or pass --score-only)")
            pipe = load_pipeline(checkpoint, device, dtype)
        start = time.perf_counter()
        counts = generate_layout(pipe, records, out, num_images, cfg_scale, temperature, top_k, top_p, seed,
                                 batch_size, log)
        counts["seconds"] = round(time.perf_counter() - start, 1)
    result = score(out, scorer, records, geneval_repo, detector_path, scorer_python, log)
    summary = {"benchmark": "geneval", "layout": str(out), "metadata": str(metadata) if metadata else None,
               "num_images": num_images, "sampling": {"cfg_scale": cfg_scale, "temperature": temperature,
                                                      "top_k": top_k, "top_p": top_p, "seed": seed},
               **counts, **result}
    write_json(out / "summary.json", summary)
    return summary


def format_summary(summary: dict) -> str:
    if not summary.get("scorer"):
        return f"GenEval layout {summary['layout']}: {summary.get('prompts')} prompts, images written, not scored"
    lines = [f"GenEval ({summary['scorer']}; official: {summary['official']}): {summary['images']} images, "
             f"{summary['prompts']} prompts"]
    for tag, value in summary["scores"].items():
        n = summary["counts"].get(tag)
        lines.append(f"  {tag:<14} {value:.4f}" + (f"  ({n} images)" if n else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="export directory of a trained model")
    p.add_argument("--metadata", help="evaluation_metadata.jsonl (GenEval's, or ShapeWorld's geneval_<split>.jsonl)")
    p.add_argument("--out", required=True, help="output folder of the layout")
    p.add_argument("--score-only", action="store_true", help="score an existing layout; generate nothing")
    p.add_argument("--num-images", type=int, default=4, help="images per prompt (GenEval: 4)")
    p.add_argument("--cfg-scale", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=0, help="top-k filter (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus filter (1: off)")
    p.add_argument("--seed", type=int, default=0, help="image j of prompt i uses seed + i·num_images + j")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward batch")
    p.add_argument("--max-prompts", type=int, default=None, help="only the first N prompts (for quick runs)")
    p.add_argument("--scorer", default="auto", choices=SCORERS, help="see above")
    p.add_argument("--geneval-repo", help="a djghosh13/geneval checkout (for the official scorer)")
    p.add_argument("--detector-path", help="folder holding mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth")
    p.add_argument("--scorer-python", help="python of the environment where GenEval's scorer is installed")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    a = p.parse_args(argv)
    if not a.score_only and not (a.checkpoint and a.metadata):
        p.error("--checkpoint and --metadata are required unless --score-only")
    if a.num_images < 1 or a.batch_size < 1:
        p.error("--num-images and --batch-size must be >= 1")
    summary = run(None if a.score_only else a.checkpoint, None if a.score_only else a.metadata, a.out,
                  a.num_images, a.cfg_scale, a.temperature, a.top_k, a.top_p, a.seed, a.batch_size, a.max_prompts,
                  a.scorer, a.geneval_repo, a.detector_path, a.scorer_python, device=a.device, dtype=a.dtype)
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
