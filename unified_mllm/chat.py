"""Chat with a trained unified model in the terminal: questions about images, and drawings.

    python -m unified_mllm.chat --checkpoint runs/quickstart/mixed/export

Type a message to talk; ``/image PATH [question]`` attaches an image; ``/draw PROMPT`` draws (PNG paths are
printed); ``/help`` lists the commands.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from unified_mllm.inference.session import HELP, ChatSession, DrawSettings


def handle(session: ChatSession, line: str, out=print) -> bool:
    """Run one input line; returns False when the session should end."""
    line = line.strip()
    if not line:
        return True
    if line in ("/quit", "/exit"):
        return False
    if line == "/help":
        out(HELP)
    elif line == "/reset":
        session.reset()
        out("[conversation cleared]")
    elif line.startswith("/image"):
        rest = line[len("/image"):].strip()
        if not rest:
            out("usage: /image PATH [question]")
            return True
        try:
            parts = shlex.split(rest)
        except ValueError:
            parts = rest.split()
        path, question = parts[0], " ".join(parts[1:])
        try:
            img = session.attach(path)
        except ValueError as e:
            out(f"[cannot use that image: {e}]")
            return True
        out(f"[attached {path} ({img.width}×{img.height})]")
        if question:
            out(f"assistant: {session.ask(question)}")
    elif line.startswith("/draw"):
        prompt = line[len("/draw"):].strip()
        if not prompt:
            out("usage: /draw PROMPT")
            return True
        _, paths = session.draw_images(prompt)
        out("[drew " + ", ".join(str(p) for p in paths) + "]")
    elif line.startswith("/"):
        out(f"[unknown command {line.split()[0]}; /help lists them]")
    else:
        out(f"assistant: {session.ask(line)}")
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unified_mllm.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="an export directory (<stage output_dir>/export)")
    p.add_argument("--out-dir", default="chat_images", help="where /draw saves its PNGs")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--cfg-scale", type=float, default=3.0)
    p.add_argument("--temperature", type=float, default=1.0, help="image-code sampling temperature")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from unified_mllm.inference import UnifiedPipeline

    try:
        pipe = UnifiedPipeline.from_pretrained(args.checkpoint, args.device, args.dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: cannot load {args.checkpoint}: {e}", file=sys.stderr)
        return 2
    session = ChatSession(pipe, Path(args.out_dir), DrawSettings(args.num_images, args.cfg_scale, args.temperature,
                                                                 args.top_k, args.top_p, args.seed),
                          args.max_new_tokens)
    interactive = sys.stdin.isatty()
    print(f"unified-mllm chat — {args.checkpoint}. /help for commands, /quit to leave.", flush=True)
    while True:
        try:
            line = input("you: " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if not handle(session, line, out=lambda s: print(s, flush=True)):
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
