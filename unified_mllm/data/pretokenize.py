"""Encode every image of a recipe once with WinTok into a `datasets` cache keyed by the tokenizer's hash.

    python -m unified_mllm.data.pretokenize --recipe data_recipes/shapeworld_mixed.yaml --wintok runs/quickstart/wintok

``--recipe`` may be repeated: the WinTok is loaded once, and a recipe whose images another finished cache holds
exactly (the ShapeWorld recipes share theirs) gets a copy of that cache.

Writes ``<root>/<recipe stem>/<wintok hash>/`` (root: the recipe's pretokenize_dir, else runs/pretokenized) with
columns ``key`` (image path, or ``sha1:`` of encoded image bytes), ``digest`` (``sha1:`` of the image's bytes, so a
dataset moved elsewhere still finds its rows), ``pixel_codes`` (C × P int16) and ``semantic`` (N × D float16). Resumable: finished
shards under ``.shards/`` are kept and skipped; unreadable images are counted and logged, never fatal.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from unified_mllm.config import ConfigError, load_recipe
from unified_mllm.data.image_features import content_digest, image_key, read_image
from unified_mllm.data.samples import BadSample
from unified_mllm.data.sources import read_source

SHARD = 4096


def cache_dir_for(recipe_path: str, recipe, wintok_hash: str) -> Path:
    """``<root>/<recipe stem>/<wintok hash>``; root: the recipe's pretokenize_dir, else $UMLLM_PRETOKENIZED, else
    runs/pretokenized."""
    root = Path(recipe.pretokenize_dir or os.environ.get("UMLLM_PRETOKENIZED") or "runs/pretokenized")
    return root / Path(recipe_path).stem / wintok_hash


def sibling_caches(out: Path):
    """(path, dataset) of every other recipe's finished cache for the same WinTok (same root and hash)."""
    import datasets

    for other in sorted(out.parent.parent.glob(f"*/{out.name}")):
        if other != out and (other / "dataset_info.json").is_file():
            yield other, datasets.load_from_disk(str(other))


def encoded_elsewhere(out: Path) -> dict[str, tuple]:
    """Features of images already in another recipe's finished cache for the same WinTok (same root and hash):
    key → (digest or None for a cache from before digests, pixel_codes, semantic). Recipes that share images (the
    ShapeWorld ones all do) encode them once."""
    known: dict[str, tuple] = {}
    for _, ds in sibling_caches(out):
        ds = ds.with_format("numpy")
        digests = ds["digest"] if "digest" in ds.column_names else [None] * len(ds)
        for key, digest, codes, sem in zip(ds["key"], digests, ds["pixel_codes"], ds["semantic"]):
            known.setdefault(str(key), (digest and str(digest), codes, sem))
    return known


def same_images_elsewhere(out: Path, refs: list[str]) -> Path | None:
    """Another recipe's finished cache for the same WinTok (same root and hash) holding exactly the images ``refs``
    (sorted keys), with digests: its rows are this recipe's rows, so the cache is copied, not rebuilt row by row."""
    for other, ds in sibling_caches(out):
        if len(ds) == len(refs) and "digest" in ds.column_names and sorted(map(str, ds["key"])) == refs:
            return other
    return None


def with_digests(shard, by_key: dict):
    """A shard finished by an older version (no ``digest`` column) gets one, so it joins the new shards."""
    if "digest" in shard.column_names:
        return shard
    return shard.add_column("digest", [content_digest(by_key.get(k, k)) for k in shard["key"]])


def resolve_workers(workers: int, wintok) -> int:
    """``workers`` processes to encode shards in; 0: one per CPU core when WinTok is on the CPU, else 1. The tiny
    WinTok's ops are too small for two threads to pay (1,016 images/s on one thread, 1,299 on two); two processes
    of one thread encoded the quickstart's 50,000 images in 34.5–34.8 s against 36.1–43.3 s for one process on two
    threads, the same codes to the bit (NOTES.md, session 27)."""
    if workers > 0:
        return workers
    on_cpu = all(p.device.type == "cpu" for p in wintok.parameters())
    return max(1, os.cpu_count() or 1) if on_cpu else 1


def worker_start_method(threads: int) -> str:
    """How the encoding workers start: forked from this process where that is safe — Linux, one intra-op thread a
    worker (a forked child must not use the parent's OpenMP thread pool), no CUDA context — so they inherit the loaded
    WinTok and its imports instead of importing them again (the quickstart's 50,000 images, alternated pairs: 42.1 /
    50.0 s against 53.6 / 56.9 s with spawned workers, the same cache to the bit; NOTES.md, session 31); spawned
    otherwise."""
    import multiprocessing

    safe = (sys.platform == "linux" and threads == 1 and not torch.cuda.is_initialized()
            and "fork" in multiprocessing.get_all_start_methods())
    return "fork" if safe else "spawn"


_WORKER_WINTOK = None


def _init_worker(wintok, threads: int) -> None:
    global _WORKER_WINTOK
    torch.set_num_threads(threads)
    _WORKER_WINTOK = wintok


def _encode_shard_job(job: tuple) -> tuple[int, int]:
    return encode_shard(_WORKER_WINTOK, *job)


def encode_shard(wintok, shard_dir: Path, by_key: dict, known: dict, batch_size: int) -> tuple[int, int]:
    """Encode the images ``by_key`` (key → reference, in shard order) into the finished shard ``shard_dir``, taking
    the rows of ``known`` keys from another cache. Returns (skipped unreadable images, reused rows)."""
    from tokenizer import preprocess

    rows = {"key": [], "digest": [], "pixel_codes": [], "semantic": []}
    part = list(by_key)
    skipped = reused = 0
    for b in range(0, len(part), batch_size):
        images, keys, digests = [], [], []
        for key in part[b:b + batch_size]:
            if key in known:
                digest, codes, sem = known[key]
                rows["key"].append(key)
                rows["digest"].append(digest or content_digest(by_key[key]))
                rows["pixel_codes"].append(codes)
                rows["semantic"].append(sem)
                reused += 1
                continue
            try:
                image, digest = read_image(by_key[key])
                images.append(image)
                keys.append(key)
                digests.append(digest)
            except BadSample as e:
                skipped += 1
                print(f"skipped: {e}", file=sys.stderr)
        if not images:
            continue
        with torch.inference_mode():
            enc = wintok.encode(preprocess(images, wintok.config.image_size))
        rows["key"] += keys
        rows["digest"] += digests
        rows["pixel_codes"] += [c.to(torch.int16).numpy() for c in enc.pixel_codes]
        rows["semantic"] += [s.to(torch.float16).numpy() for s in enc.semantic_tokens]
    import datasets

    tmp = shard_dir.with_suffix(".tmp")
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp))
    tmp.rename(shard_dir)  # a shard exists only once complete
    return skipped, reused


def pretokenize(recipe_path: str, wintok, batch_size: int = 64, out_root: str | None = None,
                workers: int = 1) -> tuple[Path, dict]:
    import datasets

    recipe = load_recipe(recipe_path)
    if out_root:
        recipe.pretokenize_dir = out_root
    out = cache_dir_for(recipe_path, recipe, wintok.identity_hash())
    if out.is_dir():
        return out, {"images": len(datasets.load_from_disk(str(out))), "skipped": 0, "cached": True}
    by_key = {image_key(r["image"]): r["image"] for s in recipe.sources for r in read_source(s, recipe_path)
              if isinstance(r.get("image"), (str, Path, bytes))}
    refs = sorted(by_key)
    twin = same_images_elsewhere(out, refs)
    if twin is not None:
        t0 = time.time()
        tmp = out.with_name(out.name + ".copy")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(twin, tmp)
        tmp.rename(out)  # complete or absent
        shutil.rmtree(out.parent / (out.name + ".shards"), ignore_errors=True)  # of an earlier run stopped part-way
        return out, {"images": len(refs), "skipped": 0, "copied_from": str(twin), "seconds": round(time.time() - t0, 1)}
    shards = out.parent / (out.name + ".shards")
    shards.mkdir(parents=True, exist_ok=True)
    known = encoded_elsewhere(out)
    t0 = time.time()
    todo = [(shards / f"{start // SHARD:05d}", refs[start:start + SHARD]) for start in range(0, len(refs), SHARD)]
    todo = [(d, part) for d, part in todo if not d.is_dir()]
    jobs = [(d, {k: by_key[k] for k in part}, {k: known[k] for k in part if k in known}, batch_size) for d, part in todo]
    workers = min(resolve_workers(workers, wintok), len(jobs))
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        threads = max(1, (os.cpu_count() or 1) // workers)
        context = multiprocessing.get_context(worker_start_method(threads))
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                 initargs=(wintok, threads)) as pool:
            counts = list(pool.map(_encode_shard_job, jobs))
    else:
        counts = [encode_shard(wintok, *job) for job in jobs]
    skipped, reused = sum(c[0] for c in counts), sum(c[1] for c in counts)
    parts = [with_digests(datasets.load_from_disk(str(p)), by_key) for p in sorted(shards.iterdir())
             if p.suffix != ".tmp"]
    full = datasets.concatenate_datasets(parts) if parts else datasets.Dataset.from_dict(
        {"key": [], "digest": [], "pixel_codes": [], "semantic": []})
    full.save_to_disk(str(out))
    shutil.rmtree(shards)
    return out, {"images": len(full), "skipped": skipped, "reused": reused, "workers": max(workers, 1),
                 "seconds": round(time.time() - t0, 1), "images_per_s": round(len(full) / max(time.time() - t0, 1e-9), 1)}


def main(argv: list[str] | None = None) -> int:
    from tokenizer import WinTok, WinTokLoadError

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, action="append", help="a data recipe; repeat it for several (their "
                   "shared images are encoded once)")
    p.add_argument("--wintok", required=True, help="WinTok checkpoint (dir, .pth or .safetensors)")
    p.add_argument("--out", default=None, help="cache root (default: the recipe's pretokenize_dir or runs/pretokenized)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="processes encoding shards (0: one per CPU core when WinTok "
                   "runs on the CPU, each on its share of the threads; 1: this process)")
    a = p.parse_args(argv)
    try:
        wintok = WinTok.from_checkpoint(a.wintok).freeze()
        for recipe in dict.fromkeys(a.recipe):
            out, stats = pretokenize(recipe, wintok, a.batch_size, a.out, a.workers)
            print(f"pretokenized → {out}: {stats}", flush=True)
    except (ConfigError, WinTokLoadError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
