"""Train one stage of a unified MLLM (or the WinTok tokenizer).

    deepspeed train_stage.py --stage sft [--config FILE] [--set optim.lr=2e-5 ...]
    python train_stage.py --stage sft --print-config
"""

from __future__ import annotations

import argparse
import sys

from unified_mllm.config import STAGE_CONFIG_CLASSES, ConfigError, describe_fields, load_stage_config, to_yaml


def field_help() -> str:
    lines = ["config fields (set in the YAML or with --set NAME=VALUE):"]
    seen: set[type] = set()
    for cls in STAGE_CONFIG_CLASSES.values():
        if cls in seen:
            continue
        seen.add(cls)
        stages = [s for s, c in STAGE_CONFIG_CLASSES.items() if c is cls]
        lines.append(f"\n  [{cls.__name__}: stages {', '.join(stages)}]")
        for name, type_name, default, doc in describe_fields(cls):
            shown = "" if default is None and "." not in name and type_name[0].isupper() else f" = {default!r}"
            lines.append(f"  {name} ({type_name}{shown})\n      {doc}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=field_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", required=True, choices=list(STAGE_CONFIG_CLASSES), help="stage to run")
    parser.add_argument("--config", default=None, help="stage YAML (default: stage_configs/<stage>.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set optim.lr=1e-4 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_stage_config(args.stage, args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from unified_mllm.training import run_stage  # heavy imports only once the config is valid

    return run_stage(cfg)


if __name__ == "__main__":
    sys.exit(main())
