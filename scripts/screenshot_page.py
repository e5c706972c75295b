"""Remake the README's picture of the search page: the default model over the demo collection, searched with a
demo cat, in headless Chromium (Debian's package, driven by Playwright: `pip install .[dev]`).

    python -m scripts.screenshot_page                  # from the repo root; writes docs/img/search-page.png
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from bench.launcher import Server

REPO = Path(__file__).resolve().parents[1]
KEY = "screenshot-key"  # the picture shows the key field filled (as dots), like a real session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "default"))
    parser.add_argument("--query", default=str(REPO / "demo" / "images" / "cat" / "0000.jpg"))
    parser.add_argument("--out", default=str(REPO / "docs" / "img" / "search-page.png"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as root:  # a fresh index: the demo collection embedded by this model
        env = {**os.environ, "CORINFOMAX_INDEX": f"{root}/index", "BENTOML_HOME": f"{root}/bentoml",
               "BENTOML_DO_NOT_TRACK": "True", "CORINFOMAX_MODEL": args.model, "CORINFOMAX_API_KEY": KEY,
               "CORINFOMAX_DEMO_DIR": str(REPO / "demo" / "images")}
        server = Server(env, Path(root) / "server.log").start()
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox", "--headless"])
                page = browser.new_page(viewport={"width": 1280, "height": 820})
                page.goto(f"{server.url}/ui/")
                page.fill("#key", KEY)
                page.locator("#key").blur()  # one change event, as a person leaving the field makes
                page.set_input_files("#file", args.query)
                page.wait_for_function("document.querySelectorAll('#results .result').length > 0 && "
                                       "document.querySelectorAll('#classes .bar').length > 0 && "
                                       "document.querySelectorAll('#stats dd').length > 0 && "
                                       "[...document.querySelectorAll('#results img')]"
                                       ".every((img) => img.complete && img.naturalWidth > 0)")
                page.screenshot(path=args.out)
                browser.close()
        finally:
            server.stop()
    print(args.out)


if __name__ == "__main__":
    main()
