"""One command for a configured set of evaluations, one summary.

    python -m eval.suite --checkpoint runs/quickstart/mixed/export --config eval_configs/shapeworld.yaml \\
        --out runs/quickstart/eval [--set shapeworld.max_questions=100 ...]

Writes ``OUT/summary.json`` and ``OUT/summary.md`` — every number with its benchmark, split, metric, sample
count, the scorer that produced it and whether that is the benchmark's official scorer — and ``OUT/samples.png``
(a grid of generated samples with their prompts). Each part writes its own files below ``OUT/<part>/``. A part
that fails is recorded with its error and the others still run; the exit status is then 1. A bad config is one
line naming the file and field (exit 2).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from eval.common import EvalError, image_grid, load_pipeline, write_json
from eval.config import SuiteConfig, load_suite_config


@dataclass
class Entry:
    benchmark: str
    split: str
    metric: str
    value: float | None
    samples: int
    """Documents / images the number is computed over."""
    scorer: str
    official: bool
    """Whether the benchmark's own official scorer produced the number (on the benchmark's own data)."""
    note: str = ""


def _entries(benchmark: str, split: str, summary: dict, unit_counts: dict, total: int, scorer: str,
             official: bool) -> list[Entry]:
    return [Entry(benchmark, split, metric, float(value), int(unit_counts.get(metric, total)), scorer, official)
            for metric, value in summary.items()]


# ---------------------------------------------------------------------------------------------- parts
def run_shapeworld(cfg: SuiteConfig, pipe, out: Path, log) -> tuple[list[Entry], dict, list]:
    from eval import shapeworld

    c, s = cfg.shapeworld, cfg.sampling
    result = shapeworld.run(None, cfg.data, out, tuple(c.splits), c.max_questions, c.max_prompts, c.num_images,
                            s.cfg_scale, s.temperature, s.top_k, s.top_p, s.seed, s.batch_size, c.max_new_tokens,
                            answer_batch_size=c.answer_batch_size, pipe=pipe, log=log)
    entries, samples = [], []
    judge = "unified_mllm.shapeworld.grade"
    for split, part in result["splits"].items():
        u, g = part["understanding"], part["generation"]
        entries += _entries("shapeworld_understanding", split, u["scores"], u["counts"], u["questions"],
                            f"{judge}.grade_answer", False)
        entries += _entries("shapeworld_generation", split, g["scores"], g["counts"], g["images"],
                            f"{judge}.grade_generation", False)
        samples += [(path, f"{split}: {r['prompt']}") for r in g["records"] for path in r["images"][:1]]
    brief = {split: {d: {k: v for k, v in p[d].items() if k != "records"} for d in p}
             for split, p in result["splits"].items()}
    return entries, {"files": str(out / "shapeworld.json"), "splits": brief}, samples


def lmms_tasks(cfg: SuiteConfig, out: Path) -> tuple[list[str], str | None, dict[str, int]]:
    """The lmms-eval part's tasks, include path and local ShapeWorld tasks (written under ``out``): its in-process
    work, done in the suite's main thread (imports are not thread-safe: datasets read a half-imported transformers
    when this ran beside the pipeline's loading)."""
    import eval.lmms_runner  # noqa: F401  (imported here, not first in the thread that runs it)
    from eval.shapeworld_tasks import task_name, write_tasks

    c = cfg.lmms_eval
    tasks, include = list(c.tasks), c.include_path
    local: dict[str, int] = {}
    if c.shapeworld_kinds:
        task_dir = out / "tasks"
        local = write_tasks(cfg.data, task_dir, tuple(c.shapeworld_splits), tuple(c.shapeworld_kinds))
        tasks += [task_name(k, s) for s in c.shapeworld_splits for k in c.shapeworld_kinds]
        include = str(task_dir)
    return tasks, include, local


def run_lmms(cfg: SuiteConfig, checkpoint: str, out: Path, log, threads: int | None = None,
             prepared: tuple[list[str], str | None, dict[str, int]] | None = None) -> tuple[list[Entry], dict, list]:
    from eval.lmms_runner import run_lmms_eval

    c = cfg.lmms_eval
    tasks, include, local = prepared or lmms_tasks(cfg, out)
    simple = c.model_class == "simple" or (c.model_class == "auto" and "mc" in c.shapeworld_kinds)
    res = run_lmms_eval(checkpoint, tasks, out / "results", offline=c.offline, timeout_s=c.timeout_s, log=log,
                        include_path=include, batch_size=c.batch_size, limit=c.limit, device=cfg.device,
                        max_new_tokens=c.max_new_tokens, force_simple=simple, threads=threads)
    entries = []
    for task, metrics in res.metrics.items():
        is_local = task in local
        split = task.rsplit("_", 1)[-1] if is_local else res.splits.get(task, "")
        for metric, value in metrics.items():
            scorer = f"lmms-eval ({task.split('_')[1]} format and scoring)" if is_local else f"lmms-eval {task}"
            notes = ([] if c.limit is None else [f"--limit {c.limit}"]) + (["percent"] if metric == "gpt_eval_score" else [])
            entries.append(Entry(task, split, metric, value, res.samples.get(task, 0), scorer, not is_local,
                                 ", ".join(notes)))
    missing = [t for t in tasks if t not in res.metrics]
    if missing:
        raise EvalError(f"lmms-eval returned no metrics for {', '.join(missing)} (results: {res.results_file})")
    return entries, {"results_file": res.results_file, "command": " ".join(res.command[2:]),
                     "seconds": res.seconds, "model_class": "simple" if simple else "chat"}, []


def run_geneval(cfg: SuiteConfig, pipe, out: Path, log) -> tuple[list[Entry], dict, list]:
    from eval import geneval

    c, s = cfg.geneval, cfg.sampling
    metadata = c.metadata or str(Path(cfg.data) / f"geneval_{c.shapeworld_split}.jsonl")
    split = "geneval" if c.metadata else f"shapeworld_{c.shapeworld_split}"
    summary = geneval.run(None, metadata, out, c.num_images, s.cfg_scale, s.temperature, s.top_k, s.top_p, s.seed,
                          s.batch_size, c.max_prompts, c.scorer, c.geneval_repo, c.detector_path, c.scorer_python,
                          pipe=pipe, log=log)
    samples = [(str(paths[0]), record["prompt"]) for _, record, paths in geneval.layout_prompts(out) if paths]
    if not summary.get("scorer"):
        return [Entry("geneval_layout", split, "status", None, summary["prompts"], "none", False,
                      "images written, not scored")], summary, samples
    entries = _entries("geneval" if c.metadata else "geneval_layout", split, summary["scores"], summary["counts"],
                       summary["images"], summary["scorer"], summary["official"])
    return entries, summary, samples


def run_dpg(cfg: SuiteConfig, pipe, out: Path, log) -> tuple[list[Entry], dict, list]:
    from eval import dpg

    c, s = cfg.dpg, cfg.sampling
    sw = None if c.prompts else str(Path(cfg.data) / f"geneval_{c.shapeworld_split}.jsonl")
    summary = dpg.run(None, c.prompts, out, sw, s.cfg_scale, s.temperature, s.top_k, s.top_p, s.seed, s.batch_size,
                      c.max_prompts, c.ella_repo, c.csv, c.scorer_python, pipe=pipe, log=log)
    split = "dpg_bench" if c.prompts else f"shapeworld_{c.shapeworld_split}"
    grids = sorted(Path(summary["layout"]).glob("*.png"))
    samples = [(str(p), p.stem) for p in grids[:4]]
    if not summary.get("scorer"):
        return [Entry("dpg_layout", split, "status", None, summary["prompts"], "none", False,
                      "images written, not scored")], summary, samples
    n = summary.get("items", summary["prompts"])
    entries = _entries(summary["benchmark"], split, summary["scores"], summary.get("counts", {}), n,
                       summary["scorer"], summary["official"])
    return entries, summary, samples


def run_grounding(cfg: SuiteConfig, pipe, out: Path, log) -> tuple[list[Entry], dict, list]:
    from eval import grounding

    c = cfg.grounding
    result = grounding.run(None, cfg.data, c.split, c.max_scenes, out / "grounding.json",
                           cfg.sampling.batch_size, pipe=pipe)
    entries = [Entry("shapeworld_grounding", c.split, probe, float(r["accuracy"]), int(r["n"]),
                     "eval.grounding.score", False) for probe, r in result["probes"].items()]
    log("[grounding] " + ", ".join(f"{p} {r['accuracy']:.2f}" for p, r in result["probes"].items()))
    return entries, {"files": str(out / "grounding.json"), "probes": result["probes"]}, []


PARTS = {"lmms_eval": run_lmms, "shapeworld": run_shapeworld, "grounding": run_grounding, "geneval": run_geneval, "dpg": run_dpg}
"""Run order: lmms-eval first, in its own process, before this one loads the model (one copy on the GPU at a time).
On a CPU (:func:`lmms_threads_beside`) the other parts but the last run beside it, on the other half of the threads;
the last, the ShapeWorld bench when it runs, then takes them all."""


def lmms_threads_beside(cfg: SuiteConfig) -> int | None:
    """Threads for lmms-eval's process when it runs beside the suite's other parts (half of this process's, which
    keeps the rest while it runs), or None when it runs first and alone: disabled, asked not to, on CUDA, or on one
    thread."""
    import torch

    on_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    others = any(getattr(cfg, name).enabled for name in PARTS if name != "lmms_eval")
    threads = torch.get_num_threads()
    if not (cfg.lmms_eval.enabled and cfg.lmms_eval.beside and others) or on_cuda or threads < 2:
        return None
    return threads // 2


# -------------------------------------------------------------------------------------------- report
def write_markdown(path: Path, checkpoint: str, config: str, entries: list[Entry], parts: dict) -> None:
    lines = [f"# Evaluation of `{checkpoint}`", "", f"Config: `{config}` — {datetime.datetime.now():%Y-%m-%d %H:%M}",
             "", "| benchmark | split | metric | value | n | scorer | official | note |",
             "|---|---|---|---:|---:|---|---|---|"]
    for e in entries:
        value = "—" if e.value is None else f"{e.value:.4f}"
        lines.append(f"| {e.benchmark} | {e.split} | {e.metric} | {value} | {e.samples} | {e.scorer} | "
                     f"{'yes' if e.official else 'no'} | {e.note} |")
    failed = {k: v for k, v in parts.items() if v.get("status") == "failed"}
    if failed:
        lines += ["", "## Failed parts", ""] + [f"- **{k}**: {v['error']}" for k, v in failed.items()]
    lines += ["", "n: documents (understanding) or images (generation) the number is computed over. "
              "official: the benchmark's own scorer on its own data; ShapeWorld numbers come from the project's "
              "exact judge.", "", "![samples](samples.png)", ""]
    path.write_text("\n".join(lines))


def write_samples_grid(path: Path, samples: list[tuple[str, str]], limit: int) -> bool:
    images, labels = [], []
    for file, label in samples[:limit]:
        images.append(Image.open(file).convert("RGB"))
        labels.append(label)
    if not images:
        return False
    cell = max(128, max(i.size[0] for i in images))
    image_grid(images, cols=min(4, len(images)), cell=cell, labels=labels).save(path)
    return True


def run_suite(checkpoint: str, cfg: SuiteConfig, out: str | Path, config_name: str = "", log=print) -> dict:
    if not (Path(checkpoint) / "unified_config.json").is_file():
        raise EvalError(f"--checkpoint {checkpoint}: no unified_config.json there; pass the export directory of a "
                        "trained stage, e.g. runs/quickstart/mixed/export")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = None
    results: dict[str, tuple[list[Entry], dict, list]] = {}
    parts: dict[str, dict] = {}

    def attempt(name: str, fn):
        """fn()'s result, or None with the part recorded as failed."""
        try:
            return fn()
        except EvalError as err:
            parts[name] = {"status": "failed", "error": str(err)}
            log(f"[suite] {name} failed: {err}")
        except Exception as err:  # a bug in one part must not lose the others' numbers; the traceback is kept
            parts[name] = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                           "traceback": traceback.format_exc()}
            log(f"[suite] {name} failed:\n{traceback.format_exc()}")
        return None

    def run_part(name: str, fn=None) -> None:
        """Run a part (``fn``, or its PARTS function) and record its numbers and seconds, or its failure."""
        log(f"[suite] {name}")
        start = time.perf_counter()

        def default():
            nonlocal pipe
            if name == "lmms_eval":
                return PARTS[name](cfg, checkpoint, out / name, log)
            pipe = pipe or load_pipeline(checkpoint, cfg.device, cfg.dtype)
            return PARTS[name](cfg, pipe, out / name, log)

        if (result := attempt(name, fn or default)) is not None:
            results[name] = result
            parts[name] = {"status": "ok", "seconds": round(time.perf_counter() - start, 1), **result[1]}

    enabled = [name for name in PARTS if getattr(cfg, name).enabled]
    beside = lmms_threads_beside(cfg)
    if beside is None:
        for name in enabled:
            run_part(name)
    else:
        import threading

        import torch

        threads = torch.get_num_threads()
        lmms = None
        if (prepared := attempt("lmms_eval", lambda: lmms_tasks(cfg, out / "lmms_eval"))) is not None:
            # the thread only waits on lmms-eval's process; everything in-process stays in this thread
            lmms = threading.Thread(target=run_part, name="lmms-eval", args=("lmms_eval", lambda: run_lmms(
                cfg, checkpoint, out / "lmms_eval", log, beside, prepared)))
            lmms.start()
            torch.set_num_threads(threads - beside)
        order = [name for name in enabled if name not in ("lmms_eval", "shapeworld")] + (
            ["shapeworld"] if "shapeworld" in enabled else [])
        try:
            for name in order[:-1]:
                run_part(name)
        finally:
            # the last (the ShapeWorld bench, the longest) waits for lmms-eval and takes every thread: a torch thread
            # count cannot change inside a running part, and this order is never slower than lmms-eval alone first
            if lmms is not None:
                lmms.join()
            torch.set_num_threads(threads)
        for name in order[-1:]:
            run_part(name)
    entries: list[Entry] = [e for name in enabled if name in results for e in results[name][0]]
    samples: list[tuple[str, str]] = [s for name in enabled if name in results for s in results[name][2]]
    parts = {name: parts[name] for name in enabled if name in parts}
    grid = cfg.grid_samples > 0 and write_samples_grid(out / "samples.png", samples, cfg.grid_samples)
    from unified_mllm.config import to_dict

    summary = {"checkpoint": str(checkpoint), "config": config_name, "created": datetime.datetime.now().isoformat(),
               "entries": [e.__dict__ for e in entries], "parts": parts,
               "samples_grid": str(out / "samples.png") if grid else None, "resolved_config": to_dict(cfg)}
    write_json(out / "summary.json", summary)
    write_markdown(out / "summary.md", str(checkpoint), config_name, entries, parts)
    return summary


def main(argv: list[str] | None = None) -> int:
    from unified_mllm.config import ConfigError

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="export directory of a trained model")
    p.add_argument("--config", required=True, help="suite config, e.g. eval_configs/shapeworld.yaml")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    a = p.parse_args(argv)
    try:
        cfg = load_suite_config(a.config, a.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = run_suite(a.checkpoint, cfg, a.out, a.config)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(Path(a.out, "summary.md").read_text().split("\n\nn: ")[0])
    failed = [k for k, v in summary["parts"].items() if v["status"] == "failed"]
    if failed:
        print(f"error: failed parts: {', '.join(failed)} (see {Path(a.out) / 'summary.json'})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
