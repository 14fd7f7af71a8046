"""Take the docs' screenshot of the web page: a registry's tasks, one image routed with no task named.

Starts the page (``adaptkit_app.main.launch``) on a registry, drives Debian's chromium with Playwright (the ``dev``
extra), uploads an image, picks "Auto: which task?" and writes ``docs/assets/page.png``:

    python benchmarks/figures/screenshot_page.py --registry registry.db \
        --image ../shared/data/cifar10-mini/test/ship/0001.jpg

Any registry works; the docs' picture shows tasks trained on the packaged backbone (``adaptkit train --backbone
vit_cifar_tiny_patch4_32.adaptkit_c10 ...`` on digits and the folders of ``benchmarks/common/data.py``).
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", required=True, help="registry file or SQLAlchemy URL")
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--task", default="auto", help="the task to pick (default: Auto, which task?)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "assets" / "page.png")
    parser.add_argument("--width", type=int, default=1100)
    args = parser.parse_args()

    from playwright.sync_api import expect, sync_playwright

    from adaptkit_app.main import launch

    app = launch(args.registry, port=_port(), prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": args.width, "height": 640})
            page.set_default_timeout(120_000)
            page.goto(app.local_url)
            page.locator("#image input[type=file]").set_input_files(str(args.image))
            page.locator("#task input").click()
            name = "Auto: which task?" if args.task == "auto" else args.task
            page.get_by_role("option", name=name).first.click()
            expect(page.locator("#timing")).to_contain_text("predicted in", timeout=120_000)
            page.wait_for_timeout(500)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=False)
            browser.close()
    finally:
        app.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
