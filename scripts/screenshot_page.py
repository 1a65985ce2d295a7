"""Take the README's screenshot of the web chat page (docs/web-chat.png).

Serves a model (default: the tiny random-weight image+text fixture, built in a temporary folder) on
loopback, opens ``/`` in Debian's headless Chromium through Playwright at a laptop's 1366 x 768, attaches
an image, asks a question, waits for the streamed reply and saves the screenshot. The tiny model's reply is
random text: the picture shows the page, not MedGemma's answers.

    .venv/bin/python scripts/screenshot_page.py [--model X.gguf --mmproj Y.gguf] [--out docs/web-chat.png]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def tiny_model(workdir: Path) -> tuple[Path, Path]:
    from medgemma_gguf.convert.converter import convert_checkpoint
    from medgemma_gguf.fixtures.tiny_checkpoint import build_tiny_checkpoint

    checkpoint = build_tiny_checkpoint(workdir / "tiny-medgemma", "mm-k256")
    result = convert_checkpoint(str(checkpoint), workdir / "gguf", outtype="f32", mmproj_type="f32", progress=False)
    return result.text_path, result.mmproj_path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--mmproj", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "web-chat.png")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    import numpy as np
    import uvicorn
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from medgemma_gguf.processes import free_port
    from medgemma_gguf.runtime.chat import load
    from medgemma_gguf.runtime.server import ServerLimits, create_app

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_path, mmproj_path = (args.model, args.mmproj) if args.model else tiny_model(workdir)
        model = load(model_path, mmproj_path, n_gpu_layers=0, n_ctx=2048, n_threads=2, n_parallel=2)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(model, limits=ServerLimits(max_tokens_limit=512)),
                                               host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        image = workdir / "chest-xray.png"
        yy, xx = np.mgrid[0:448, 0:448]
        ribs = (np.sin(yy / 9.0) * 40 + 120 - np.abs(xx - 224) / 3).clip(0, 255)
        Image.fromarray(ribs.astype(np.uint8)).save(image)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_FLAGS, headless=True)
                page = browser.new_page(viewport={"width": 1366, "height": 768})
                page.goto(f"http://127.0.0.1:{port}/")
                while page.evaluate("() => document.getElementById('status').textContent") != "ready":
                    time.sleep(0.05)
                page.select_option("#preset", "radiology")
                page.fill("#max-tokens", "48")
                page.fill("#temperature", "1")  # greedy makes the random model repeat one token (a blank page)
                page.dispatch_event("#temperature", "input")
                page.fill("#seed", "11")
                page.set_input_files("#file-input", [str(image)])
                while page.evaluate("() => document.querySelectorAll('#attachments img').length") < 1:
                    time.sleep(0.05)
                page.fill("#message", "Describe this X-ray")
                page.press("#message", "Enter")
                while "tokens" not in page.evaluate(
                        "() => document.querySelector('.message.assistant .stats')?.textContent || ''"):
                    time.sleep(0.05)
                page.fill("#message", "Is there a pneumothorax?")
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out))
                browser.close()
        finally:
            server.should_exit = True
            thread.join(timeout=30)
            model.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
