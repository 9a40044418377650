"""The client optimizer both trainers hand to ``deepspeed.initialize`` (``optim.optimizer``).

``adamw``: AdamW over :func:`param_groups`. ``muon``: DeepSpeed's ``MuonWithAuxAdam`` — Muon on the weight matrices
of ``nn.Linear`` layers, AdamW on everything else. Each of the AdamW groups (decay / no decay) is split into a Muon
half and an AdamW half, and every parameter is tagged ``use_muon``: ZeRO-1/2 flattens each group, so a group must be
all Muon or all AdamW, and ZeRO orthogonalises a Muon group's gradient per parameter (by its shape) before the step.
"""

from __future__ import annotations

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


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
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
        _newton_schulz_for_cpu()
    return MuonWithAuxAdam(halves, adam_optimizer=torch.optim.AdamW, adam_optimizer_kwargs={})


def _newton_schulz_for_cpu() -> None:
    """Two settings of DeepSpeed's Muon that cost a CPU run its time (NOTES.md, session 17): it torch.compiles the
    Newton–Schulz step (60 s of compiling at the start of a 5-minute WinTok run, for a step no faster than eager), and
    it runs the iteration in fp16 or bf16 whenever the accelerator reports support — which DeepSpeed's CPU
    accelerator does, while half-precision matmuls on a CPU are slower than fp32 (the ShapeWorld WinTok's 39 matrices:
    65 ms a step in fp16, 30 ms in fp32). On CPU the step runs eagerly and in fp32."""
    from deepspeed.runtime.zero.muon import original_muon

    torch.compiler.set_stance("force_eager")
    original_muon.ns_compute_dtype = lambda ns_method="gram": torch.float32


def current_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The learning rates to log: ``lr`` (AdamW's) and, under Muon, ``muon_lr``."""
    groups = optimizer.param_groups
    adam = [g["lr"] for g in groups if not g.get("use_muon", False)]
    muon = [g["lr"] for g in groups if g.get("use_muon", False)]
    return {"lr": adam[0] if adam else muon[0], **({"muon_lr": muon[0]} if muon else {})}
