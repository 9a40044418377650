"""Run lmms-eval on a checkpoint and collect its results; a failed evaluation is an error, not exit status 0.

    python -m eval.lmms_runner --model unified_mllm --model_args pretrained=DIR --tasks pope --output_path OUT

As a command it takes exactly lmms-eval's arguments and differs in two ways: ``unified_mllm`` is registered
even when the installed package metadata predates the entry point (an editable install made before it was
added), and it exits 1 when no results file was written under ``--output_path`` (lmms-eval 0.7.3 prints the
error of a failed evaluation and exits 0). :func:`run_lmms_eval` builds that command for the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from eval.common import EvalError


@dataclass
class LmmsEvalResult:
    results_file: str
    metrics: dict[str, dict[str, float]]
    """task → metric → value (lmms-eval's ``results`` without the filter suffix, stderr and alias entries)."""
    samples: dict[str, int]
    """task → number of documents evaluated (``n-samples.effective``)."""
    splits: dict[str, str] = field(default_factory=dict)
    """task → the dataset split it read."""
    command: list[str] = field(default_factory=list)
    seconds: float = 0.0


def ensure_registered() -> None:
    """Register the plugin's manifest when the installed metadata does not carry the entry point."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    from eval.lmms_plugin import manifest

    if "unified_mllm" not in MODEL_REGISTRY_V2.list_model_names():
        MODEL_REGISTRY_V2.register_manifest(manifest())


def find_results(output_path: str | Path, since: float) -> Path | None:
    files = [p for p in Path(output_path).rglob("*_results.json") if p.stat().st_mtime >= since - 1]
    return max(files, key=lambda p: p.stat().st_mtime) if files else None


def parse_results(path: str | Path) -> tuple[dict[str, dict[str, float]], dict[str, int], dict[str, str]]:
    data = json.loads(Path(path).read_text())
    metrics: dict[str, dict[str, float]] = {}
    for task, values in data.get("results", {}).items():
        row = {}
        for key, value in values.items():
            name = key.split(",")[0]
            if key == "alias" or "_stderr" in name or not isinstance(value, (int, float)):
                continue
            row[name] = float(value)
        metrics[task] = row
    samples = {t: int(v.get("effective", v.get("original", 0))) for t, v in data.get("n-samples", {}).items()}
    splits = {t: str(c.get("test_split") or c.get("validation_split") or "") for t, c in data.get("configs", {}).items()}
    return metrics, samples, splits


def lmms_eval_command(checkpoint: str | Path, tasks: list[str], output_path: str | Path,
                      include_path: str | Path | None = None, batch_size: int = 8, limit: int | None = None,
                      device: str = "auto", max_new_tokens: int | None = None, force_simple: bool = False,
                      log_samples: bool = True, extra_args: list[str] | None = None) -> list[str]:
    model_args = f"pretrained={Path(checkpoint).resolve()},batch_size={batch_size},device={device}"
    if max_new_tokens is not None:
        model_args += f",max_new_tokens={max_new_tokens}"
    cmd = [sys.executable, "-m", "eval.lmms_runner", "--model", "unified_mllm", "--model_args", model_args,
           "--tasks", ",".join(tasks), "--output_path", str(output_path)]
    if include_path:
        cmd += ["--include_path", str(include_path)]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    if force_simple:
        cmd += ["--force_simple"]
    if log_samples:
        cmd += ["--log_samples"]
    return cmd + list(extra_args or [])


def run_lmms_eval(checkpoint: str | Path, tasks: list[str], output_path: str | Path, offline: bool = True,
                  timeout_s: int | None = None, log=print, threads: int | None = None, **kwargs) -> LmmsEvalResult:
    """Run lmms-eval in a subprocess (its own logging, accelerate and CUDA state) and read its results file.
    ``threads``: the subprocess's OMP_NUM_THREADS (None: inherited)."""
    Path(output_path).mkdir(parents=True, exist_ok=True)
    cmd = lmms_eval_command(checkpoint, tasks, output_path, **kwargs)
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if offline:
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log_file = Path(output_path) / "lmms_eval.log"
    log(f"[lmms-eval] {' '.join(cmd[2:])}  (log: {log_file})")
    start = time.time()
    with open(log_file, "w") as f:
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise EvalError(f"lmms-eval ran past {timeout_s} s; see {log_file}") from None
    results = find_results(output_path, start)
    if proc.returncode != 0 or results is None:
        lines = [ln for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if "Error" in ln or "[unified_mllm]" in ln), lines[-1] if lines else "")
        raise EvalError(f"lmms-eval failed (exit {proc.returncode}, {'no' if results is None else 'a'} results file): "
                        f"{reason.strip()[:300]}; full log: {log_file}")
    metrics, samples, splits = parse_results(results)
    return LmmsEvalResult(str(results), metrics, samples, splits, cmd, round(time.time() - start, 1))


def main() -> int:
    argv = sys.argv[1:]
    output_path = None
    for i, arg in enumerate(argv):
        if arg == "--output_path" and i + 1 < len(argv):
            output_path = argv[i + 1]
        elif arg.startswith("--output_path="):
            output_path = arg.split("=", 1)[1]
    ensure_registered()
    from lmms_eval.cli.dispatch import main as lmms_main

    start = time.time()
    sys.argv = ["lmms-eval", *argv]
    lmms_main()
    if output_path and find_results(output_path, start) is None:
        print(f"[eval.lmms_runner] lmms-eval wrote no results under {output_path}: the evaluation failed "
              "(see the error above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
