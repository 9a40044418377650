"""Stage training (DeepSpeed engine, freezing, checkpoints, resume, logging)."""

from __future__ import annotations

import sys


def run_stage(cfg) -> int:
    """Train one stage from its resolved config; returns the exit code (also ends worker processes cleanly)."""
    from unified_mllm.config import ConfigError
    from unified_mllm.training.distributed import finish

    if cfg.stage == "tokenizer":
        from tokenizer.training import NonFiniteLoss
        from tokenizer.training import TokenizerTrainer as Trainer
    else:
        from unified_mllm.training.trainer import NonFiniteLoss
        from unified_mllm.training.trainer import StageTrainer as Trainer

    try:
        code = Trainer(cfg).fit()
    except NonFiniteLoss as e:
        print(f"training stopped: {e}", file=sys.stderr)
        code = 4
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    finish(code)
    return code
