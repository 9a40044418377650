"""Training throughput, model FLOP utilisation and ZeRO memory of the stage trainer, in one run.

    python scripts/bench/train.py [--quick] [--json OUT] [--profile OUT.txt] [--repeats 2] ...

1. **Tokens/s against the plain alternative.** Our step (``StageTrainer.train_step``: pretokenized WinTok features,
   sequence packing, ``sdpa_packed`` attention, DeepSpeed ZeRO-2) against the Hugging Face ``Trainer`` on the same
   model (same config and seed; plain ``sdpa``) and the same records, with padded batches and WinTok run online in
   the data collator — what a LLaVA/LLaMA-Factory user has. Both count only real (non-pad) tokens and time whole
   optimizer steps including data loading; the Trainer gets as many samples per step as our packed micro-batches
   carry on average. The two run in two processes that take turns, one step each (so both see the same machine
   load); ``--repeats`` such pairs of processes, the ratio taken within each pair.
2. **MFU** = achieved FLOP/s of our step ÷ the FLOP/s of a large fp32 ``torch.matmul`` (2048³) timed in the same
   process between the steps (median). FLOPs of a step = every matmul of its forward and backward pass counted by
   ``torch.utils.flop_counter.FlopCounterMode`` (LLM, LM head, projector, generation embedding and depth head —
   replayed afterwards on the very batches that were timed) + the LLM's attention counted analytically, because
   FlopCounterMode does not count CPU sdpa: per layer 12 · d_attn · Σ_docs n(n+1)/2 (QKᵀ and AV at 2 FLOPs per
   multiply-add, causal within each packed document, backward = 2 × forward; d_attn = heads × head_dim). Optimizer
   and element-wise FLOPs are not counted. Reported beside it: the classic 6 · N · tokens (N = LLM parameters incl.
   the LM head) and ``attention_dense_mask_flops``, what plain sdpa computes under the dense packed mask.
3. **Peak memory per process** for ZeRO-2, ZeRO-3 and ZeRO-3 + CPU offload (``stage_configs/deepspeed/*.json``) at
   a larger LLM (``--zero-*`` flags): each mode in its own processes (``--zero-procs`` ranks with RANK/WORLD_SIZE/
   MASTER_ADDR/MASTER_PORT set), the peak RSS over the whole process (``ru_maxrss``) and sampled during the training
   steps only. The offload mode compiles DeepSpeed's cpu_adam once (~90 s, cached afterwards).

Data, the text tokenizer, a random-init WinTok at the ShapeWorld preset and its pretokenize cache are made under
``--workdir`` once and reused. ``--quick`` is a < 2 min smoke run (small data, few steps, one ZeRO rank).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# The ShapeWorld WinTok preset of stage_configs/tokenizer.yaml (random weights: throughput does not depend on them).
WINTOK_PRESET = dict(image_size=64, patch_size=8, hidden_size=64, num_layers=2, decoder_num_layers=2, semantic_dim=128,
                     num_semantic_tokens=16, codebook_size=256)
ZERO_MODES = ("zero2", "zero3", "zero3_offload")


# --------------------------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def matmul_flops(n: int = 2048, repeats: int = 3) -> float:
    """Best FLOP/s of an fp32 (n × n) @ (n × n) matmul."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the lifetime peak
        return maxrss_bytes()


def maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


class RssSampler:
    """Peak resident memory of this process between start() and stop(), sampled every ``period`` seconds."""

    def __init__(self, period: float = 0.005):
        self.period, self.peak, self._stop = period, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.period)

    def start(self) -> RssSampler:
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss_bytes())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def arch_set(a: dict) -> str:
    return "model.llm.arch={" + ", ".join(f"{k}: {v}" for k, v in a.items()) + "}"


def llm_arch(args, prefix: str = "") -> dict:
    g = lambda name: getattr(args, prefix + name)  # noqa: E731
    return {"model_type": "qwen2", "hidden_size": g("hidden"), "intermediate_size": g("intermediate"),
            "num_hidden_layers": g("layers"), "num_attention_heads": g("heads"), "num_key_value_heads": g("kv_heads"),
            "max_position_embeddings": max(1024, args.max_seq_len), "rope_theta": 10000.0,
            "tie_word_embeddings": True}


def stage_overrides(world: dict, arch: dict, out: Path, micro_batch: int, max_seq_len: int, zero: str) -> list[str]:
    return [arch_set(arch), "model.init_from=null", f"model.wintok={world['wintok']}",
            f"model.llm.text_tokenizer={world['tok']}", "model.llm.attn_implementation=auto",
            f"optim.micro_batch_size={micro_batch}", f"data.max_seq_len={max_seq_len}", "data.num_workers=0",
            "optim.max_steps=1000", f"deepspeed.config=stage_configs/deepspeed/{zero}.json",
            f"checkpoint.output_dir={out}", "checkpoint.resume=never", "logging.tensorboard=false",
            "logging.progress_bar=false", "logging.jsonl=false"]


# ------------------------------------------------------------------------------------------ the world
def prepare(workdir: Path, scenes: int) -> dict:
    """ShapeWorld data, text tokenizer, WinTok (ShapeWorld preset, random init) and its pretokenize cache."""
    workdir.mkdir(parents=True, exist_ok=True)
    data, tok, wintok = workdir / f"sw{scenes}", workdir / f"tok{scenes}", workdir / "wintok"
    pretok = workdir / f"pretok{scenes}"  # the cache key is recipe stem + WinTok hash: one cache per scene count
    env = {**os.environ, "SHAPEWORLD_DIR": str(data), "UMLLM_PRETOKENIZED": str(pretok),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    steps = []
    if not (data / "t2i_train.jsonl").is_file():
        steps.append(["-m", "unified_mllm.shapeworld", "--out", str(data), "--num", str(scenes), "--num-test", "10",
                      "--prompts-per-tag", "2", "--workers", "1"])
    if not (tok / "tokenizer_config.json").is_file():
        steps.append(["-m", "unified_mllm.data.text_tokenizer", "--recipe", "data_recipes/shapeworld_mixed.yaml",
                      "--out", str(tok), "--vocab-size", "512"])
    for cmd in steps:
        subprocess.run([sys.executable, *cmd], check=True, cwd=ROOT, env=env, capture_output=True, timeout=600)
    if not (wintok / "config.json").is_file():
        import torch

        from tokenizer import WinTok, WinTokConfig

        torch.manual_seed(0)
        WinTok(WinTokConfig.tiny(**WINTOK_PRESET)).save_pretrained(wintok)
    subprocess.run([sys.executable, "-m", "unified_mllm.data.pretokenize", "--recipe",
                    "data_recipes/shapeworld_mixed.yaml", "--wintok", str(wintok), "--out", str(pretok)],
                   check=True, cwd=ROOT, env=env, capture_output=True, timeout=1200)
    return {"data": str(data), "tok": str(tok), "wintok": str(wintok), "env": env}


class Worker:
    """A benchmark process that runs one timed step each time it is told ``go`` (so our step and the Hugging Face
    step alternate under the same machine load) and writes its figures to a JSON file on ``end``."""

    def __init__(self, kind: str, spec: dict, env: dict, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.kind, self.result = kind, out_dir / f"{kind}_result.json"
        self.result.unlink(missing_ok=True)
        self.log = out_dir / f"{kind}.log"
        read_fd, write_fd = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--spec", json.dumps(spec),
             "--worker-out", str(self.result)], cwd=ROOT, env={**env, "UMLLM_BENCH_FD": str(write_fd)},
            stdin=subprocess.PIPE, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, text=True,
            pass_fds=(write_fd,))
        os.close(write_fd)
        self.status = os.fdopen(read_fd)

    def wait(self) -> str:
        """Block until the worker reports ``done``; returns what follows it on the line."""
        line = self.status.readline().strip()
        if not line.startswith("done"):
            self.proc.wait()
            raise RuntimeError(f"{self.kind} worker failed (exit {self.proc.returncode}); its log "
                               f"{self.log}:\n{self.log.read_text()[-4000:]}")
        return line[4:].strip()

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def go(self) -> None:
        self.send("go")
        self.wait()

    def end(self) -> dict:
        self.proc.stdin.write("end\n")
        self.proc.stdin.close()
        self.proc.wait()
        if self.proc.returncode != 0 or not self.result.is_file():
            raise RuntimeError(f"{self.kind} worker failed (exit {self.proc.returncode}); its log "
                               f"{self.log}:\n{self.log.read_text()[-4000:]}")
        return json.loads(self.result.read_text())


class Conductor:
    """The worker side of :class:`Worker`: ``done`` after set-up and after each step, wait for ``go``."""

    def __init__(self):
        self.out = os.fdopen(int(os.environ["UMLLM_BENCH_FD"]), "w")

    def done(self, payload: str = "") -> None:
        self.out.write(f"done {payload}\n")
        self.out.flush()

    def next(self) -> str:
        return sys.stdin.readline().strip()


def paired(spec: dict, env: dict, out_dir: Path) -> tuple[dict, dict]:
    """Our step and the HF Trainer's step, alternating one step at a time after both have warmed up."""
    ours, hf = Worker("ours", spec, env, out_dir), Worker("hf", spec, env, out_dir)
    try:
        samples_per_step = float(ours.wait())  # set up and warmed up; HF builds meanwhile, then learns its batch
        hf.send(str(spec.get("hf_batch_size") or max(1, round(samples_per_step))))
        hf.wait()
        for _ in range(spec["steps"]):
            ours.go()
            hf.go()
        return ours.end(), hf.end()
    finally:
        for w in (ours, hf):
            if w.proc.poll() is None:
                w.proc.kill()


# -------------------------------------------------------------------------------------- our training step
def attention_flops(batch: dict, pad_id: int, n_layers: int, d_attn: int) -> tuple[float, float]:
    """(useful, dense) attention FLOPs of one forward + backward: causal within each packed document, and the dense
    (width × width) scores that plain sdpa computes under a packed block-diagonal mask (for comparison)."""
    ids, pos = batch["input_ids"], batch["position_ids"]
    useful = 0.0
    for row_ids, row_pos in zip(ids.tolist(), pos.tolist()):
        real = [p for t, p in zip(row_ids, row_pos) if t != pad_id]
        starts = [i for i, p in enumerate(real) if p == 0] + [len(real)]
        useful += sum((b - a) * (b - a + 1) / 2 for a, b in zip(starts, starts[1:]))
    dense = ids.shape[0] * ids.shape[1] ** 2
    return 12.0 * n_layers * d_attn * useful, 12.0 * n_layers * d_attn * dense


def count_step_flops(cfg, batches: list[dict]) -> float:
    """Matmul FLOPs of forward + backward of each batch on a fresh copy of the model (FlopCounterMode)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from unified_mllm.training import build
    from unified_mllm.training.freeze import apply_trainables

    torch.manual_seed(cfg.seed)
    model, _, new_ids = build.build_model(cfg, {})
    apply_trainables(model, cfg.train, new_ids)
    model.train()
    total = 0.0
    for batch in batches:
        with FlopCounterMode(display=False) as fc:
            out = model(**build.model_inputs(batch, "cpu"), touch_unused=True)
            out.loss.backward()
        model.zero_grad(set_to_none=True)
        total += fc.get_total_flops()
    return total


def worker_ours(spec: dict) -> dict:
    import torch

    from unified_mllm.config import load_stage_config
    from unified_mllm.training import build
    from unified_mllm.training.trainer import StageTrainer

    conductor = Conductor()
    cfg = load_stage_config("mixed", None, spec["overrides"])
    trainer = StageTrainer(cfg)
    pad_id = trainer.pad_id
    # samples per packed micro-batch (the HF Trainer gets this many per step), from a separate copy of the stream
    probe = build.build_data(cfg, trainer.model, trainer.tokenizer, 0, 1)
    samples_per_step = statistics.mean(int((next(probe)["position_ids"] == 0).sum()) for _ in range(16))
    del probe
    recorded: list[dict] = []

    def stream():
        for batch in trainer.loader:
            recorded.append(batch)
            yield batch

    it = stream()
    for _ in range(spec["warmup"]):
        trainer.train_step(it)
    recorded.clear()
    peaks = [matmul_flops()]
    prof = None
    if spec.get("profile"):
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CPU])
        prof.__enter__()
    times, tokens = [], []
    conductor.done(str(samples_per_step))
    while conductor.next() == "go":
        t0 = time.perf_counter()
        m = trainer.train_step(it)
        times.append(time.perf_counter() - t0)
        tokens.append(m["tokens"])
        if prof is None:
            peaks.append(matmul_flops(repeats=1))  # the matmul rate under the same load as the steps
        conductor.done()
    elapsed = sum(times)
    if prof is not None:
        prof.__exit__(None, None, None)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60)
        Path(spec["profile"]).write_text(f"our training step: {len(times)} steps, {elapsed:.2f} s, "
                                         f"{sum(tokens) / elapsed:.0f} tokens/s\n{table}\n")
    peaks.append(matmul_flops())
    positions = sum(b["input_ids"].numel() for b in recorded)
    samples = sum(int(((b["position_ids"] == 0) & (b["input_ids"] != pad_id)).sum()) for b in recorded)
    llm = cfg.model.llm.arch
    head_dim = llm["hidden_size"] // llm["num_attention_heads"]
    d_attn = llm["num_attention_heads"] * head_dim
    useful_attn = dense_attn = 0.0
    for b in recorded:
        u, d = attention_flops(b, pad_id, llm["num_hidden_layers"], d_attn)
        useful_attn, dense_attn = useful_attn + u, dense_attn + d
    matmul = count_step_flops(cfg, recorded)
    n_llm = sum(p.numel() for n, p in trainer.model.llm.named_parameters() if "embed_tokens" not in n)
    n_llm += trainer.model.llm.get_input_embeddings().weight.numel()  # the tied LM head is a matmul per token
    peak = statistics.median(peaks)
    flops = matmul + useful_attn
    total_tokens = sum(tokens)
    return {"tokens": total_tokens, "seconds": elapsed, "steps": len(times), "tokens_per_s": total_tokens / elapsed,
            "step_seconds": times, "step_tokens": tokens,
            "samples_per_step": samples / len(times), "pad_fraction": 1 - total_tokens / max(positions, 1),
            "matmul_flops_per_s": peak, "matmul_flops_per_s_samples": peaks, "step_matmul_flops": matmul,
            "attention_useful_flops": useful_attn, "attention_dense_mask_flops": dense_attn,
            "flops": flops, "achieved_flops_per_s": flops / elapsed, "mfu": flops / elapsed / peak,
            "six_n_t_flops": 6.0 * n_llm * total_tokens, "llm_params": n_llm,
            "params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------ the Hugging Face baseline
def worker_hf(spec: dict) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from tokenizer import preprocess
    from unified_mllm.config import load_recipe, load_stage_config
    from unified_mllm.data.image_features import open_image
    from unified_mllm.data.masking import IGNORE
    from unified_mllm.data.samples import SampleBuilder
    from unified_mllm.data.sources import read_source
    from unified_mllm.data.templates import resolve_template
    from unified_mllm.training import build
    from unified_mllm.training.freeze import apply_trainables

    conductor = Conductor()
    cfg = load_stage_config("mixed", None, spec["overrides"] + ["model.llm.attn_implementation=sdpa"])  # plain
    torch.manual_seed(cfg.seed)
    model, tokenizer, new_ids = build.build_model(cfg, {})
    apply_trainables(model, cfg.train, new_ids)
    wintok = model.wintok
    builder = SampleBuilder(tokenizer, model.config.special_ids, model.config.num_und_slots,
                            model.config.vision.num_positions, resolve_template(cfg.data.template, tokenizer, cfg.stage),
                            cfg.data.cfg.drop_prob, cfg.data.cfg.uncond_prompt)
    recipe = load_recipe(cfg.data.recipe)
    records = [r for s in recipe.sources for r in read_source(s, cfg.data.recipe)]
    pad_id = model.config.special_ids["pad_id"]

    def collate(recs: list[dict]) -> dict:
        """Tokenize, run WinTok online on the batch's images, pad to the longest sample."""
        samples = [builder.build(r, random.Random(f"{cfg.data.seed}:{r['source']}:{r['index']}")) for r in recs]
        und = [ref for s in samples for ref in s.und_images]
        gen = [ref for s in samples for ref in s.gen_images]
        batch: dict = {}
        if und or gen:
            wintok.eval()
            with torch.inference_mode():
                enc = wintok.encode(preprocess([open_image(r) for r in und + gen], wintok.config.image_size))
            if und:
                batch["und_semantic"] = enc.semantic_tokens[:len(und)].clone()
                batch["und_pixel_codes"] = enc.pixel_codes[:len(und)].clone()
            if gen:
                batch["gen_codes"] = enc.pixel_codes[len(und):].clone()
        width = max(len(s.input_ids) for s in samples)
        batch["input_ids"] = torch.tensor([s.input_ids + [pad_id] * (width - len(s.input_ids)) for s in samples])
        batch["labels"] = torch.tensor([s.labels + [IGNORE] * (width - len(s.labels)) for s in samples])
        batch["attention_mask"] = torch.tensor([[1] * len(s.input_ids) + [0] * (width - len(s.input_ids))
                                                for s in samples])
        return batch

    batch_size = int(conductor.next())  # as many samples per step as our packed micro-batches carry
    times: list[float] = []
    step_tokens: list[float] = []
    positions: list[int] = []
    warmup, go = spec["warmup"], {"t": 0.0}

    class Clock(TrainerCallback):
        """After the warm-up: report each step done, then wait for the next go (data loading counts in the step)."""

        def on_step_end(self, args, state, control, **kw):
            if state.global_step > warmup:
                times.append(time.perf_counter() - go["t"])
            if state.global_step >= warmup:
                conductor.done()
                if conductor.next() != "go":
                    control.should_training_stop = True
                go["t"] = time.perf_counter()

    class PlainTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(**inputs)
            return (out.loss, out) if return_outputs else out.loss

        def training_step(self, model, inputs, num_items_in_batch=None):
            step_tokens.append(float(inputs["attention_mask"].sum()))
            positions.append(inputs["attention_mask"].numel())
            return super().training_step(model, inputs, num_items_in_batch)

    total = warmup + spec["steps"]
    targs = TrainingArguments(
        output_dir=spec["out_dir"], use_cpu=True, per_device_train_batch_size=batch_size,
        max_steps=total + 1, learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.betas[0], adam_beta2=cfg.optim.betas[1], max_grad_norm=cfg.optim.grad_clip,
        lr_scheduler_type="cosine", warmup_steps=max(1, total // 20), optim="adamw_torch", save_strategy="no",
        report_to=[], logging_steps=10_000, disable_tqdm=True, remove_unused_columns=False,
        dataloader_num_workers=0, seed=cfg.seed, data_seed=cfg.data.seed)
    trainer = PlainTrainer(model=model, args=targs, train_dataset=records, data_collator=collate,
                           callbacks=[Clock()])
    trainer.train()
    timed = step_tokens[warmup:warmup + len(times)]
    timed_pos = positions[warmup:warmup + len(times)]
    return {"tokens": sum(timed), "seconds": sum(times), "steps": len(times), "tokens_per_s": sum(timed) / sum(times),
            "step_seconds": times, "step_tokens": timed, "samples_per_step": batch_size,
            "pad_fraction": 1 - sum(timed) / max(sum(timed_pos), 1), "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------ ZeRO memory
def worker_zero(spec: dict) -> dict:
    from unified_mllm.config import load_stage_config
    from unified_mllm.training.trainer import StageTrainer

    cfg = load_stage_config("mixed", None, spec["overrides"])
    t0 = time.perf_counter()
    trainer = StageTrainer(cfg)
    init_s = time.perf_counter() - t0
    after_init = rss_bytes()
    it = iter(trainer.loader)
    sampler = RssSampler().start()
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        trainer.train_step(it)
    step_s = (time.perf_counter() - t0) / spec["steps"]
    peak_steps = sampler.stop()
    params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trainer.model.parameters())
    return {"rank": trainer.rank, "world_size": trainer.world_size, "params": params, "init_s": init_s,
            "step_s": step_s, "rss_after_init": after_init, "peak_rss_steps": peak_steps,
            "peak_rss_process": maxrss_bytes()}


def run_zero(mode: str, world: dict, args, out_dir: Path) -> dict:
    arch = llm_arch(args, "zero_")
    overrides = stage_overrides(world, arch, out_dir / mode, args.zero_micro_batch, args.max_seq_len, mode)
    port = free_port()
    procs, outs = [], []
    for rank in range(args.zero_procs):
        out = out_dir / f"{mode}_rank{rank}.json"
        out.unlink(missing_ok=True)
        env = {**world["env"], "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(args.zero_procs),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        spec = {"overrides": overrides, "steps": args.zero_steps, "out_dir": str(out_dir)}
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", "zero", "--spec",
                                       json.dumps(spec), "--worker-out", str(out)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs.append(out)
    errors = []
    for p in procs:
        _, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            errors.append(err[-3000:])
    if errors or not all(o.is_file() for o in outs):
        raise RuntimeError(f"ZeRO mode {mode} failed:\n" + "\n".join(errors))
    ranks = [json.loads(o.read_text()) for o in outs]
    mb = 1024 ** 2
    return {"ranks": ranks, "params": ranks[0]["params"],
            "peak_rss_process_mb": max(r["peak_rss_process"] for r in ranks) / mb,
            "peak_rss_steps_mb": max(r["peak_rss_steps"] for r in ranks) / mb,
            "rss_after_init_mb": max(r["rss_after_init"] for r in ranks) / mb,
            "step_s": max(r["step_s"] for r in ranks)}


# ------------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small and fast smoke run (< 2 min)")
    p.add_argument("--json", default=None, metavar="OUT", help="write every figure to this JSON file")
    p.add_argument("--profile", default=None, metavar="OUT", help="torch.profiler table of our steps (first repeat)")
    p.add_argument("--workdir", default="runs/bench/train", help="data, tokenizers and caches (reused)")
    p.add_argument("--scenes", type=int, default=3000, help="ShapeWorld training scenes")
    p.add_argument("--threads", type=int, default=0,
                   help="torch/OpenMP threads of every worker (0: torch's default). On cores shared with other work, "
                        "1 avoids OpenMP threads waiting on each other")
    p.add_argument("--repeats", type=int, default=2, help="alternating our/HF measurements")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--steps", type=int, default=15, help="timed optimizer steps per measurement")
    p.add_argument("--micro-batch", type=int, default=8, help="our packed rows per step (ShapeWorld preset: 8)")
    p.add_argument("--max-seq-len", type=int, default=512, help="packed row length (ShapeWorld preset: 512)")
    p.add_argument("--hf-batch-size", type=int, default=0,
                   help="HF Trainer samples per step (0: as many as our packed rows carried on average)")
    p.add_argument("--hidden", type=int, default=256, help="LLM width (ShapeWorld preset: 256)")
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--zero-modes", default=",".join(ZERO_MODES), help="comma list; empty skips the memory part")
    p.add_argument("--zero-procs", type=int, default=2, help="ranks per ZeRO measurement")
    p.add_argument("--zero-steps", type=int, default=2)
    p.add_argument("--zero-micro-batch", type=int, default=2)
    p.add_argument("--zero-hidden", type=int, default=1024)
    p.add_argument("--zero-intermediate", type=int, default=2816)
    p.add_argument("--zero-layers", type=int, default=12)
    p.add_argument("--zero-heads", type=int, default=16)
    p.add_argument("--zero-kv-heads", type=int, default=4)
    p.add_argument("--worker", choices=["ours", "hf", "zero"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.scenes, a.repeats, a.warmup, a.steps = min(a.scenes, 600), 1, 1, 3
        a.zero_procs, a.zero_steps, a.zero_micro_batch = 1, 1, 1
        a.zero_hidden, a.zero_intermediate, a.zero_layers, a.zero_heads, a.zero_kv_heads = 256, 688, 4, 4, 2
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.spec)
        if os.environ.get("OMP_NUM_THREADS"):
            import torch

            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        result = {"ours": worker_ours, "hf": worker_hf, "zero": worker_zero}[args.worker](spec)
        Path(args.worker_out).write_text(json.dumps(result))
        from unified_mllm.training.distributed import finish

        finish(0)
        return 0
    t_start = time.time()
    workdir = Path(args.workdir)
    log(f"preparing ShapeWorld data ({args.scenes} scenes), text tokenizer, WinTok and its cache in {workdir}")
    world = prepare(workdir, args.scenes)
    if args.threads:
        world["env"]["OMP_NUM_THREADS"] = str(args.threads)
    arch = llm_arch(args)
    runs = []
    for r in range(args.repeats):
        base = {"overrides": stage_overrides(world, arch, workdir / "ours", args.micro_batch, args.max_seq_len,
                                             "zero2"),
                "warmup": args.warmup, "steps": args.steps, "out_dir": str(workdir / "out" / "hf_trainer")}
        ours, hf = paired({**base, "profile": args.profile if r == 0 else None,
                           "hf_batch_size": args.hf_batch_size}, world["env"], workdir / "out")
        ratio = ours["tokens_per_s"] / hf["tokens_per_s"]
        runs.append({"ours": ours, "hf": hf, "ratio": ratio})
        log(f"repeat {r + 1}: ours {ours['tokens_per_s']:.0f} tok/s (pad {ours['pad_fraction']:.1%}), HF Trainer "
            f"{hf['tokens_per_s']:.0f} tok/s (batch {hf['samples_per_step']}, pad {hf['pad_fraction']:.1%}) → {ratio:.2f}×; MFU "
            f"{ours['mfu']:.3f} (matmul {ours['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s)")
    zero = {}
    modes = [m for m in args.zero_modes.split(",") if m]
    for mode in modes:
        log(f"ZeRO memory: {mode}, {args.zero_procs} rank(s)")
        zero[mode] = run_zero(mode, world, args, workdir / "zero")
    result = {
        "config": {"llm": arch, "micro_batch": args.micro_batch, "max_seq_len": args.max_seq_len,
                   "scenes": args.scenes, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                   "recipe": "data_recipes/shapeworld_mixed.yaml", "wintok": WINTOK_PRESET,
                   "zero_llm": llm_arch(args, "zero_"), "zero_procs": args.zero_procs, "quick": args.quick,
                   "threads": runs[0]["ours"]["threads"] if runs else None,
                   "flops": "FlopCounterMode (matmuls, fwd+bwd) + analytic causal per-document attention"},
        "runs": runs,
        "ratio": statistics.median(r["ratio"] for r in runs),
        "ratio_min": min(r["ratio"] for r in runs),
        "tokens_per_s": statistics.median(r["ours"]["tokens_per_s"] for r in runs),
        "hf_tokens_per_s": statistics.median(r["hf"]["tokens_per_s"] for r in runs),
        "mfu": statistics.median(r["ours"]["mfu"] for r in runs),
        "matmul_flops_per_s": statistics.median(r["ours"]["matmul_flops_per_s"] for r in runs),
        "zero": zero,
        "seconds": time.time() - t_start,
    }
    print(f"\n== training throughput ({'quick, ' if args.quick else ''}{result['seconds']:.0f} s) ==")
    print(f"LLM {arch['hidden_size']}×{arch['num_hidden_layers']} (ShapeWorld mix, {args.micro_batch}×"
          f"{args.max_seq_len} packed), {runs[0]['ours']['params'] / 1e6:.2f}M trainable params")
    for i, r in enumerate(runs):
        o, h = r["ours"], r["hf"]
        print(f"repeat {i + 1}: ours {o['tokens_per_s']:8.0f} tok/s   HF Trainer {h['tokens_per_s']:8.0f} tok/s   "
              f"ratio {r['ratio']:.2f}×   MFU {o['mfu']:.3f} (6·N·T alone would say "
              f"{o['six_n_t_flops'] / o['seconds'] / o['matmul_flops_per_s']:.3f})")
    print(f"ratio (median) {result['ratio']:.2f}× (target ≥ 2)   MFU (median) {result['mfu']:.3f} (target ≥ 0.30)   "
          f"matmul {result['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s fp32")
    if zero:
        z = llm_arch(args, "zero_")
        print(f"peak memory per process, LLM {z['hidden_size']}×{z['num_hidden_layers']} "
              f"({next(iter(zero.values()))['params'] / 1e6:.0f}M params), {args.zero_procs} rank(s):")
        for mode, v in zero.items():
            print(f"  {mode:<14} whole process {v['peak_rss_process_mb']:8.0f} MiB   during steps "
                  f"{v['peak_rss_steps_mb']:8.0f} MiB   after init {v['rss_after_init_mb']:8.0f} MiB   "
                  f"step {v['step_s']:.2f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
