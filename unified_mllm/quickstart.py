"""The ShapeWorld quickstart: every pipeline step through the real code paths, resumable step by step.

    python -m unified_mllm.quickstart [--out runs/quickstart] [--fast]

Each finished step leaves a marker in ``<out>/.done/``; a re-run skips it. A failed step prints its name and
the command that resumes the pipeline.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from unified_mllm.config import STAGE_CONFIG_CLASSES, ConfigError, load_stage_config


@dataclass
class Step:
    name: str
    """Step name, also the name of its done marker."""
    run: Callable[[argparse.Namespace], str]
    """Does the work; returns a one-line summary of what it did."""
    needs: str | None = None
    """A module that must exist for this step; without it the step is reported as not available yet."""


def run_cmd(cmd: list[str]) -> None:
    print("  $ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def step_data(args: argparse.Namespace) -> str:
    out = Path(args.out) / "data" / "shapeworld"
    num = 2000 if args.fast else 50000
    run_cmd([sys.executable, "-m", "unified_mllm.shapeworld", "--out", str(out), "--num", str(num),
             "--seed", "0", "--resolution", str(args.resolution)])
    return f"ShapeWorld dataset with {num} samples in {out}"


def step_configs(args: argparse.Namespace) -> str:
    for stage in STAGE_CONFIG_CLASSES:
        load_stage_config(stage)
    return f"validated stage configs: {', '.join(STAGE_CONFIG_CLASSES)}"


STEPS = [
    Step("data", step_data, needs="unified_mllm.shapeworld"),
    Step("configs", step_configs),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quickstart", help="run directory")
    parser.add_argument("--fast", action="store_true", help="few steps and small data (CI smoke run)")
    parser.add_argument("--resolution", type=int, default=64, help="ShapeWorld image size")
    args = parser.parse_args(argv)
    done_dir = Path(args.out) / ".done"
    done_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    for step in STEPS:
        marker = done_dir / step.name
        if marker.exists():
            print(f"[quickstart] {step.name}: already done ({marker.read_text().strip()})")
            continue
        if step.needs and importlib.util.find_spec(step.needs) is None:
            print(f"[quickstart] {step.name}: not available yet ({step.needs} is not built); stopping here")
            break
        print(f"[quickstart] {step.name} ...", flush=True)
        t0 = time.time()
        try:
            summary = step.run(args)
        except (subprocess.CalledProcessError, ConfigError, OSError) as e:
            print(f"[quickstart] step '{step.name}' failed: {e}\n"
                  f"[quickstart] fix the cause and re-run `bash scripts/quickstart.sh` — finished steps are skipped.",
                  file=sys.stderr)
            return 1
        timings[step.name] = round(time.time() - t0, 1)
        marker.write_text(summary + "\n")
        print(f"[quickstart] {step.name}: {summary} ({timings[step.name]} s)")
    (Path(args.out) / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
