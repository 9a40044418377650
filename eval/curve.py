"""Score against training steps: the ShapeWorld bench on every intermediate export of a stage and on its final export.

    python -m eval.curve --stage-dir runs/quickstart/mixed --data runs/quickstart/data/shapeworld \\
        [--splits heldin] [--max-questions 150] [--max-prompts 60] [--out runs/quickstart/eval/curve.json]

A stage writes intermediate exports when ``checkpoint.export_every`` > 0 (``<stage-dir>/exports/step_N``); the final
``<stage-dir>/export`` is the last point, at the stage's last logged step. Every point is scored with the same
questions, prompts and sampling seed, so the points compare. Output: ``curve.json`` with one record per point
(step, understanding and generation scores per category) and ``curve.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eval.common import EvalError, run_cli, write_json
from eval.shapeworld import run as run_shapeworld
from unified_mllm.quickstart import stage_summary


def points(stage_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, export directory) of every complete intermediate export and the final export, by step."""
    stage_dir = Path(stage_dir)
    found = []
    for p in sorted((stage_dir / "exports").glob("step_*")):
        if p.is_dir() and not p.name.endswith(".partial") and p.name[5:].isdigit():
            found.append((int(p.name[5:]), p))
    final, metrics = stage_dir / "export", stage_dir / "metrics.jsonl"
    if final.is_dir() and metrics.is_file():  # the final export's step: the stage's last logged one
        found.append((stage_summary(metrics)["steps"], final))
    if not found:
        raise EvalError(f"{stage_dir}: no exports/step_* and no export with its metrics.jsonl; train the stage "
                        f"(with checkpoint.export_every > 0 for intermediate points)")
    return sorted(found)


def run(stage_dir: str | Path, data: str | Path, out: str | Path | None = None, splits: tuple[str, ...] = ("heldin",),
        max_questions: int | None = 150, max_prompts: int | None = 60, seed: int = 0, cfg_scale: float = 3.0,
        device: str = "auto", dtype: str = "auto", log=print) -> dict:
    records = []
    for step, export in points(stage_dir):
        res = run_shapeworld(str(export), data, None, splits, max_questions, max_prompts, 1, cfg_scale=cfg_scale,
                             seed=seed, device=device, dtype=dtype, log=lambda *_: None)
        rec: dict = {"step": step, "export": str(export)}
        for split, part in res["splits"].items():
            for direction in ("understanding", "generation"):
                if direction in part:
                    rec[f"{direction}/{split}"] = part[direction]["scores"]
        records.append(rec)
        log(f"[curve] step {step}: " + ", ".join(
            f"{k} {v['overall']:.3f}" for k, v in rec.items() if isinstance(v, dict)))
    result = {"stage_dir": str(stage_dir), "data": str(data), "max_questions": max_questions,
              "max_prompts": max_prompts, "cfg_scale": cfg_scale, "seed": seed, "points": records}
    if out is not None:
        out = Path(out)
        write_json(out, result)
        plot(result, out.with_suffix(".png"))
    return result


def plot(result: dict, path: Path) -> Path:
    """Overall understanding, overall generation and single-object generation against the step, per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = result["points"]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    keys = sorted({k for r in pts for k, v in r.items() if isinstance(v, dict)})
    for key in keys:
        for cat in ("overall", "single_object"):
            xy = [(r["step"], r[key][cat]) for r in pts if key in r and cat in r[key]]
            if xy and (cat == "overall" or key.startswith("generation")):
                ax.plot(*zip(*xy), marker="o", linewidth=1.2, label=f"{key} {cat}")
    ax.set_xlabel("training step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("ShapeWorld bench against training steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage-dir", required=True, help="a stage's checkpoint.output_dir (holds exports/ and export/)")
    p.add_argument("--data", required=True, help="ShapeWorld data directory")
    p.add_argument("--out", help="curve.json to write (curve.png beside it)")
    p.add_argument("--splits", default="heldin")
    p.add_argument("--max-questions", type=int, default=150, help="questions per split and point")
    p.add_argument("--max-prompts", type=int, default=60, help="generation prompts per split and point")
    p.add_argument("--cfg-scale", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    a = p.parse_args(argv)
    run(a.stage_dir, a.data, a.out, tuple(a.splits.split(",")), a.max_questions, a.max_prompts, a.seed, a.cfg_scale,
        a.device, a.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
