"""Helpers of the browser tests: the system's Chromium, pages that record script errors, screenshots."""
from __future__ import annotations

import sys
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The security tests' loopback federation (with its lying site) is shared with these tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "security"))


def open_page(browser, url: str):
    """A fresh page that records script errors and console errors (a CSP violation shows as one)."""
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.on("console", lambda message: page.errors.append(message.text) if message.type == "error" else None)
    page.goto(url)
    return page


def screenshot(page, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path
