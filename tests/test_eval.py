"""Evaluation harness on a tiny random export: lmms-eval run for real and offline on local ShapeWorld tasks,
GenEval / DPG-Bench layouts (seeded, resumable), the ShapeWorld bench (scoring checked on oracles), the suite.

A random model answers at chance, so these tests check structure, counts, seeds, resume, exit codes, and that
every number equals what the pipeline and the graders give when recomputed here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_model import WORDS, build
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from eval import dpg, geneval, shapeworld
from eval.common import EvalError
from tokenizer import WinTok, WinTokConfig
from unified_mllm.config import ConfigError
from unified_mllm.inference import UnifiedPipeline
from unified_mllm.model import save_pretrained
from unified_mllm.shapeworld.dataset import write_dataset
from unified_mllm.shapeworld.judge import detect
from unified_mllm.shapeworld.prompts import scene_for_spec, violating_scene
from unified_mllm.shapeworld.render import render
from unified_mllm.shapeworld.text import answer_from_detections

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "benchmarks"
HAVE_LMMS = importlib.util.find_spec("lmms_eval") is not None
needs_lmms = pytest.mark.skipif(not HAVE_LMMS, reason="lmms-eval not installed (bash scripts/setup_env.sh dev,eval)")

# the test vocabulary: ShapeWorld's words, so prompts and answers are real tokens (option letters included)
EVAL_WORDS = WORDS + sorted({
    "A", "B", "C", "D", "0", "1", "2", "3", "4", "5", "6", "the", "in", "image", "are", "what", "color", "shape",
    "where", "relative", "to", "answer", "left", "right", "above", "below", "or", "with", "option", "letter",
    "from", "given", "choices", "directly", "question", "using", "single", "word", "phrase", "photo", "of", "and",
    "object", "triangle", "diamond", "green", "purple", "yellow", "cyan", "orange", ".", ",", "'", "s",
} - set(WORDS))
POPE_SUFFIX = "\nAnswer the question using a single word or phrase."


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_assets")
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(EVAL_WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        str(root / "tok"))
    torch.manual_seed(0)
    WinTok(WinTokConfig.tiny(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                             decoder_num_heads=2, num_semantic_tokens=3, codebook_size=16)).save_pretrained(root / "wt")
    return root


@pytest.fixture(scope="module")
def export(assets: Path, tmp_path_factory) -> Path:
    model, tok, _ = build(assets)
    return save_pretrained(model, tok, tmp_path_factory.mktemp("eval_export") / "export")


@pytest.fixture(scope="module")
def pipe(export: Path) -> UnifiedPipeline:
    return UnifiedPipeline.from_pretrained(export, device="cpu")


@pytest.fixture(scope="module")
def sw_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapeworld")
    write_dataset(out, num=8, seed=0, resolution=64, num_test=60, prompts_per_tag=3, workers=1)
    return out


@pytest.fixture(scope="module")
def lmms_env(tmp_path_factory) -> dict:
    """Environment of an lmms-eval subprocess: offline, its own datasets cache, and the entry point of
    pyproject.toml on the path (an editable install made before the entry point existed lacks it)."""
    tmp = tmp_path_factory.mktemp("lmms_env")
    section = (ROOT / "pyproject.toml").read_text().split('[project.entry-points."lmms_eval.models"]')[1].split("\n[")[0]
    entry_points = dict(re.findall(r'^(\w+)\s*=\s*"([^"]+)"', section, flags=re.M))
    assert entry_points.get("unified_mllm") == "eval.lmms_plugin:manifest"
    dist = tmp / "site" / "unified_mllm_eval_entry_points-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: unified-mllm-eval-entry-points\nVersion: 0\n")
    (dist / "entry_points.txt").write_text("[lmms_eval.models]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp / "hf_datasets"),
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp / "site")]))
    return env


def python(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def geneval_metadata(tmp_path_factory) -> Path:
    """The real 553-prompt file when this machine has it; else a few records in the same format."""
    real = SHARED / "geneval" / "evaluation_metadata.jsonl"
    if real.is_file():
        return real
    path = tmp_path_factory.mktemp("geneval") / "evaluation_metadata.jsonl"
    records = [{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
               {"tag": "two_object", "include": [{"class": "toilet", "count": 1}, {"class": "bicycle", "count": 1}],
                "prompt": "a photo of a toilet and a bicycle"},
               {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
                "prompt": "a photo of two clocks"},
               {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
               {"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1,
                                                                               "position": ["left of", 0]}],
                "prompt": "a photo of a cat left of a dog"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def dpg_prompts(tmp_path_factory) -> Path:
    real = SHARED / "dpg_bench" / "prompts"
    if real.is_dir():
        return real
    folder = tmp_path_factory.mktemp("dpg_prompts")
    for stem, text in (("0", "A red square above a blue circle."), ("10", "Three cabbages in a field."),
                       ("2", "A triangle and a square."), ("partiprompts5", "A cyan diamond.")):
        (folder / f"{stem}.txt").write_text(text)
    return folder


# ---------------------------------------------------------------------------------------- lmms-eval
@needs_lmms
def test_plugin_manifest_and_response_wrapping(export: Path) -> None:
    from lmms_eval.api.instance import unwrap_generation_output
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from eval.lmms_plugin import UnifiedMLLM, UnifiedMLLMChat, loglikelihood_response, manifest

    registry = ModelRegistryV2()
    registry.register_manifest(manifest())
    assert registry.get_model_class("unified_mllm") is UnifiedMLLMChat
    assert registry.get_model_class("unified_mllm", force_simple=True) is UnifiedMLLM
    # whatever the installed evaluator does to responses, the task receives the (nll, is_greedy) pair
    assert unwrap_generation_output(loglikelihood_response(2.5, True))[0] == (2.5, True)
    # model_args win over the CLI's default --batch_size (lmms-eval passes both)
    lm = UnifiedMLLM.create_from_arg_string(f"pretrained={export},batch_size=3,device=cpu", {"batch_size": 1})
    assert lm.batch_size == 3 and lm.pipe.device.type == "cpu"


@pytest.fixture(scope="module")
def task_dir(sw_data: Path, tmp_path_factory) -> Path:
    from eval.shapeworld_tasks import write_tasks

    out = tmp_path_factory.mktemp("lmms_tasks")
    sizes = write_tasks(sw_data, out, splits=("heldin",))
    assert set(sizes) == {f"shapeworld_{k}_heldin" for k in ("pope", "vqa", "mmbench", "mc")}
    assert all(n > 0 for n in sizes.values())
    return out


def _samples(out: Path, task: str) -> list[dict]:
    (path,) = out.rglob(f"*_samples_{task}.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def _reply(sample: dict) -> str:
    r = sample["filtered_resps"]
    return r[0] if isinstance(r, list) else r


def _docs(task_dir: Path, task: str):
    import datasets

    return datasets.Dataset.from_parquet(str(task_dir / f"{task}.parquet"))


@needs_lmms
def test_lmms_eval_loglikelihood_is_the_negative_log_likelihood(pipe, export, task_dir, lmms_env, tmp_path) -> None:
    """`python -m lmms_eval` itself, simple class: a multiple-choice task scored by our loglikelihood."""
    out = tmp_path / "out"
    # batch_size 5: the 12 option requests run as batches of 5, 5 and 2, each compared below with the unbatched figure
    proc = python("-m", "lmms_eval", "--model", "unified_mllm", "--model_args",
                  f"pretrained={export},device=cpu,batch_size=5",
                  "--force_simple", "--include_path", str(task_dir), "--tasks",
                  "shapeworld_mc_heldin,shapeworld_pope_heldin", "--limit", "3", "--log_samples",
                  "--output_path", str(out), env=lmms_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = list(out.rglob("*_results.json"))
    assert len(found) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(found[0].read_text())
    assert res["n-samples"]["shapeworld_mc_heldin"]["effective"] == 3
    assert res["configs"]["shapeworld_mc_heldin"]["target_delimiter"] == ""  # not " A": see the pipeline's test
    docs = _docs(task_dir, "shapeworld_mc_heldin")
    hits = []
    for s in _samples(out, "shapeworld_mc_heldin"):
        doc = docs[s["doc_id"]]
        nll = [float(r[0]) for r in s["filtered_resps"]]
        # each option is the letter right after the assistant prompt, as the model answers (target_delimiter "")
        want = [-pipe.loglikelihood([doc["image"]], doc["prompt"], letter)[0] for letter in "ABCD"]
        assert nll == pytest.approx(want, abs=1e-3)
        assert min(nll) >= 0 and len(set(round(x, 4) for x in nll)) > 1  # letters are real, distinct tokens
        hits.append(float(max(range(4), key=lambda i: -want[i]) == doc["label"]))
        assert s["acc"] == hits[-1]
    assert res["results"]["shapeworld_mc_heldin"]["acc,none"] == pytest.approx(sum(hits) / len(hits))
    # the simple class answers generation tasks like the pipeline does
    pope = _docs(task_dir, "shapeworld_pope_heldin")
    for s in _samples(out, "shapeworld_pope_heldin"):
        doc = pope[s["doc_id"]]
        assert _reply(s) == pipe.answer([doc["image"]], doc["question"] + POPE_SUFFIX, max_new_tokens=8)


@needs_lmms
def test_failing_evaluations_exit_nonzero(task_dir, lmms_env, tmp_path) -> None:
    bad = tmp_path / "no_such_export"
    runs = {  # both start at once: most of their time is lmms-eval's start-up
        # a checkpoint that does not load: lmms-eval itself exits non-zero, with the reason on stderr
        "plugin": ["-m", "lmms_eval", "--model", "unified_mllm", "--model_args", f"pretrained={bad}",
                   "--include_path", str(task_dir), "--tasks", "shapeworld_pope_heldin", "--limit", "2",
                   "--output_path", str(tmp_path / "a")],
        # a failure inside lmms-eval (an unknown task), which plain lmms-eval 0.7.3 reports with exit status 0
        "runner": ["-m", "eval.lmms_runner", "--model", "unified_mllm", "--model_args", f"pretrained={bad}",
                   "--tasks", "no_such_task", "--output_path", str(tmp_path / "b")],
    }
    procs = {k: subprocess.Popen([sys.executable, *a], cwd=ROOT, env=lmms_env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k, a in runs.items()}
    out = {k: p.communicate(timeout=300) for k, p in procs.items()}
    assert procs["plugin"].returncode != 0
    assert "[unified_mllm]" in out["plugin"][1] and str(bad) in out["plugin"][1]
    assert not list((tmp_path / "a").rglob("*_results.json"))
    assert procs["runner"].returncode == 1
    assert "wrote no results" in out["runner"][1]


# ------------------------------------------------------------------------------------------ GenEval
def test_geneval_layout_is_official_seeded_and_resumes(pipe, geneval_metadata: Path, tmp_path: Path) -> None:
    out = tmp_path / "geneval"
    records = geneval.read_metadata(geneval_metadata, 3)  # a limit samples every tag in turn; its prefixes agree
    kw = dict(num_images=2, cfg_scale=2.0, seed=7, batch_size=4, pipe=pipe, log=lambda *_: None)
    s = geneval.run(None, str(geneval_metadata), out, max_prompts=2, **kw)
    assert (s["generated"], s["skipped"]) == (2, 0)
    assert s["status"] == "images written, not scored" and s["official"] is False  # COCO objects: no judge here
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["00000", "00001"]
    for i in range(2):
        assert json.loads((out / f"{i:05d}" / "metadata.jsonl").read_text()) == records[i]
        assert sorted(p.name for p in (out / f"{i:05d}" / "samples").iterdir()) == ["0000.png", "0001.png"]
    # image j of prompt i is sampled with seed + i·num_images + j, whatever else shares its batch
    again = pipe.generate_images([records[1]["prompt"]], num_images=2, cfg_scale=2.0, seed=7 + 1 * 2)[0]
    for j in range(2):
        assert np.array_equal(np.asarray(Image.open(out / "00001" / "samples" / f"{j:04d}.png")), np.asarray(again[j]))
    # resume: finished prompts are skipped and left untouched; a missing image is drawn again, identically
    kept = out / "00000" / "samples" / "0000.png"
    stamp = kept.stat().st_mtime_ns
    lost = out / "00001" / "samples" / "0001.png"
    before = lost.read_bytes()
    lost.unlink()
    s = geneval.run(None, str(geneval_metadata), out, max_prompts=3, **kw)
    assert (s["generated"], s["skipped"]) == (2, 1)
    assert lost.read_bytes() == before and kept.stat().st_mtime_ns == stamp
    assert (out / "00002" / "samples" / "0001.png").is_file()


def _write_layout(out: Path, specs: list[dict], scene_fn, per_prompt: int = 2) -> None:
    rng = random.Random(0)
    for i, spec in enumerate(specs):
        d = out / f"{i:05d}"
        (d / "samples").mkdir(parents=True)
        (d / "metadata.jsonl").write_text(json.dumps(spec) + "\n")
        for j in range(per_prompt):
            render(scene_fn(spec, rng), 64).save(d / "samples" / f"{j:04d}.png")


def test_geneval_shapeworld_judge_scores_a_layout_exactly(sw_data: Path, tmp_path: Path) -> None:
    specs = geneval.read_metadata(sw_data / "geneval_heldin.jsonl")
    assert {s["tag"] for s in specs} == set(geneval.TAGS)
    _write_layout(tmp_path / "good", specs, scene_for_spec)
    s = geneval.run(None, None, tmp_path / "good", scorer="auto", log=lambda *_: None)
    assert s["scorer"].startswith("shapeworld judge") and s["official"] is False
    assert s["scores"] == {**{t: 1.0 for t in geneval.TAGS}, "overall": 1.0}
    assert s["images"] == 2 * len(specs) and sum(s["counts"].values()) == s["images"]
    rows = [json.loads(x) for x in (tmp_path / "good" / "results_shapeworld.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"filename", "tag", "prompt", "correct", "reason", "metadata"}  # evaluate_images.py's
    _write_layout(tmp_path / "bad", specs, violating_scene)
    s = geneval.run(None, None, tmp_path / "bad", scorer="shapeworld", log=lambda *_: None)
    assert s["scores"] == {**{t: 0.0 for t in geneval.TAGS}, "overall": 0.0}
    assert json.loads(json.dumps(s)) == json.loads((tmp_path / "bad" / "summary.json").read_text())


def test_geneval_official_scorer_is_called_with_its_interface(sw_data: Path, tmp_path: Path) -> None:
    """GenEval's scorer needs CUDA, mmdet and its detector weights, so a stand-in checkout with the same command
    line, files and output checks the wrapper: arguments, working directories, results parsing."""
    specs = geneval.read_metadata(sw_data / "geneval_heldin.jsonl")[:6]
    _write_layout(tmp_path / "layout", specs, scene_for_spec)
    repo = tmp_path / "geneval_repo" / "evaluation"
    repo.mkdir(parents=True)
    (repo / "object_names.txt").write_text("circle\nsquare\n")
    (repo / "evaluate_images.py").write_text(
        "import argparse, json, os, re\n"
        "p = argparse.ArgumentParser(); p.add_argument('imagedir'); p.add_argument('--outfile')\n"
        "p.add_argument('--model-path'); a = p.parse_args()\n"
        "assert os.path.isdir(a.model_path)\n"
        "rows = []\n"
        "for sub in sorted(os.listdir(a.imagedir)):\n"
        "    d = os.path.join(a.imagedir, sub)\n"
        "    if not (os.path.isdir(d) and sub.isdigit()): continue\n"
        "    meta = json.load(open(os.path.join(d, 'metadata.jsonl')))\n"
        "    for name in sorted(os.listdir(os.path.join(d, 'samples'))):\n"
        "        if re.match(r'\\d+\\.png', name):\n"
        "            rows.append({'filename': os.path.join(d, 'samples', name), 'tag': meta['tag'], 'prompt': meta['prompt'],\n"
        "                         'correct': name == '0000.png', 'reason': '', 'metadata': json.dumps(meta)})\n"
        "open(a.outfile, 'w').write(''.join(json.dumps(r) + '\\n' for r in rows))\n")
    (repo / "summary_scores.py").write_text(
        "import json, sys\n"
        "classes = open('object_names.txt').read().split()  # relative to evaluation/, as in GenEval\n"
        "rows = [json.loads(x) for x in open(sys.argv[1])]\n"
        "tags = {}\n"
        "for r in rows: tags.setdefault(r['tag'], []).append(r['correct'])\n"
        "print(f'Overall score (avg. over tasks): {sum(sum(v) / len(v) for v in tags.values()) / len(tags):.5f}')\n")
    detector = tmp_path / "detector"
    detector.mkdir()
    s = geneval.run(None, None, tmp_path / "layout", scorer="auto", geneval_repo=str(repo.parent),
                    detector_path=str(detector), log=lambda *_: None)
    assert s["official"] is True and s["scorer"].startswith("GenEval evaluate_images.py")
    assert s["scores"]["overall"] == pytest.approx(0.5) and s["images"] == 12
    assert "Overall score" in (tmp_path / "layout" / "summary_scores.txt").read_text()
    with pytest.raises(EvalError, match="djghosh13/geneval"):
        geneval.run(None, None, tmp_path / "layout", scorer="official", geneval_repo=str(tmp_path),
                    detector_path=str(detector), log=lambda *_: None)


# ---------------------------------------------------------------------------------------------- DPG
def test_dpg_grids_are_named_by_item_seeded_and_resume(pipe, dpg_prompts: Path, tmp_path: Path) -> None:
    items = dpg.read_prompts(dpg_prompts)[:2]
    s = dpg.run(None, str(dpg_prompts), tmp_path, max_prompts=2, seed=5, batch_size=8, pipe=pipe, log=lambda *_: None)
    assert (s["generated"], s["status"]) == (2, "images written, not scored")
    files = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert files == sorted(f"{item_id}.png" for item_id, _ in items)  # only grids in the scorer's folder
    side = pipe.wintok.config.image_size
    for i, (item_id, prompt) in enumerate(items):
        grid = Image.open(tmp_path / "images" / f"{item_id}.png")
        assert grid.size == (2 * side, 2 * side)
        if i == 1:  # cell j (left→right, top→bottom) is sample j, seeded seed + i·4 + j
            want = pipe.generate_images([prompt], num_images=4, seed=5 + i * 4)[0]
            for cell, img in zip(dpg.split_grid(grid), want):
                assert np.array_equal(np.asarray(cell), np.asarray(img))
    s = dpg.run(None, str(dpg_prompts), tmp_path, max_prompts=2, seed=5, pipe=pipe, log=lambda *_: None)
    assert (s["generated"], s["skipped"]) == (0, 2)
    with pytest.raises(EvalError, match="not a directory"):
        dpg.run(None, str(tmp_path / "nope"), tmp_path, pipe=pipe)


def test_dpg_shapeworld_cells_are_judged(sw_data: Path, tmp_path: Path) -> None:
    items, specs = dpg.shapeworld_prompts(sw_data / "geneval_heldin.jsonl")
    rng = random.Random(1)
    (tmp_path / "images").mkdir()
    for item_id, _ in items:
        cells = [render(scene_for_spec(specs[item_id], rng), 64) for _ in range(4)]
        cells[3] = render(violating_scene(specs[item_id], rng), 64)  # one cell of four fails
        dpg.make_grid(cells).save(tmp_path / "images" / f"{item_id}.png")
    s = dpg.score_shapeworld(tmp_path / "images", specs)
    assert s["scores"]["overall"] == pytest.approx(0.75) and s["items"] == len(items)


def test_dpg_official_scorer_is_called_with_its_interface(tmp_path: Path) -> None:
    """ELLA's scorer needs modelscope and mPLUG-large; a stand-in with its command line and result file checks the
    wrapper (arguments, working directory, parsing of the overall and L1 category scores)."""
    images = tmp_path / "out" / "images"
    images.mkdir(parents=True)
    for item in ("0", "1"):
        Image.new("RGB", (64, 64)).save(images / f"{item}.png")
    script = tmp_path / "ELLA" / "dpg_bench" / "compute_dpg_bench.py"
    script.parent.mkdir(parents=True)
    (script.parent / "dpg_bench.csv").write_text("item_id,text\n")
    script.write_text(
        "import argparse, os\n"
        "p = argparse.ArgumentParser()\n"
        "for a in ('--image-root-path', '--resolution', '--csv', '--res-path', '--pic-num', '--vqa-model'): p.add_argument(a)\n"
        "a = p.parse_args()\n"
        "assert os.path.isdir('dpg_bench') and a.pic_num == '4' and a.resolution == '32' and a.vqa_model == 'mplug'\n"
        "assert sorted(os.listdir(a.image_root_path)) == ['0.png', '1.png'] and os.path.isfile(a.csv)\n"
        "open(a.res_path, 'w').write('x/0.png, 1.0\\nModel: images\\nL1 category scores:\\n\\tentity: 80.0\\n'\n"
        "                            '\\trelation: 70.0\\nL2 category scores:\\n\\tentity - whole: 80.0\\n'\n"
        "                            'DPG-Bench score: 75.5\\n')\n")
    s = dpg.score_official(images, tmp_path / "out", tmp_path / "ELLA", script.parent / "dpg_bench.csv", 32,
                           log=lambda *_: None)
    assert s["official"] is True and s["scores"] == {"overall": 0.755, "entity": 0.8, "relation": 0.7}
    with pytest.raises(EvalError, match="dpg_bench.csv"):
        dpg.score_official(images, tmp_path / "out", tmp_path / "ELLA", tmp_path / "missing.csv", 32)


# ------------------------------------------------------------------------------------ ShapeWorld bench
def test_shapeworld_bench_counts_and_categories(pipe, sw_data: Path, tmp_path: Path) -> None:
    r = shapeworld.run(None, sw_data, tmp_path, max_questions=12, max_prompts=3, num_images=2, batch_size=8,
                       pipe=pipe, log=lambda *_: None)
    assert set(r["splits"]) == {"heldin", "heldout"}
    for part in r["splits"].values():
        u, g = part["understanding"], part["generation"]
        assert u["questions"] == 12 and sum(u["counts"].values()) == 12 and len(u["records"]) == 12
        assert u["scores"]["overall"] == pytest.approx(sum(x["correct"] for x in u["records"]) / 12)
        for cat, n in u["counts"].items():
            recs = [x for x in u["records"] if x["category"] == cat]
            assert len(recs) == n and u["scores"][cat] == pytest.approx(sum(x["correct"] for x in recs) / n)
        assert g["prompts"] == 3 and g["images"] == 6 and sum(g["counts"].values()) == 6
        assert all(Path(f).is_file() for rec in g["records"] for f in rec["images"])
    saved = json.loads((tmp_path / "shapeworld.json").read_text())
    assert saved["splits"]["heldin"]["understanding"]["scores"] == r["splits"]["heldin"]["understanding"]["scores"]


def test_shapeworld_scoring_is_exact_on_oracles(sw_data: Path) -> None:
    for split in shapeworld.SPLITS:
        qs = shapeworld.read_questions(sw_data, split)
        cats = {q["category"] for q in qs}
        assert cats == {"presence", "counting", "color", "shape", "position", "multiple_choice"}
        # the ground truth, and a reader of the original images (the detector), are right on every category
        for preds in ([q["answer"] for q in qs],
                      [answer_from_detections(q["spec"], detect(Image.open(q["image_path"]))) for q in qs]):
            _, s = shapeworld.score_answers(qs, preds)
            assert s["scores"] == {**{c: 1.0 for c in cats}, "overall": 1.0}
        # answers phrased as a model would write them
        words = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four"}
        phrased = [f"({q['answer']}) {q['spec']['choices'][q['answer']]}" if q["category"] == "multiple_choice" else
                   f"{words.get(q['answer'], q['answer']).capitalize()}." for q in qs]
        assert shapeworld.score_answers(qs, phrased)[1]["scores"]["overall"] == 1.0
        # wrong answers score zero everywhere
        wrong = [{"yes": "no", "no": "yes"}.get(q["answer"], "B" if q["answer"] == "A" else "A")
                 if q["category"] in ("presence", "multiple_choice") else "zebra" for q in qs]
        _, s = shapeworld.score_answers(qs, wrong)
        assert s["scores"] == {**{c: 0.0 for c in cats}, "overall": 0.0}
        # generation: a scene that satisfies each prompt passes, one that breaks it fails
        specs = shapeworld.read_prompts(sw_data, split)
        rng = random.Random(0)
        _, s = shapeworld.score_images(specs, [[render(scene_for_spec(sp, rng), 64)] for sp in specs])
        assert s["scores"]["overall"] == 1.0 and all(v == 1.0 for v in s["scores"].values())
        _, s = shapeworld.score_images(specs, [[render(violating_scene(sp, rng), 64)] for sp in specs])
        assert all(v == 0.0 for v in s["scores"].values())


def test_shapeworld_judge_fails_texture_read_as_many_shapes() -> None:
    """An untrained generator paints palette-coloured texture; the detector reads it as 8+ shapes, which would
    satisfy every "at least one X" prompt. No ShapeWorld scene holds more than MAX_OBJECTS shapes."""
    from unified_mllm.shapeworld.grade import grade_generation
    from unified_mllm.shapeworld.scene import BACKGROUND, COLORS, MAX_OBJECTS

    rng = np.random.default_rng(0)
    palette = np.array(list(COLORS.values()) + [BACKGROUND] * 4, dtype=np.uint8)
    texture = Image.fromarray(np.kron(palette[rng.integers(0, len(palette), (8, 8))], np.ones((8, 8, 1), np.uint8)))
    assert len(detect(texture)) > MAX_OBJECTS
    for shape in ("circle", "square", "triangle", "diamond"):
        ok, reason = grade_generation(texture, {"tag": "single_object", "include": [{"class": shape, "count": 1}]})
        assert not ok and "objects detected" in reason


def test_shapeworld_judge_fails_a_shape_among_fragments() -> None:
    """An image of fragments (what a barely trained generator draws) in which one blob happens to read as a circle
    is not a scene of a circle: the grader counts every foreground blob, read as a shape or not. The same circle
    alone passes, and so do real scenes of MAX_OBJECTS shapes."""
    from unified_mllm.shapeworld.grade import grade_generation
    from unified_mllm.shapeworld.judge import detect_scene
    from unified_mllm.shapeworld.render import render
    from unified_mllm.shapeworld.scene import COLORS, MAX_OBJECTS, Scene, ShapeObject

    spec = {"tag": "single_object", "include": [{"class": "circle", "count": 1}]}
    alone = np.asarray(render(Scene([ShapeObject("circle", "red", 0.25, 0.25, 0.3)]), 64)).copy()
    assert grade_generation(Image.fromarray(alone), spec)[0]
    fragments = alone.copy()
    for i in range(MAX_OBJECTS):  # thin 2-px bars: foreground blobs too long and thin to be any kind of shape
        fragments[40 + 5 * (i % 2): 42 + 5 * (i % 2), 4 + 15 * i: 16 + 15 * i] = list(COLORS.values())[i]
    dets, blobs = detect_scene(Image.fromarray(fragments))
    assert [d.shape for d in dets] == ["circle"] and blobs == MAX_OBJECTS + 1
    ok, reason = grade_generation(Image.fromarray(fragments), spec)
    assert not ok and "foreground blobs" in reason
    full = Scene([ShapeObject(s, "blue", 0.2 + 0.55 * (i % 2), 0.2 + 0.55 * (i // 2), 0.2)
                  for i, s in enumerate(("circle", "square", "triangle", "diamond"))])
    assert grade_generation(render(full, 64), {"tag": "two_object", "include": [{"class": "circle", "count": 1},
                                                                                {"class": "diamond", "count": 1}]})[0]


def test_shapeworld_bench_bad_input_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "vqa_heldin.jsonl").write_text('{"image": "x.png", "question": "q"}\n')
    with pytest.raises(EvalError, match=r"vqa_heldin.jsonl:1: missing answer, category"):
        shapeworld.read_questions(tmp_path, "heldin")
    proc = python("-m", "eval.shapeworld", "--checkpoint", str(tmp_path / "none"), "--data", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --checkpoint")
    assert len(proc.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------- suite
@pytest.fixture(scope="module")
def suite_run(export: Path, sw_data: Path, lmms_env: dict, tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    sets = [f"data={sw_data}", "device=cpu", "sampling.batch_size=8", "shapeworld.max_questions=12",
            "shapeworld.max_prompts=3", "shapeworld.num_images=1", "lmms_eval.shapeworld_kinds=[pope,vqa,mmbench]",
            "lmms_eval.shapeworld_splits=[heldin]", "lmms_eval.limit=3", "lmms_eval.batch_size=4",
            "geneval.max_prompts=3", "geneval.num_images=2", "dpg.max_prompts=2", "grid_samples=6", "grounding.max_scenes=3"]
    if not HAVE_LMMS:
        sets.append("lmms_eval.enabled=false")
    args = ["-m", "eval.suite", "--checkpoint", str(export), "--config", "eval_configs/shapeworld.yaml",
            "--out", str(out)] + [x for s in sets for x in ("--set", s)]
    return python(*args, env=lmms_env, timeout=600), out


def test_suite_writes_every_number_with_its_provenance(suite_run, pipe, sw_data) -> None:
    proc, out = suite_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert all(p["status"] == "ok" for p in summary["parts"].values())
    assert set(summary["parts"]) == {"shapeworld", "grounding", "geneval", "dpg"} | (
        {"lmms_eval"} if HAVE_LMMS else set())
    entries = summary["entries"]
    for e in entries:
        assert set(e) == {"benchmark", "split", "metric", "value", "samples", "scorer", "official", "note"}
        assert e["samples"] > 0 and e["scorer"] and e["split"] and 0.0 <= e["value"] <= 100.0
        assert e["official"] is False  # ShapeWorld data everywhere: no official benchmark number
    benches = {(e["benchmark"], e["split"]) for e in entries}
    for split in ("heldin", "heldout"):
        assert {("shapeworld_understanding", split), ("shapeworld_generation", split)} <= benches
    assert ("shapeworld_grounding", "heldin") in benches
    assert ("geneval_layout", "shapeworld_heldout") in benches and ("dpg_layout_shapeworld", "shapeworld_heldin") in benches
    overall = {(e["benchmark"], e["split"]): e for e in entries if e["metric"] == "overall"}
    assert overall[("shapeworld_understanding", "heldin")]["samples"] == 12
    assert overall[("geneval_layout", "shapeworld_heldout")]["samples"] == 6  # 3 prompts × 2 images
    if HAVE_LMMS:
        metrics = {(e["benchmark"], e["metric"]): e for e in entries}
        for task, metric in (("pope", "pope_accuracy"), ("pope", "pope_f1_score"), ("vqa", "exact_match"),
                             ("mmbench", "gpt_eval_score")):
            assert metrics[(f"shapeworld_{task}_heldin", metric)]["samples"] == 3
        # the chat class answered POPE exactly as the pipeline does
        pope = _docs(out / "lmms_eval" / "tasks", "shapeworld_pope_heldin")
        samples = _samples(out / "lmms_eval" / "results", "shapeworld_pope_heldin")
        answers = [pipe.answer([pope[s["doc_id"]]["image"]], pope[s["doc_id"]]["question"] + POPE_SUFFIX,
                               max_new_tokens=8) for s in samples]
        assert [_reply(s) for s in samples] == answers
        acc = sum(a.lower().strip() == pope[s["doc_id"]]["answer"] for a, s in zip(answers, samples)) / 3
        assert metrics[("shapeworld_pope_heldin", "pope_accuracy")]["value"] == pytest.approx(acc)
        # on a CPU lmms-eval's process ran beside the other parts on half the threads; the summary keeps the run order
        threads = torch.get_num_threads()
        log = (out / "lmms_eval" / "results" / "lmms_eval.log").read_text()
        assert f"batch size 4, {threads // 2 if threads >= 2 else threads} threads" in log
    assert list(summary["parts"]) == [name for name in ("lmms_eval", "shapeworld", "grounding", "geneval", "dpg")
                                      if name in summary["parts"]]
    assert entries[0]["scorer"].startswith("lmms-eval") == HAVE_LMMS  # its numbers first, although it ran beside
    md = (out / "summary.md").read_text()
    assert md.count("\n| ") == len(entries) + 1  # header + one row per number
    assert Image.open(out / "samples.png").size[0] > 0
    assert len(list((out / "geneval").glob("0000*/samples/*.png"))) == 6
    assert len(list((out / "dpg" / "images").glob("sw*.png"))) == 2


def test_lmms_eval_runs_beside_the_other_parts_only_on_a_cpu(monkeypatch) -> None:
    from eval.config import load_suite_config
    from eval.suite import lmms_threads_beside

    def beside(threads: int, *sets: str) -> int | None:
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        return lmms_threads_beside(load_suite_config("eval_configs/shapeworld.yaml", ["data=d", *sets]))

    assert beside(2, "device=cpu") == 1 and beside(16, "device=cpu") == 8
    assert beside(1, "device=cpu") is None  # one thread: nothing to share
    assert beside(16, "device=cuda") is None  # one copy of the model on the GPU at a time
    assert beside(16, "device=cpu", "lmms_eval.beside=false") is None
    assert beside(16, "device=cpu", "lmms_eval.enabled=false") is None
    alone = ["shapeworld.enabled=false", "grounding.enabled=false", "geneval.enabled=false", "dpg.enabled=false"]
    assert beside(16, "device=cpu", *alone) is None  # nothing to run beside it


def test_eval_configs_validate_and_errors_name_the_field(tmp_path: Path) -> None:
    from eval.config import load_suite_config

    for path in sorted((ROOT / "eval_configs").glob("*.yaml")):
        load_suite_config(path)
    cases = {"geneval:\n  enabled: true\n  colour: 1\n": "geneval.colour: unknown field",
             "shapeworld:\n  enabled: true\n  num_images: many\n": "shapeworld.num_images: expected an integer",
             "shapeworld:\n  enabled: true\n": "shapeworld.enabled: needs the ShapeWorld directory",
             "data: ${NO_SUCH_VAR_FOR_TEST}\nshapeworld:\n  enabled: true\n": "data: environment variable"}
    for text, message in cases.items():
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_suite_config(bad)
    proc = python("-m", "eval.suite", "--checkpoint", "x", "--config", str(bad), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "data: environment variable NO_SUCH_VAR_FOR_TEST" in proc.stderr
    proc = python("-m", "eval.suite", "--checkpoint", str(tmp_path / "none"), "--config", "eval_configs/shapeworld.yaml",
                  "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: --checkpoint {tmp_path / 'none'}: no unified_config.json there; pass the export directory of a "
        "trained stage, e.g. runs/quickstart/mixed/export"]


def test_prompt_limits_keep_every_category(tmp_path: Path) -> None:
    """ShapeWorld and GenEval metadata list each tag's prompts together; a max_prompts smaller than the file must
    still sample every tag (it used to take the first tag only: a "generation overall" of single objects)."""

    tags = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
    path = tmp_path / "geneval_heldin.jsonl"
    path.write_text("".join(json.dumps({"tag": t, "prompt": f"{t} {i}", "include": []}) + "\n"
                            for t in tags for i in range(50)))
    for records in (geneval.read_metadata(path, 12), shapeworld.read_prompts(tmp_path, "heldin", 12)):
        assert [r["tag"] for r in records] == tags * 2
    items, by_id = dpg.shapeworld_prompts(path, 7)
    assert len(items) == 7 and {r["tag"] for r in by_id.values()} == set(tags)
    assert len(geneval.read_metadata(path)) == 300


def test_grounding_check_tells_a_reader_of_the_question_from_one_of_the_image(sw_data: Path, pipe, export: Path,
                                                                                 tmp_path: Path) -> None:
    """A model that answers from the detections and the question's words scores 1.0 on every probe; one that
    ignores the words (first object's colour, always "yes") fails exactly the probes that need them."""
    from eval import grounding

    qs = grounding.grounding_questions(sw_data, "heldin")
    assert {q["probe"] for q in qs} == set(grounding.PROBES)
    reader, blind = [], []
    for q in qs:
        dets = detect(Image.open(q["image_path"]).convert("RGB"))
        words = q["question"].rstrip("?").split()
        if q["probe"] == "colour_of_shape":
            reader.append(next(d.color for d in dets if d.shape == words[-1]))
            blind.append(dets[0].color)
        else:
            reader.append("yes" if any((d.color, d.shape) == (words[-2], words[-1]) for d in dets) else "no")
            blind.append("Yes.")
    assert all(r["accuracy"] == 1.0 for r in grounding.score(qs, reader).values())
    s = grounding.score(qs, blind)
    assert s["presence_present"]["accuracy"] == 1.0 and s["presence_swapped"]["accuracy"] == 0.0
    assert s["presence_absent_colour"]["says_yes"] == 1.0 and s["colour_of_shape"]["any_object_colour"] == 1.0
    assert s["colour_of_shape"]["accuracy"] < 0.8
    mute = grounding.score(qs, ["" for _ in qs])  # a zero rate is reported, not dropped
    assert mute["colour_of_shape"]["any_object_colour"] == 0.0 and mute["presence_swapped"]["says_yes"] == 0.0
    res = grounding.run(export, sw_data, max_scenes=3, out=tmp_path / "g.json", pipe=pipe)
    assert json.loads((tmp_path / "g.json").read_text())["probes"] == res["probes"]
    assert len(res["records"]) == sum(r["n"] for r in res["probes"].values())
