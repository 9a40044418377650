"""The CLI chat and the web demo, driven as a user would: a piped terminal session, and a real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, python_cmd
from PIL import Image
from test_model import build, make_assets

from unified_mllm.model import save_pretrained
from unified_mllm.shapeworld.render import render
from unified_mllm.shapeworld.scene import place, random_specs

ARTIFACTS = Path(os.environ.get("UMLLM_TEST_ARTIFACTS", ROOT / "test-artifacts"))
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A tiny random model; UMLLM_DEMO_CHECKPOINT=DIR drives both demos against a trained export instead (e.g.
    the quickstart's runs/quickstart/mixed/export)."""
    if os.environ.get("UMLLM_DEMO_CHECKPOINT"):
        return Path(os.environ["UMLLM_DEMO_CHECKPOINT"]).resolve()
    root = tmp_path_factory.mktemp("demo")
    model, tok, _ = build(make_assets(root / "assets"))
    return save_pretrained(model, tok, root / "export")


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory) -> Path:
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("img") / "scene.png"
    render(place(rng, random_specs(rng, 2)), 64).save(path)
    return path


def test_cli_chat_session(export: Path, scene_png: Path, tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    script = "\n".join(["/help", "how many circles ?", f"/image {tmp_path / 'missing.png'}",
                        f"/image {tmp_path / 'broken.png'}", f"/image {scene_png} is there a red circle ?",
                        "and how many squares ?", "/draw a red circle", "/bogus", "/reset", "/quit"]) + "\n"
    out = subprocess.run(python_cmd("-m", "unified_mllm.chat", "--checkpoint", str(export), "--out-dir",
                                    str(tmp_path / "drawn"), "--num-images", "2", "--max-new-tokens", "4"),
                         input=script, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("  /draw PROMPT") for line in lines)
    assert sum(line.startswith("assistant: ") for line in lines) == 3  # the session went on after the bad images
    assert f"[cannot use that image: {tmp_path / 'missing.png'}: image file not found]" in lines
    assert any(line.startswith(f"[cannot use that image: {tmp_path / 'broken.png'}: unreadable image") for line in lines)
    drew = next(line for line in lines if line.startswith("[drew "))
    paths = [Path(p) for p in drew[len("[drew "):-1].split(", ")]
    side = json.loads((export / "wintok" / "config.json").read_text())["image_size"]
    assert len(paths) == 2 and all(Image.open(p).size == (side, side) for p in paths)
    assert "[unknown command /bogus; /help lists them]" in lines and "[conversation cleared]" in lines
    assert "Traceback" not in out.stderr


def test_cli_chat_bad_checkpoint_is_one_clear_error(tmp_path: Path) -> None:
    out = subprocess.run(python_cmd("-m", "unified_mllm.chat", "--checkpoint", str(tmp_path)), input="",
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "no unified_config.json; this is not a unified-mllm export" in out.stderr and "Traceback" not in out.stderr


def _browser_available() -> str | None:
    missing = [m for m in ("gradio", "playwright") if __import__("importlib").util.find_spec(m) is None]
    if missing:
        return f"missing Python packages {missing} (the demo and dev extras)"
    if shutil.which("chromium") is None:
        return "no chromium on PATH (Debian package chromium)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_web_demo_in_headless_chromium(export: Path, scene_png: Path, tmp_path: Path) -> None:
    why = _browser_available()
    if why:
        if os.environ.get("UMLLM_REQUIRE_BROWSER"):
            pytest.fail(f"UMLLM_REQUIRE_BROWSER is set but {why}")
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    port = _free_port()
    server = subprocess.Popen(python_cmd("-m", "unified_mllm.demo", "--checkpoint", str(export), "--port", str(port),
                                         "--out-dir", str(tmp_path / "drawn"), "--num-images", "3"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                assert time.time() < deadline, "the demo did not start within 120 s"
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.goto(url)
            page.wait_for_selector("#chat-text textarea", timeout=60_000)
            # upload, ask
            page.locator("#chat-image input[type=file]").set_input_files(str(scene_png))
            page.wait_for_selector("#chat-image img", timeout=30_000)
            page.locator("#chat-text textarea").fill("how many circles ?")
            page.locator("#chat-send").click()
            page.wait_for_function("document.querySelector('#chatbot').innerText.includes('how many circles ?')",
                                   timeout=60_000)
            page.wait_for_function("document.querySelectorAll('#chatbot .message-row, #chatbot .message').length >= 2",
                                   timeout=60_000)
            assert "🖼️ how many circles ?" in page.locator("#chatbot").inner_text()
            # draw
            page.get_by_role("tab", name="Draw").click()
            page.locator("#draw-prompt textarea").fill("a red circle")
            page.locator("#draw-button").click()
            page.wait_for_function("document.querySelectorAll('#draw-gallery img').length >= 3", timeout=120_000)
            status = page.locator("#draw-status").inner_text()
            assert status.startswith("3 images in") and "saved to" in status
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "web_demo.png"), full_page=True)
            browser.close()
        assert len(list((tmp_path / "drawn").glob("*.png"))) == 3
        assert (ARTIFACTS / "web_demo.png").stat().st_size > 10_000
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_web_demo_binds_to_localhost_by_default() -> None:
    out = subprocess.run(python_cmd("-m", "unified_mllm.demo", "--help"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "default 127.0.0.1" in out.stdout
