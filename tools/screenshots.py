"""Build the documentation site, serve it on localhost and screenshot pages with headless Chromium.

    python tools/screenshots.py [--out site-screenshots] [--chromium chromium]

Takes the home page, a method page and the API reference (Debian: ``apt-get install chromium``).
Not part of the test suite (the suite runs ``mkdocs build --strict``); look at the pictures: rendered
pages, no raw Markdown, plots visible.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = {"home": "", "method-pitome": "methods/pitome/", "api": "api/", "results": "results/"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "site-screenshots")
    p.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    p.add_argument("--size", default="1280,2000", help="window width,height in pixels")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                       check=True)
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        args.out.mkdir(parents=True, exist_ok=True)
        try:
            for name, path in PAGES.items():
                shot = args.out / f"{name}.png"
                subprocess.run([args.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                f"--window-size={args.size}", f"--screenshot={shot}", base + path],
                               check=True, capture_output=True, timeout=120)
                print(f"{base + path} -> {shot}")
        finally:
            server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
