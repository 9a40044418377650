"""The ShapeWorld quickstart: every pipeline step through the real code paths, resumable step by step.

    python -m unified_mllm.quickstart [--out runs/quickstart] [--fast] [--chain align,mixed] [--steps-scale K]

Each finished step leaves a marker in ``<out>/.done/``; a re-run skips it. A failed step prints its name and
the command that resumes the pipeline. The settings a run was made with are kept in ``<out>/.done/settings.json``;
a re-run with other settings stops with an error instead of mixing the two runs' steps in one report.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from unified_mllm.config import PROJECT_ROOT, STAGE_CONFIG_CLASSES, ConfigError, load_stage_config
from unified_mllm.report import RUN_SETTINGS_FILE, run_settings


@dataclass
class Step:
    name: str
    """Step name, also the name of its done marker."""
    run: Callable[[argparse.Namespace], str]
    """Does the work; returns a one-line summary of what it did."""
    needs: str | None = None
    """A module that must exist for this step; without it the step is reported as not available yet."""


def run_cmd(cmd: list[str], env: dict | None = None) -> None:
    """Runs ``cmd`` from the project root, its output on the terminal."""
    print("  $ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=PROJECT_ROOT)


def step_data(args: argparse.Namespace) -> str:
    out = Path(args.out) / "data" / "shapeworld"
    num = 300 if args.fast else 50000
    extra = ["--num-test", "60", "--prompts-per-tag", "5"] if args.fast else []
    run_cmd([sys.executable, "-m", "unified_mllm.shapeworld", "--out", str(out), "--num", str(num),
             "--seed", "0", "--resolution", str(args.resolution), *extra])
    return f"ShapeWorld dataset with {num} samples in {out}"


def step_configs(args: argparse.Namespace) -> str:
    for stage in STAGE_CONFIG_CLASSES:
        load_stage_config(stage)
    return f"validated stage configs: {', '.join(STAGE_CONFIG_CLASSES)}"


def step_teacher(args: argparse.Namespace) -> str:
    out = Path(args.out) / "teacher"
    steps = "20" if args.fast else "600"
    run_cmd([sys.executable, "-m", "tokenizer.teacher", "--data", str(Path(args.out) / "data" / "shapeworld"),
             "--out", str(out), "--steps", steps])
    meta = json.loads((out / "config.json").read_text())
    return (f"ShapeWorld teacher in {out} (val exact accuracy: counts {meta['val_exact_counts_acc']}, "
            f"presence {meta['val_exact_presence_acc']}, per-cell objects {meta['val_exact_cells_acc']})")


def tokenizer_command(run: Path, procs: int, fast: bool = False, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The DeepSpeed-launcher command of the tokenizer stage on a quickstart run's data and teacher, as the MLLM stages
    run: ``procs`` processes, each with its share of the preset's batch of 16 images (8 in the fast run). On 2 cores two
    single-threaded processes ran 0.99–1.27× (mean 1.13×) the steps per second of one process on two threads in five
    side-by-side measurements on a noisy machine, and reached judge agreement 0.992 against 0.988 (NOTES.md, session
    23; ``python scripts/bench/procs.py --stage tokenizer`` measures it)."""
    run = Path(run)
    micro = FAST_TOKENIZER_BATCH if fast else load_stage_config("tokenizer").optim.micro_batch_size
    sets = [f"checkpoint.output_dir={run / 'wintok_train'}", "logging.progress_bar=false",
            f"data.images={run / 'data' / 'shapeworld' / 'images' / 'train'}",
            f"data.eval_images={run / 'data' / 'shapeworld' / 'images' / 'test_heldin'}",
            f"teacher.path={run / 'teacher'}",
            f"optim.micro_batch_size={micro_batch_per_proc('tokenizer', micro, procs)}",
            *((f"optim.max_steps={FAST_STEPS}", *FAST_STAGE) if fast else ()), *extra]
    return launcher(procs, "tokenizer", sets)


def step_tokenizer(args: argparse.Namespace) -> str:
    procs = stage_procs()
    run_cmd(tokenizer_command(Path(args.out), procs, args.fast), env=stage_env(args, procs))
    export = Path(args.out) / "wintok_train" / "export"
    link = Path(args.out) / "wintok"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(export.resolve(), target_is_directory=True)
    result = json.loads((Path(args.out) / "wintok_train" / "eval.json").read_text())
    return (f"WinTok trained and exported to {link}: PSNR {result['psnr']:.2f}, judge agreement "
            f"{result.get('shapeworld_judge_agreement', float('nan')):.3f}, codebook usage {result['codebook_usage']:.2f}")


def step_probe(args: argparse.Namespace) -> str:
    out = Path(args.out) / "wintok_train" / "probe.json"
    n_train, n_test = ("200", "60") if args.fast else ("3000", "600")
    run_cmd([sys.executable, "-m", "tokenizer.probe", "--checkpoint", str(Path(args.out) / "wintok"), "--data",
             str(Path(args.out) / "data" / "shapeworld"), "--num-train", n_train, "--num-test", n_test,
             "--out", str(out)])
    r = json.loads(out.read_text())
    return "linear probes semantic vs pixel: " + ", ".join(
        f"{k} {r[k]['semantic']:.2f} vs {r[k]['pixel']:.2f}" for k in ("kind", "colour", "count", "binding")
        if "semantic" in r.get(k, {}))


def _data_dir(args: argparse.Namespace) -> Path:
    return Path(args.out) / "data" / "shapeworld"


def run_env(run: Path) -> dict:
    """The environment of a command on a quickstart run: the recipes read ShapeWorld from SHAPEWORLD_DIR; the
    pretokenize cache lives inside the run directory."""
    return {**os.environ, "SHAPEWORLD_DIR": str(Path(run) / "data" / "shapeworld"),
            "UMLLM_PRETOKENIZED": str(Path(run) / "pretokenized")}


def _env(args: argparse.Namespace, threads: int | None = None) -> dict:
    """run_env, with ``threads`` as OMP_NUM_THREADS unless the user set it."""
    env = run_env(Path(args.out))
    if threads:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    return env


def step_text_tokenizer(args: argparse.Namespace) -> str:
    out = Path(args.out) / "text_tokenizer"
    run_cmd([sys.executable, "-m", "unified_mllm.data.text_tokenizer", "--recipe", "data_recipes/shapeworld_mixed.yaml",
             "--out", str(out), "--vocab-size", "384" if args.fast else "768"], env=_env(args))
    return f"SentencePiece text tokenizer trained on the ShapeWorld texts → {out}"


def step_pretokenize(args: argparse.Namespace) -> str:
    recipes = list(dict.fromkeys(load_stage_config(stage).data.recipe for stage in _chain(args)))
    run_cmd([sys.executable, "-m", "unified_mllm.data.pretokenize", *(x for r in recipes for x in ("--recipe", r)),
             "--wintok", str(Path(args.out) / "wintok")], env=_env(args))
    return f"WinTok codes + semantic tokens cached for {', '.join(recipes)} in {Path(args.out) / 'pretokenized'}"


def _chain(args: argparse.Namespace) -> list[str]:
    return [s.strip() for s in args.chain.split(",") if s.strip()]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


FAST_STEPS = 6
FAST_MICRO_BATCH = 4
FAST_STAGE = ["checkpoint.save_every=3", "logging.log_every=1"]
"""The fast run's settings for every stage, beside its steps (FAST_STEPS) and micro-batch (FAST_MICRO_BATCH)."""
FAST_TOKENIZER_BATCH = 8
"""The fast run's tokenizer-stage batch of images (split over the processes as the preset's 16 are)."""


def launcher_command(run: Path, stage: str, output_dir: Path, init_from: Path | None, zero: str = "zero2",
                     procs: int = 1, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The DeepSpeed-launcher command of one MLLM stage on a quickstart run's WinTok and text tokenizer (also used by
    scripts/stage_table.py)."""
    sets = [f"model.wintok={run / 'wintok'}", f"model.llm.text_tokenizer={run / 'text_tokenizer'}",
            f"model.init_from={init_from if init_from else 'null'}", f"checkpoint.output_dir={output_dir}",
            f"deepspeed.config=stage_configs/deepspeed/{zero}.json", "logging.progress_bar=false", *extra]
    return launcher(procs, stage, sets)


def launcher(procs: int, stage: str, sets: list[str]) -> list[str]:
    """``deepspeed --num_gpus procs --master_port <free> train_stage.py --stage stage --set …``: a training stage's
    command under the DeepSpeed launcher (the tokenizer stage's and the MLLM stages')."""
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    return [deepspeed, "--num_gpus", str(procs), "--master_port", str(_free_port()), str(PROJECT_ROOT / "train_stage.py"),
            "--stage", stage, *(x for item in sets for x in ("--set", item))]


CURVE_POINTS = 4
"""The last stage of the chain exports this many times (the last is its final export): the score-vs-steps curve."""


def stage_procs() -> int:
    """Processes per training stage: two where there are two cores or more. On 2 cores, two single-threaded processes
    ran the mixed stage 1.23–1.34× faster per step than one process on two threads (NOTES.md, session 7;
    `scripts/bench/procs.py` measures it), and the tokenizer stage 1.13× on average (session 23): these models'
    ops are too small for intra-op threading to pay."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def threads_per_proc(procs: int) -> int:
    return max((os.cpu_count() or 1) // procs, 1)


def micro_batch_per_proc(stage: str, micro: int, procs: int, field_name: str = "micro_batch_size") -> int:
    """The share of a global micro-batch of ``micro`` samples that each of ``procs`` processes takes."""
    if micro % procs:
        raise ValueError(f"stage {stage}: {field_name} {micro} does not split over {procs} processes")
    return micro // procs


def batch_sets_per_proc(stage: str, optim, procs: int, micro: int | None = None) -> list[str]:
    """The ``--set``s that give each of ``procs`` processes its share of the stage preset's micro-batch (``micro``
    instead of the preset's, when given) and of each task's micro-batch, so the global batches stay the preset's.
    ``optim``: the stage preset's OptimConfig."""
    micro = optim.micro_batch_size if micro is None else micro
    sets = [f"optim.micro_batch_size={micro_batch_per_proc(stage, micro, procs)}"]
    for task, size in optim.task_micro_batch_size.items():
        share = micro_batch_per_proc(stage, size, procs, f"task_micro_batch_size.{task}")
        sets.append(f"optim.task_micro_batch_size.{task}={share}")
    return sets


def stage_env(args: argparse.Namespace, procs: int) -> dict:
    """The stage's environment: the cores shared out among its processes (unless the user set OMP_NUM_THREADS)."""
    return _env(args, threads_per_proc(procs))


def stage_command(args: argparse.Namespace, stage: str, prev: str | None, procs: int = 1) -> list[str]:
    """The quickstart's command of one stage of its chain (ZeRO-2, ``procs`` processes, each with its share of the
    preset's micro-batch, so the global batch is the preset's); the last stage also writes intermediate exports for
    the score-vs-steps curve."""
    out = Path(args.out)
    optim = load_stage_config(stage).optim
    extra = [*(FAST_STAGE if args.fast else ()),
             *batch_sets_per_proc(stage, optim, procs, FAST_MICRO_BATCH if args.fast else None)]
    last = stage == _chain(args)[-1]
    steps = FAST_STEPS if args.fast else optim.max_steps
    if last:  # --steps-scale: the last stage only
        steps = max(round(steps * args.steps_scale), 1)
    if steps != optim.max_steps:
        extra.append(f"optim.max_steps={steps}")
    if last:
        # rounded up, so the last point is the final export (rounded down, 2657 steps gave 664 … 2656 and 2657)
        extra.append(f"checkpoint.export_every={math.ceil(steps / (2 if args.fast else CURVE_POINTS))}")
    return launcher_command(out, stage, out / stage, out / prev / "export" if prev else None, procs=procs,
                            extra=extra)


RUN_SETTINGS = ("fast", "resolution", "chain", "steps_scale")
"""The options that change what a run's steps produce (a settings file written before one existed reads as its
default)."""


def check_run_settings(args: argparse.Namespace) -> str | None:
    """Record the run's settings in ``<out>/.done/settings.json`` the first time; afterwards, the error for a re-run
    that asks for other ones (its finished steps would be skipped and the report would mix two runs), else None."""
    path = Path(args.out) / ".done" / RUN_SETTINGS_FILE
    now = {k: getattr(args, k) for k in RUN_SETTINGS} | {"chain": ",".join(_chain(args))}
    try:
        recorded = run_settings(Path(args.out))
    except ValueError as e:
        return f"{e}; delete it and re-run to record this run's settings"
    if recorded is not None:
        parser = build_parser()
        before = {**{k: parser.get_default(k) for k in RUN_SETTINGS}, **recorded}
        changed = [k for k in RUN_SETTINGS if before[k] != now[k]]
        if changed:
            said = ", ".join(f"--{k.replace('_', '-')} {before[k]!r} then, {now[k]!r} now" for k in changed)
            return (f"{args.out} was made with other settings ({said}); its finished steps would be reused. "
                    f"Use another --out, or delete {args.out} to start again")
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(now, indent=2) + "\n")
    return None


def stage_summary(metrics: Path) -> dict:
    """Loss at the first and last logged step and the mean tokens/s of a stage's metrics.jsonl (the first two
    windows, start-up, left out when there are more)."""
    recs = step_records(metrics)
    steady = recs[2:] if len(recs) > 2 else recs
    tps = [r["tokens_per_s"] for r in steady if "tokens_per_s" in r]
    return {"steps": recs[-1]["step"], "loss_start": recs[0]["loss"], "loss_end": recs[-1]["loss"],
            "tokens_per_s": sum(tps) / max(len(tps), 1),
            "tokens_per_s_by_task": {t: sum(v) / len(v) for t, v in per_task(steady, "tokens_per_s").items()},
            "loss_by_task": {t: (v[0], v[-1]) for t, v in per_task(recs, "loss").items()}}


def step_records(metrics: Path) -> list[dict]:
    """The logged-step records of a stage's metrics.jsonl, the tokenizer stage's too (messages left out)."""
    recs = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    return [r for r in recs if "step" in r]


def per_task(records: list[dict], name: str) -> dict[str, list[float]]:
    """``name/<task>`` of the records, per task, in logged order."""
    got: dict[str, list[float]] = {}
    for r in records:
        for k, v in r.items():
            if k.startswith(name + "/"):
                got.setdefault(k.split("/", 1)[1], []).append(v)
    return dict(sorted(got.items()))


def make_stage_step(stage: str) -> Step:
    def run(args: argparse.Namespace) -> str:
        chain = _chain(args)
        prev = chain[chain.index(stage) - 1] if chain.index(stage) else None
        procs = stage_procs()
        run_cmd(stage_command(args, stage, prev, procs), env=stage_env(args, procs))
        f = stage_summary(Path(args.out) / stage / "metrics.jsonl")
        kinds, losses = f["tokens_per_s_by_task"], f["loss_by_task"]
        each = f" ({', '.join(f'{t} {v:.0f}' for t, v in kinds.items())})" if len(kinds) > 1 else ""
        loss = (", ".join(f"{t} loss {a:.3f} → {b:.3f}" for t, (a, b) in losses.items()) if len(losses) > 1
                else f"loss {f['loss_start']:.3f} → {f['loss_end']:.3f}")
        return (f"{stage}: {f['steps']} steps, {loss}, {f['tokens_per_s']:.0f} tokens/s{each}; "
                f"export {Path(args.out) / stage / 'export'}")

    return Step(stage, run, needs="unified_mllm.training")


def step_eval(args: argparse.Namespace) -> str:
    final = Path(args.out) / _chain(args)[-1] / "export"
    out = Path(args.out) / "eval"
    config = "eval_configs/shapeworld_fast.yaml" if args.fast else "eval_configs/shapeworld.yaml"
    run_cmd([sys.executable, "-m", "eval.suite", "--checkpoint", str(final), "--config", config, "--out", str(out)],
            env=_env(args))
    return f"evaluation suite on {final} → {out / 'summary.md'}"


def step_curve(args: argparse.Namespace) -> str:
    """The held-in score of the last stage's intermediate exports, drawn where the eval misses a target (the issue
    asks for the curve there, to show what limits the run); with every target met it is skipped, the command that
    draws it given instead — it would add a third of the eval's time (NOTES.md, session 21)."""
    from unified_mllm.report import missed_targets

    stage_dir = Path(args.out) / _chain(args)[-1]
    out = Path(args.out) / "eval" / "curve.json"
    limits = ["--max-questions", "12", "--max-prompts", "6"] if args.fast else ["--max-questions", "300",
                                                                                 "--max-prompts", "120"]
    cmd = [sys.executable, "-m", "eval.curve", "--stage-dir", str(stage_dir), "--data", str(_data_dir(args)),
           "--out", str(out), *limits]
    summary = Path(args.out) / "eval" / "summary.json"
    if not missed_targets(json.loads(summary.read_text())):
        return f"skipped: every target is met (draw it with `{' '.join(cmd)}`)"
    run_cmd(cmd, env=_env(args))
    pts = json.loads(out.read_text())["points"]
    return "held-in score against steps: " + "; ".join(
        f"step {p['step']}: understanding {p['understanding/heldin']['overall']:.2f}, generation "
        f"{p['generation/heldin']['overall']:.2f}" for p in pts)


def step_report(args: argparse.Namespace) -> str:
    from unified_mllm.report import write_report

    path = write_report(Path(args.out), _chain(args))
    return f"report → {path}"


STEPS = [
    Step("data", step_data, needs="unified_mllm.shapeworld"),
    Step("configs", step_configs),
    Step("teacher", step_teacher, needs="tokenizer.teacher"),
    Step("tokenizer", step_tokenizer, needs="tokenizer.training"),
    Step("probe", step_probe, needs="tokenizer.probe"),
    Step("text_tokenizer", step_text_tokenizer, needs="unified_mllm.data.text_tokenizer"),
    Step("pretokenize", step_pretokenize, needs="unified_mllm.data.pretokenize"),
    # the MLLM stages of --chain are inserted here
    Step("eval", step_eval, needs="eval.suite"),
    Step("curve", step_curve, needs="eval.curve"),
    Step("report", step_report, needs="unified_mllm.report"),
]
NOT_BUILT_YET: tuple[str, ...] = ()
"""Pipeline steps whose code does not exist yet."""


def steps_for(args: argparse.Namespace) -> list[Step]:
    i = next(k for k, s in enumerate(STEPS) if s.name == "eval")
    return STEPS[:i] + [make_stage_step(stage) for stage in _chain(args)] + STEPS[i:]


STEP_ERRORS = (subprocess.CalledProcessError, ConfigError, OSError)


def _timed(step: Step, args: argparse.Namespace) -> tuple[str, float, Exception | None]:
    t0 = time.time()
    try:
        summary, error = step.run(args), None
    except STEP_ERRORS as e:
        summary, error = "", e
    return summary, round(time.time() - t0, 1), error


def missing_run_parts(run: Path, needs: tuple[str, ...]) -> str | None:
    """The error for a script that works on a quickstart run directory lacking one of ``needs``; None if complete."""
    for need in needs:
        if not (Path(run) / need).exists():
            return f"error: {Path(run) / need} is missing; run `bash scripts/quickstart.sh` first (or --run DIR)"
    return None


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:
        return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quickstart", help="run directory")
    parser.add_argument("--fast", action="store_true", help="few steps and small data (CI smoke run)")
    parser.add_argument("--resolution", type=int, default=64, help="ShapeWorld image size")
    parser.add_argument("--chain", default="align,mixed",
                        help="the MLLM stages, in order, each initialised from the previous export "
                             "(e.g. align,sft,t2i)")
    parser.add_argument("--steps-scale", type=float, default=1.0,
                        help="train the chain's last stage this many times its preset's steps (the curve follows); "
                             "3 reaches understanding 0.90 on ShapeWorld (NOTES.md, session 12) in ~3x the stage's time")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.out = str(Path(args.out).resolve())
    for stage in _chain(args):
        if stage not in STAGE_CONFIG_CLASSES or stage == "tokenizer":
            parser.error(f"--chain: unknown MLLM stage {stage!r} (valid: align, sft, t2i, mixed)")
    if not (math.isfinite(args.steps_scale) and args.steps_scale > 0):
        parser.error(f"--steps-scale must be > 0, got {args.steps_scale}")
    done_dir = Path(args.out) / ".done"
    error = check_run_settings(args)
    if error:
        print(f"[quickstart] error: {error}", file=sys.stderr)
        return 2
    timing_file = Path(args.out) / "timings.json"
    timings: dict[str, float] = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    for step in steps_for(args):
        marker = done_dir / step.name
        if marker.exists():
            print(f"[quickstart] {step.name}: already done ({marker.read_text().strip()})")
            continue
        if step.needs and _missing(step.needs):
            print(f"[quickstart] {step.name}: not available yet ({step.needs} is not built); stopping here")
            break
        print(f"[quickstart] {step.name} ...", flush=True)
        summary, seconds, error = _timed(step, args)
        if error is not None:
            print(f"[quickstart] step '{step.name}' failed: {error}\n"
                  f"[quickstart] fix the cause and re-run `bash scripts/quickstart.sh` — finished steps are skipped.",
                  file=sys.stderr)
            return 1
        timings[step.name] = seconds
        # written after every step, so the report step (and a run killed midway) sees the times so far
        timing_file.write_text(json.dumps(timings, indent=2) + "\n")
        marker.write_text(summary + "\n")
        print(f"[quickstart] {step.name}: {summary} ({seconds} s)")
    else:
        print("[quickstart] every step is done" + (f"; not built yet: {', '.join(NOT_BUILT_YET)}" if NOT_BUILT_YET
                                                   else f"; report: {Path(args.out) / 'report.md'}"))
    print(f"[quickstart] step timings (s): {json.dumps(timings)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
