"""The evaluation suite with lmms-eval's process beside the other parts (``lmms_eval.beside``, the default on a CPU)
against lmms-eval alone first, in one run.

    python scripts/bench/eval_suite.py --checkpoint runs/quickstart/mixed/export [--config eval_configs/shapeworld.yaml]
        [--data runs/quickstart/data/shapeworld] [--repeats 2] [--set KEY=VALUE ...] [--json J]

Each repeat runs ``python -m eval.suite`` once each way into a fresh folder (so no part resumes from the other's
files), the order swapped in every other repeat so both see the same machine load. Prints each run's wall time and
its parts' seconds, each pair's ratio (>1: beside is faster) and their median, and whether every number of every
run is the same (the order of the parts changes no figure).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_suite(checkpoint: str, config: str, out: Path, beside: bool, sets: list[str]) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "eval.suite", "--checkpoint", checkpoint, "--config", config, "--out", str(out),
           "--set", f"lmms_eval.beside={str(beside).lower()}"] + [x for s in sets for x in ("--set", s)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return seconds, json.loads((out / "summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="an export directory")
    p.add_argument("--config", default="eval_configs/shapeworld.yaml")
    p.add_argument("--data", help="ShapeWorld data directory (sets the suite's `data`)")
    p.add_argument("--repeats", type=int, default=2, help="pairs of runs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a suite config override")
    p.add_argument("--json", help="also write the figures here")
    a = p.parse_args(argv)
    if not (Path(a.checkpoint) / "unified_config.json").is_file():
        print(f"error: --checkpoint {a.checkpoint}: no unified_config.json there (an export directory, e.g. "
              "runs/quickstart/mixed/export)", file=sys.stderr)
        return 2
    sets = ([f"data={a.data}"] if a.data else []) + a.set
    rows, ratios, numbers = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.repeats):
            pair = {}
            for beside in ((True, False) if rep % 2 == 0 else (False, True)):
                seconds, summary = run_suite(a.checkpoint, a.config, Path(tmp) / f"{rep}_{beside}", beside, sets)
                parts = {k: v.get("seconds") for k, v in summary["parts"].items()}
                numbers.append([(e["benchmark"], e["split"], e["metric"], e["value"]) for e in summary["entries"]])
                pair[beside] = seconds
                rows.append({"repeat": rep, "beside": beside, "seconds": round(seconds, 1), "parts": parts})
                print(f"repeat {rep} {'beside' if beside else 'alone first'}: {seconds:.1f} s  {parts}", flush=True)
            ratios.append(pair[False] / pair[True])
            print(f"repeat {rep}: {ratios[-1]:.2f}x")
    same = all(n == numbers[0] for n in numbers)
    print(f"median {statistics.median(ratios):.2f}x (beside against lmms-eval alone first); "
          f"every number the same in all runs: {same}")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "ratios": ratios, "same_numbers": same}, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
