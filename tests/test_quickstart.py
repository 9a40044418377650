"""The quickstart pipeline in its --fast form: every built step runs, leaves a marker, and a re-run skips it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unified_mllm.quickstart", "--out", str(out), "--fast"],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)


def test_fast_quickstart_runs_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    first = run(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for step in ("data", "configs", "teacher", "tokenizer", "probe"):
        assert (out / ".done" / step).is_file(), step
    assert (out / "wintok" / "model.safetensors").is_file()
    assert set(json.loads((out / "timings.json").read_text())) >= {"data", "teacher", "tokenizer", "probe"}
    probe = json.loads((out / "wintok_train" / "probe.json").read_text())
    assert {"kind", "colour", "count"} <= set(probe)
    second = run(out)
    assert second.returncode == 0
    assert second.stdout.count("already done") == 5


def test_failed_step_names_itself_and_how_to_resume(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    (out / "data").mkdir(parents=True)
    (out / "data" / "shapeworld").write_text("not a directory")  # the data step cannot write here
    res = run(out)
    assert res.returncode == 1
    assert "step 'data' failed" in res.stderr and "re-run `bash scripts/quickstart.sh`" in res.stderr
