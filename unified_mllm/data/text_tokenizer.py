"""Train a SentencePiece vocabulary on a recipe's text and save it as a Hugging Face tokenizer directory.

    python -m unified_mllm.data.text_tokenizer --recipe data_recipes/shapeworld_mixed.yaml --out DIR --vocab-size 512

The tiny ShapeWorld LLM uses it; real runs use the LLM's own tokenizer. The directory loads with
``AutoTokenizer.from_pretrained(DIR)`` and carries a ChatML chat template. Byte fallback is on: a character the
ShapeWorld text never showed (a capital in a user's question, an emoji) becomes its UTF-8 bytes instead of vanishing,
so every text round-trips; the 256 byte pieces count in the vocabulary size.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from unified_mllm.config import ConfigError, load_recipe
from unified_mllm.data.sources import read_source
from unified_mllm.data.templates import CHATML

TEMPLATE_SYMBOLS = ["<|im_start|>", "<|im_end|>"]
NEWLINE = "\n"
"""A piece of its own, as in real LLM vocabularies. The texts are trained on whole, newlines inside them: trained line
by line, a line's first word is learnt with the word-start mark (``▁Answer``) that it lacks after a newline inside a
turn, so "\\nAnswer" came out as ``A`` + ``nswer`` — the same ``A`` as a multiple-choice option's letter."""
ROLE_LINES = ["<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_start|>system\n"]
"""The ChatML headers as the template writes them, so the role names are learnt as they appear after <|im_start|>."""


def recipe_texts(recipe_path: str, limit: int = 200_000) -> list[str]:
    recipe = load_recipe(recipe_path)
    texts: list[str] = []
    for src in recipe.sources:
        for rec in read_source(src, recipe_path):
            if rec.get("caption"):
                texts.append(str(rec["caption"]))
            for turn in rec.get("conversations") or []:
                if isinstance(turn, dict) and isinstance(turn.get("value"), str):
                    # as encoded: the <image> tag becomes special tokens, so the text after it starts at its newline
                    texts.append(turn["value"].replace("<image>", ""))
            if len(texts) >= limit:
                return texts
    return texts


def train_text_tokenizer(texts: list[str], out: str | Path, vocab_size: int = 512):
    import sentencepiece as spm
    from transformers import AutoTokenizer, LlamaTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sentences = list(texts) + ROLE_LINES * 10
    symbols = TEMPLATE_SYMBOLS + [NEWLINE]
    with tempfile.TemporaryDirectory() as tmp:
        # every character of the corpus, the 256 byte pieces, <unk>/<s>/</s> and the symbols need a slot
        minimum = len(set("".join(sentences)) - {NEWLINE}) + 256 + 3 + len(symbols)
        if vocab_size < minimum:
            print(f"[text_tokenizer] vocabulary size {vocab_size} raised to {minimum} (256 byte-fallback pieces + the "
                  f"corpus characters + special symbols)")
            vocab_size = minimum
        # sentences from an iterator may hold newlines (a corpus file is read line by line); the identity rule keeps
        # them (NFKC folds a newline into a space), so training sees each word as encoding will
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_prefix=str(Path(tmp) / "tokenizer"), vocab_size=vocab_size,
            model_type="bpe", user_defined_symbols=symbols, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, minloglevel=2)
        staging = Path(tmp) / "hf"
        staging.mkdir()
        (staging / "tokenizer.model").write_bytes((Path(tmp) / "tokenizer.model").read_bytes())
        tok = LlamaTokenizer.from_pretrained(str(staging))
    tok.chat_template = CHATML
    tok.save_pretrained(str(out))
    return AutoTokenizer.from_pretrained(str(out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=512)
    a = p.parse_args(argv)
    try:
        texts = recipe_texts(a.recipe)
        tok = train_text_tokenizer(texts, a.out, a.vocab_size)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"text tokenizer with {len(tok)} tokens trained on {len(texts)} texts → {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
