"""Open a report in a real headless browser (Debian's `chromium`): a screenshot and the rendered DOM, to
check that what vitquant writes renders, and to make the screenshot committed under benchmarks/results."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("no chromium found (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="vitquant-chromium-") as profile:
        # --no-sandbox: CI runs as root, where chromium refuses its sandbox; the page is our own file
        cmd = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               "--disable-extensions", f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)


def screenshot(html: str | Path, png: str | Path, width: int = 1200, height: int = 2000, timeout: float = 120) -> Path:
    """Render `html` at width×height CSS pixels into `png`."""
    png = Path(png).resolve()
    _run([f"--window-size={width},{height}", f"--screenshot={png}", Path(html).resolve().as_uri()], timeout)
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot to {png}")
    return png


def rendered_dom(html: str | Path, timeout: float = 120) -> str:
    """The DOM after chromium parsed and laid out `html`."""
    return _run(["--dump-dom", Path(html).resolve().as_uri()], timeout).stdout
