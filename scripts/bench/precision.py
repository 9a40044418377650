"""fp32 against bf16 autocast, for one training stage on CPU, in the quickstart's process layout.

    python scripts/bench/precision.py [--run runs/quickstart] [--stage mixed|tokenizer|…] [--steps 120]
        [--warm 20] [--repeats 2] [--json J]

``deepspeed.precision: auto`` picks ``bf16_autocast`` on a CPU that multiplies bf16 in hardware (AVX512-BF16 or
AMX) and ``fp32`` elsewhere. This measures that choice against the plain alternative in the same run: the same stage,
steps and batch, ``stage_procs()`` single-threaded processes as the quickstart runs them, an MLLM stage from the
run's ``align`` export, the tokenizer stage from scratch on the run's data and teacher. The two precisions take turns
(``--repeats`` pairs, the order swapped in every other pair, so both see the same machine load); each pair gives a
ratio of time per step between logged steps ``--warm`` and the last. Prints every row, each pair's ratio and their
median (>1: bf16 autocast is faster), and the loss each run logged last (the same steps on the same data, so the two
should be close). Needs what the quickstart made under ``--run`` (``bash scripts/quickstart.sh``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from procs import add_run_args, open_run, stage_run, timed_window  # noqa: E402  (the same runs and window)

PRECISIONS = ("fp32", "bf16_autocast")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p, steps=120, warm=20)
    p.add_argument("--repeats", type=int, default=2, help="pairs of runs (one per precision)")
    a = p.parse_args(argv)
    if (run := open_run(a)) is None:
        return 2
    from unified_mllm.quickstart import stage_procs, step_records, threads_per_proc
    from unified_mllm.training.ds_config import cpu_has_native_bf16

    procs = stage_procs()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_precision_") as tmp:
        for rep in range(a.repeats):
            for precision in PRECISIONS if rep % 2 == 0 else PRECISIONS[::-1]:
                out = Path(tmp) / f"{precision}_{rep}"
                cmd, env = stage_run(run, a.stage, out, procs, a.steps, [f"deepspeed.precision={precision}"])
                res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                if res.returncode:
                    print(res.stderr[-3000:], file=sys.stderr)
                    print(f"error: the {precision} run failed (exit {res.returncode})", file=sys.stderr)
                    return 1
                metrics = out / "metrics.jsonl"
                rows.append({"precision": precision, "repeat": rep, "last_loss": step_records(metrics)[-1]["loss"],
                             **timed_window(metrics, a.warm)})
    unit = "images/s" if a.stage == "tokenizer" else "tokens/s"
    for r in rows:
        kinds = ", ".join(f"{t} {v:,.0f}" for t, v in r["tokens_per_s_by_task"].items())
        print(f"{r['precision']:>13} (pair {r['repeat']}): {r['steps']} steps in {r['seconds']:.1f} s "
              f"({r['seconds'] / r['steps']:.3f} s/step); {unit} {kinds}; last loss {r['last_loss']:.6f}")
    per_step = {(r["precision"], r["repeat"]): r["seconds"] / r["steps"] for r in rows}
    ratios = [per_step[("fp32", k)] / per_step[("bf16_autocast", k)] for k in range(a.repeats)]
    print(f"ratio (time per step, fp32 / bf16_autocast), per pair: {', '.join(f'{x:.2f}' for x in ratios)}; "
          f"median {statistics.median(ratios):.2f}x ({procs} process(es) × {threads_per_proc(procs)} thread(s))")
    print(f"this CPU {'has' if cpu_has_native_bf16() else 'lacks'} native bf16 matmuls: deepspeed.precision auto "
          f"picks {'bf16_autocast' if cpu_has_native_bf16() else 'fp32'} here")
    if a.json:
        Path(a.json).write_text(json.dumps({"stage": a.stage, "procs": procs, "rows": rows, "ratios": ratios},
                                           indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
