"""Local lmms-eval tasks built from ShapeWorld test questions, in the formats of real lmms-eval tasks.

    python -m eval.shapeworld_tasks --data runs/quickstart/data/shapeworld --out runs/eval/lmms_tasks
    python -m lmms_eval --model unified_mllm --model_args pretrained=DIR --include_path runs/eval/lmms_tasks \\
        --tasks shapeworld_pope_heldin,shapeworld_vqa_heldin,shapeworld_mmbench_heldin --output_path runs/eval/lmms

Each task is a YAML file beside a parquet file (images embedded, Hugging Face ``Image`` feature), read with
``dataset_path: parquet`` — no hub access. The fields, prompts and scoring are those of the real tasks, and the
scoring functions are lmms-eval's own (imported with ``!function lmms_eval.tasks....``):

| task | format of | questions | metrics (lmms-eval functions) |
|---|---|---|---|
| ``shapeworld_pope_<split>`` | ``pope`` | presence yes/no | pope_accuracy / precision / recall / f1 / yes_ratio |
| ``shapeworld_vqa_<split>`` | ``textvqa_val`` | counting, colour, shape, position | exact_match (VQA accuracy over 10 answers) |
| ``shapeworld_mmbench_<split>`` | ``mmbench_en_dev_static`` | multiple choice | gpt_eval_score (MMBench static matching, no GPT) |
| ``shapeworld_mc_<split>`` | ``output_type: multiple_choice`` | multiple choice | acc, acc_norm (from log-likelihoods) |

The ``shapeworld_mc_*`` tasks score answers by log-likelihood, so they need the simple model class
(``--force_simple``); the others run with either class. Their options are scored as the model answers them: the
letter right after the assistant prompt (``target_delimiter: ""``; lmms-eval's default " A" is a token the model
never puts there).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unified_mllm.shapeworld.text import SHORT_ANSWER

KINDS = ("pope", "vqa", "mmbench", "mc")
SPLITS = ("heldin", "heldout")
VQA_CATEGORIES = ("counting", "color", "shape", "position")
LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."

_YAML = {
    "pope": """\
task: {name}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {name}.parquet
test_split: test
output_type: generate_until
doc_to_visual: !function lmms_eval.tasks.pope.utils.pope_doc_to_visual
doc_to_text: !function lmms_eval.tasks.pope.utils.pope_doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 8
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
process_results: !function lmms_eval.tasks.pope.utils.pope_process_results
metric_list:
  - metric: pope_accuracy
    aggregation: !function lmms_eval.tasks.pope.utils.pope_aggregate_accuracy
    higher_is_better: true
  - metric: pope_precision
    aggregation: !function lmms_eval.tasks.pope.utils.pope_aggregate_precision
    higher_is_better: true
  - metric: pope_recall
    aggregation: !function lmms_eval.tasks.pope.utils.pope_aggregate_recall
    higher_is_better: true
  - metric: pope_f1_score
    aggregation: !function lmms_eval.tasks.pope.utils.pope_aggregate_f1_score
    higher_is_better: true
  - metric: pope_yes_ratio
    aggregation: !function lmms_eval.tasks.pope.utils.pope_aggregate_yes_ratio
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: {short}
metadata:
  version: 0.0
""",
    "vqa": """\
task: {name}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {name}.parquet
test_split: test
output_type: generate_until
doc_to_visual: !function lmms_eval.tasks.textvqa.utils.textvqa_doc_to_visual
doc_to_text: !function lmms_eval.tasks.textvqa.utils.textvqa_doc_to_text
doc_to_target: "answer"
generation_kwargs:
  until:
    - "ASSISTANT:"
  max_new_tokens: 8
  temperature: 0
  do_sample: false
process_results: !function lmms_eval.tasks.textvqa.utils.textvqa_process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
  - metric: submission
    aggregation: !function lmms_eval.tasks.textvqa.utils.textvqa_aggregate_submissions
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: {short}
    ocr: false
metadata:
  version: 0.0
""",
    "mmbench": """\
task: {name}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {name}.parquet
test_split: test
output_type: generate_until
doc_to_visual: !function lmms_eval.tasks.mmbench.en_utils.mmbench_doc_to_visual
doc_to_text: !function lmms_eval.tasks.mmbench.en_utils.mmbench_doc_to_text
doc_to_target: "answer"
generation_kwargs:
  until:
    - "ASSISTANT:"
  max_new_tokens: 8
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
process_results: !function lmms_eval.tasks.mmbench.en_utils.mmbench_process_results
metric_list:
  - metric: gpt_eval_score
    aggregation: !function lmms_eval.tasks.mmbench.en_utils.mmbench_aggregate_dev_results_static
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: {letter}
metadata:
  version: 0.0
""",
    "mc": """\
task: {name}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {name}.parquet
test_split: test
output_type: multiple_choice
doc_to_visual: !function lmms_eval.tasks.pope.utils.pope_doc_to_visual
doc_to_text: "prompt"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "label"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
""",
}


def task_name(kind: str, split: str) -> str:
    return f"shapeworld_{kind}_{split}"


def _read_questions(data: Path, split: str) -> list[dict]:
    path = data / f"vqa_{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; write ShapeWorld data with "
                                f"`python -m unified_mllm.shapeworld --out {data}`")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None
    return rows


def _image(data: Path, row: dict) -> dict:
    path = data / row["image"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} (question {row['id']}) not found; regenerate the ShapeWorld data")
    return {"bytes": path.read_bytes(), "path": path.name}


def _records(kind: str, rows: list[dict], data: Path) -> list[dict]:
    out = []
    for i, r in enumerate(rows):
        cat = r["category"]
        if kind == "pope" and cat == "presence":
            out.append({"question_id": r["id"], "question": r["question"], "answer": r["answer"],
                        "category": r["spec"].get("sampling", "random"), "image_source": r["image"],
                        "image": _image(data, r)})
        elif kind == "vqa" and cat in VQA_CATEGORIES:
            out.append({"question_id": r["id"], "question": r["question"], "answers": [r["answer"]] * 10,
                        "answer": r["answer"], "category": cat, "image": _image(data, r)})
        elif kind in ("mmbench", "mc") and cat == "multiple_choice":
            choices = r["spec"]["choices"]
            stem = r["question"].split("\n")[0]
            rec = {"index": i, "question": stem, "hint": "nan", "answer": r["answer"],
                   "A": choices.get("A", "nan"), "B": choices.get("B", "nan"), "C": choices.get("C", "nan"),
                   "D": choices.get("D", "nan"), "category": r["spec"].get("base", "multiple_choice"),
                   "L2-category": "shapeworld", "source": "shapeworld", "split": "dev", "image": _image(data, r)}
            if kind == "mc":
                options = "\n".join(f"{k}. {v}" for k, v in sorted(choices.items()))
                rec = {"question_id": r["id"], "prompt": f"{stem}\n{options}{LETTER_ANSWER}",
                       "label": "ABCD".index(r["answer"]), "answer": r["answer"], "category": rec["category"],
                       "image": rec["image"]}
            out.append(rec)
    return out


def write_tasks(data: str | Path, out: str | Path, splits: tuple[str, ...] = SPLITS,
                kinds: tuple[str, ...] = KINDS, max_per_task: int | None = None) -> dict[str, int]:
    """Write ``<task>.yaml`` + ``<task>.parquet`` for each kind and split into ``out``; returns task → size."""
    import datasets

    datasets.disable_progress_bars()
    data, out = Path(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split in splits:
        rows = _read_questions(data, split)
        for kind in kinds:
            if kind not in KINDS:
                raise ValueError(f"unknown ShapeWorld task kind {kind!r} (valid: {', '.join(KINDS)})")
            recs = _records(kind, rows, data)[:max_per_task]
            if not recs:
                raise ValueError(f"{data}/vqa_{split}.jsonl has no questions for the {kind} task")
            name = task_name(kind, split)
            features = {k: datasets.Value("string") for k in recs[0]}
            features["image"] = datasets.Image()
            if "answers" in recs[0]:
                features["answers"] = datasets.Sequence(datasets.Value("string"))
            for k in ("index", "label"):
                if k in recs[0]:
                    features[k] = datasets.Value("int64")
            ds = datasets.Dataset.from_list(recs, features=datasets.Features(features))
            ds.to_parquet(str(out / f"{name}.parquet"))
            (out / f"{name}.yaml").write_text(_YAML[kind].format(name=name, short=json.dumps(SHORT_ANSWER), letter=json.dumps(LETTER_ANSWER)))
            sizes[name] = len(recs)
    (out / "tasks.json").write_text(json.dumps(sizes, indent=1))
    return sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="ShapeWorld directory (python -m unified_mllm.shapeworld --out ...)")
    p.add_argument("--out", required=True, help="directory for the task YAMLs and parquet files (--include_path)")
    p.add_argument("--splits", default=",".join(SPLITS), help="comma-separated: heldin, heldout")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated task kinds: {', '.join(KINDS)}")
    p.add_argument("--max-per-task", type=int, default=None, help="at most this many questions per task")
    a = p.parse_args(argv)
    try:
        sizes = write_tasks(a.data, a.out, tuple(a.splits.split(",")), tuple(a.kinds.split(",")), a.max_per_task)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, n in sizes.items():
        print(f"{name}: {n} questions")
    print(f"--include_path {a.out} --tasks {','.join(sizes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
