"""Run the four MLLM stages on ShapeWorld-tiny under the DeepSpeed launcher and print each stage's loss at start
and end, tokens/s and wall time — per ZeRO configuration.

    python scripts/stage_table.py [--run runs/quickstart] [--zero zero2,zero3] [--procs 2] [--steps 40]
                                  [--out /tmp/stage_table]

Needs what the quickstart made under ``--run`` (ShapeWorld data, WinTok export, text tokenizer, pretokenize cache);
``bash scripts/quickstart.sh`` (or its steps up to ``pretokenize``) makes them; the recipes of the stages the
quickstart did not run are pretokenized first (reusing the cached encodings). Each ZeRO configuration runs the
chain align → sft → t2i → mixed, every stage initialised from the previous one's export (``model.init_from``),
with ``--procs`` processes under ``deepspeed --num_gpus``. Loss at start is step 1's; tokens/s is the mean of
the logged windows after step 2. Prints a Markdown table and writes it with the raw
figures to ``<out>/stage_table.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHAIN = ("align", "sft", "t2i", "mixed")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/quickstart", help="the quickstart's run directory")
    p.add_argument("--zero", default="zero2,zero3", help="stage_configs/deepspeed/<name>.json, comma-separated")
    p.add_argument("--procs", type=int, default=2, help="processes per stage (deepspeed --num_gpus)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per stage")
    p.add_argument("--stages", default=",".join(CHAIN), help="a part of the chain, in order")
    p.add_argument("--init-from", default=None, help="export that the first stage starts from (default: none)")
    p.add_argument("--out", default="/tmp/stage_table")
    a = p.parse_args(argv)
    run, out = Path(a.run).resolve(), Path(a.out).resolve()
    sys.path.insert(0, str(ROOT))
    from unified_mllm.config import load_stage_config
    from unified_mllm.quickstart import launcher_command, missing_run_parts, run_env, stage_summary

    if error := missing_run_parts(run, ("wintok", "text_tokenizer", "data/shapeworld", "pretokenized")):
        print(error, file=sys.stderr)
        return 2
    env = run_env(run)

    stages = [x.strip() for x in a.stages.split(",") if x.strip()]
    for recipe in dict.fromkeys(load_stage_config(stage).data.recipe for stage in stages):
        # the quickstart caches only its own chain's recipes; this reuses their encodings and is quick
        subprocess.run([sys.executable, "-m", "unified_mllm.data.pretokenize", "--recipe", recipe, "--wintok",
                        str(run / "wintok")], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    rows = []
    for zero in [z.strip() for z in a.zero.split(",") if z.strip()]:
        prev = Path(a.init_from).resolve() if a.init_from else None
        for stage in stages:
            stage_out = out / zero / stage
            cmd = launcher_command(run, stage, stage_out, prev, zero=zero, procs=a.procs, extra=[
                f"optim.max_steps={a.steps}", "checkpoint.resume=never", f"checkpoint.save_every={a.steps}",
                "logging.log_every=1"])
            print(f"[stage_table] {zero} {stage}: {' '.join(cmd)}", file=sys.stderr, flush=True)
            t0 = time.time()
            res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            wall = time.time() - t0
            if res.returncode != 0 or not (stage_out / "export").is_dir():
                print(res.stdout[-3000:] + res.stderr[-3000:], file=sys.stderr)
                print(f"error: {zero} {stage} failed (exit {res.returncode})", file=sys.stderr)
                return 1
            rows.append({"zero": zero, "stage": stage, "procs": a.procs, **stage_summary(stage_out / "metrics.jsonl"),
                         "wall_s": wall})
            prev = stage_out / "export"
    lines = ["| ZeRO | stage | processes | steps | loss at start | loss at end | tokens/s | wall s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['zero']} | {r['stage']} | {r['procs']} | {r['steps']} | {r['loss_start']:.3f} | "
              f"{r['loss_end']:.3f} | {r['tokens_per_s']:.0f} | {r['wall_s']:.0f} |" for r in rows]
    out.mkdir(parents=True, exist_ok=True)
    (out / "stage_table.md").write_text("\n".join(lines) + "\n")
    (out / "stage_table.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
