"""Screenshots of the playground page against the registered models, in Debian's Chromium (Playwright):
`python -m loadtest.playground_shots` -> docs/img/playground-{image,text}.png.

Starts both services on free ports with a throw-away key, uses the page as a person would (drops a
Fashion-MNIST test image, types a sentence), waits for the explanation and saves the pages.
"""

from __future__ import annotations

import argparse
import io
import secrets
import sys
import tempfile
from pathlib import Path

from PIL import Image

from deploy import launch
from servable.idx import read_idx

FASHION_MNIST_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
SENTENCE = "A warm, funny and beautifully acted film, though the ending drags."


def garment_png(index: int, scale: int = 8) -> bytes:
    pixels = read_idx(FASHION_MNIST_TEST)[index]
    img = Image.fromarray(pixels).resize((28 * scale, 28 * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    from playwright.sync_api import expect, sync_playwright

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    parser.add_argument("--image-index", type=int, default=0, help="Fashion-MNIST test image shown")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    key = "shots-" + secrets.token_hex(8)
    servers = {}
    with tempfile.TemporaryDirectory(prefix="playground-shots-") as logs:
        try:
            for kind, target in launch.SERVICES.items():
                servers[kind] = launch.start_ready(target, {"SERVABLE_AUTH_KEYS": f"shots:{key}"},
                                                   log_path=Path(logs) / f"{kind}.log")  # fmt: skip
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 900, "height": 900})
                page.goto(servers["image"].url + "/playground")
                page.fill("#api-key", key)
                png = garment_png(args.image_index)
                page.set_input_files("#file", files=[{"name": "garment.png", "mimeType": "image/png", "buffer": png}])
                expect(page.locator("#status")).to_contain_text("Done", timeout=60_000)
                page.screenshot(path=str(args.out / "playground-image.png"), full_page=True)
                page.goto(servers["text"].url + "/playground")
                page.fill("#api-key", key)
                page.fill("#text", SENTENCE)
                page.click("#run-text")
                expect(page.locator("#status")).to_contain_text("Done", timeout=60_000)
                page.screenshot(path=str(args.out / "playground-text.png"), full_page=True)
                browser.close()
        finally:
            for server in servers.values():
                server.stop()
    print(f"wrote {args.out / 'playground-image.png'} and {args.out / 'playground-text.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
