"""One process on every core against one single-threaded process per core, for one training stage on CPU.

    python scripts/bench/procs.py [--run runs/quickstart] [--stage mixed|tokenizer|…] [--steps 100] [--procs 2]
        [--json J]

The quickstart runs its training stages as ``stage_procs()`` processes with the cores shared out among them; this
measures that choice against the plain alternative (one process, intra-op threads on every core) in the same run:
the same stage, steps and global batch (the preset's micro-batch split over the processes), an MLLM stage from the
run's ``align`` export, the tokenizer stage from scratch on the run's data and teacher. Time is the wall time between
the logged steps ``--warm`` and the last (start-up, the first compile of DeepSpeed's ops and the final export left
out); tokens/s per step kind come from ``tokens_per_s/<task>`` in ``metrics.jsonl`` (images/s for the tokenizer).
Prints both rows and the ratio (>1: the multi-process form is faster).
Needs what the quickstart made under ``--run`` (``bash scripts/quickstart.sh``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def timed_window(metrics: Path, warm: int) -> dict:
    from unified_mllm.quickstart import per_task, step_records

    recs = step_records(metrics)
    first = next(r for r in recs if r["step"] >= warm)
    after = [r for r in recs if r["step"] > first["step"]]
    rates = per_task(after, "tokens_per_s")
    if not rates and after and "images_per_s" in after[0]:  # the tokenizer stage
        rates = {"images": [r["images_per_s"] for r in after]}
    return {"steps": recs[-1]["step"] - first["step"], "seconds": recs[-1]["time"] - first["time"],
            "tokens_per_s_by_task": {t: sum(v) / len(v) for t, v in rates.items()}}


def stage_needs(stage: str) -> tuple[str, ...]:
    """What a quickstart run must hold for a bench to run ``stage`` from it."""
    if stage == "tokenizer":
        return ("data/shapeworld/images/train", "teacher")
    return ("wintok", "text_tokenizer", "pretokenized", "align/export")


def stage_run(run: Path, stage: str, out: Path, procs: int, steps: int,
              sets: list[str] | tuple[str, ...] = ()) -> tuple[list[str], dict]:
    """The command and environment of a ``steps``-step bench run of ``stage`` in ``procs`` processes, each with its
    share of the preset's batch (the quickstart's split), logging every 10 steps and saving no checkpoint: an MLLM
    stage from the run's align export, the tokenizer stage from scratch on its data and teacher, without its closing
    eval. ``sets``: the bench's own ``--set`` items."""
    from unified_mllm.config import load_stage_config
    from unified_mllm.quickstart import (
        batch_sets_per_proc,
        launcher_command,
        run_env,
        threads_per_proc,
        tokenizer_command,
    )

    sets = [f"optim.max_steps={steps}", "logging.log_every=10", f"checkpoint.save_every={steps + 1}", *sets]
    if stage == "tokenizer":
        cmd = tokenizer_command(run, procs, extra=[f"checkpoint.output_dir={out}", "data.eval_images=", *sets])
    else:
        optim = load_stage_config(stage).optim
        cmd = launcher_command(run, stage, out, run / "align" / "export", procs=procs,
                               extra=[*batch_sets_per_proc(stage, optim, procs), *sets])
    # every form gets the whole machine, whatever OMP_NUM_THREADS the caller has set
    return cmd, {**run_env(run), "OMP_NUM_THREADS": str(threads_per_proc(procs))}


def add_run_args(p: argparse.ArgumentParser, steps: int, warm: int) -> None:
    """The arguments of every bench that times a stage from a quickstart run (this one, precision.py)."""
    p.add_argument("--run", default="runs/quickstart", help="the quickstart's run directory")
    p.add_argument("--stage", default="mixed")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--warm", type=int, default=warm, help="timing starts at this logged step")
    p.add_argument("--json", default=None, help="also write the figures here")


def open_run(a: argparse.Namespace) -> Path | None:
    """The run directory of ``--run``, with the project importable; None (the missing part printed) where the run
    lacks what ``--stage`` starts from."""
    sys.path.insert(0, str(ROOT))
    from unified_mllm.quickstart import missing_run_parts

    run = Path(a.run).resolve()
    if error := missing_run_parts(run, stage_needs(a.stage)):
        print(error, file=sys.stderr)
        return None
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p, steps=100, warm=10)
    p.add_argument("--procs", type=int, default=2, help="processes of the multi-process form")
    a = p.parse_args(argv)
    if (run := open_run(a)) is None:
        return 2
    from unified_mllm.config import load_stage_config
    from unified_mllm.quickstart import batch_sets_per_proc, threads_per_proc

    try:
        batch_sets_per_proc(a.stage, load_stage_config(a.stage).optim, a.procs)
    except ValueError as e:
        print(f"error: {e} (the preset's); choose --procs that divides it", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_procs_") as tmp:
        for procs in (1, a.procs):
            out = Path(tmp) / f"p{procs}"
            cmd, env = stage_run(run, a.stage, out, procs, a.steps)
            res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if res.returncode:
                print(res.stderr[-3000:], file=sys.stderr)
                print(f"error: the {procs}-process run failed (exit {res.returncode})", file=sys.stderr)
                return 1
            rows.append({"procs": procs, "threads_per_proc": threads_per_proc(procs),
                         **timed_window(out / "metrics.jsonl", a.warm)})
    for r in rows:
        kinds = ", ".join(f"{t} {v:,.0f}" for t, v in r["tokens_per_s_by_task"].items())
        unit = "images/s" if a.stage == "tokenizer" else "tokens/s"
        print(f"{r['procs']} process(es) × {r['threads_per_proc']} thread(s): {r['steps']} steps in "
              f"{r['seconds']:.1f} s ({r['seconds'] / r['steps']:.3f} s/step); {unit} {kinds}")
    ratio = (rows[0]["seconds"] / rows[0]["steps"]) / (rows[1]["seconds"] / rows[1]["steps"])
    print(f"ratio (time per step, 1 process / {a.procs} processes): {ratio:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps({"stage": a.stage, "rows": rows, "ratio": ratio}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
