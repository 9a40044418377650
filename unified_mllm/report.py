"""The quickstart report: step timings, loss curves (PNG), sample grids and score tables in one Markdown file.

    python -m unified_mllm.report --run runs/quickstart [--chain align,mixed]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TARGETS = {
    "understanding overall (held-in)": ("understanding", "heldin", "overall", 0.90),
    "generation overall (held-in)": ("generation", "heldin", "overall", 0.60),
    "generation single object (held-in)": ("generation", "heldin", "single_object", 0.90),
}
"""The quickstart's targets (issue 10): name → (direction, split, category, minimum)."""
RUN_SETTINGS_FILE = "settings.json"
"""In ``<run>/.done/`` beside the step markers: the settings the run was made with (``quickstart.check_run_settings``)."""


def run_settings(run: Path) -> dict | None:
    """The settings a quickstart run recorded (None where it recorded none); ValueError naming the file where it cannot
    be read as a JSON object."""
    path = Path(run) / ".done" / RUN_SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is unreadable ({e})") from e
    if not isinstance(settings, dict):
        raise ValueError(f"{path} is unreadable (a JSON {type(settings).__name__}, not an object)")
    return settings


def _records(metrics: Path) -> list[dict]:
    if not metrics.is_file():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def loss_curves(run: Path, chain: list[str], out: Path) -> Path | None:
    """One PNG with a panel per stage: total loss and per-task losses against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [(s, _records(run / s / "metrics.jsonl")) for s in ["wintok_train", *chain]]
    stages = [(s, r) for s, r in stages if r]
    if not stages:
        return None
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.2), squeeze=False)
    for ax, (stage, recs) in zip(axes[0], stages):
        keys = ["loss"] + sorted({k for r in recs for k in r if k.startswith("loss/")})
        for k in keys:
            pts = [(r["step"], r[k]) for r in recs if k in r and r[k] == r[k]]
            if pts:
                ax.plot(*zip(*pts), label=k, linewidth=1.2)
        ax.set_title("tokenizer" if stage == "wintok_train" else stage)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def score_rows(summary: dict) -> list[dict]:
    """Flatten the suite's summary.json into rows with benchmark, metric, value, samples, scorer."""
    return [r for r in summary.get("entries", []) if isinstance(r, dict)]


def find_score(rows: list[dict], direction: str, split: str, category: str) -> float | None:
    for r in rows:
        if r.get("benchmark") == f"shapeworld_{direction}" and r.get("split") == split and r.get("metric") == category:
            return r.get("value")
    return None


def missed_targets(summary: dict) -> list[str]:
    """The targets a suite's summary.json does not reach (or does not score)."""
    rows = score_rows(summary)
    return [name for name, (direction, split, category, minimum) in TARGETS.items()
            if (find_score(rows, direction, split, category) or 0.0) < minimum]


def curve_section(run: Path) -> list[str]:
    """The score-vs-steps curve of the last stage (``python -m eval.curve``), when the run has one."""
    path = run / "eval" / "curve.json"
    if not path.is_file():
        return []
    curve = json.loads(path.read_text())
    lines = ["", "## Score against training steps", "",
             f"The last stage's intermediate exports on the same {curve['max_questions']} held-in questions and "
             f"{curve['max_prompts']} prompts (one image each) per point (`python -m eval.curve`); the last point is the "
             f"final export scored again, so it can differ a little from the tables.", ""]
    if path.with_suffix(".png").is_file():
        lines += [f"![score against steps]({path.with_suffix('.png').relative_to(run)})", ""]
    lines += ["| step | understanding overall | generation overall | generation single object |", "|---:|---:|---:|---:|"]
    for p in curve["points"]:
        und, gen = p.get("understanding/heldin", {}), p.get("generation/heldin", {})
        cells = [f"{d[k]:.3f}" if k in d else "—" for d, k in ((und, "overall"), (gen, "overall"),
                                                                (gen, "single_object"))]
        lines.append(f"| {p['step']} | " + " | ".join(cells) + " |")
    return lines


def write_report(run: Path, chain: list[str]) -> Path:
    run = Path(run)
    lines = ["# ShapeWorld quickstart report", ""]
    timings = json.loads((run / "timings.json").read_text()) if (run / "timings.json").is_file() else {}
    if timings:
        total = sum(timings.values())
        lines += ["## Steps", "", "| step | seconds |", "|---|---:|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
        lines += [f"| **total** | **{total:.1f}** ({total / 60:.1f} min) |", ""]
    # the steps in the pipeline's order, as timed (timings.json keeps it across re-runs; file times do not survive a copy)
    markers = [m for m in (run / ".done" / name for name in timings) if m.is_file()]
    if markers:
        lines += ["## What each step did", ""]
        try:
            settings = run_settings(run)
            if settings:
                lines += ["Run settings: " + ", ".join(f"`{k}` {v}" for k, v in settings.items()) + ".", ""]
        except ValueError as e:
            lines += [f"Run settings: {e}.", ""]
        lines += [f"- **{m.name}**: {m.read_text().strip()}" for m in markers]
        lines.append("")
    curves = loss_curves(run, chain, run / "loss_curves.png")
    if curves:
        lines += ["## Loss curves", "", f"![loss curves]({curves.name})", ""]
    summary_path = run / "eval" / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        rows = score_rows(summary)
        lines += ["## Targets", "", "| target | reached | minimum | met |", "|---|---:|---:|---|"]
        for name, (direction, split, category, minimum) in TARGETS.items():
            got = find_score(rows, direction, split, category)
            met = "—" if got is None else ("yes" if got >= minimum else "no")
            lines.append(f"| {name} | {'n/a' if got is None else f'{got:.3f}'} | {minimum:.2f} | {met} |")
        lines += curve_section(run)
        lines += ["", "## Scores", ""]
        if rows:
            keys = [k for k in ("benchmark", "split", "metric", "value", "samples", "scorer", "official")
                    if any(k in r for r in rows)]
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            for r in rows:
                cells = [f"{r[k]:.4f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        grids = sorted((run / "eval").glob("samples*.png"))
        if grids:
            lines += ["## Generated samples", ""]
            lines += [f"![{g.stem}]({g.relative_to(run)})" for g in grids]
            lines.append("")
        lines += [f"Full tables: [{summary_path.relative_to(run)}]({summary_path.relative_to(run)}), "
                  f"[eval/summary.md](eval/summary.md).", ""]
    out = run / "report.md"
    out.write_text("\n".join(lines))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/quickstart")
    p.add_argument("--chain", default="align,mixed")
    a = p.parse_args(argv)
    print(write_report(Path(a.run), [s for s in a.chain.split(",") if s]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
