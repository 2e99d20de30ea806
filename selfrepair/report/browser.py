"""Open a report in a local headless Chromium (no network): the rendered DOM, or a PNG screenshot.

Used by the tests and to take the README's screenshot. Chromium is found as
``$SELFREPAIR_CHROMIUM``, then ``chromium``, ``chromium-browser``,
``google-chrome`` on the PATH (the set-up installs ``/usr/bin/chromium`` for
kaleido's PNG export).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Union

__all__ = ["find_chromium", "dump_dom", "screenshot", "element_screenshot"]

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> Optional[str]:
    """Path of a Chromium/Chrome executable, or None."""
    env = os.environ.get("SELFREPAIR_CHROMIUM")
    if env and Path(env).is_file():
        return env
    for name in CANDIDATES:
        p = shutil.which(name)
        if p:
            return p
    return None


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("no Chromium/Chrome found (install one, e.g. apt-get install -y chromium, or set "
                                "SELFREPAIR_CHROMIUM)")
    with tempfile.TemporaryDirectory(prefix="selfrepair-chromium-") as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
               "--disable-extensions", "--disable-background-networking", f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _url(page: Union[str, Path], fragment: str = "") -> str:
    url = Path(page).resolve().as_uri()
    return url + ("#" + fragment.lstrip("#") if fragment else "")


def dump_dom(page: Union[str, Path], fragment: str = "", *, budget_ms: int = 20000, timeout: float = 180) -> str:
    """The DOM of ``page`` after its scripts ran (``--virtual-time-budget`` ms of page time), as HTML text."""
    r = _run([f"--virtual-time-budget={int(budget_ms)}", "--dump-dom", _url(page, fragment)], timeout)
    if r.returncode != 0 or not r.stdout.strip():
        raise RuntimeError(f"chromium --dump-dom failed (exit {r.returncode}): {r.stderr.strip()[-500:]}")
    return r.stdout


def screenshot(page: Union[str, Path], png: Union[str, Path], *, width: int = 1400, height: int = 1500,
               fragment: str = "", budget_ms: int = 20000, timeout: float = 180) -> Path:
    """A ``width`` x ``height`` PNG of the top of ``page`` once its scripts ran."""
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    r = _run([f"--window-size={int(width)},{int(height)}", f"--virtual-time-budget={int(budget_ms)}",
              f"--screenshot={png.resolve()}", _url(page, fragment)], timeout)
    if r.returncode != 0 or not png.is_file():
        raise RuntimeError(f"chromium --screenshot failed (exit {r.returncode}): {r.stderr.strip()[-500:]}")
    return png


def element_screenshot(page: Union[str, Path], png: Union[str, Path], element_id: str, *, fragment: str = "",
                       width: int = 1400, timeout_ms: int = 120_000) -> Path:
    """A PNG of one element of ``page`` (e.g. ``block-groups``: the groups table and its drill-down) after the
    page is ready and ``fragment`` applied; needs Playwright (``pip install playwright``), driving the local
    Chromium (no browser download)."""
    from playwright.sync_api import sync_playwright  # optional: a test extra, only for screenshots

    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("no Chromium/Chrome found (install one, or set SELFREPAIR_CHROMIUM)")
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        try:
            pg = browser.new_page(viewport={"width": int(width), "height": 1000})
            pg.route("http*://**", lambda route: route.abort())  # offline, whatever the page asks for
            pg.goto(_url(page, fragment))
            pg.wait_for_selector("body[data-ready='1']", timeout=timeout_ms)
            pg.locator(f"#{element_id}").screenshot(path=str(png))
        finally:
            browser.close()
    return png
