"""Screenshot of a dashboard page in headless Chromium (how docs/dashboard.png was made).

    python scripts/dashboard_screenshot.py OUTPUT_DIR/dashboard/index.html docs/dashboard.png [--latent N]

Needs the `playwright` package (dev extra) and a system Chromium (Debian: apt-get install chromium); no
browser is downloaded. Without --latent it opens the latent with the most firing tokens.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def densest_latent(index: Path) -> int:
    text = (index.parent / "data.js").read_text()
    data = json.loads(text.removeprefix("window.DASHBOARD_DATA = ").rstrip().removesuffix(";"))
    density = data["columns"]["density"]
    return max(range(len(density)), key=density.__getitem__)


def main() -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("index", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--latent", type=int, default=None)
    parser.add_argument("--search", default="", help="Text typed into the search box first.")
    args = parser.parse_args()
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        raise SystemExit("no chromium on PATH: apt-get install chromium")
    latent = args.latent if args.latent is not None else densest_latent(args.index)
    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(profile, executable_path=executable, headless=True,
                                                       args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 860})
        page = context.new_page()
        page.goto(args.index.resolve().as_uri() + f"#latent={latent}")
        page.locator("#detail h2").wait_for()
        if args.search:
            page.fill("#search", args.search)
        page.screenshot(path=str(args.png))
        context.close()
    print(args.png)


if __name__ == "__main__":
    main()
