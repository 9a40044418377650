"""Training building blocks: schedule, DeepSpeed config filling, checkpoint atomicity, RNG round trip."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from unified_mllm.config import ConfigError, load_config
from unified_mllm.config.stage import StageConfig
from unified_mllm.training.checkpoint import CheckpointManager, _from_safe, _to_safe
from unified_mllm.training.distributed import extensions_root
from unified_mllm.training.ds_config import (
    build_ds_config,
    cpu_has_native_bf16,
    resolve_precision,
    zero_stage,
)
from unified_mllm.training.rng import rng_state, set_rng_state
from unified_mllm.training.schedule import lr_factor


def cfg_with(**optim) -> StageConfig:
    return load_config(StageConfig, {"optim": optim})


def test_warmup_then_cosine_to_floor() -> None:
    optim = cfg_with(max_steps=100, warmup_ratio=0.1, min_lr_ratio=0.1).optim
    factors = [lr_factor(s, optim) for s in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(factors[:10], factors[1:10]))  # warm-up rises
    assert all(a >= b for a, b in zip(factors[10:100], factors[11:100]))  # cosine falls
    assert factors[100] == pytest.approx(0.1)


def test_a_tasks_own_floor_scales_its_steps_to_its_cosine() -> None:
    """optim.task_min_lr_ratio: that task's step at ``step`` runs at the cosine to its floor — the same warm-up, the
    ends at the two floors — and a task not named (or named at the stage's floor) at the schedule's lr."""
    from unified_mllm.training.schedule import task_floor_scale

    optim = cfg_with(max_steps=100, warmup_ratio=0.1, min_lr_ratio=0.1,
                     task_min_lr_ratio={"understanding": 0.4, "generation": 0.1}).optim
    own = cfg_with(max_steps=100, warmup_ratio=0.1, min_lr_ratio=0.4).optim
    for step in (0, 5, 9, 10, 50, 99, 100):
        scaled = lr_factor(step, optim) * task_floor_scale(step, optim, "understanding")
        assert scaled == pytest.approx(lr_factor(step, own)), step
        assert task_floor_scale(step, optim, "generation") == 1.0 and task_floor_scale(step, optim, "text") == 1.0
    assert task_floor_scale(5, optim, "understanding") == pytest.approx(1.0)  # warm-up: one schedule
    assert task_floor_scale(100, optim, "understanding") == pytest.approx(4.0)  # 0.4 / 0.1 at the end


@pytest.mark.parametrize(("name", "stage"), [("zero2", 2), ("zero3", 3), ("zero3_offload", 3)])
def test_ds_config_fills_every_auto(name: str, stage: int) -> None:
    cfg = load_config(StageConfig, {"deepspeed": {"config": f"stage_configs/deepspeed/{name}.json"},
                                    "optim": {"micro_batch_size": 3, "grad_accum": 2, "grad_clip": 0.5}})
    ds = build_ds_config(cfg.deepspeed, cfg.optim, world_size=2)
    assert '"auto"' not in json.dumps(ds)  # no value left "auto"
    assert ds["train_batch_size"] == 12 and ds["gradient_clipping"] == 0.5 and zero_stage(ds) == stage
    assert ds["bf16"]["enabled"] is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert ("torch_autocast" in ds) is (not torch.cuda.is_available() and cpu_has_native_bf16())
    assert ("optimizer" in ds) is (name == "zero3_offload")


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_on_cpu_is_bf16_autocast_only_with_native_bf16(monkeypatch, tmp_path, native: bool) -> None:
    """auto on a CPU: bf16 autocast (fp32 weights, gradients and communication) where the CPU multiplies bf16 in
    hardware, fp32 where it would emulate it; an explicit precision wins, and a DeepSpeed JSON's own torch_autocast
    section never survives a precision that does not ask for it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "torch_autocast": {
        "enabled": True, "dtype": "bfloat16"}}))
    got = {}
    for precision in ("auto", "fp32", "bf16_autocast"):
        cfg = load_config(StageConfig, {"deepspeed": {"config": str(tmp_path / "ds.json"), "precision": precision}})
        got[precision] = (resolve_precision(cfg.deepspeed), build_ds_config(cfg.deepspeed, cfg.optim, 1))
    assert got["auto"][0] == ("bf16_autocast" if native else "fp32")
    autocast = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert got["bf16_autocast"][0] == "bf16_autocast" and got["bf16_autocast"][1]["torch_autocast"] == autocast
    assert got["bf16_autocast"][1]["bf16"] == {"enabled": False}
    assert got["fp32"][0] == "fp32" and "torch_autocast" not in got["fp32"][1]
    assert got["auto"][1].get("torch_autocast") == (autocast if native else None)
    auto = load_config(StageConfig, {"deepspeed": {"config": str(tmp_path / "ds.json")}}).deepspeed
    assert resolve_precision(auto, cpu_autocast=False) == "fp32"  # the tokenizer stage's auto on any CPU
    tokenizer_precision = resolve_precision(auto, cpu_autocast=False)
    assert "torch_autocast" not in build_ds_config(auto, cfg.optim, 1, tokenizer_precision)
    # the config follows the precision it is handed, not its own resolution of auto
    assert build_ds_config(auto, cfg.optim, 1, "bf16_autocast")["torch_autocast"] == autocast
    # a reduction dtype DeepSpeed would ignore under autocast is one error naming the file and the key; fp32 is what
    # it does anyway, and bf16 proper honours the key
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "communication_data_type": "bf16"}))
    with pytest.raises(ConfigError, match=r"ds\.json.*communication_data_type.*ignored.*bf16_autocast"):
        build_ds_config(auto, cfg.optim, 1, "bf16_autocast")
    assert build_ds_config(auto, cfg.optim, 1, "bf16")["communication_data_type"] == "bf16"
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "communication_data_type": "fp32"}))
    assert build_ds_config(auto, cfg.optim, 1, "bf16_autocast")["communication_data_type"] == "fp32"
    # null is DeepSpeed's own default (the dtype follows the parameters): no error
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "communication_data_type": None}))
    assert build_ds_config(auto, cfg.optim, 1, "bf16_autocast")["communication_data_type"] is None


def test_ds_config_missing_file_names_the_field() -> None:
    cfg = load_config(StageConfig, {"deepspeed": {"config": "stage_configs/deepspeed/nope.json"}})
    with pytest.raises(ConfigError, match="nope.json.*not found"):
        build_ds_config(cfg.deepspeed, cfg.optim, 1)


def test_partial_checkpoint_is_never_latest(tmp_path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=2, rank=0)
    root = tmp_path / "checkpoints"
    (root / "step_00000010").mkdir(parents=True)
    (root / "step_00000010" / "meta.json").write_text("{}")
    (root / "step_00000020.partial").mkdir()  # killed mid-save
    (root / "step_00000030").mkdir()  # no meta.json: incomplete
    assert mgr.latest() == root / "step_00000010"


def test_a_checkpoint_of_another_parameter_order_is_refused_before_loading(tmp_path) -> None:
    """ZeRO's flat optimizer states follow the optimizer's parameter order: a checkpoint recorded with another order
    (or, without a record, written in DeepSpeed's by-size order when this run's differs) is one clear error naming
    the way on, before anything loads; the same order loads."""

    class Engine:
        umllm_param_layout, umllm_legacy_param_layout = "balanced", "by-size"
        loaded = False

        def load_checkpoint(self, *args, **kwargs):
            Engine.loaded = True
            return args[0], None

    mgr = CheckpointManager(tmp_path, keep_last=2, rank=0)
    path = tmp_path / "checkpoints" / "step_00000010"
    path.mkdir(parents=True)
    torch.save(_to_safe({"step": 10}), path / "trainer_rank0.pt")
    for meta in ({"param_layout": "other"}, {}):
        (path / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(ValueError, match="another parameter order.*checkpoint.resume=never"):
            mgr.load(Engine(), path)
        assert not Engine.loaded
    (path / "meta.json").write_text(json.dumps({"param_layout": "balanced"}))
    assert mgr.load(Engine(), path) == {"step": 10} and Engine.loaded


def test_a_checkpoint_without_an_order_record_is_read_as_deepspeeds_by_size_order(monkeypatch) -> None:
    """Checkpoints written before the order was recorded hold Muon's matrices in DeepSpeed's by-size order: the
    digest a resume compares them with is that order's, and this run's balanced order is another."""
    import unified_mllm.training.optimizer as opt_mod
    from unified_mllm.config.stage import OptimConfig

    lin = torch.nn.Linear
    model = torch.nn.Sequential(lin(16, 32), lin(32, 16), lin(16, 32), lin(32, 32), lin(32, 16))
    balanced = opt_mod.build_optimizer(model, OptimConfig(optimizer="muon"))
    now, legacy = opt_mod.param_layouts(model, balanced.param_groups)
    monkeypatch.setattr(opt_mod, "balanced_muon_order", lambda params: params)
    deepspeeds = opt_mod.build_optimizer(model, OptimConfig(optimizer="muon"))
    assert opt_mod.param_layouts(model, deepspeeds.param_groups) == (legacy, legacy) and now != legacy


def test_muon_matrices_are_ordered_so_each_rank_orthogonalises_its_share() -> None:
    """ZeRO-1/2 gives each rank a contiguous, equal slice of a group's elements and the rank orthogonalises every
    Muon matrix its slice touches. In the order used, on the mixed preset's shapes and the WinTok's, the busiest of 2
    ranks does under 1.1x an even share of the Newton–Schulz work (DeepSpeed's by-size order: 1.12x and 1.33x), and of
    4 ranks less than by size; the order is a permutation, the same on every call."""
    from unified_mllm.training.optimizer import balanced_muon_order, newton_schulz_cost

    llm = [(512, 192), (512, 192), (192, 512), (192, 192), (192, 192), (96, 192), (96, 192)] * 4
    head = [(768, 192), (576, 192), (192, 768), (192, 192)] * 2
    mixed = llm + head + [(384, 192), (128, 384), (192, 128), (192, 192)]
    wintok = [(512, 128), (128, 512)] + [(128, 128)] * 4 + [(512, 64), (64, 512)] + [(64, 64)] * 4
    wintok = wintok * 2 + [(192, 64), (192, 32), (128, 64), (64, 32), (32, 64), (32, 32)] * 2

    def worst_share(params: list[torch.Tensor], ranks: int) -> float:
        part = -(-sum(p.numel() for p in params) // ranks)
        work, start = [0.0] * ranks, 0
        for p in params:
            for r in range(start // part, (start + p.numel() - 1) // part + 1):
                work[r] += newton_schulz_cost(p.shape)
            start += p.numel()
        return max(work) / (sum(newton_schulz_cost(p.shape) for p in params) / ranks)

    for shapes in (mixed, wintok):
        params = [torch.empty(s) for s in shapes]
        by_size = sorted(params, key=lambda p: p.size(), reverse=True)
        order = balanced_muon_order(by_size)
        assert sorted(map(id, order)) == sorted(map(id, params))
        assert [id(p) for p in balanced_muon_order(by_size)] == [id(p) for p in order]
        assert worst_share(order, 2) < 1.1 < worst_share(by_size, 2)
        assert worst_share(order, 4) < worst_share(by_size, 4)


def test_rng_state_survives_weights_only_round_trip(tmp_path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = rng_state()
    torch.save(_to_safe(state), tmp_path / "s.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(_from_safe(torch.load(tmp_path / "s.pt", weights_only=True)))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_log_window_means_per_task_and_speeds_per_step_kind() -> None:
    from unified_mllm.training.metrics import LogWindow

    now = [100.0]
    window = LogWindow(clock=lambda: now[0])
    steps = [("understanding", 6.0, 1.0, 400), ("understanding", 4.0, 1.0, 400), ("generation", 8.0, 2.0, 200)]
    for task, loss, seconds, tokens in steps:
        window.add({"task": task, "tokens": tokens, "loss": loss, "text_loss": loss - 1, "image_loss": 1.0}, seconds)
    now[0] += 5.0  # the window's wall time: its steps (4 s) plus logging, checkpoints and data waits
    got = window.record()
    assert got["loss"] == pytest.approx(6.0) and got["text_loss"] == pytest.approx(5.0) and got["image_loss"] == 1.0
    assert got["loss/understanding"] == pytest.approx(5.0) and got["loss/generation"] == pytest.approx(8.0)
    assert got["tokens_per_s"] == pytest.approx(1000 / 5.0)
    assert got["tokens_per_s/understanding"] == pytest.approx(400.0) and got["tokens_per_s/generation"] == 100.0
    # two ranks: tokens are summed over them, losses stay this rank's means
    two = window.record(reduce=lambda v: 2 * v)
    assert two["tokens_per_s/generation"] == 200.0 and two["tokens_per_s"] == pytest.approx(400.0)
    assert two["loss/understanding"] == got["loss/understanding"]


def test_single_process_run_leaves_no_shared_memory_behind(tmp_path) -> None:
    """Under the launcher, DeepSpeed's CPU all-reduce op creates a 66 MB /dev/shm segment per process and never
    removes it."""
    port = str(20000 + os.getpid() % 10000)
    code = ("from unified_mllm.training.distributed import init_distributed, finish\n"
            "import deepspeed.comm.comm as dc\n"
            "init_distributed()\n"
            "print('shm_op', getattr(dc.cdb, 'shm_comm_op', None) is not None)\n"
            "print(*[line for line in open('/proc/self/maps') if 'deepspeed_allreduce_buffer' in line], sep='')\n"
            "finish(0)\n")
    env = {**os.environ, "MASTER_PORT": port, "LOCAL_SIZE": "1"}  # LOCAL_SIZE as the launcher sets it
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR"):
        env.pop(key, None)
    # a lock that a killed build left in the extensions root an hour ago: the run clears it before DeepSpeed builds
    # its op (a lock on the op itself would otherwise hang this run for good; an own name keeps real builds apart)
    stale = extensions_root() / f"unified_mllm_test_{os.getpid()}" / "lock"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.touch()
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    try:
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                             cwd=tmp_path)
        assert not stale.exists() and f"removed {stale}" in res.stderr, res.stderr[-3000:]
    finally:
        stale.unlink(missing_ok=True)
        stale.parent.rmdir()
    assert res.returncode == 0, res.stderr[-3000:]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    if "shm_op True" not in res.stdout:
        pytest.skip("DeepSpeed's shared-memory all-reduce op is not built here; nothing to clean up")
    # the op made its segment and the run still had it mapped (the all-reduce keeps working); only the name went
    assert f"_{port}_0 (deleted)" in res.stdout, res.stdout


def test_a_killed_builds_lock_is_removed_and_a_recent_one_named(tmp_path) -> None:
    """A run killed while torch compiled DeepSpeed's op leaves ``<op>/lock``; every later run then waited on it
    forever, silently. Both layouts: TORCH_EXTENSIONS_DIR/<op>/lock and <cache>/py311_cpu/<op>/lock."""
    from unified_mllm.training.distributed import STALE_BUILD_LOCK_S, clear_stale_build_locks

    stale = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    recent = tmp_path / "cpu_adam" / "lock"
    built = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"
    for f in (stale, recent, built):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.touch()
    now = recent.stat().st_mtime + 5
    os.utime(stale, (now - STALE_BUILD_LOCK_S - 60, now - STALE_BUILD_LOCK_S - 60))
    lines = clear_stale_build_locks(tmp_path, now=now)
    assert not stale.exists() and recent.exists() and built.exists()
    assert len(lines) == 2 and any(f"removed {stale}" in x for x in lines)
    assert any(str(recent) in x and "delete the file" in x for x in lines)
    assert clear_stale_build_locks(tmp_path / "absent") == []


def test_the_cpu_op_built_at_setup_is_reused_with_or_without_the_environment_on_path() -> None:
    """After the set-up's build, a stage started through the interpreter's path with a bare PATH (the quickstart, the
    launcher) and one from an activated environment both load DeepSpeed's CPU op without compiling it again: torch
    used whichever ninja came first on PATH, and the two recorded builds differently, so each rebuilt it (35–60 s)."""
    if torch.cuda.is_available():
        pytest.skip("the CPU op is built on CPU-only machines")
    root = extensions_root()
    setup = subprocess.run([sys.executable, "-m", "unified_mllm.training.distributed", "--build-cpu-ops"],
                           capture_output=True, text=True, timeout=900)
    assert setup.returncode == 0 and "op ready" in setup.stdout, setup.stderr[-3000:]
    logs = sorted({*root.glob("deepspeed_shm_comm/.ninja_log"), *root.glob("*/deepspeed_shm_comm/.ninja_log")})
    assert logs, f"no build of DeepSpeed's shm op under {root}"
    before = {p: p.read_text() for p in logs}
    bare = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    activated = {**bare, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{bare.get('PATH', '')}"}
    for env in ({**bare, "PATH": "/usr/bin:/bin"}, activated):
        res = subprocess.run([sys.executable, "-c", "from unified_mllm.training.distributed import build_cpu_ops; "
                              "print(build_cpu_ops())"], env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        assert {p: p.read_text() for p in logs} == before, f"the op was compiled again with PATH={env['PATH']}"


MUON_STEP = """
import json
import sys
import torch
from torch import nn
from unified_mllm.config import load_config
from unified_mllm.config.stage import StageConfig
from unified_mllm.training.distributed import finish, init_distributed
from unified_mllm.training.ds_config import build_ds_config
import unified_mllm.training.optimizer as optimizer_module
from unified_mllm.training.optimizer import current_lrs, initialize_engine

ns_dtypes = []  # the dtype each Newton-Schulz iteration computes in
_ns = optimizer_module.newton_schulz
optimizer_module.newton_schulz = lambda g, steps=5: ns_dtypes.append(str(g.dtype)) or _ns(g, steps)
init_distributed()
torch.manual_seed(0)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.hidden = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.lm_head = nn.Linear(32, 10)

    def forward(self, tokens, feats):
        return self.lm_head(self.norm(torch.relu(self.hidden(self.embed(tokens) + feats))))


model = Tiny()
before = {n: p.detach().clone() for n, p in model.named_parameters()}
cfg = load_config(StageConfig, {"optim": {"optimizer": "muon", "lr": 1e-3, "muon_lr": 0.02, "warmup_ratio": 0.0,
                                          "min_lr_ratio": 1.0,  # a flat schedule: the step sizes read as the lrs
                                          "max_steps": 10, "micro_batch_size": 4, "grad_clip": 1.0},
                                "deepspeed": {"precision": sys.argv[1]}})
engine = initialize_engine(model, cfg.optim, build_ds_config(cfg.deepspeed, cfg.optim, 1))
hidden_dtype = []
model.hidden.register_forward_hook(lambda m, a, out: hidden_dtype.append(str(out.dtype)))
tokens, feats = torch.randint(0, 10, (4, 8)), torch.randn(4, 8, 16)
engine.backward(nn.functional.cross_entropy(engine(tokens, feats).flatten(0, 1), tokens.flatten()))
engine.step()
after = {n: p.detach() for n, p in model.named_parameters()}
step = (after["hidden.weight"] - before["hidden.weight"]) / 0.02 / 2 ** 0.5  # Muon scales 32 x 16 by sqrt(32 / 16)
used = tokens.unique()
print("RESULT", json.dumps({
    "inner": type(getattr(engine.optimizer, "optimizer", engine.optimizer)).__name__, "hidden_out": hidden_dtype,
    "ns": ns_dtypes,
    "weights": sorted({str(p.dtype) for p in model.parameters()}),
    "singular_values": torch.linalg.svdvals(step).tolist(), "lrs": current_lrs(engine.optimizer),
    "embed_step": (after["embed.weight"] - before["embed.weight"])[used].abs().mean().item(),
    "head_step": (after["lm_head.weight"] - before["lm_head.weight"]).abs().mean().item()}))
finish(0)
"""


@pytest.mark.parametrize("precision", ["fp32", "bf16_autocast"])
def test_muon_under_zero2_steps_hidden_matrices_orthogonally_and_tables_with_adamw(tmp_path, precision: str) -> None:
    """The hidden layer's first update is an orthogonalised matrix of Muon's size (all singular values near 1, even
    with optim.grad_clip set: ZeRO would otherwise clip it to a fraction), while the embedding and the LM head take
    AdamW's first step (lr per element). Under bf16_autocast the forward's matmuls and the Newton-Schulz iteration
    run in bf16 while the weights, and so the updates, stay fp32."""
    env = {**os.environ, "MASTER_PORT": str(21000 + os.getpid() % 10000)}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR"):
        env.pop(key, None)
    res = subprocess.run([sys.executable, "-c", MUON_STEP, precision], env=env, capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.split("RESULT", 1)[1])
    assert got["inner"] == "MuonWithAuxAdam"
    assert got["hidden_out"] == ["torch.bfloat16" if precision == "bf16_autocast" else "torch.float32"]
    assert got["ns"] == got["hidden_out"]  # one Muon matrix, iterated in the forward's dtype
    assert got["weights"] == ["torch.float32"]
    assert all(0.5 < s < 1.5 for s in got["singular_values"]), got["singular_values"]
    assert got["lrs"] == {"lr": pytest.approx(1e-3), "muon_lr": pytest.approx(0.02)}
    assert got["embed_step"] == pytest.approx(1e-3, rel=0.01) and got["head_step"] == pytest.approx(1e-3, rel=0.01)


@pytest.mark.parametrize("shape", [(64, 64), (48, 64), (32, 96), (192, 48)])
def test_cpu_muon_update_is_deepspeeds_update(shape) -> None:
    """The CPU Muon update (fused fp32 Newton–Schulz, on X or on its Gram matrix by shape) gives DeepSpeed's own update
    and momentum for square, squarish, wide and tall matrices; a non-finite gradient leaves the momentum as it was."""
    from deepspeed.runtime.zero.muon import original_muon

    from unified_mllm.training.optimizer import _newton_schulz_for_cpu

    _newton_schulz_for_cpu()
    fast, reference = original_muon.muon_update, original_muon.muon_update.reference
    gen = torch.Generator().manual_seed(0)
    grad, momentum = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    mom_fast, mom_ref = momentum.clone(), momentum.clone()
    got, want = fast(grad.clone(), mom_fast), reference(grad.clone(), mom_ref)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(mom_fast, mom_ref)
    assert 0.5 < torch.linalg.svdvals(got / max(1.0, shape[0] / shape[1]) ** 0.5).min() < 1.5
    bad = grad.clone()
    bad[0, 0] = float("nan")
    assert not torch.isfinite(fast(bad, mom_fast)).all()  # the overflowed step stays visible as one
    torch.testing.assert_close(mom_fast, mom_ref)
    # a bf16 stage iterates in bf16: the same fp32 momentum, an fp32 update within bf16's rounding of the fp32 one
    _newton_schulz_for_cpu(torch.bfloat16)
    try:
        mom_bf16 = momentum.clone()
        got_bf16 = original_muon.muon_update(grad.clone(), mom_bf16)
    finally:
        _newton_schulz_for_cpu()
    torch.testing.assert_close(mom_bf16, mom_ref)
    assert got_bf16.dtype == torch.float32
    assert ((got_bf16 - want).norm() / want.norm()).item() < 0.05
    assert 0.5 < torch.linalg.svdvals(got_bf16 / max(1.0, shape[0] / shape[1]) ** 0.5).min() < 1.5


def test_muon_with_optimizer_offload_is_refused_naming_the_field() -> None:
    cfg = load_config(StageConfig, {"optim": {"optimizer": "muon"},
                                    "deepspeed": {"config": "stage_configs/deepspeed/zero3_offload.json"}})
    with pytest.raises(ValueError, match="optim.optimizer: muon runs without ZeRO-Offload"):
        build_ds_config(cfg.deepspeed, cfg.optim, 1)
