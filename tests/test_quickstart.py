"""The quickstart pipeline in its --fast form: every built step runs, leaves a marker, and a re-run skips it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def set_args(cmd: list[str]) -> list[str]:
    """The ``--set`` values of a stage command."""
    return [cmd[i + 1] for i, c in enumerate(cmd) if c == "--set"]


def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unified_mllm.quickstart", "--out", str(out), "--fast", *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=1800)


def test_fast_quickstart_runs_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    first = run(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    steps = ("data", "configs", "teacher", "tokenizer", "probe", "text_tokenizer", "pretokenize", "align", "mixed",
             "eval", "curve", "report")
    for step in steps:
        assert (out / ".done" / step).is_file(), step
    assert (out / "wintok" / "model.safetensors").is_file()
    # the tokenizer stage ran under the launcher as the MLLM stages do, its batch of 8 split over the processes
    from unified_mllm.quickstart import FAST_TOKENIZER_BATCH, stage_procs

    meta = json.loads(next((out / "wintok_train" / "checkpoints").glob("*/meta.json")).read_text())
    assert meta["world_size"] == stage_procs()
    assert meta["config"]["optim"]["micro_batch_size"] * stage_procs() == FAST_TOKENIZER_BATCH == 8
    # precision auto: the tokenizer stage in fp32 on any CPU, the MLLM stages in bf16 autocast where it has native bf16
    from unified_mllm.training.ds_config import cpu_has_native_bf16

    assert meta["precision"] == "fp32"
    mixed = json.loads(next((out / "mixed" / "checkpoints").glob("*/meta.json")).read_text())
    assert mixed["precision"] == ("bf16_autocast" if cpu_has_native_bf16() else "fp32")
    # its logged steps read as the MLLM stages' do (scripts/bench/procs.py times both through step_records)
    from unified_mllm.quickstart import step_records

    assert [r["step"] for r in step_records(out / "wintok_train" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert set(json.loads((out / "timings.json").read_text())) >= {"data", "teacher", "tokenizer", "probe"}
    probe = json.loads((out / "wintok_train" / "probe.json").read_text())
    assert {"kind", "colour", "count"} <= set(probe)
    # the MLLM stages ran under the DeepSpeed launcher and exported; the suite and the report are complete
    for stage in ("align", "mixed"):
        assert (out / stage / "export" / "unified_config.json").is_file()
        assert (out / stage / "metrics.jsonl").read_text().strip()
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert {p: v["status"] for p, v in summary["parts"].items()} == {
        "shapeworld": "ok", "grounding": "ok", "lmms_eval": "ok", "geneval": "ok", "dpg": "ok"}
    for entry in summary["entries"]:
        assert {"benchmark", "split", "metric", "value", "samples", "scorer", "official"} <= set(entry)
    got = {(e["benchmark"], e["split"], e["metric"]) for e in summary["entries"]}
    for direction in ("understanding", "generation"):
        for split in ("heldin", "heldout"):
            assert (f"shapeworld_{direction}", split, "overall") in got
    assert ("shapeworld_grounding", "heldin", "presence_swapped") in got
    assert (out / "eval" / "samples.png").is_file() and (out / "loss_curves.png").is_file()
    report = (out / "report.md").read_text()
    # score against steps: the mixed stage's intermediate export (step 3) and its final one (step 6)
    curve = json.loads((out / "eval" / "curve.json").read_text())
    assert [p["step"] for p in curve["points"]] == [3, 6]
    assert all(0 <= p["understanding/heldin"]["overall"] <= 1 and "single_object" in p["generation/heldin"]
               for p in curve["points"])
    assert (out / "eval" / "curve.png").is_file()
    # a fast run misses the targets, so the curve was drawn; the report's total adds up the steps before it
    assert "held-in score against steps" in (out / ".done" / "curve").read_text()
    before = {k: v for k, v in json.loads((out / "timings.json").read_text()).items() if k != "report"}
    assert f"| **total** | **{sum(before.values()):.1f}**" in (out / "report.md").read_text()
    for heading in ("## Steps", "## Loss curves", "## Targets", "## Score against training steps", "## Scores"):
        assert heading in report
    assert "understanding overall (held-in)" in report and "generation single object (held-in)" in report
    second = run(out)
    assert second.returncode == 0
    assert second.stdout.count("already done") == len(steps)
    # other settings on the same run directory: one error naming the setting and the fix, nothing reused or redone
    third = run(out, "--steps-scale", "2")
    assert third.returncode == 2 and "already done" not in third.stdout
    assert "--steps-scale 1.0 then, 2.0 now" in third.stderr and "Use another --out" in third.stderr
    assert json.loads((out / ".done" / "settings.json").read_text())["steps_scale"] == 1.0


def test_failed_step_names_itself_and_how_to_resume(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    (out / "data").mkdir(parents=True)
    (out / "data" / "shapeworld").write_text("not a directory")  # the data step cannot write here
    res = run(out)
    assert res.returncode == 1
    assert "step 'data' failed" in res.stderr and "re-run `bash scripts/quickstart.sh`" in res.stderr


def test_stage_summary_gives_each_step_kind_its_own_speed(tmp_path: Path) -> None:
    from unified_mllm.quickstart import stage_summary

    kind = {s: "generation" if s % 3 == 0 else "understanding" for s in range(1, 8)}
    rows = [{"step": s, "loss": 2.0 - s / 10, f"loss/{kind[s]}": 2.0 - s / 10, "tokens_per_s": 1000.0,
             f"tokens_per_s/{kind[s]}": 600.0 if kind[s] == "generation" else 1500.0} for s in range(1, 8)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"message": "start"}, *rows]) + "\n")
    got = stage_summary(path)
    assert got["steps"] == 7 and got["loss_start"] == 1.9 and got["loss_end"] == 1.3
    assert got["tokens_per_s_by_task"] == {"generation": 600.0, "understanding": 1500.0}
    assert got["loss_by_task"] == {"generation": (1.7, 1.4), "understanding": (1.9, 1.3)}


def test_stage_command_splits_the_presets_batch_over_the_processes() -> None:
    import argparse

    import pytest

    from unified_mllm.config import load_stage_config
    from unified_mllm.quickstart import CURVE_POINTS, FAST_STEPS, micro_batch_per_proc, stage_command

    args = argparse.Namespace(out="runs/x", fast=False, chain="align,mixed", steps_scale=1.0)
    micro = load_stage_config("mixed").optim.micro_batch_size
    cmd = stage_command(args, "mixed", "align", procs=2)
    assert cmd[cmd.index("--num_gpus") + 1] == "2"
    sets = set_args(cmd)
    assert [s for s in sets if s.startswith("optim.micro_batch_size=")] == [f"optim.micro_batch_size={micro // 2}"]
    per_task = load_stage_config("mixed").optim.task_micro_batch_size  # each task's batch is split too
    assert per_task and sorted(s for s in sets if s.startswith("optim.task_micro_batch_size.")) == sorted(
        f"optim.task_micro_batch_size.{t}={n // 2}" for t, n in per_task.items())
    steps = load_stage_config("mixed").optim.max_steps  # the curve's points: the exports before the end, and the end
    every = int(next(s for s in sets if s.startswith("checkpoint.export_every=")).split("=")[1])
    assert len([*range(every, steps, every), steps]) == CURVE_POINTS
    with pytest.raises(ValueError, match="stage mixed: micro_batch_size 8 does not split over 3 processes"):
        micro_batch_per_proc("mixed", 8, 3)
    # --steps-scale: the last stage trains K × its preset's steps, and the curve keeps its points over them
    for scale in (3.0, 0.5):
        sets = set_args(stage_command(argparse.Namespace(**{**vars(args), "steps_scale": scale}), "mixed", "align",
                                      procs=2))
        scaled = round(steps * scale)
        assert [s for s in sets if s.startswith("optim.max_steps=")] == [f"optim.max_steps={scaled}"]
        every = int(next(s for s in sets if s.startswith("checkpoint.export_every=")).split("=")[1])
        assert len([*range(every, scaled, every), scaled]) == CURVE_POINTS
    # … and only the last stage: align keeps its preset's steps
    align = set_args(stage_command(argparse.Namespace(**{**vars(args), "steps_scale": 3.0}), "align", None, procs=2))
    assert not any(s.startswith("optim.max_steps=") for s in align)
    # the tokenizer stage runs under the launcher too, its batch of 16 (8 in the fast run) split over the processes
    from unified_mllm.quickstart import tokenizer_command

    tok = tokenizer_command(Path("runs/x"), 2)
    assert tok[tok.index("--num_gpus") + 1] == "2" and tok[tok.index("--stage") + 1] == "tokenizer"
    micro = load_stage_config("tokenizer").optim.micro_batch_size
    assert [s for s in set_args(tok) if s.startswith("optim.micro_batch_size=")] == [f"optim.micro_batch_size={micro // 2}"]
    fast = set_args(tokenizer_command(Path("runs/x"), 2, fast=True))
    assert "optim.micro_batch_size=4" in fast and "optim.max_steps=6" in fast
    # with --fast, the fast steps are scaled and given once, and the fast curve has its two points
    fast_args = argparse.Namespace(out="runs/x", fast=True, chain="align,mixed", steps_scale=2.0)
    fast = set_args(stage_command(fast_args, "mixed", "align", procs=2))
    assert [s for s in fast if s.startswith("optim.max_steps=")] == [f"optim.max_steps={2 * FAST_STEPS}"]
    assert f"checkpoint.export_every={FAST_STEPS}" in fast
    # … while every other stage of a fast run keeps the fast steps
    assert [s for s in set_args(stage_command(fast_args, "align", None, procs=2))
            if s.startswith("optim.max_steps=")] == [f"optim.max_steps={FAST_STEPS}"]


def test_curve_is_drawn_only_where_a_target_is_missed(tmp_path: Path, monkeypatch) -> None:
    """The issue asks for the score-vs-steps curve where a target is not met; with all met the step only names the
    command (the eval then has the cores to itself)."""
    import argparse

    from unified_mllm import quickstart as qs
    from unified_mllm.report import TARGETS

    ran: list[list[str]] = []

    def fake_run(cmd: list[str], env: dict | None = None) -> None:
        ran.append(cmd)
        Path(cmd[cmd.index("--out") + 1]).write_text(json.dumps({"points": [
            {"step": 6, "understanding/heldin": {"overall": 0.5}, "generation/heldin": {"overall": 0.25}}]}))

    monkeypatch.setattr(qs, "run_cmd", fake_run)
    args = argparse.Namespace(out=str(tmp_path), fast=False, chain="align,mixed")
    (tmp_path / "eval").mkdir()

    def scores(**value: float) -> None:
        entries = [{"benchmark": f"shapeworld_{d}", "split": s, "metric": c, "value": value.get(c, m)}
                   for d, s, c, m in TARGETS.values()]
        (tmp_path / "eval" / "summary.json").write_text(json.dumps({"entries": entries}))

    scores()  # every target exactly met
    said = qs.step_curve(args)
    assert not ran and said.startswith("skipped: every target is met") and "-m eval.curve --stage-dir" in said
    scores(single_object=0.89)
    assert qs.step_curve(args) == "held-in score against steps: step 6: understanding 0.50, generation 0.25"
    assert ran and ran[0][1:3] == ["-m", "eval.curve"]


def test_run_settings_are_recorded_once_and_a_rerun_with_others_is_refused(tmp_path: Path) -> None:
    import argparse

    from unified_mllm.quickstart import check_run_settings

    def args(**kw) -> argparse.Namespace:
        return argparse.Namespace(**{"out": str(tmp_path), "fast": False, "resolution": 64, "chain": "align,mixed",
                                     "steps_scale": 1.0, **kw})

    assert check_run_settings(args()) is None  # first run: recorded
    assert json.loads((tmp_path / ".done" / "settings.json").read_text())["chain"] == "align,mixed"
    assert check_run_settings(args(chain="align, mixed")) is None  # the same chain, spelt with a space
    error = check_run_settings(args(chain="align,sft,t2i", steps_scale=3.0))
    assert "--chain 'align,mixed' then, 'align,sft,t2i' now" in error and "--steps-scale 1.0 then, 3.0 now" in error
    # a settings file from before an option existed reads as that option's default
    (tmp_path / ".done" / "settings.json").write_text(json.dumps({"fast": False, "resolution": 64,
                                                                    "chain": "align,mixed"}))
    assert check_run_settings(args()) is None
    assert "--steps-scale" in check_run_settings(args(steps_scale=2.0))
    (tmp_path / ".done" / "settings.json").write_text("{not json")
    assert "settings.json is unreadable" in check_run_settings(args())


def test_report_lists_the_steps_done_and_the_run_settings_apart(tmp_path: Path) -> None:
    """The report's "what each step did" names each finished step with its summary, in the pipeline's order (also in a
    copied run, whose files carry the copy's times); the run's settings (kept beside the markers) are one line of their
    own, not a step, and an unreadable settings file is named there instead of stopping the report."""
    from unified_mllm.report import write_report

    done = tmp_path / ".done"
    done.mkdir()
    (done / "settings.json").write_text(json.dumps({"fast": False, "steps_scale": 0.85, "chain": "align,mixed"}))
    for i, (step, said) in enumerate((("data", "ShapeWorld dataset with 50000 samples"), ("align", "30 steps"))):
        (done / step).write_text(said + "\n")
        os.utime(done / step, (2_000_000 - i, 2_000_000 - i))  # data written last, as a copy may leave it
    (tmp_path / "timings.json").write_text(json.dumps({"data": 10.0, "align": 40.0}))
    report = write_report(tmp_path, ["align"]).read_text()
    section = report.split("## What each step did")[1]
    assert "Run settings: `fast` False, `steps_scale` 0.85, `chain` align,mixed." in section
    assert "settings.json" not in section
    assert section.index("- **data**: ShapeWorld dataset with 50000 samples") < section.index("- **align**: 30 steps")
    assert "| **total** | **50.0** (0.8 min) |" in report

    (done / "settings.json").write_text("[1, 2]")
    section = write_report(tmp_path, ["align"]).read_text().split("## What each step did")[1]
    assert f"Run settings: {done / 'settings.json'} is unreadable (a JSON list, not an object)." in section
    assert "- **data**: ShapeWorld dataset with 50000 samples" in section and "- **align**: 30 steps" in section
