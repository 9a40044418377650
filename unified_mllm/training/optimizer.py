"""The client optimizer both trainers hand to ``deepspeed.initialize`` (``optim.optimizer``).

``adamw``: AdamW over :func:`param_groups`. ``muon``: DeepSpeed's ``MuonWithAuxAdam`` — Muon on the weight matrices
of ``nn.Linear`` layers, AdamW on everything else. Each of the AdamW groups (decay / no decay) is split into a Muon
half and an AdamW half, and every parameter is tagged ``use_muon``: ZeRO-1/2 flattens each group, so a group must be
all Muon or all AdamW, and ZeRO orthogonalises a Muon group's gradient per parameter (by its shape) before the step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from unified_mllm.config.stage import OptimConfig
from unified_mllm.training.freeze import param_groups

# Matrices that are an input or output table rather than a hidden transform stay with AdamW, as in Muon's recipe:
# embeddings, the LM head, the generation head's code logits.
_NOT_MUON = ("embed", "lm_head", "gen_head.out.")


def muon_parameter_names(model: nn.Module) -> set[str]:
    """Trainable hidden weight matrices: of ``nn.Linear`` layers and ``nn.MultiheadAttention``'s packed input
    projection, except the input and output tables named in ``_NOT_MUON``."""
    names = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, nn.Linear):
            weights = [("weight", module.weight)]
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            weights = [("in_proj_weight", module.in_proj_weight)]
        else:
            continue
        for attr, weight in weights:
            name = prefix + attr
            if weight.requires_grad and not any(word in name.lower() for word in _NOT_MUON):
                names.add(name)
    return names


def build_optimizer(model: nn.Module, optim: OptimConfig,
                    ns_dtype: torch.dtype = torch.float32) -> torch.optim.Optimizer:
    """``ns_dtype``: on CPU, the dtype of Muon's Newton–Schulz iteration (:func:`_newton_schulz_for_cpu`);
    :func:`initialize_engine` derives it from the DeepSpeed config."""
    groups = param_groups(model, optim.weight_decay)
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    muon = muon_parameter_names(model)
    by_id = {id(p): name for name, p in model.named_parameters()}
    halves = []
    for group in groups:
        for use_muon in (True, False):
            params = [p for p in group["params"] if (by_id.get(id(p)) in muon) is use_muon]
            for p in params:
                p.use_muon = use_muon
            if not params:
                continue
            if use_muon:
                halves.append({"params": params, "use_muon": True, "lr": optim.muon_lr,
                               "momentum": optim.muon_momentum, "weight_decay": group["weight_decay"]})
            else:
                halves.append({"params": params, "use_muon": False, "lr": optim.lr, "betas": tuple(optim.betas),
                               "eps": optim.eps, "weight_decay": group["weight_decay"]})
    if not any(h["use_muon"] for h in halves):
        raise ValueError("optim.optimizer: muon found no trainable nn.Linear weight to optimise; use adamw")
    if not torch.cuda.is_available():
        _newton_schulz_for_cpu(ns_dtype)
    optimizer = MuonWithAuxAdam(halves, adam_optimizer=torch.optim.AdamW, adam_optimizer_kwargs={})
    for group in optimizer.param_groups:
        if group["use_muon"]:  # MuonWithAuxAdam sorted them by size
            group["params"] = balanced_muon_order(group["params"])
    return optimizer


def newton_schulz_cost(shape: torch.Size | tuple[int, ...]) -> float:
    """The work of :func:`newton_schulz` on a matrix of ``shape`` (a conv filter as its (out, in·k·k) view): its
    multiply-add FLOPs on the path it takes (the matrix itself, or its Gram matrix for a wide one), plus 16 MFLOP's
    worth for the ~15 calls a matrix costs whatever its size (fitted to one CPU thread, bf16 and fp32: NOTES.md,
    session 31)."""
    m, n = shape[0], math.prod(shape[1:])
    m, n = min(m, n), max(m, n)
    flops = 5 * (4 * m * m * n + 2 * m**3) if n < 2 * m else 8 * m * m * n + 28 * m**3
    return flops + 16e6


def balanced_muon_order(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Muon's matrices in the order ZeRO-1/2 flattens them: each rank orthogonalises the matrices of its contiguous
    slice of the group (a matrix cut by a slice's edge on both ranks), so the order decides who does how much. By size,
    as DeepSpeed orders them, the first ranks get the big matrices (the fewest Newton–Schulz FLOPs per element) and
    the last the small ones: on the mixed stage's 40 matrices over 2 ranks, 30 against 40 ms a step, the first rank
    idle for the difference. Here each next matrix is the one that keeps the running Newton–Schulz cost closest to
    its share of the running element count, so any even cut of the sequence holds about its share of the work, on
    any number of ranks. Deterministic in the shapes and the given order (a checkpoint's flat states depend on it)."""
    rest = [(newton_schulz_cost(p.shape), p.numel(), p) for p in params]  # each matrix's cost, computed once
    density = sum(c for c, _, _ in rest) / max(sum(n for _, n, _ in rest), 1)
    order, cost, numel = [], 0.0, 0
    while rest:
        c, n, p = rest.pop(min(range(len(rest)), key=lambda j: abs(cost + rest[j][0] - density * (numel + rest[j][1]))))
        order.append(p)
        cost, numel = cost + c, numel + n
    return order


def initialize_engine(model: nn.Module, optim: OptimConfig, ds_config: dict):
    """The DeepSpeed engine both trainers train through: under ZeRO-Offload DeepSpeed builds its own CPU AdamW from
    the config (``uses_config_optimizer``), otherwise the client optimizer of :func:`build_optimizer`, its
    Newton–Schulz iteration in bf16 where the config computes in bf16 (``bf16`` or ``torch_autocast`` enabled:
    the precision the trainer resolved, read from the one place it is written); the schedule is
    ``build_scheduler``'s either way."""
    import deepspeed

    from unified_mllm.training.ds_config import computes_in_bf16, uses_config_optimizer
    from unified_mllm.training.schedule import build_scheduler

    if uses_config_optimizer(ds_config):
        engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, optim.weight_decay),
                                          config=ds_config, lr_scheduler=lambda opt: build_scheduler(opt, optim))
    else:
        optimizer = build_optimizer(model, optim, torch.bfloat16 if computes_in_bf16(ds_config) else torch.float32)
        layouts = param_layouts(model, optimizer.param_groups)  # read before ZeRO replaces the groups' parameters
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                          lr_scheduler=build_scheduler(optimizer, optim))
        engine.umllm_param_layout, engine.umllm_legacy_param_layout = layouts
    return engine


def param_layouts(model: nn.Module, groups: list[dict]) -> tuple[str, str]:
    """Digests of the optimizer's parameter order, group by group — the order ZeRO-1/2 flattens them in, so the order
    of a checkpoint's flat optimizer states — now and as before :func:`balanced_muon_order` (Muon's matrices by size,
    DeepSpeed's order). The checkpoint records the first; a resume compares them (``CheckpointManager.load``)."""
    import hashlib

    names = {id(p): n for n, p in model.named_parameters()}

    def digest(order: list[list[torch.Tensor]]) -> str:
        text = "|".join(",".join(names.get(id(p), "?") for p in params) for params in order)
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    now = [list(g["params"]) for g in groups]
    # exact: DeepSpeed's sort is stable, and balanced_muon_order keeps same-shaped matrices in their relative order
    before = [sorted(g["params"], key=lambda p: p.size(), reverse=True) if g.get("use_muon") else list(g["params"])
              for g in groups]
    return digest(now), digest(before)


def _newton_schulz_for_cpu(dtype: torch.dtype = torch.float32) -> None:
    """Settings of DeepSpeed's Muon that cost a CPU run its time (NOTES.md, sessions 17–18): it torch.compiles the
    Newton–Schulz step (60 s of compiling at the start of a 5-minute WinTok run, for a step no faster than eager), it
    runs the iteration in fp16 or bf16 whenever the accelerator reports support — which DeepSpeed's CPU accelerator
    does, while half-precision matmuls on a CPU without native bf16 are slower than fp32 (the ShapeWorld WinTok's 39
    matrices: 65 ms a step in fp16, 30 ms in fp32) — and its update spends more of a small matrix's time in
    element-wise passes than in the iteration. On CPU the step runs eagerly through :func:`muon_update_fp32`, the
    iteration in ``dtype``: bf16 for a stage whose forward runs in bf16 (which ``auto`` picks only on a CPU with native
    bf16 matmuls: the mixed stage's 39 matrices 131 → 85 ms a step at one thread, its step 1.09–1.17x faster; NOTES.md,
    session 25), fp32 otherwise. The momentum and the returned update stay fp32."""
    from deepspeed.runtime.zero.muon import original_muon

    torch.compiler.set_stance("force_eager")
    original_muon.ns_compute_dtype = lambda ns_method="gram": torch.float32
    if not getattr(original_muon.muon_update, "_umllm_fp32", False):
        reference = original_muon.muon_update

        def update(grad, momentum, beta=0.95, ns_steps=5, nesterov=True, ns_method="gram", is_expert_group=False,
                   num_heads=None):
            if num_heads is not None or is_expert_group or grad.dtype != torch.float32:
                return reference(grad, momentum, beta, ns_steps, nesterov, ns_method, is_expert_group, num_heads)
            return muon_update_fp32(grad, momentum, beta, ns_steps, nesterov, ns_dtype=update.ns_dtype)

        update._umllm_fp32, update.reference = True, reference
        original_muon.muon_update = update  # ZeRO-1/2/3 import it from the module at each step
    original_muon.muon_update.ns_dtype = dtype  # one process trains one stage: its optimizer sets it


_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Muon's quintic iteration, as DeepSpeed's


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Muon's quintic Newton–Schulz orthogonalisation of a matrix, in its dtype (fp32, or bf16 for a stage in bf16:
    :func:`muon_update_fp32`), with fused matmuls: what DeepSpeed's standard and Gram iterations compute, in fewer
    passes over memory. A matrix at least twice as wide as tall (after turning a tall one) iterates on its Gram matrix
    R = X·Xᵀ, restarting from X at iteration 2 as DeepSpeed does; a squarer one iterates on X itself, which is cheaper
    there (NOTES.md, session 18)."""
    a, b, c = _NS_COEFFICIENTS
    tall = g.size(-2) > g.size(-1)
    x = g.mT if tall else g
    x = x / (torch.linalg.vector_norm(x) + 1e-7)
    if x.size(-1) < 2 * x.size(-2):
        for _ in range(steps):
            gram = x @ x.mT
            poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b·A + c·A²
            x = torch.addmm(x, poly, x, beta=a)  # a·X + (b·A + c·A²)·X
        return x.mT if tall else x
    gram, q = x @ x.mT, None  # X_k = Q·X, R = X_k·X_kᵀ
    for i in range(steps):
        if i == 2:  # DeepSpeed's restart: fold Q into X
            x, q = q @ x, None
            gram = x @ x.mT
        z = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b·R + c·R²
        if q is None:
            q = z.clone()
            q.diagonal().add_(a)
        else:
            q = torch.addmm(q, z, q, beta=a)
        if i < steps - 1 and i != 1:
            rz = torch.addmm(gram, z, gram, beta=a)  # (a + Z)·R, then (a + Z)²·R
            gram = torch.addmm(rz, z, rz, beta=a)
    x = q @ x
    return x.mT if tall else x


def muon_update_fp32(grad: torch.Tensor, momentum: torch.Tensor, beta: float = 0.95, ns_steps: int = 5,
                     nesterov: bool = True, ns_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """DeepSpeed's ``muon_update`` for an fp32 matrix (or a conv filter viewed as one): the momentum and the Nesterov
    blend in place (fp32), then the update orthogonalised in ``ns_dtype`` and returned in fp32, scaled by
    sqrt(rows / cols) for a tall matrix. A non-finite gradient leaves the momentum untouched and comes back as it is,
    so the step that produced it is still seen as one."""
    if not bool(torch.isfinite(grad).all()):
        return grad
    momentum.lerp_(grad, 1 - beta)
    update = grad.lerp_(momentum, beta) if nesterov else momentum
    rows, cols = grad.size(-2), grad.size(-1)
    out = newton_schulz((update.view(len(update), -1) if update.ndim == 4 else update).to(ns_dtype), ns_steps)
    out = out.float()
    if rows > cols:
        out.mul_(math.sqrt(rows / cols))
    return out


def current_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The learning rates to log: ``lr`` (AdamW's) and, under Muon, ``muon_lr``."""
    groups = optimizer.param_groups
    adam = [g["lr"] for g in groups if not g.get("use_muon", False)]
    muon = [g["lr"] for g in groups if g.get("use_muon", False)]
    return {"lr": adam[0] if adam else muon[0], **({"muon_lr": muon[0]} if muon else {})}
