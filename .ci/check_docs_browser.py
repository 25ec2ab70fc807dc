"""Open the built documentation in headless chromium and check that its pages render with their figures.

Usage: python .ci/check_docs_browser.py docs/_build/html [screenshot-dir]

Serves the HTML over http on localhost (as a reader's browser gets it, not file://), opens the index, the
``hf.HessianOperator`` API page and the quickstart gallery page in Debian's chromium (through Playwright,
``executable_path=/usr/bin/chromium``), and fails (exit 1) when on any of them

- a request to the local server fails or answers 4xx/5xx (a missing figure, stylesheet or script),
- an ``<img>`` is not complete or has ``naturalWidth == 0`` (a broken or empty image),
- a page has fewer figures than it should, or lacks the headings and text it must show.

Each page's full-page screenshot is saved (default ``<html>/../screenshots``) for a person to look at.
"""

from __future__ import annotations

import functools
import http.server
import os
import sys
import tempfile
import threading

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip

# page -> (headings that must be there, text that must be there, minimum number of figures)
PAGES = {
    "index.html": (["hessianflow", "Concepts", "How-to", "Gallery", "Reference"], ["hf.HessianOperator"], 1),
    "api/hf.HessianOperator.html": (
        ["hf.HessianOperator"],
        # its own parameters' descriptions and its doctest example
        ["the finite-difference step relative to the parameters",
         ">>> H = HessianOperator(model, nn.MSELoss(), data=(X, y))"],  # fmt: skip
        0,
    ),
    "auto_examples/plot_quickstart.html": (
        ["Eigenvalues, trace, spectral density, per-layer table and loss landscape", "The spectral density",
         "Curvature per layer", "The loss along the top eigenvector"],  # fmt: skip
        ["max |lanczos - eigvalsh|", "fc1", "fc2"],
        3,
    ),
}

# the signature a page must show, parameter by parameter (the class's first signature line): the real
# parameters of HessianOperator, not **kwargs: the 11 explicit ones and **options
SIGNATURES = {
    "api/hf.HessianOperator.html": ["model=None", "criterion=None", "data=None", "dataloader", "params=None",
                                    "loss_fn", "reduction", "batch_weight", "backend", "fd_step", "objective",
                                    "**options"],  # fmt: skip
}

# every <img>: complete and decoded to a non-empty bitmap; figures are the gallery's and the page's own
IMAGES_JS = """() => Array.from(document.images).map(img => ({
    src: img.currentSrc || img.src, complete: img.complete, width: img.naturalWidth,
    figure: !img.closest('.sidebar-drawer, .sidebar-container, header, footer')
}))"""
HEADINGS_JS = "() => Array.from(document.querySelectorAll('h1, h2, h3, p.caption, .caption-text'))" \
    ".map(h => h.textContent.replace(/[\\u00b6#]/g, '').trim())"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(directory: str) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_QuietHandler, directory=directory)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def check_page(page, base: str, path: str, spec, shots: str) -> list[str]:
    headings, texts, min_figures = spec
    failed_requests: list[str] = []

    def on_failed(request):
        if request.url.startswith(base):
            failed_requests.append(f"{request.url} ({request.failure})")

    def on_response(response):
        if response.url.startswith(base) and response.status >= 400:
            failed_requests.append(f"{response.url} (HTTP {response.status})")

    page.on("requestfailed", on_failed)
    page.on("response", on_response)
    response = page.goto(base + path, wait_until="load")
    page.wait_for_load_state("networkidle")
    problems = [] if response is not None and response.ok else [f"{path}: HTTP {response.status if response else '?'}"]
    problems += [f"{path}: request failed: {r}" for r in failed_requests]
    images = page.evaluate(IMAGES_JS)
    broken = [i["src"] for i in images if not i["complete"] or i["width"] == 0]
    problems += [f"{path}: image not rendered: {src}" for src in broken]
    figures = [i for i in images if i["figure"] and i["complete"] and i["width"] > 0]
    if len(figures) < min_figures:
        problems.append(f"{path}: {len(figures)} figures rendered, expected at least {min_figures}")
    found = page.evaluate(HEADINGS_JS)
    problems += [f"{path}: no heading {h!r} (found {found[:12]})" for h in headings if h not in found]
    if path in SIGNATURES:
        signature = page.inner_text("dl.py > dt.sig")  # the first one: the page's class
        problems += [f"{path}: signature without {p!r}: {signature!r}" for p in SIGNATURES[path] if p not in signature]
    body = page.inner_text("body")
    problems += [f"{path}: text {t!r} not on the page" for t in texts if t not in body]
    shot = os.path.join(shots, path.replace("/", "_").replace(".html", ".png"))
    page.screenshot(path=shot, full_page=True)
    print(f"{path}: {len(images)} images ({len(figures)} figures, {len(broken)} broken), "
          f"{len(headings)} headings and {len(texts)} texts checked; screenshot {shot}")  # fmt: skip
    return problems


def main(html_dir: str, shots: str | None = None) -> int:
    from playwright.sync_api import sync_playwright

    html_dir = os.path.abspath(html_dir)
    shots = shots or os.path.join(os.path.dirname(html_dir), "screenshots")
    os.makedirs(shots, exist_ok=True)
    server, base = serve(html_dir)
    problems: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile, sync_playwright() as p:
            # a persistent context is how Playwright passes chromium a --user-data-dir of our own: a fresh one
            context = p.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=FLAGS, viewport={"width": 1280, "height": 900}
            )
            for path, spec in PAGES.items():
                page = context.new_page()
                problems += check_page(page, base, path, spec, shots)
                page.close()
            context.close()
    finally:
        server.shutdown()
    for line in problems:
        print("FAILED:", line)
    print(f"browser check: {len(PAGES)} pages, {'FAILED' if problems else 'all rendered with their figures'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
