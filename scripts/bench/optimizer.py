"""Muon against AdamW (``optim.optimizer``): time per step and loss after the same steps, for one stage on a
quickstart run.

    python scripts/bench/optimizer.py [--run runs/quickstart] [--stage tokenizer|mixed] [--steps 300] [--json J]

Both runs are the stage's preset on the run's data with only ``optim.optimizer`` changed, one after the other on the
same machine (the tokenizer in one process, the mixed stage as the quickstart runs it: ``stage_procs()`` processes
under the DeepSpeed launcher, from the run's ``align`` export). Time is the wall time between the logged step
``--warm`` and the last (start-up and the final export left out). The loss column is the mean of the last quarter of
the logged steps (the tokenizer's ``loss/l2``, the mixed stage's ``loss``). Prints both rows and the ratios (time per
step and loss, Muon / AdamW). Needs what the quickstart made under ``--run`` (``bash scripts/quickstart.sh``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def window(metrics: Path, warm: int, loss_key: str) -> dict:
    recs = [json.loads(line) for line in metrics.read_text().splitlines()]
    first = next(r for r in recs if r["step"] >= warm)
    tail = [r[loss_key] for r in recs[-max(len(recs) // 4, 1):] if loss_key in r]
    return {"steps": recs[-1]["step"] - first["step"], "seconds": recs[-1]["time"] - first["time"],
            "loss": sum(tail) / len(tail)}


def tokenizer_command(run: Path, out: Path, steps: int, optimizer: str) -> list[str]:
    data = run / "data" / "shapeworld" / "images"
    sets = [f"data.images={data / 'train'}", f"data.eval_images={data / 'test_heldin'}",
            f"teacher.path={run / 'teacher'}", f"optim.max_steps={steps}", f"optim.optimizer={optimizer}",
            f"checkpoint.output_dir={out}", f"checkpoint.save_every={steps + 1}", "logging.log_every=10",
            "logging.progress_bar=false"]
    cmd = [sys.executable, str(ROOT / "train_stage.py"), "--stage", "tokenizer"]
    for item in sets:
        cmd += ["--set", item]
    return cmd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/quickstart", help="the quickstart's run directory")
    p.add_argument("--stage", default="tokenizer", choices=["tokenizer", "mixed"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warm", type=int, default=20, help="timing starts at this logged step")
    p.add_argument("--json", default=None, help="also write the figures here")
    a = p.parse_args(argv)
    run = Path(a.run).resolve()
    sys.path.insert(0, str(ROOT))
    from unified_mllm.config import load_stage_config
    from unified_mllm.quickstart import (
        batch_sets_per_proc,
        launcher_command,
        missing_run_parts,
        run_env,
        stage_procs,
        threads_per_proc,
    )

    needs = ("data", "teacher") if a.stage == "tokenizer" else ("wintok", "text_tokenizer", "pretokenized",
                                                                 "align/export")
    if error := missing_run_parts(run, needs):
        print(error, file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_optimizer_") as tmp:
        for optimizer in ("adamw", "muon"):
            out = Path(tmp) / optimizer
            if a.stage == "tokenizer":
                cmd, env, loss_key = tokenizer_command(run, out, a.steps, optimizer), run_env(run), "loss/l2"
            else:
                procs = stage_procs()
                cmd = launcher_command(run, a.stage, out, run / "align" / "export", procs=procs, extra=[
                    f"optim.max_steps={a.steps}", f"optim.optimizer={optimizer}",
                    *batch_sets_per_proc(a.stage, load_stage_config(a.stage).optim, procs),
                    "logging.log_every=10", f"checkpoint.save_every={a.steps + 1}"])
                env, loss_key = {**run_env(run), "OMP_NUM_THREADS": str(threads_per_proc(procs))}, "loss"
            res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if res.returncode:
                print(res.stderr[-3000:], file=sys.stderr)
                print(f"error: the {optimizer} run failed (exit {res.returncode})", file=sys.stderr)
                return 1
            rows.append({"optimizer": optimizer, **window(out / "metrics.jsonl", a.warm, loss_key)})
    for r in rows:
        print(f"{a.stage}, {r['optimizer']}: {r['steps']} steps in {r['seconds']:.1f} s "
              f"({r['seconds'] / r['steps']:.4f} s/step); loss {r['loss']:.4f}")
    adamw, muon = rows
    time_ratio = (muon["seconds"] / muon["steps"]) / (adamw["seconds"] / adamw["steps"])
    loss_ratio = muon["loss"] / adamw["loss"]
    print(f"ratio Muon / AdamW: time per step {time_ratio:.2f}x, loss after {a.steps} steps {loss_ratio:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps({"stage": a.stage, "rows": rows, "time_ratio": time_ratio,
                                            "loss_ratio": loss_ratio}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
