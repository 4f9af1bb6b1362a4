"""The playground page in a real browser: Debian's headless Chromium driven by Playwright.

Against the real servers (the tiny trained models of tests/conftest.py): upload or drop an image,
type a sentence, see the bars and the explanation; a wrong key shows a clear message; the key is
never stored. Then the same page through the real nginx proxy from the shared template, over
TLS, under the proxy's Content-Security-Policy: a policy that blocked the page's script, style,
calls or heatmap would show up as console errors and a page that never answers.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright

from serving.playground import CSP
from tests.conftest import API_KEY

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = os.environ.get("SERVABLE_PLAYGROUND_SCREENSHOTS")  # a folder: save the pages seen


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("the playground tests need Debian's chromium: `make apt` (apt-get install chromium)")
    with sync_playwright() as p:
        # root (CI, containers) needs --no-sandbox
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def _open(browser: Browser, url: str, **context) -> tuple[Page, list[str]]:
    page = browser.new_context(**context).new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(url)
    return page, problems


def _garment_png(image_run, scale: int = 4) -> tuple[bytes, tuple[int, int]]:
    """A real Fashion-MNIST test image, enlarged so the heatmap is visible."""
    pixels = image_run.splits.test_x[0]
    img = Image.fromarray(pixels).resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue(), img.size


def _shot(page: Page, name: str) -> None:
    if SCREENSHOTS:
        page.screenshot(path=str(Path(SCREENSHOTS) / name), full_page=True)


def _nothing_stored(page: Page, key: str = API_KEY) -> None:
    stored = page.evaluate("() => [localStorage.length, sessionStorage.length, document.cookie]")
    assert stored == [0, 0, ""]
    assert key not in page.url


def check_image_page(page: Page, png: bytes, size: tuple[int, int], key: str = API_KEY) -> None:
    page.fill("#api-key", key)
    page.set_input_files("#file", files=[{"name": "garment.png", "mimeType": "image/png", "buffer": png}])
    expect(page.locator("#status")).to_contain_text("Done", timeout=60_000)
    expect(page.locator("#bars .bar")).to_have_count(5)
    widths = page.locator("#bars .fill").evaluate_all("fills => fills.map(f => f.getBoundingClientRect().width)")
    assert widths[0] > 0 and widths == sorted(widths, reverse=True)  # bars drawn, longest first
    expect(page.locator("#heatmap")).to_be_visible()
    natural = page.eval_on_selector("#heatmap", "img => [img.complete, img.naturalWidth, img.naturalHeight]")
    assert natural == [True, *size]  # the overlay is a decoded PNG of the input's size
    assert re.search(r"\d", page.inner_text("#explained-label"))
    _nothing_stored(page, key)


def check_text_page(page: Page, text: str, key: str = API_KEY) -> None:
    page.fill("#api-key", key)
    page.fill("#text", text)
    page.click("#run-text")
    expect(page.locator("#status")).to_contain_text("Done", timeout=60_000)
    expect(page.locator("#bars .bar")).to_have_count(2)
    assert page.locator("#bars .fill").first.evaluate("f => f.getBoundingClientRect().width") > 0
    words = page.locator("#words span.word")
    expect(words).to_have_count(len(text.split()))
    assert page.inner_text("#words") == text  # the sentence, word for word, each coloured by its score
    scores = [float(s) for s in words.evaluate_all("spans => spans.map(s => s.dataset.score)")]
    assert any(s != 0 for s in scores)
    colours = words.evaluate_all("spans => spans.map(s => getComputedStyle(s).backgroundColor)")
    assert len(set(colours)) > 1
    _nothing_stored(page, key)


def test_image_page_upload_and_drop_show_bars_and_heatmap(browser, image_server, image_run):
    page, problems = _open(browser, image_server.url + "/playground")
    png, size = _garment_png(image_run)
    check_image_page(page, png, size)
    _shot(page, "playground-image.png")
    # Dropping a file does the same (a real DataTransfer with a File, dispatched on the drop zone).
    page.evaluate("() => { document.getElementById('heatmap').removeAttribute('src'); }")
    transfer = page.evaluate_handle(
        """(b64) => { const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                     const dt = new DataTransfer();
                     dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'})); return dt; }""",
        base64.b64encode(png).decode(),
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    expect(page.locator("#status")).to_contain_text("Done", timeout=60_000)
    assert page.eval_on_selector("#heatmap", "img => img.naturalWidth") == size[0]
    assert problems == []


def test_text_page_shows_label_bars_and_coloured_words(browser, text_server):
    page, problems = _open(browser, text_server.url + "/playground")
    check_text_page(page, "A warm, funny and beautifully acted film, though the ending drags.")
    _shot(page, "playground-text.png")
    assert problems == []


def test_a_wrong_or_missing_key_shows_a_clear_message(browser, text_server, image_server, image_run):
    page, _ = _open(browser, text_server.url + "/playground")
    page.click("#run-text")
    expect(page.locator("#status.error")).to_have_text("Enter your API key first.")
    page.fill("#api-key", "wrong-key-0000000000")
    page.click("#run-text")
    expect(page.locator("#status.error")).to_contain_text("API key was refused (401")
    expect(page.locator("#result")).to_be_hidden()
    page, _ = _open(browser, image_server.url + "/playground")
    page.fill("#api-key", "wrong-key-0000000000")
    png, _ = _garment_png(image_run)
    page.set_input_files("#file", files=[{"name": "g.png", "mimeType": "image/png", "buffer": png}])
    expect(page.locator("#status.error")).to_contain_text("API key was refused (401")
    _shot(page, "playground-wrong-key.png")
    assert "wrong-key-0000000000" not in image_server.log()


def test_page_and_assets_are_served_without_a_key_with_the_page_policy(image_server):
    import requests

    page = requests.get(image_server.url + "/playground", timeout=10)
    assert page.status_code == 200 and page.headers["content-security-policy"] == CSP
    assert 'data-kind="image"' in page.text and "https://" not in page.text  # no CDN
    for asset, ctype in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
        r = requests.get(f"{image_server.url}/playground/{asset}", timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith(ctype)
        assert "http://" not in r.text and "https://" not in r.text  # nothing loaded from elsewhere
    assert "localStorage" not in requests.get(image_server.url + "/playground/playground.js", timeout=10).text


# ---------------------------------------------------------------- through the proxy: TLS and its CSP


@pytest.fixture(scope="module")
def proxy(image_server, text_server, tmp_path_factory):
    """The real nginx from deploy/nginx/servable.conf.template, with TLS, in front of the test servers."""
    from deploy.local_stack import LocalStack

    stack = LocalStack(tmp_path_factory.mktemp("playground-proxy"), "unused", "unused", {}, replicas=0)
    stack.replicas = {"image": [image_server], "text": [text_server]}
    stack._start_nginx()
    try:
        yield stack
    finally:
        stack.nginx.stop()


def test_the_page_works_through_the_proxy_over_tls_under_its_csp(browser, proxy, image_run):
    import requests

    r = requests.get(proxy.proxy_url + "/image/playground", timeout=10, verify=proxy.ca_file)
    # nginx's header and the replica's (requests joins repeated headers with ", "): both the page policy
    assert {p.strip() for p in re.split(r",\s*(?=default-src)", r.headers["content-security-policy"])} == {CSP}
    api = requests.get(proxy.proxy_url + "/image/info", headers={"x-api-key": API_KEY}, timeout=10,
                       verify=proxy.ca_file)  # fmt: skip
    assert api.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"  # elsewhere: strict
    # The browser does not know the stack's own CA: accept its certificate, keep every other check.
    png, size = _garment_png(image_run)
    page, problems = _open(browser, proxy.proxy_url + "/image/playground", ignore_https_errors=True)
    check_image_page(page, png, size)
    assert problems == []
    page, problems = _open(browser, proxy.proxy_url + "/text/playground", ignore_https_errors=True)
    check_text_page(page, "Dull, predictable and far too long.")
    assert problems == []
