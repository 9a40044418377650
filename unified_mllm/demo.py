"""Web demo (Gradio, the ``demo`` extra): chat about uploaded images, and a tab that draws from a prompt.

    pip install -e '.[demo]'      # or: bash scripts/setup_env.sh demo
    python -m unified_mllm.demo --checkpoint runs/quickstart/mixed/export [--host 127.0.0.1] [--port 7860]

Binds to 127.0.0.1 unless ``--host`` says otherwise (``--host 0.0.0.0`` exposes it to the network).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unified_mllm.inference.session import ChatSession, DrawSettings
from unified_mllm.tokens import IMAGE


def build_app(pipe, out_dir: Path, defaults: DrawSettings | None = None, max_new_tokens: int = 128):
    import gradio as gr

    defaults = defaults or DrawSettings()
    drawer = ChatSession(pipe, out_dir, defaults, max_new_tokens)

    def respond(text: str, image, history: list, state: dict):
        """One chat turn; ``state`` holds this browser's conversation (text + PIL images)."""
        text = (text or "").strip()
        history = list(history or [])
        if not text and image is None:
            return history, state, "", None
        if not text:
            text = "Describe the image."
        images = [image.convert("RGB")] if image is not None else []
        content = IMAGE * len(images) + ("\n" if images else "") + text.replace(IMAGE, "")
        messages = state["messages"] + [{"role": "user", "content": content, "images": images}]
        reply = pipe.chat(messages, max_new_tokens=max_new_tokens)
        state = {"messages": messages + [{"role": "assistant", "content": reply}]}
        shown = ("🖼️ " if images else "") + text
        history += [{"role": "user", "content": shown}, {"role": "assistant", "content": reply}]
        return history, state, "", None

    def clear():
        return [], {"messages": []}

    def draw(prompt: str, num_images: float, cfg_scale: float, temperature: float, top_k: float, top_p: float,
             seed: float):
        prompt = (prompt or "").strip()
        if not prompt:
            return [], "Type a prompt first."
        images, paths = drawer.draw_images(prompt, num_images=int(num_images), cfg_scale=float(cfg_scale),
                                           temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                                           seed=int(seed))
        stats = pipe.last_stats
        return images, (f"{len(images)} images in {stats.seconds:.1f} s "
                        f"({stats.image_tokens / max(stats.seconds, 1e-9):.0f} image tokens/s); saved to "
                        + ", ".join(str(p) for p in paths))

    with gr.Blocks(title="unified-mllm") as app:
        gr.Markdown("## unified-mllm — one model that answers about images and draws them")
        with gr.Tab("Chat"):
            state = gr.State({"messages": []})
            chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=360)
            with gr.Row():
                image = gr.Image(type="pil", label="Image (optional)", elem_id="chat-image", height=200)
                with gr.Column():
                    text = gr.Textbox(label="Message", placeholder="Ask about the image…", elem_id="chat-text")
                    send = gr.Button("Send", variant="primary", elem_id="chat-send")
                    reset = gr.Button("Clear conversation", elem_id="chat-clear")
            send.click(respond, [text, image, chatbot, state], [chatbot, state, text, image])
            text.submit(respond, [text, image, chatbot, state], [chatbot, state, text, image])
            reset.click(clear, None, [chatbot, state])
        with gr.Tab("Draw"):
            prompt = gr.Textbox(label="Prompt", placeholder="two red circles", elem_id="draw-prompt")
            with gr.Row():
                num = gr.Slider(1, 8, value=defaults.num_images, step=1, label="Images")
                cfg = gr.Slider(1.0, 10.0, value=defaults.cfg_scale, step=0.5, label="CFG scale")
                temp = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05, label="Temperature")
            with gr.Row():
                top_k = gr.Slider(0, 512, value=defaults.top_k, step=1, label="Top-k (0 = off)")
                top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p")
                seed = gr.Number(value=defaults.seed, precision=0, label="Seed")
            go = gr.Button("Draw", variant="primary", elem_id="draw-button")
            gallery = gr.Gallery(label="Images", columns=4, elem_id="draw-gallery")
            status = gr.Markdown(elem_id="draw-status")
            go.click(draw, [prompt, num, cfg, temp, top_k, top_p, seed], [gallery, status])
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unified_mllm.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="an export directory (<stage output_dir>/export)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--out-dir", default="demo_images", help="where drawings are saved")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--cfg-scale", type=float, default=3.0)
    p.add_argument("--num-images", type=int, default=4)
    args = p.parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: the web demo needs Gradio: pip install -e '.[demo]' (or bash scripts/setup_env.sh demo)",
              file=sys.stderr)
        return 2
    from unified_mllm.inference import UnifiedPipeline

    try:
        pipe = UnifiedPipeline.from_pretrained(args.checkpoint, args.device, args.dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: cannot load {args.checkpoint}: {e}", file=sys.stderr)
        return 2
    app = build_app(pipe, Path(args.out_dir), DrawSettings(num_images=args.num_images, cfg_scale=args.cfg_scale))
    print(f"serving on http://{args.host}:{args.port}", flush=True)
    app.launch(server_name=args.host, server_port=args.port, share=False, show_error=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
