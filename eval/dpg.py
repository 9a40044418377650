"""DPG-Bench: 2×2 grids named ``<item_id>.png``, resumable, scored by the official mPLUG scorer when installed.

    python -m eval.dpg --checkpoint runs/x/export --prompts PATH/dpg_bench/prompts --out runs/x/dpg
    python -m eval.dpg ... --ella-repo ~/ELLA --csv ~/ELLA/dpg_bench/dpg_bench.csv        # official scorer
    python -m eval.dpg --checkpoint runs/x/export --shapeworld-metadata data/shapeworld/geneval_heldin.jsonl \\
        --out runs/x/dpg_shapeworld                                                      # ShapeWorld, judged

Layout::

    OUT/images/<item_id>.png   four samples of the prompt in a 2×2 grid (left→right, top→bottom = sample 0..3,
                               sample j of prompt i seeded with seed + i·4 + j), each cell the model's resolution
    OUT/summary.json           the score (or "images written, not scored") and where it came from

``<item_id>`` is the prompt file's stem (``prompts/<item_id>.txt``). A grid that exists is not drawn again.
The official scorer (ELLA's ``dpg_bench/compute_dpg_bench.py``: mPLUG-large VQA through modelscope) reads every
file of the image folder, so nothing but the grids is written there; it needs ``dpg_bench.csv`` (``--csv``) and
its own environment (``--scorer-python``). With ``--shapeworld-metadata`` the prompts are ShapeWorld's
GenEval-format prompts (item ids ``sw<index>``), and each cell is graded by the ShapeWorld judge against its
prompt's metadata (score = mean over cells; not the DPG-Bench metric).
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

from eval.common import (
    EvalError,
    balanced_head,
    load_pipeline,
    natural_key,
    read_jsonl,
    run_cli,
    save_png,
    write_json,
)

GRID = 2
NUM_CELLS = GRID * GRID


def read_prompts(folder: str | Path, max_prompts: int | None = None, log=print) -> list[tuple[str, str]]:
    """(item_id, prompt) of every ``*.txt`` in ``folder``, in natural order; empty files are counted and skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalError(f"--prompts {folder}: not a directory of <item_id>.txt files (DPG-Bench: dpg_bench/prompts)")
    items, empty = [], []
    for path in sorted(folder.glob("*.txt"), key=lambda p: natural_key(p.stem)):
        text = path.read_text(errors="replace").strip()
        if text:
            items.append((path.stem, text))
        else:
            empty.append(path.name)
    if empty:
        log(f"[dpg] skipped {len(empty)} empty prompt files: {', '.join(empty[:5])}{' …' if len(empty) > 5 else ''}")
    if not items:
        raise EvalError(f"--prompts {folder}: no non-empty .txt prompt files")
    return items[:max_prompts] if max_prompts else items


def shapeworld_prompts(metadata: str | Path, max_prompts: int | None = None) -> tuple[list[tuple[str, str]], dict]:
    records = balanced_head(read_jsonl(metadata, required=("prompt", "tag")), max_prompts)
    items = [(f"sw{i:05d}", r["prompt"]) for i, r in enumerate(records)]
    return items, {item_id: r for (item_id, _), r in zip(items, records)}


def make_grid(images: list[Image.Image]) -> Image.Image:
    side = images[0].size[0]
    grid = Image.new("RGB", (GRID * side, GRID * side))
    for j, img in enumerate(images):
        grid.paste(img.convert("RGB"), ((j % GRID) * side, (j // GRID) * side))
    return grid


def split_grid(grid: Image.Image) -> list[Image.Image]:
    """The four cells, in the order of the official scorer's crops."""
    side = grid.size[0] // GRID
    return [grid.crop(((j % GRID) * side, (j // GRID) * side, (j % GRID + 1) * side, (j // GRID + 1) * side))
            for j in range(NUM_CELLS)]


def generate_grids(pipe, items: list[tuple[str, str]], images_dir: str | Path, cfg_scale: float = 3.0,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                   batch_size: int = 16, log=print) -> dict:
    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    todo = [i for i, (item_id, _) in enumerate(items) if not (images_dir / f"{item_id}.png").is_file()]
    if len(todo) < len(items):
        log(f"[dpg] {len(items) - len(todo)} of {len(items)} grids exist: skipped")
    per_call = max(1, batch_size // NUM_CELLS)
    start, done = time.perf_counter(), 0
    runs: list[list[int]] = []
    for i in todo:  # consecutive indices per call, so sample j of prompt i is always seeded seed + i·4 + j
        if runs and runs[-1][-1] == i - 1 and len(runs[-1]) < per_call:
            runs[-1].append(i)
        else:
            runs.append([i])
    for run in runs:
        images = pipe.generate_images([items[i][1] for i in run], num_images=NUM_CELLS, cfg_scale=cfg_scale,
                                      temperature=temperature, top_k=top_k, top_p=top_p,
                                      seed=seed + run[0] * NUM_CELLS, batch_size=batch_size)
        for i, imgs in zip(run, images):
            save_png(make_grid(imgs), images_dir / f"{items[i][0]}.png")
        done += len(run)
        log(f"[dpg] {done}/{len(todo)} grids ({time.perf_counter() - start:.0f} s)")
    return {"generated": len(todo), "skipped": len(items) - len(todo)}


def score_shapeworld(images_dir: str | Path, specs: dict[str, dict]) -> dict:
    from unified_mllm.shapeworld.grade import grade_generation

    images_dir = Path(images_dir)
    per_item, by_tag = {}, {}
    for item_id, spec in specs.items():
        path = images_dir / f"{item_id}.png"
        if not path.is_file():
            continue
        cells = split_grid(Image.open(path).convert("RGB"))
        ok = [grade_generation(c, spec)[0] for c in cells]
        per_item[item_id] = sum(ok) / len(ok)
        by_tag.setdefault(spec["tag"], []).append(per_item[item_id])
    if not per_item:
        raise EvalError(f"{images_dir}: no grids to score")
    scores = {tag: sum(v) / len(v) for tag, v in by_tag.items()}
    scores["overall"] = sum(per_item.values()) / len(per_item)
    return {"scorer": "shapeworld judge per cell (not the DPG-Bench metric)", "official": False,
            "scores": scores, "counts": {tag: len(v) for tag, v in by_tag.items()}, "items": len(per_item)}


def score_official(images_dir: str | Path, out: str | Path, ella_repo: str | Path, csv: str | Path,
                   resolution: int, python: str | None = None, log=print) -> dict:
    """Run ELLA's compute_dpg_bench.py on the grids; parses its overall score and L1/L2 category scores."""
    repo = Path(ella_repo).resolve()
    script = repo / "dpg_bench" / "compute_dpg_bench.py"
    if not script.is_file():
        raise EvalError(f"{script}: not found; --ella-repo must be a checkout of TencentQQGYLab/ELLA")
    if not Path(csv).is_file():
        raise EvalError(f"--csv {csv}: not found; it is dpg_bench/dpg_bench.csv of the ELLA repository")
    res_path = Path(out).resolve() / "dpg_results.txt"
    cmd = [python or sys.executable, str(script), "--image-root-path", str(Path(images_dir).resolve()),
           "--resolution", str(resolution), "--pic-num", str(NUM_CELLS), "--vqa-model", "mplug",
           "--csv", str(Path(csv).resolve()), "--res-path", str(res_path)]
    log(f"[dpg] official scorer: {' '.join(cmd)}")
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    text = res_path.read_text() if res_path.is_file() else ""
    m = re.search(r"DPG-Bench score: ([0-9.]+)", text)
    if proc.returncode != 0 or not m:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise EvalError(f"compute_dpg_bench.py failed (exit {proc.returncode}): {' | '.join(tail)}")
    scores = {"overall": float(m.group(1)) / 100}
    section = None
    for line in text.splitlines():
        if line.startswith("L1 category scores"):
            section = "L1"
        elif line.startswith("L2 category scores"):
            section = "L2"
        elif section == "L1" and line.startswith("\t") and ":" in line:
            name, value = line.strip().rsplit(":", 1)
            scores[name.strip()] = float(value) / 100
    failed = len(re.findall(r"^Failed filename", proc.stdout, flags=re.M))
    return {"scorer": "DPG-Bench compute_dpg_bench.py (mPLUG-large)", "official": True, "scores": scores,
            "failed_images": failed, "results_file": str(res_path)}


def run(checkpoint: str | None, prompts: str | None, out: str | Path, shapeworld_metadata: str | None = None,
        cfg_scale: float = 3.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
        batch_size: int = 16, max_prompts: int | None = None, ella_repo: str | None = None,
        csv: str | None = None, scorer_python: str | None = None, pipe=None, device: str = "auto",
        dtype: str = "auto", log=print) -> dict:
    out = Path(out)
    images_dir = out / "images"
    specs = None
    if shapeworld_metadata:
        items, specs = shapeworld_prompts(shapeworld_metadata, max_prompts)
    elif prompts:
        items = read_prompts(prompts, max_prompts, log)
    else:
        raise EvalError("pass --prompts (a folder of <item_id>.txt) or --shapeworld-metadata")
    if pipe is None:
        if checkpoint is None:
            raise EvalError("--checkpoint is required to draw the grids")
        pipe = load_pipeline(checkpoint, device, dtype)
    start = time.perf_counter()
    counts = generate_grids(pipe, items, images_dir, cfg_scale, temperature, top_k, top_p, seed, batch_size, log)
    counts["seconds"] = round(time.perf_counter() - start, 1)
    resolution = pipe.wintok.config.image_size
    if ella_repo:
        result = score_official(images_dir, out, ella_repo, csv or Path(ella_repo) / "dpg_bench" / "dpg_bench.csv",
                                resolution, scorer_python, log)
    elif specs is not None:
        result = score_shapeworld(images_dir, specs)
    else:
        result = {"scorer": None, "official": False, "status": "images written, not scored"}
    summary = {"benchmark": "dpg_bench" if specs is None else "dpg_layout_shapeworld", "layout": str(images_dir),
               "prompts": len(items), "cell_resolution": resolution,
               "sampling": {"cfg_scale": cfg_scale, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                            "seed": seed}, **counts, **result}
    write_json(out / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="export directory of a trained model")
    p.add_argument("--prompts", help="folder of <item_id>.txt prompts (DPG-Bench: dpg_bench/prompts)")
    p.add_argument("--shapeworld-metadata", help="ShapeWorld geneval_<split>.jsonl instead of --prompts (judged)")
    p.add_argument("--out", required=True, help="output folder (grids in OUT/images)")
    p.add_argument("--cfg-scale", type=float, default=3.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="images per forward batch")
    p.add_argument("--max-prompts", type=int, default=None, help="only the first N prompts")
    p.add_argument("--ella-repo", help="a TencentQQGYLab/ELLA checkout (official scorer)")
    p.add_argument("--csv", help="dpg_bench.csv (default: ELLA_REPO/dpg_bench/dpg_bench.csv)")
    p.add_argument("--scorer-python", help="python of the environment where the mPLUG scorer is installed")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    a = p.parse_args(argv)
    if bool(a.prompts) == bool(a.shapeworld_metadata):
        p.error("pass exactly one of --prompts and --shapeworld-metadata")
    s = run(a.checkpoint, a.prompts, a.out, a.shapeworld_metadata, a.cfg_scale, a.temperature, a.top_k, a.top_p,
            a.seed, a.batch_size, a.max_prompts, a.ella_repo, a.csv, a.scorer_python, device=a.device, dtype=a.dtype)
    if s.get("scorer"):
        print(f"DPG layout {s['layout']} ({s['scorer']}; official: {s['official']}): "
              + ", ".join(f"{k} {v:.4f}" for k, v in s["scores"].items()))
    else:
        print(f"DPG layout {s['layout']}: {s['prompts']} grids, images written, not scored")
    print(json.dumps({k: s[k] for k in ("generated", "skipped", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
