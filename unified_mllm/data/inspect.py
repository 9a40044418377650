"""Print one sample of every recipe source as text with its loss mask: learned text tokens plain, masked ones in
[brackets], image-generation slots (whose WinTok codes the generation head learns) in {braces}, runs of image slots
collapsed.

    python -m unified_mllm.data.inspect --recipe data_recipes/shapeworld_mixed.yaml --tokenizer DIR --wintok DIR
"""

from __future__ import annotations

import argparse
import random
import sys

from unified_mllm.config import ConfigError, load_recipe
from unified_mllm.data.masking import IGNORE
from unified_mllm.data.samples import BadSample, SampleBuilder
from unified_mllm.data.sources import read_source
from unified_mllm.data.templates import resolve_template
from unified_mllm.tokens import add_special_tokens

GEN_SLOT = "<image_gen>"


def render_sample(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    pieces, i = [], 0
    tokens = tokenizer.convert_ids_to_tokens(input_ids)
    while i < len(tokens):
        j = i
        while j + 1 < len(tokens) and tokens[j + 1] == tokens[i] and tokens[i] in ("<image>", "<image_gen>"):
            j += 1
        text = tokens[i] + (f"×{j - i + 1}" if j > i else "")
        if tokens[i] == GEN_SLOT:
            pieces.append(f"{{{text}}}")  # the codes of these slots are the generation head's targets
        else:
            pieces.append(text if labels[i] != IGNORE else f"[{text}]")
        i = j + 1
    return " ".join(pieces)


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    from tokenizer import WinTok

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True)
    p.add_argument("--tokenizer", required=True, help="text tokenizer directory")
    p.add_argument("--wintok", required=True, help="WinTok checkpoint (for the slot counts)")
    p.add_argument("--template", default="auto")
    p.add_argument("--stage", default="sft")
    p.add_argument("--understanding-input", default="semantic", choices=["semantic", "pixel", "both"])
    a = p.parse_args(argv)
    print("legend: learned text tokens plain, [masked], {image codes learned by the generation head}")
    try:
        recipe = load_recipe(a.recipe)
        tok = AutoTokenizer.from_pretrained(a.tokenizer)
        ids, _ = add_special_tokens(tok, "<unconditional>")
        c = WinTok.from_checkpoint(a.wintok).config
        slots = {"semantic": c.num_semantic_tokens, "pixel": c.num_positions,
                 "both": c.num_semantic_tokens + c.num_positions}[a.understanding_input]
        builder = SampleBuilder(tok, ids.to_dict(), slots, c.num_positions, resolve_template(a.template, tok, a.stage),
                                0.0, "<unconditional>")
        for src in recipe.sources:
            rec = next(iter(read_source(src, a.recipe)))
            try:
                sample = builder.build(rec, random.Random(0))
            except BadSample as e:
                print(f"== {src.name} ({src.task}): first record skipped: {e}")
                continue
            n_learn = sum(lab != IGNORE for lab in sample.labels)
            n_codes = sample.input_ids.count(tok.convert_tokens_to_ids(GEN_SLOT))
            codes = f", {n_codes} image positions for the generation head" if n_codes else ""
            print(f"== {src.name} ({src.task}, {src.format}): {len(sample.input_ids)} tokens, {n_learn} learned text "
                  f"tokens{codes}")
            print(render_sample(tok, sample.input_ids, sample.labels))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
